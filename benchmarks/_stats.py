"""Medians and spread over repetitions, and the plain-text tables the benchmarks print."""

from __future__ import annotations

import contextlib
import math
import os
import statistics
import time
from collections.abc import Sequence
from typing import Any


def file_system(folder: str | os.PathLike[str]) -> str:
    """The type of the file system `folder` is on ("ext4", "tmpfs", ...), from /proc/mounts."""
    path = os.path.realpath(folder)
    best, kind = "", "unknown"
    try:
        with open("/proc/mounts") as f:
            for line in f:
                fields = line.split()
                if len(fields) >= 3:
                    mount = fields[1].replace("\\040", " ")
                    inside = path == mount or path.startswith(mount.rstrip("/") + "/")
                    if inside and len(mount) >= len(best):
                        best, kind = mount, fields[2]
    except OSError:
        pass
    return kind


def file_create_us(folder: str | os.PathLike[str], files: int = 200) -> float:
    """CPU microseconds (user + kernel, this thread) to create one empty file in a new folder
    under `folder`, averaged over `files` files, which are removed after. Every store write makes
    a new file; on some machines (this project's shared one: ext4 without a journal) the
    kernel's cost per new file swings twentyfold from minute to minute, so benchmarks that
    write files record it beside their figures."""
    base = os.path.join(os.fspath(folder), f".create-probe-{os.getpid()}-{time.monotonic_ns()}")
    os.makedirs(base)
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL
    try:
        start = time.thread_time()
        for i in range(files):
            os.close(os.open(f"{base}/{i}", flags, 0o600))
        used = time.thread_time() - start
    finally:
        for i in range(files):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(f"{base}/{i}")
        os.rmdir(base)
    return round(used / files * 1e6, 1)


def summary(values: Sequence[float]) -> dict[str, float]:
    """median, min, max and the interquartile range (q1, q3) of repeated measurements."""
    if not values:
        raise ValueError("summary of no values")
    ordered = sorted(values)
    if len(ordered) >= 2:
        q1, _, q3 = statistics.quantiles(ordered, n=4, method="inclusive")
    else:
        q1 = q3 = ordered[0]
    return {"median": statistics.median(ordered), "min": ordered[0], "max": ordered[-1],
            "q1": q1, "q3": q3, "n": len(ordered)}


def psnr(a: Any, b: Any) -> float:
    """Peak signal-to-noise ratio of two 8-bit images (PIL images or arrays), dB; inf when
    identical."""
    import numpy as np

    x, y = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    mse = float(((x - y) ** 2).mean())
    return math.inf if mse == 0 else 10 * math.log10(255.0 ** 2 / mse)


def spread(s: dict[str, float], digits: int = 1, unit: str = "") -> str:
    """"12.3 (11.9-13.0)": the median, then min-max."""
    return (f"{s['median']:.{digits}f}{unit} "
            f"({s['min']:.{digits}f}-{s['max']:.{digits}f})")


def table(headers: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    cells = [[str(h) for h in headers]] + [[str(c) for c in row] for row in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    lines = []
    for n, row in enumerate(cells):
        lines.append("  ".join(c.ljust(w) if i == 0 else c.rjust(w)
                               for i, (c, w) in enumerate(zip(row, widths, strict=True))))
        if n == 0:
            lines.append("  ".join("-" * w for w in widths))
    return "\n".join(lines)


def machine_busy(seconds: float = 1.0) -> dict[str, float]:
    """How busy the machine is before a benchmark starts: the share of all cores in use over
    `seconds` (/proc/stat) and the 1-minute load average. These machines are shared; a busy
    start means other processes competed with what was measured."""
    def sample() -> tuple[int, int]:
        with open("/proc/stat") as f:
            values = [int(v) for v in f.readline().split()[1:]]
        idle = values[3] + (values[4] if len(values) > 4 else 0)  # idle + iowait
        return sum(values), idle

    total0, idle0 = sample()
    time.sleep(seconds)
    total1, idle1 = sample()
    busy = 1 - (idle1 - idle0) / max(1, total1 - total0)
    return {"busy_pct": round(100 * busy, 1), "loadavg_1m": round(os.getloadavg()[0], 2),
            "cores": os.cpu_count() or 1}
