"""The download parts of `python -m benchmarks results` (benchmarks/bench_results.py): parallel
against sequential download of 1,000 images from S3 over HTTP, and the peak memory of
`farm results` for 10,000 images. The batches are filled straight into the store, a stand-in
for rendering (benchmarks/_filled_batch.py). S3 is s3rver (benchmarks/_s3rver.py) and, for
comparison, moto's server (benchmarks/_moto_server.py)."""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager, nullcontext
from pathlib import Path
from typing import Any

from benchmarks._stats import machine_busy, table

DOWNLOAD_IMAGES = 1_000
MEMORY_IMAGES = 10_000
# (server, added latency per request, GET path): S3's time to first byte is 15-30 ms a request.
# s3rver answers in well under a millisecond; moto takes ~17 CPU-ms a request, so on a 2-core
# machine it, not the client, caps a parallel download. "light": the store's presigned GETs on
# a plain pool, as `farm results` downloads; "boto3": boto3's get_object for every GET, the
# store's fall-back path, for comparison (farm/store.py)
DOWNLOAD_RUNS = (("s3rver", 0.0, "light"), ("s3rver", 0.02, "light"),
                 ("s3rver", 0.02, "boto3"), ("moto", 0.02, "light"))


@contextmanager
def _moto(latency: float) -> Iterator[tuple[str, str, str]]:
    """moto's S3 in a process of its own: (endpoint, access key, secret key)."""
    server = subprocess.Popen([sys.executable, "-m", "benchmarks._moto_server", "--latency",
                               str(latency)], stdout=subprocess.PIPE, text=True)
    try:
        assert server.stdout is not None
        yield f"http://127.0.0.1:{server.stdout.readline().strip()}", "bench", "bench"
    finally:
        server.kill()
        server.wait()


@contextmanager
def _s3rver(latency: float) -> Iterator[tuple[str, str, str]]:
    from benchmarks._s3rver import ACCESS_KEY, SECRET_KEY, s3rver

    with s3rver(latency) as endpoint:
        yield endpoint, ACCESS_KEY, SECRET_KEY


SERVERS = {"moto": _moto, "s3rver": _s3rver}


@contextmanager
def _s3(server: str, latency: float) -> Iterator[dict[str, str]]:
    """An environment whose store is a fresh bucket "bench" on `server` (moto or s3rver, each a
    process of its own), answering each request `latency` seconds late."""
    import boto3

    with SERVERS[server](latency) as (endpoint, key, secret):
        creds = {"AWS_ACCESS_KEY_ID": key, "AWS_SECRET_ACCESS_KEY": secret,
                 "AWS_DEFAULT_REGION": "us-east-1"}
        client = boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1",
                              aws_access_key_id=key, aws_secret_access_key=secret)
        if "bench" not in {b["Name"] for b in client.list_buckets().get("Buckets", [])}:
            client.create_bucket(Bucket="bench")
        os.environ.update(creds)
        # boto3's default session caches the credentials it first read
        boto3.DEFAULT_SESSION = None
        with tempfile.TemporaryDirectory(prefix="farm-bench-results-") as home:
            yield {**creds, "FARM_HOME": home, "FARM_STORE_URL": "s3://bench/renders",
                   "FARM_S3_ENDPOINT_URL": endpoint}


