"""A new worker process from start to ready, split into pull, load and compile/warm, and the pull
throughput of parallel ranged GETs against one single-stream GET of the same object.

Cold starts (tiny model on CPU, regional compile (`compile_repeated_blocks`: the fastest cold
compile measured here, python -m benchmarks compile), one bucket: its CFG-on and CFG-off
graphs), each a
fresh process with an empty local inductor cache, the store an S3 server (s3rver, 20 ms added to
every request), the broker the Redis on 127.0.0.1:6379 (db 14):

    nothing cached       no catalog, nothing on disk: the model is made where it runs (built,
                         the stand-in for a Hub download), compiled from nothing
    in store, not disk   the model pushed to the store's catalog, the machine's cache empty:
                         pulled, loaded, compiled from nothing
    on disk + cache      the machine's cache holds the model and the store holds the compile
                         artefacts the run before saved: loaded, compiled from the fleet cache

*process+broker s* is the rest of the start outside pull, load and compile (interpreter,
imports, broker); each row keeps a timeline of the worker's own lines.

Pull throughput: one 128 MiB blob fetched by farm/blobs.py with one GET (one stream), then with
its ranged GETs at once, in the same run; through a proxy that caps each connection at
STREAM_CAP bytes/s, as S3 serves each connection at a bounded rate (tens of MB/s) however fast
the link, and without the cap (localhost: the server's and the client's CPU set the pace).
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import os
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from benchmarks._stats import machine_busy, table

SLOW = True  # three cold workers, two of them compiling from nothing: minutes on a CPU
BLOB_BYTES = 128 << 20
STREAM_CAP = 8_000_000  # bytes/s per connection through the proxy
LATENCY = 0.02
COMPILE = "regional"
REDIS_URL = os.environ.get("BENCH_REDIS_URL", "redis://127.0.0.1:6379/14")


# -- a proxy capping each connection's bytes per second ------------------------------------------


@contextlib.contextmanager
def capped(port: int, cap: float) -> Iterator[int]:
    """A TCP proxy to 127.0.0.1:`port` sending each connection's answers at `cap` bytes/s."""
    loop = asyncio.new_event_loop()
    ready = threading.Event()
    box: dict[str, Any] = {}

    async def pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                   rate: float | None) -> None:
        start, sent = time.monotonic(), 0
        try:
            while chunk := await reader.read(64 << 10):
                writer.write(chunk)
                await writer.drain()
                if rate:
                    sent += len(chunk)
                    ahead = sent / rate - (time.monotonic() - start)
                    if ahead > 0:
                        await asyncio.sleep(ahead)
        except (ConnectionError, OSError):
            pass
        finally:
            with contextlib.suppress(Exception):
                writer.close()

    async def handle(client_r: asyncio.StreamReader, client_w: asyncio.StreamWriter) -> None:
        server_r, server_w = await asyncio.open_connection("127.0.0.1", port)
        with contextlib.suppress(asyncio.CancelledError):
            await asyncio.gather(pipe(client_r, server_w, None), pipe(server_r, client_w, cap))

    async def serve() -> None:
        server = await asyncio.start_server(handle, "127.0.0.1", 0)
        box["port"] = server.sockets[0].getsockname()[1]
        box["server"] = server
        ready.set()
        with contextlib.suppress(asyncio.CancelledError):
            async with server:
                await server.serve_forever()
        open_connections = asyncio.all_tasks() - {asyncio.current_task()}
        for task in open_connections:
            task.cancel()
        await asyncio.gather(*open_connections, return_exceptions=True)

    thread = threading.Thread(target=lambda: loop.run_until_complete(serve()), daemon=True)
    thread.start()
    ready.wait(10)
    try:
        yield int(box["port"])
    finally:
        loop.call_soon_threadsafe(box["server"].close)
        thread.join(10)


# -- pull throughput ------------------------------------------------------------------------


