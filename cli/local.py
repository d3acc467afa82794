"""The embedded farm on one machine: `farm up` starts the broker and N worker processes in the
background, `farm down` stops them all. Worker processes are recorded in FARM_HOME/run/farm.json.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from farm import broker, fleet, procs
from farm.errors import FarmError
from farm.settings import Settings


@dataclass(frozen=True)
class LocalWorker:
    pid: int
    name: str
    log: str


def state_file(settings: Settings) -> Path:
    return settings.run_dir / "farm.json"


def read_workers(settings: Settings) -> list[LocalWorker]:
    try:
        data = json.loads(state_file(settings).read_text())
    except (FileNotFoundError, ValueError):
        return []
    return [LocalWorker(**w) for w in data.get("workers", [])]


def is_worker(worker: LocalWorker) -> bool:
    """Whether `worker.pid` still runs that farm worker (its command line names it). Where the
    system will not show its command line (not ours to read), trust the state file."""
    args = procs.command_line(worker.pid)
    return args is None or ("worker" in args and worker.name in args)


alive = procs.alive


def running_workers(settings: Settings) -> list[LocalWorker]:
    return [w for w in read_workers(settings) if alive(w.pid)]


def up(settings: Settings, *, workers: int, model_names: list[str], device: str,
       echo: Callable[[str], None], timeout: float = 600.0,
       vram: list[str] | None = None) -> list[LocalWorker]:
    """Start the broker (when embedded) and `workers` background workers; wait until ready."""
    broker.ensure_broker(settings)
    broker.wait_for_broker(settings)
    settings.log_dir.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ)
    env["FARM_HOME"] = str(settings.home)
    started: list[LocalWorker] = []
    stamp = time.strftime("%Y%m%d-%H%M%S")
    for i in range(workers):
        name = f"local-{i + 1}"
        log_path = settings.log_dir / f"worker-{i + 1}-{stamp}.log"
        cmd = [sys.executable, "-m", "farm.cli.main", "worker", "--name", name, "--device", device]
        for m in model_names:
            cmd += ["--model", m]
        if vram:
            cmd += ["--vram", vram[i % len(vram)]]
        if settings.metrics_port:
            # one port each on this machine: FARM_METRICS_PORT, the next one, and so on
            cmd += ["--metrics-port", str(settings.metrics_port + i)]
        with open(log_path, "ab") as log:
            proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT,
                                    stdin=subprocess.DEVNULL, env=env, start_new_session=True)
        started.append(LocalWorker(pid=proc.pid, name=name, log=str(log_path)))
    state_file(settings).write_text(json.dumps(
        {"started_at": time.time(), "workers": [w.__dict__ for w in started]}, indent=2))
    _wait_ready(settings, started, echo, timeout)
    return started


def _wait_ready(settings: Settings, started: list[LocalWorker], echo: Callable[[str], None],
                timeout: float) -> None:
    client = broker.redis_client(settings)
    deadline = time.monotonic() + timeout
    names = {w.name for w in started}
    shown = -1
    while True:
        ready = {w.name for w in fleet.live_workers(client)
                 if w.name in names and w.state == fleet.WorkerState.READY}
        if len(ready) != shown:
            shown = len(ready)
            echo(f"workers ready: {shown}/{len(started)}")
        if ready == names:
            return
        for w in started:
            if not alive(w.pid):
                tail = _tail(Path(w.log))
                stop_workers(settings, started)
                raise FarmError(f"worker {w.name} exited while starting; last lines of "
                                f"{w.log}: {tail}")
        if time.monotonic() > deadline:
            stop_workers(settings, started)
            raise FarmError(f"workers were not ready after {timeout:g} s; see {settings.log_dir}")
        time.sleep(0.25)


def stop_workers(settings: Settings, workers: list[LocalWorker], grace: float = 60.0) -> int:
    """SIGTERM (warm shutdown: the current job finishes), then SIGKILL after `grace` s.
    Only processes that are still the workers `up` started: a pid is reused once it exits."""
    live = [w for w in workers if alive(w.pid) and is_worker(w)]
    for w in live:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(w.pid, signal.SIGTERM)
    deadline = time.monotonic() + grace
    while any(alive(w.pid) for w in live) and time.monotonic() < deadline:
        _reap()
        time.sleep(0.1)
    for w in live:
        if alive(w.pid):
            with contextlib.suppress(ProcessLookupError):
                os.killpg(w.pid, signal.SIGKILL)
    _reap()
    with contextlib.suppress(FileNotFoundError):
        state_file(settings).unlink()
    return len(live)


def down(settings: Settings) -> tuple[int, bool]:
    """Stop every local worker and the embedded broker. Returns (workers stopped, broker?)."""
    stopped = stop_workers(settings, read_workers(settings))
    return stopped, broker.stop_broker(settings)


def _reap() -> None:
    """Collect exited children of this process (when `up` and `down` run in one process)."""
    with contextlib.suppress(ChildProcessError):
        while os.waitpid(-1, os.WNOHANG)[0]:
            pass


def _tail(path: Path, lines: int = 5) -> str:
    try:
        return " | ".join(path.read_text(errors="replace").strip().splitlines()[-lines:])
    except OSError:
        return "(no log)"
