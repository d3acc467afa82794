"""Medians and spread over repetitions, and the plain-text tables the benchmarks print."""

from __future__ import annotations

import math
import os
import statistics
import time
from collections.abc import Sequence
from typing import Any


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
