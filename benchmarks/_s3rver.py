"""s3rver, an S3-compatible server from npm (file-backed, one Node process), for benchmarks
that measure a client's parallelism: moto answers each request with ~17 CPU-ms of Python, so on
a small machine the server, not the client, sets the pace. s3rver answers in well under a
millisecond; `latency` adds S3's time to first byte (15-30 ms) to every request.

s3rver 3.7.1 is installed with npm on first use into ~/.cache/farm-benchmarks/s3rver; it needs
`node` and `npm` on PATH. It stores objects but does not enforce conditional writes (If-Match):
fine for reading results back, not for the lifecycle's compare-and-set.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

VERSION = "3.7.1"
HOME = Path.home() / ".cache" / "farm-benchmarks" / "s3rver"
SCRIPT = Path(__file__).with_suffix(".js")
BUCKET = "bench"
# s3rver's one account
ACCESS_KEY = SECRET_KEY = "S3RVER"


def available() -> bool:
    return shutil.which("node") is not None and (
        (HOME / "node_modules" / "s3rver").is_dir() or shutil.which("npm") is not None)


def install() -> Path:
    modules = HOME / "node_modules"
    if not (modules / "s3rver" / "package.json").is_file():
        HOME.mkdir(parents=True, exist_ok=True)
        subprocess.run(["npm", "install", "--silent", "--no-audit", "--no-fund", "--prefix",
                        str(HOME), f"s3rver@{VERSION}"], check=True)
    return modules


@contextmanager
def s3rver(latency: float = 0.0) -> Iterator[str]:
    """A fresh s3rver with an empty bucket BUCKET, answering `latency` seconds late; yields its
    endpoint URL."""
    modules = install()
    with tempfile.TemporaryDirectory(prefix="farm-bench-s3rver-") as directory:
        server = subprocess.Popen(
            ["node", "--openssl-legacy-provider", str(SCRIPT), directory,
             str(round(latency * 1000))],
            env={**os.environ, "NODE_PATH": str(modules)},
            stdout=subprocess.PIPE, text=True)
        try:
            assert server.stdout is not None
            port = server.stdout.readline().strip()
            if not port.isdigit():
                raise RuntimeError(f"s3rver did not start (exit {server.poll()})")
            yield f"http://127.0.0.1:{port}"
        finally:
            server.kill()
            server.wait()
