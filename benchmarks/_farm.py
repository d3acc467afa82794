"""A private farm for one benchmark: its own FARM_HOME in a temporary folder, the embedded
broker on a unix socket, a file store, and worker processes started and stopped on demand.

    with LocalFarm("overhead") as farm:
        farm.start_workers(["w1"], kind="farm", max_jobs=40)   # `farm worker`, real pipelines
        farm.wait_ready(["w1"])
        ...
    # every worker process and the broker are stopped, the folder removed, even on error

Workers run as separate processes (each in its own session, so a stop reaches its children),
so they compete over Redis and the store the way a real fleet does.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path
from types import TracebackType
from typing import Any
from urllib.parse import unquote, urlparse

from farm import broker, fleet, procs, tally
from farm.keys import record_key
from farm.lifecycle import FINAL_STATES
from farm.settings import Settings
from farm.store import Store, open_store

ROOT = Path(__file__).resolve().parent.parent


def code_version() -> str:
    """The commit measured, with "-dirty" when the working tree had changes other than the
    benchmarks' own results (a run after another rewrites them)."""
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT,
                              capture_output=True, text=True, timeout=10).stdout.strip()
        changed = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no", "--",
                                  ".", ":(exclude)benchmarks/results"], cwd=ROOT,
                                 capture_output=True, text=True, timeout=10).stdout.strip()
    except OSError:
        return "unknown"
    return (head + ("-dirty" if changed else "")) if head else "unknown"


class BenchError(RuntimeError):
    """A benchmark could not run (a worker died, a batch did not finish in time)."""