def _store(endpoint: str, prefix: str, home: Path) -> Any:
    from farm.settings import Settings
    from farm.store import open_store

    return open_store(Settings.load(env={"FARM_STORE_URL": f"s3://bench/{prefix}",
                                         "FARM_S3_ENDPOINT_URL": endpoint,
                                         "FARM_HOME": str(home)}))


def pull_throughput(endpoint: str, port: int) -> list[dict[str, Any]]:
    from farm import blobs

    work = Path(tempfile.mkdtemp(prefix="farm-bench-pull-"))
    try:
        source = work / "blob"
        source.write_bytes(os.urandom(BLOB_BYTES))
        digest = blobs.file_sha256(source)
        blobs.upload(_store(endpoint, "pull", work), source, digest)
        rows = []
        for label, cap in (("capped", STREAM_CAP), ("uncapped", None)):
            with contextlib.ExitStack() as stack:
                url = endpoint if cap is None else \
                    f"http://127.0.0.1:{stack.enter_context(capped(port, cap))}"
                store = _store(url, "pull", work)
                timings = {}
                for mode, threads, part in (("single", 1, BLOB_BYTES),
                                            ("parallel", blobs.THREADS, blobs.PART_BYTES)):
                    out = work / f"{label}-{mode}"
                    t0 = time.perf_counter()
                    blobs.fetch(store, digest, BLOB_BYTES, out, threads=threads,
                                part_bytes=part)
                    timings[mode] = time.perf_counter() - t0
                    out.unlink()
            rows.append({"link": label, "stream_cap_bytes_s": cap,
                         "single_s": round(timings["single"], 2),
                         "parallel_s": round(timings["parallel"], 2),
                         "single_mb_s": round(BLOB_BYTES / timings["single"] / 1e6, 1),
                         "parallel_mb_s": round(BLOB_BYTES / timings["parallel"] / 1e6, 1),
                         "ratio": round(timings["single"] / timings["parallel"], 2)})
        return rows
    finally:
        shutil.rmtree(work, ignore_errors=True)


# -- cold starts ----------------------------------------------------------------------------


def _worker(env: dict[str, str], *, device: str = "cpu", model: str = "tiny-sdxl",
            backend: str = COMPILE) -> dict[str, Any]:
    """Start `farm worker`, read its lines as they come, stop it once ready."""
    t0 = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-m", "farm.cli.main", "worker", "--device", device,
                             "--model", model, "--compile", backend, "--name", "cold"],
                            env=env, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL,
                            text=True)
    lines: collections.deque[str] = collections.deque(maxlen=20)  # the last, for a failure
    pulled: list[str] = []
    assert proc.stderr is not None
    found: dict[str, Any] = {"pull_s": 0.0, "pulled_mb": 0.0}
    timeline: list[str] = []   # when each of the worker's own lines came, from process start
    for line in proc.stderr:
        now = time.perf_counter() - t0
        lines.append(line)
        if line.startswith("worker ") or re.search(r"model \S+: ", line):
            timeline.append(f"{now:.1f} {line.strip()[:120]}")
        # one line per model the load pulls (a profile's VAEs too): their sum
        if m := re.search(r"model (\S+): .*(pulled \d+ blobs \(([0-9.]+) MB\)|from the "
                          r"machine's cache) in ([0-9.]+) s", line):
            found["pull_s"] += float(m[4])
            found["pulled_mb"] += float(m[3] or 0)
            pulled.append(f"{m[1]}: {m[2]}")
        elif m := re.search(r"loaded in ([0-9.]+) s", line):
            found["load_total_s"] = float(m[1])
        elif m := re.search(r"warmed \d+ bucket\(s\) in ([0-9.]+) s \(\w+, fleet cache "
                            r"(\w+)", line):
            found["compile_s"], found["compile_cache"] = float(m[1]), m[2]
        elif ": ready (" in line:
            found["ready_s"] = now
            break
    proc.terminate()
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(60)
    if proc.poll() is None:
        proc.kill()
    if "ready_s" not in found:
        raise RuntimeError(f"the worker did not become ready (exit {proc.poll()}):\n"
                           + "".join(lines))
    found["pulled"] = "; ".join(pulled) or "-"
    found["timeline"] = timeline
    found["load_s"] = found.pop("load_total_s") - found["pull_s"]
    found["start_s"] = found["ready_s"] - found["load_s"] - found["pull_s"] - found["compile_s"]
    return found