def download_benchmark() -> dict[str, Any]:
    """1,000 images and their sidecars from S3 over HTTP: one thread, then the pool that
    `farm results` uses, in the same run, against each server of DOWNLOAD_RUNS."""
    from benchmarks._filled_batch import fill
    from farm.scheduler.results import download
    from farm.settings import Settings
    from farm.store import DOWNLOAD_THREADS, open_store

    figures: dict[str, Any] = {"images": DOWNLOAD_IMAGES, "threads": DOWNLOAD_THREADS,
                               "machine_before": machine_busy()}
    rows = []
    for server, latency, path in DOWNLOAD_RUNS:
        with _s3(server, latency) as env:
            settings = Settings.load(env=env)
            store = open_store(settings)
            if path == "boto3":
                store.light = None  # type: ignore[attr-defined]
            fill(store, settings, "bench-dl", DOWNLOAD_IMAGES, size=64, threads=32)
            times = {}
            for threads in (1, DOWNLOAD_THREADS):
                with tempfile.TemporaryDirectory() as out:
                    start = time.perf_counter()
                    got = download(store, "bench-dl", Path(out), settings, threads=threads,
                                   sheets=False)
                    times[threads] = time.perf_counter() - start
                    assert got.fetched == DOWNLOAD_IMAGES, got.fetched
            ratio = times[1] / times[DOWNLOAD_THREADS]
            name = f"{server}_{int(latency * 1000)}ms" + ("_boto3" if path == "boto3" else "")
            figures[name] = {
                "sequential_s": round(times[1], 2), "parallel_s": round(times[DOWNLOAD_THREADS], 2),
                "ratio": round(ratio, 2), "get_path": path}
            rows.append((server, f"{int(latency * 1000)} ms", path, f"{times[1]:.2f}",
                         f"{times[DOWNLOAD_THREADS]:.2f}", f"{ratio:.1f}x"))
    print(table(("server", "added latency/request", "GETs", "1 thread s",
                 f"{DOWNLOAD_THREADS} threads s", "ratio"), rows))
    return figures


def _peak_memory(env: dict[str, str], out: Path) -> tuple[float, float]:
    """Peak RSS (MB) and seconds of `farm results bench-mem -o OUT`, a process of its own."""
    # a wrapper process, so RUSAGE_CHILDREN counts `farm results` alone
    probe = ("import resource, subprocess, sys\n"
             "done = subprocess.run(sys.argv[1:], capture_output=True, text=True)\n"
             "assert done.returncode == 0, done.stderr[-2000:]\n"
             "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)\n")
    start = time.perf_counter()
    done = subprocess.run([sys.executable, "-c", probe, sys.executable, "-m", "farm.cli.main",
                           "results", "bench-mem", "-o", str(out)],
                          env=env, capture_output=True, text=True, check=True)
    return int(done.stdout.strip()) / 1024, time.perf_counter() - start  # ru_maxrss: KiB


def memory_benchmark() -> dict[str, Any]:
    """Peak resident memory of `farm results` (a process of its own) taking 10,000 images with
    sidecars, thumbnails and 100 contact sheets, from a file store and from S3 (s3rver)."""
    from benchmarks._filled_batch import fill
    from farm.settings import Settings
    from farm.store import open_store

    figures: dict[str, Any] = {"images": MEMORY_IMAGES}
    rows = []
    base = {k: v for k, v in os.environ.items() if not k.startswith(("FARM_", "AWS_"))}
    for kind in ("file", "s3rver"):
        store_env: AbstractContextManager[dict[str, str]] = (
            _s3("s3rver", 0.0) if kind == "s3rver" else nullcontext({}))
        with tempfile.TemporaryDirectory(prefix="farm-bench-memory-") as tmp, store_env as s3_env:
            env = {**base, "FARM_HOME": str(Path(tmp, "home")), **s3_env}
            settings = Settings.load(env=env)
            fill(open_store(settings), settings, "bench-mem", MEMORY_IMAGES, size=64, threads=16)
            peak_mb, seconds = _peak_memory(env, Path(tmp, "out"))
            sheets = len(list(Path(tmp, "out").glob("contact-sheet-*.png")))
        figures[kind] = {"peak_rss_mb": round(peak_mb, 1), "seconds": round(seconds, 1),
                         "contact_sheets": sheets}
        rows.append((kind, MEMORY_IMAGES, f"{peak_mb:.0f}", f"{seconds:.1f}", sheets))
    print(table(("store", "images", "peak RSS MB", "seconds", "contact sheets"), rows))
    return figures