class LocalFarm:
    def __init__(self, label: str) -> None:
        self.tmp = Path(tempfile.mkdtemp(prefix=f"farm-bench-{label}-"))
        self.home = self.tmp / "home"
        self.logs = self.tmp / "logs"
        self.logs.mkdir(parents=True)
        env = {k: v for k, v in os.environ.items() if not k.startswith(("FARM_", "AWS_"))}
        # FARM_THREADS=1: one torch thread per worker, as CPU workers run by default
        env.update({"FARM_HOME": str(self.home), "FARM_THREADS": "1", "PYTHONUNBUFFERED": "1",
                    "HF_HUB_OFFLINE": "1"})
        self.env = env
        self.settings = Settings.load(env=env)
        self.procs: dict[str, subprocess.Popen[bytes]] = {}
        # commands this process sends while a batch runs, so they can be taken out of counts
        self.own_commands: Counter[str] = Counter()

    # -- life ------------------------------------------------------------------------------

    def __enter__(self) -> LocalFarm:
        try:
            broker.ensure_broker(self.settings)
            broker.wait_for_broker(self.settings)
            self.redis = broker.redis_client(self.settings)
            self.store: Store = open_store(self.settings)
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        if exc is not None:  # the logs go with the folder: show what the workers said
            for log in sorted(self.logs.glob("*.log")):
                print(f"-- {log.name}: {self.log_tail(log.stem, 20)}", file=sys.stderr)
        self.close()

    def close(self) -> None:
        try:
            self.stop_workers(list(self.procs), grace=10.0)
        finally:
            try:
                broker.stop_broker(self.settings)
            finally:
                shutil.rmtree(self.tmp, ignore_errors=True)

    # -- workers ---------------------------------------------------------------------------

    def start_workers(self, names: list[str], *, kind: str, max_jobs: int | None = None,
                      stats_dir: Path | None = None) -> None:
        """kind "farm": `farm worker --device cpu` (tiny-sdxl through diffusers);
        kind "standin": benchmarks/_standin_worker.py (worker/standin.py, no diffusion);
        kind "plain": benchmarks/_plain_celery.py (plain Celery, the same images, no farm)."""
        for name in names:
            if kind == "farm":
                cmd = [sys.executable, "-m", "farm.cli.main", "worker", "--device", "cpu",
                       "--name", name]
            elif kind == "standin":
                cmd = [sys.executable, "-m", "benchmarks._standin_worker", "--name", name]
                if stats_dir is not None:
                    cmd += ["--stats", str(stats_dir / f"{name}.json")]
            elif kind == "plain":
                cmd = [sys.executable, "-m", "benchmarks._plain_celery", "--name", name]
            else:
                raise ValueError(f"kind must be farm, standin or plain, got {kind!r}")
            if max_jobs is not None:
                cmd += ["--max-jobs", str(max_jobs)]
            with open(self.logs / f"{name}.log", "ab") as log:
                self.procs[name] = subprocess.Popen(
                    cmd, cwd=ROOT, env=self.env, stdout=log, stderr=subprocess.STDOUT,
                    stdin=subprocess.DEVNULL, start_new_session=True)

    def wait_ready(self, names: list[str], timeout: float = 180.0) -> float:
        """Wait until every named worker's heartbeat says "ready"; returns the seconds waited."""
        start = time.monotonic()
        while True:
            ready = {w.name for w in fleet.live_workers(self.redis)
                     if w.state == fleet.WorkerState.READY}
            if set(names) <= ready:
                return time.monotonic() - start
            self._check_alive(names)
            if time.monotonic() - start > timeout:
                raise BenchError(f"workers {sorted(set(names) - ready)} not ready after "
                                 f"{timeout:g} s; logs in {self.logs}")
            time.sleep(0.1)

    def wait_consuming(self, names: list[str], timeout: float = 30.0) -> None:
        """Wait until the named workers' consumers block in BRPOP: a worker reports ready just
        before its Celery consumer connects, and that start-up (HELLO, PSUBSCRIBE, the unacked
        restore, ...) must not be counted as the first jobs' cost."""
        start = time.monotonic()
        while True:
            clients = self.redis.client_list()
            if sum(1 for c in clients if c.get("cmd") == "brpop") >= len(names):
                break
            self._check_alive(names)
            if time.monotonic() - start > timeout:
                raise BenchError(f"workers {names} not consuming after {timeout:g} s")
            time.sleep(0.05)
        time.sleep(1.0)  # the last start-up commands follow the first BRPOP

    def cpu_split(self, names: list[str]) -> tuple[float, float]:
        """(user, system) CPU seconds the named worker processes have used so far: system is
        the kernel's work for them (file creation, sockets, scheduling)."""
        user = system = 0
        for name in names:
            with open(f"/proc/{self.procs[name].pid}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
            user += int(fields[11])  # utime, stime (fields 14, 15)
            system += int(fields[12])
        tick = os.sysconf("SC_CLK_TCK")
        return user / tick, system / tick

    def broker_cpu_seconds(self) -> float:
        info = self.redis.info("cpu")
        self.own_commands["info"] += 1
        return float(info["used_cpu_sys"]) + float(info["used_cpu_user"])

    def jobs_final(self, batches: list[str]) -> int:
        """Jobs of these batches with a final record, as their tallies count them (farm/tally.py;
        one HMGET per batch, in one round trip): what a worker writes with each job's end, so
        waiting on it adds no command to the workers' own."""
        finals = ["#" + s.value for s in FINAL_STATES]
        with self.redis.pipeline(transaction=False) as pipe:
            for batch in batches:
                pipe.hmget(tally.tally_key(batch), finals)
            got = pipe.execute()
        self.own_commands["hmget"] += len(batches)
        return sum(int(v or 0) for row in got for v in row)

    def wait_batches(self, names: list[str], batches: list[str], jobs: int,
                     timeout: float = 300.0, interval: float = 0.01) -> None:
        """Wait until `jobs` jobs of `batches` are final; the named workers must stay alive."""
        start = time.monotonic()
        while self.jobs_final(batches) < jobs:
            self._check_alive(names)
            if time.monotonic() - start > timeout:
                raise BenchError(f"workers {names} finished {self.jobs_final(batches)} of "
                                 f"{jobs} jobs in {timeout:g} s; logs in {self.logs}")
            time.sleep(interval)

    def stop_workers(self, names: list[str], grace: float = 30.0) -> None:
        """SIGTERM (a warm shutdown), then SIGKILL after `grace` seconds; always reaps."""
        procs.stop_group([self.procs.pop(n) for n in names if n in self.procs], grace)

    def _check_alive(self, names: list[str]) -> None:
        for name in names:
            proc = self.procs.get(name)
            if proc is not None and proc.poll() is not None:
                raise BenchError(f"worker {name} exited with {proc.returncode}: "
                                 f"{self.log_tail(name)}")

    def log_tail(self, name: str, lines: int = 8) -> str:
        try:
            text = (self.logs / f"{name}.log").read_text(errors="replace")
        except OSError:
            return "(no log)"
        return " | ".join(text.strip().splitlines()[-lines:])

    # -- what the store and Redis say ------------------------------------------------------

    def store_root(self) -> Path:
        return Path(unquote(urlparse(self.settings.effective_store_url).path))

    def job_times(self, batch: str, job_ids: list[str]) -> list[dict[str, float]]:
        """Per job: started_at, finished_at, render_s, write_s, total_s from its record, and
        written_at, when its final record reached the store (the file's modification time)."""
        out = []
        for job in job_ids:
            path = self.store_root() / record_key(batch, job)
            record = json.loads(path.read_bytes())
            if record.get("state") != "succeeded":
                raise BenchError(f"job {job} is {record.get('state')}: {record.get('error')}")
            timings = record.get("timings") or {}
            out.append({"started_at": float(record["started_at"]),
                        "finished_at": float(record["finished_at"]),
                        "written_at": path.stat().st_mtime,
                        "render_s": float(timings["render_s"]),
                        "write_s": float(timings["write_s"]),
                        "total_s": float(timings["total_s"])})
        return out

    def command_calls(self) -> Counter[str]:
        """Calls per Redis command since the server started (INFO commandstats)."""
        stats: dict[str, Any] = self.redis.info("commandstats")
        self.own_commands["info"] += 1
        return Counter({name.removeprefix("cmdstat_"): int(v["calls"])
                        for name, v in stats.items() if isinstance(v, dict)})