def cold_starts(endpoint: str) -> list[dict[str, Any]]:
    import redis

    from farm.worker import tiny

    work = Path(tempfile.mkdtemp(prefix="farm-bench-cold-"))
    base = {k: v for k, v in os.environ.items() if not k.startswith("FARM_")}  # with AWS_*
    base.update({"FARM_BROKER_URL": REDIS_URL, "FARM_S3_ENDPOINT_URL": endpoint,
                 "FARM_BUCKETS": "128x128", "FARM_THREADS": "1", "HF_HUB_OFFLINE": "1",
                 "PYTHONWARNINGS": "ignore"})
    rows: list[dict[str, Any]] = []
    try:
        # the source a push starts from: the tiny model, built once here
        source = work / "source" / "tiny-sdxl"
        tiny.build_tiny("tiny-sdxl", source)
        pushed = _store(endpoint, "catalog", work)
        from farm.worker.push import push

        push(pushed, str(source), "tiny-sdxl", echo=lambda _: None)
        cache = work / "machine-cache"
        runs = (("nothing cached", "nothing", work / "models-1", work / "cache-1"),
                ("in store, not on disk", "catalog", work / "models-2", cache),
                ("on disk + compile cache", "catalog", work / "models-3", cache))
        for label, prefix, models_dir, cache_dir in runs:
            redis.Redis.from_url(REDIS_URL).flushdb()
            env = {**base, "FARM_HOME": str(work / f"home-{len(rows)}"),
                   "FARM_STORE_URL": f"s3://bench/{prefix}", "FARM_MODELS_DIR": str(models_dir),
                   "FARM_MODEL_CACHE_DIR": str(cache_dir),
                   "TORCHINDUCTOR_CACHE_DIR": str(work / f"inductor-{len(rows)}")}
            row = _worker(env)
            rows.append({"start": label, **{k: round(v, 2) if isinstance(v, float) else v
                                            for k, v in row.items()}})
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return rows


def run() -> dict[str, Any]:
    import boto3

    from benchmarks._s3rver import ACCESS_KEY, SECRET_KEY, s3rver

    os.environ.update({"AWS_ACCESS_KEY_ID": ACCESS_KEY, "AWS_SECRET_ACCESS_KEY": SECRET_KEY,
                       "AWS_DEFAULT_REGION": "us-east-1"})
    boto3.DEFAULT_SESSION = None  # it caches the credentials it first read
    busy = machine_busy()
    print(f"machine before: {busy}")
    with s3rver(LATENCY) as endpoint:
        port = int(endpoint.rsplit(":", 1)[1])
        pulls = pull_throughput(endpoint, port)
        print(table(["link", "single GET s", "parallel s", "single MB/s", "parallel MB/s",
                     "ratio"],
                    [[r["link"], r["single_s"], r["parallel_s"], r["single_mb_s"],
                      r["parallel_mb_s"], f"{r['ratio']}x"] for r in pulls]))
        starts = cold_starts(endpoint)
    print(table(["start", "process+broker s", "pull s", "load s", "compile/warm s",
                 "compile cache", "ready s"],
                [[r["start"], r["start_s"], r["pull_s"], r["load_s"], r["compile_s"],
                  r["compile_cache"], r["ready_s"]] for r in starts]))
    load = os.getloadavg()
    print(f"load average after: {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}")
    return {"machine_before": busy, "loadavg_after": list(load), "blob_bytes": BLOB_BYTES,
            "s3_latency_s": LATENCY, "pull": pulls, "cold_starts": starts}
