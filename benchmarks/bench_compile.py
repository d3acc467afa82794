"""Compiled vs eager tiny-model workers on CPU: per-image time, cold start with the fleet
compile cache vs without, and regional vs full compile time.

Each cold start is a fresh process with an empty local inductor cache (TORCHINDUCTOR_CACHE_DIR
in a new temp dir), as on a new cloud worker; "with the fleet cache" loads the artefacts the
uncached run saved (torch.compiler.save/load_cache_artifacts, what workers upload to the
store). A cold compile takes minutes on this CPU, so each cold start runs once; per-image times
are medians of interleaved eager/compiled renders inside those processes.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

from benchmarks._stats import summary, table

ROUNDS = 7
SLOW = True  # three cold compiles: several minutes on a 2-core CPU; not part of `make bench`


def _probe(backend: str, cache_in: str, cache_out: str) -> dict[str, Any]:
    env = {**os.environ, "TORCHINDUCTOR_CACHE_DIR": tempfile.mkdtemp(prefix="inductor-"),
           "PYTHONWARNINGS": "ignore"}
    out = subprocess.run([sys.executable, "-m", "benchmarks._compile_probe", backend, cache_in,
                          cache_out, str(ROUNDS)], env=env, capture_output=True, text=True,
                         check=True, timeout=1200)
    return dict(json.loads(out.stdout.strip().splitlines()[-1]))


def run() -> dict[str, Any]:
    artefacts = Path(tempfile.mkdtemp(prefix="farm-compile-")) / "artefacts.bin"
    uncached = _probe("inductor", "-", str(artefacts))
    cached = _probe("inductor", str(artefacts), "-")
    regional = _probe("regional", "-", "-")
    eager = summary(uncached["per_image"]["eager"] + cached["per_image"]["eager"])
    compiled = summary(uncached["per_image"]["compiled"] + cached["per_image"]["compiled"])
    reg = summary(regional["per_image"]["compiled"])
    reg_eager = summary(regional["per_image"]["eager"])
    figures = {
        "per_image_s": {"eager": eager, "inductor": compiled, "regional": reg,
                        "eager_in_regional_run": reg_eager},
        "compiled_over_eager": compiled["median"] / eager["median"],
        "regional_over_eager": reg["median"] / reg_eager["median"],
        "cold_compile_s": {"inductor_uncached": uncached["cold_compile_s"],
                           "inductor_with_fleet_cache": cached["cold_compile_s"],
                           "regional_uncached": regional["cold_compile_s"]},
        "cached_over_uncached_cold_start": cached["cold_compile_s"] / uncached["cold_compile_s"],
        "regional_over_full_compile": regional["cold_compile_s"] / uncached["cold_compile_s"],
        "max_pixel_diff_vs_eager": max(uncached["max_pixel_diff"], cached["max_pixel_diff"],
                                       regional["max_pixel_diff"]),
        "artefact_bytes": artefacts.stat().st_size,
    }
    print("tiny-sdxl, 64x64, 8 steps, CPU, 1 thread; cold starts: fresh process, empty local "
          "inductor cache, 1 run each")
    print(table(["measure", "value"], [
        ["per image, eager (median, ms)", f"{eager['median'] * 1000:.1f}"],
        ["per image, inductor (median, ms)", f"{compiled['median'] * 1000:.1f}"],
        ["compiled / eager", f"{figures['compiled_over_eager']:.2f}"],
        ["regional / eager", f"{figures['regional_over_eager']:.2f}"],
        ["cold compile, no cache (s)", f"{uncached['cold_compile_s']:.1f}"],
        ["cold compile, fleet cache (s)", f"{cached['cold_compile_s']:.1f}"],
        ["fleet cache / no cache", f"{figures['cached_over_uncached_cold_start']:.2f}"],
        ["cold compile, regional (s)", f"{regional['cold_compile_s']:.1f}"],
        ["regional / full compile time", f"{figures['regional_over_full_compile']:.2f}"],
        ["max pixel difference vs eager", f"{figures['max_pixel_diff_vs_eager']}"],
    ]))
    return figures


if __name__ == "__main__":
    run()
