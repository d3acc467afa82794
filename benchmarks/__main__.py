"""Run the benchmarks (or those named on the command line) and save their figures as JSON.

With no names it runs every benchmark but the slow ones (SLOW = True: compile, compile_buckets
and cold_start, whose cold compiles take minutes on a CPU); `python -m benchmarks compile` runs
one of them by name."""

from __future__ import annotations

import importlib
import json
import pkgutil
import sys
import time
from pathlib import Path

import benchmarks
from benchmarks._farm import code_version

RESULTS = Path(__file__).resolve().parent / "results"


def main(names: list[str]) -> int:
    found = sorted(m.name for m in pkgutil.iter_modules(benchmarks.__path__)
                   if m.name.startswith("bench_"))
    chosen = [n for n in found if n in names or n[len("bench_"):] in names
              or (not names and not getattr(importlib.import_module(f"benchmarks.{n}"),
                                            "SLOW", False))]
    if not chosen:
        print(f"no benchmark matches {names}; available: {', '.join(found)}")
        return 2
    RESULTS.mkdir(exist_ok=True)
    for name in chosen:
        module = importlib.import_module(f"benchmarks.{name}")
        print(f"\n== {name} ==")
        figures = module.run()
        figures["measured_at"] = time.strftime("%Y-%m-%dT%H:%M:%S%z")
        figures.setdefault("code", code_version())
        out = RESULTS / f"{name[len('bench_'):]}.json"
        out.write_text(json.dumps(figures, indent=2, sort_keys=True))
        print(f"(figures written to {out.relative_to(Path.cwd()) if out.is_relative_to(Path.cwd()) else out})")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
