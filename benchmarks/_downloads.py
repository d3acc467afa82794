"""The download parts of `python -m benchmarks results` (benchmarks/bench_results.py): parallel
against sequential download of 1,000 images from S3 over HTTP, and the peak memory of
`farm results` for 10,000 images. The batches are filled straight into the store, a stand-in
for rendering (benchmarks/_filled_batch.py)."""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from benchmarks._stats import machine_busy, table

DOWNLOAD_IMAGES = 1_000
MEMORY_IMAGES = 10_000
# S3's time to first byte is 15-30 ms a request; moto on this machine answers in about 1 ms
LATENCIES_S = (0.0, 0.02)


@contextmanager
def _s3(latency: float) -> Iterator[dict[str, str]]:
    """An environment whose store is a fresh bucket on moto's S3 in a process of its own."""
    import boto3

    server = subprocess.Popen([sys.executable, "-m", "benchmarks._moto_server", "--latency",
                               str(latency)], stdout=subprocess.PIPE, text=True)
    try:
        assert server.stdout is not None
        endpoint = f"http://127.0.0.1:{server.stdout.readline().strip()}"
        creds = {"AWS_ACCESS_KEY_ID": "bench", "AWS_SECRET_ACCESS_KEY": "bench",
                 "AWS_DEFAULT_REGION": "us-east-1"}
        boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1",
                     aws_access_key_id="bench", aws_secret_access_key="bench"
                     ).create_bucket(Bucket="bench")
        os.environ.update(creds)
        with tempfile.TemporaryDirectory(prefix="farm-bench-results-") as home:
            yield {**creds, "FARM_HOME": home, "FARM_STORE_URL": "s3://bench/renders",
                   "FARM_S3_ENDPOINT_URL": endpoint}
    finally:
        server.kill()
        server.wait()


def download_benchmark() -> dict[str, Any]:
    """1,000 images and their sidecars from S3 over HTTP: one thread, then the pool that
    `farm results` uses, in the same run; with moto as it is, and answering 20 ms late."""
    from benchmarks._filled_batch import fill
    from farm.scheduler.results import download
    from farm.settings import Settings
    from farm.store import DOWNLOAD_THREADS, open_store

    figures: dict[str, Any] = {"images": DOWNLOAD_IMAGES, "threads": DOWNLOAD_THREADS,
                               "machine_before": machine_busy()}
    rows = []
    for latency in LATENCIES_S:
        with _s3(latency) as env:
            settings = Settings.load(env=env)
            store = open_store(settings)
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
            figures[f"latency_{int(latency * 1000)}ms"] = {
                "sequential_s": round(times[1], 2), "parallel_s": round(times[DOWNLOAD_THREADS], 2),
                "ratio": round(ratio, 2)}
            rows.append((f"{int(latency * 1000)} ms", f"{times[1]:.2f}",
                         f"{times[DOWNLOAD_THREADS]:.2f}", f"{ratio:.1f}x"))
    print(table(("added latency/request", "1 thread s", f"{DOWNLOAD_THREADS} threads s",
                 "ratio"), rows))
    return figures


def memory_benchmark() -> dict[str, Any]:
    """Peak resident memory of `farm results` (a process of its own) taking 10,000 images with
    sidecars, thumbnails and 100 contact sheets from a file store."""
    from benchmarks._filled_batch import fill
    from farm.settings import Settings
    from farm.store import open_store

    with tempfile.TemporaryDirectory(prefix="farm-bench-memory-") as tmp:
        env = {k: v for k, v in os.environ.items() if not k.startswith(("FARM_", "AWS_"))}
        env["FARM_HOME"] = str(Path(tmp, "home"))
        settings = Settings.load(env=env)
        fill(open_store(settings), settings, "bench-mem", MEMORY_IMAGES, size=64, threads=8)
        # a wrapper process, so RUSAGE_CHILDREN counts `farm results` alone
        probe = ("import resource, subprocess, sys\n"
                 "done = subprocess.run(sys.argv[1:], capture_output=True, text=True)\n"
                 "assert done.returncode == 0, done.stderr[-2000:]\n"
                 "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)\n")
        start = time.perf_counter()
        out = subprocess.run([sys.executable, "-c", probe, sys.executable, "-m", "farm.cli.main",
                              "results", "bench-mem", "-o", str(Path(tmp, "out"))],
                             env=env, capture_output=True, text=True, check=True)
        seconds = time.perf_counter() - start
        peak_mb = int(out.stdout.strip()) / 1024  # ru_maxrss is in KiB on Linux
        sheets = len(list(Path(tmp, "out").glob("contact-sheet-*.png")))
    print(table(("images", "peak RSS MB", "seconds", "contact sheets"),
                [(MEMORY_IMAGES, f"{peak_mb:.0f}", f"{seconds:.1f}", sheets)]))
    return {"images": MEMORY_IMAGES, "peak_rss_mb": round(peak_mb, 1),
            "seconds": round(seconds, 1), "contact_sheets": sheets, "store": "file"}
