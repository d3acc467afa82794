"""The Redis command rate of this machine, measured with redis-benchmark (docs/scaling.md).

    python -m benchmarks._redis_rate [--host 127.0.0.1] [--port 6379] [--rounds 3]

Runs, ROUNDS times interleaved, against database 15 of the given server (50 clients, no
pipelining, 100,000 requests each, redis-benchmark's defaults):

    redis-benchmark -h HOST -p PORT --dbnum 15 -q -n 100000 -t set,get,lpush,rpop
    redis-benchmark ... EXISTS rb:none                  (the per-step cancel check)
    redis-benchmark ... LPUSH rb:qK x                   (fill the last list: K = 1, 80, 180)
    redis-benchmark ... BRPOP rb:q1 ... rb:qK 1         (a worker's BRPOP over K lists)

K = 80 is what a CPU worker of one model lists (8 VRAM classes x 10 priorities); 180 a 24 GB
worker serving base and refiner. Prints medians (min-max) and writes
benchmarks/results/redis_rate.json. Deletes the keys it made. Not part of `make bench`: it
needs a Redis server on TCP and the redis-benchmark binary (apt: redis-tools).
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from benchmarks._stats import machine_busy, spread, summary, table

LINE = re.compile(r"^\s*(?P<name>.+?): (?P<rps>[\d.]+) requests per second")
LIST_COUNTS = (1, 80, 180)
DB = "15"
REQUESTS = "100000"


def bench(base: list[str], *args: str) -> dict[str, float]:
    out = subprocess.run([*base, "-q", "-n", REQUESTS, *args], capture_output=True, text=True,
                         check=True, timeout=300).stdout
    rates = {}
    for line in re.split(r"[\r\n]", out):
        match = LINE.match(line)
        if match:
            rates[match["name"]] = float(match["rps"])
    return rates


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks._redis_rate")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", default="6379")
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args(argv)
    binary = shutil.which("redis-benchmark")
    if binary is None:
        print("redis-benchmark is not installed (apt-get install redis-tools)")
        return 2
    version = subprocess.run([binary, "--version"], capture_output=True, text=True).stdout
    base = [binary, "-h", args.host, "-p", args.port, "--dbnum", DB]
    machine = machine_busy()
    rates: dict[str, list[float]] = {}
    try:
        for _ in range(args.rounds):
            for name, rps in bench(base, "-t", "set,get,lpush,rpop").items():
                rates.setdefault(name, []).append(rps)
            # the cancel check each denoising step makes (a key that is not there)
            rates.setdefault("EXISTS", []).extend(bench(base, "EXISTS", "rb:none").values())
            for k in LIST_COUNTS:
                bench(base, "LPUSH", f"rb:q{k}", "x")
                got = bench(base, "BRPOP", *[f"rb:q{i}" for i in range(1, k + 1)], "1")
                rates.setdefault(f"BRPOP over {k} lists", []).extend(got.values())
    finally:
        subprocess.run(["redis-cli", "-h", args.host, "-p", args.port, "-n", DB, "DEL",
                        "key:__rand_int__", "mylist",
                        *[f"rb:q{k}" for k in LIST_COUNTS]],
                       capture_output=True, timeout=30)
    figures: dict[str, Any] = {
        "server": f"{args.host}:{args.port}", "redis_benchmark": version.strip(),
        "clients": 50, "pipelining": 1, "requests": int(REQUESTS), "rounds": args.rounds,
        "commands_per_s": {name: summary(values) for name, values in rates.items()},
        "machine_before": machine,
        "measured_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    print(f"redis-benchmark against {figures['server']} ({version.strip()}), 50 clients, "
          f"no pipelining, {REQUESTS} requests, {args.rounds} rounds; median (min-max)")
    print(table(["command", "requests/s"],
                [[n, spread(s, 0)] for n, s in figures["commands_per_s"].items()]))
    print(f"machine before start: {machine['busy_pct']}% of {machine['cores']} cores busy, "
          f"load average {machine['loadavg_1m']}")
    out = Path(__file__).resolve().parent / "results" / "redis_rate.json"
    out.parent.mkdir(exist_ok=True)
    out.write_text(json.dumps(figures, indent=2, sort_keys=True))
    print(f"(figures written to {out})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
