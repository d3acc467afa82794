"""Compiling every bucket: one graph per bucket and CFG state (static shapes) against one graph
with dynamic height and width, tiny-sdxl on CPU at the nine SDXL-shaped buckets (an eighth of
1024x1024 and the rest), regional compile, 1 thread.

Four fresh processes (benchmarks/_bucket_probe.py), each with an empty local inductor cache as
on a new machine: static and dynamic with nothing cached (each saves its artefacts), then each
again with its artefacts loaded first (the fleet compile cache). Per bucket: compile seconds
(its warm-up compiled minus the same warm-up eager) and graphs so far; per image (8 steps,
CFG on): compiled against eager, interleaved in the same process. The cold compiles take
minutes on a 2-core CPU: SLOW, run it with `python -m benchmarks compile_buckets`.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

from benchmarks._stats import table

ROUNDS = 5
SLOW = True
MODES = ("static", "dynamic")


def probe(mode: str, cache_in: str = "-", cache_out: str = "-", model: str = "tiny",
          backend: str = "regional", rounds: int = ROUNDS) -> dict[str, Any]:
    """One run of the probe in a fresh process with an empty inductor cache: its last line."""
    env = {**os.environ, "TORCHINDUCTOR_CACHE_DIR": tempfile.mkdtemp(prefix="inductor-"),
           "PYTHONWARNINGS": "ignore"}
    out = subprocess.run([sys.executable, "-m", "benchmarks._bucket_probe", mode, backend,
                          model, str(rounds), cache_in, cache_out], env=env,
                         capture_output=True, text=True, check=True, timeout=3600)
    return dict(json.loads(out.stdout.strip().splitlines()[-1]))


def summarise(runs: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """The figures of the four probe runs ({mode}-cold, {mode}-cached)."""
    figures: dict[str, Any] = {"runs": runs}
    for mode in MODES:
        cold, cached = runs[f"{mode}-cold"], runs[f"{mode}-cached"]
        ratios = []
        for bucket, times in cold["per_image"].items():
            both = times["compiled"] + cached["per_image"][bucket]["compiled"]
            eager = times["eager"] + cached["per_image"][bucket]["eager"]
            ratios.append(statistics.median(both) / statistics.median(eager))
        figures[mode] = {
            "compile_s_per_bucket": {b["bucket"]: round(b["compile_s"], 1)
                                     for b in cold["per_bucket"]},
            "graphs": cold["graphs"],
            "all_buckets_cold_s": cold["all_buckets_s"],
            "all_buckets_fleet_cache_s": cached["all_buckets_s"],
            "fleet_cache_inductor": cached.get("fxgraph_cache", {}),
            "per_image_s": {b: statistics.median(t["compiled"])
                            for b, t in cached["per_image"].items()},
            "eager_per_image_s": {b: statistics.median(t["eager"])
                                  for b, t in cached["per_image"].items()},
            "compiled_over_eager_median": statistics.median(ratios),
            "max_pixel_diff_vs_eager": max(cold["max_pixel_diff"], cached["max_pixel_diff"]),
            "new_graphs_while_rendering": cold["new_graphs_while_rendering"]
            + cached["new_graphs_while_rendering"],
        }
    s, d = figures["static"], figures["dynamic"]
    figures["dynamic_over_static"] = {
        "cold_compile": d["all_buckets_cold_s"] / s["all_buckets_cold_s"],
        "fleet_cache_compile": d["all_buckets_fleet_cache_s"] / s["all_buckets_fleet_cache_s"],
        "per_image": statistics.median(d["per_image_s"][b] / s["per_image_s"][b]
                                       for b in s["per_image_s"]),
    }
    rows = [[b, f"{s['compile_s_per_bucket'][b]:.1f}", f"{d['compile_s_per_bucket'][b]:.1f}",
             f"{s['per_image_s'][b]:.3f}", f"{d['per_image_s'][b]:.3f}",
             f"{s['eager_per_image_s'][b]:.3f}"] for b in s["compile_s_per_bucket"]]
    rows.append(["all nine, nothing cached", f"{s['all_buckets_cold_s']:.1f}",
                 f"{d['all_buckets_cold_s']:.1f}", "", "", ""])
    rows.append(["all nine, fleet cache", f"{s['all_buckets_fleet_cache_s']:.1f}",
                 f"{d['all_buckets_fleet_cache_s']:.1f}", "", "", ""])
    print(table(["bucket", "compile s, static", "compile s, dynamic", "s/image static",
                 "s/image dynamic", "s/image eager"], rows))
    print(f"graphs: static {s['graphs']}, dynamic {d['graphs']}; dynamic/static: cold compile "
          f"{figures['dynamic_over_static']['cold_compile']:.2f}, per image "
          f"{figures['dynamic_over_static']['per_image']:.2f}")
    return figures


def run() -> dict[str, Any]:
    folder = Path(tempfile.mkdtemp(prefix="farm-buckets-"))
    runs: dict[str, dict[str, Any]] = {}
    load = {"before": os.getloadavg()}
    for mode in MODES:
        saved = str(folder / f"{mode}.bin")
        runs[f"{mode}-cold"] = probe(mode, cache_out=saved)
        runs[f"{mode}-cached"] = probe(mode, cache_in=saved)
    load["after"] = os.getloadavg()
    print("tiny-sdxl on CPU, 1 thread, regional compile, 8 steps per image; each run a fresh "
          f"process; load average {load['before'][0]:.1f} before, {load['after'][0]:.1f} after")
    return {**summarise(runs), "load_average": load}


if __name__ == "__main__":
    run()
