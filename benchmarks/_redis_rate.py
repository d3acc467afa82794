"""The Redis command rate of this machine, measured with redis-benchmark (docs/scaling.md).

    python -m benchmarks._redis_rate [--host 127.0.0.1] [--port 6379] [--rounds 3]

Runs, ROUNDS times interleaved, against database 15 of the given server (50 clients, no
pipelining, 100,000 requests each, redis-benchmark's defaults):

    redis-benchmark -h HOST -p PORT --dbnum 15 -q -n 100000 -t set,get,lpush,rpop
    redis-benchmark ... EXISTS rb:none                  (the per-step cancel check)
    redis-benchmark ... LPUSH rb:qK x                   (fill the last list: K = 1, 80, 180)
    redis-benchmark ... BRPOP rb:q1 ... rb:qK 1         (a worker's BRPOP over K lists)

K = 80 is what a CPU worker of one model lists (8 VRAM classes x 10 priorities); 180 a 24 GB
worker serving base and refiner.

Then the commands a job costs the farm beyond its BRPOP, as the workers send them:

    SET rb:inflight:__rand_int__ <INFLIGHT_BYTES bytes>  (the in-flight record: the delivery's
                                                         note; -r FLEET, one key per worker)
    EVALSHA <farm/tally.py's note> 1 rb:tally rb-job-__rand_int__ __rand_int__ succeeded
                                                        (the "running" note, -r 1,000,000: nearly
                                                         every note is a job's first, which moves
                                                         two counters as a real note does)
    DEL rb:gone:__rand_int__                            (a delete of an in-flight record; over
                                                         RECORDS 64-byte keys all written just
                                                         before: 95 % of the draws find theirs)
    EVALSHA <the note> 2 rb:tally rb:gone:__rand_int__ rb-job-__rand_int__ __rand_int__ succeeded
                                                        (the final note, which deletes the
                                                         worker's in-flight record: the ack)

The note runs the farm's own script (loaded with SCRIPT LOAD) against a tally started as
farm/tally.py starts one. Prints medians (min-max) and writes benchmarks/results/redis_rate.json.
Deletes the keys it made. Not part of `make bench`: it needs a Redis server on TCP and the
redis-benchmark binary (apt: redis-tools).
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

import redis

from benchmarks._stats import machine_busy, spread, summary, table

LINE = re.compile(r"^\s*(?P<name>.+?): (?P<rps>[\d.]+) requests per second")
LIST_COUNTS = (1, 80, 180)
DB = "15"
REQUESTS = "100000"
# a stand-in job's in-flight record as the transport writes it (its size read with MONITOR)
INFLIGHT_BYTES = 1384
FLEET = 10_000          # workers, each with its in-flight record key
NOTE_JOBS = 1_000_000   # the range the note's job ids are drawn from
RECORDS = 1_000_000     # records written for the deletes to find (95 % of 100,000 draws do)


def bench(base: list[str], *args: str, requests: str = REQUESTS) -> dict[str, float]:
    out = subprocess.run([*base, "-q", "-n", requests, *args], capture_output=True, text=True,
                         check=True, timeout=300).stdout
    rates = {}
    for line in re.split(r"[\r\n]", out):
        match = LINE.match(line)
        if match:
            rates[match["name"]] = float(match["rps"])
    return rates


def _fill(client: Any, prefix: str, value: str, n: int) -> None:
    """Keys prefix + every __rand_int__ redis-benchmark draws below n (12 digits)."""
    for first in range(0, n, 20_000):
        with client.pipeline(transaction=False) as pipe:
            for i in range(first, min(n, first + 20_000)):
                pipe.set(f"{prefix}{i:012d}", value)
            pipe.execute()


def farm_commands(base: list[str], client: Any) -> dict[str, float]:
    """SET of an in-flight record, DEL of one, a tally note and a note that also deletes an
    in-flight record (the final note, which acks its message), at redis-benchmark's rate."""
    from farm import tally

    client.delete("rb:tally")
    tally.start(client, "-", NOTE_JOBS)  # the fields a started tally has
    client.rename(tally.tally_key("-"), "rb:tally")
    sha = client.script_load(tally._NOTE)
    rates = {}
    value = "x" * INFLIGHT_BYTES
    got = bench(base, "-r", str(FLEET), "SET", "rb:inflight:__rand_int__", value)
    rates["SET in-flight record"] = next(iter(got.values()))
    got = bench(base, "-r", str(NOTE_JOBS), "EVALSHA", sha, "1", "rb:tally",
                "rb-job-__rand_int__", "__rand_int__", "succeeded")
    rates["EVALSHA tally note"] = next(iter(got.values()))
    # the deletes find their key: 100,000 draws from RECORDS keys, all written just before
    # (64-byte values: a million records of full size would take 1.4 GB; a delete frees one
    # allocation either way)
    _fill(client, "rb:gone:", value[:64], RECORDS)
    got = bench(base, "-r", str(RECORDS), "DEL", "rb:gone:__rand_int__")
    rates["DEL in-flight record"] = next(iter(got.values()))
    _fill(client, "rb:gone:", value[:64], RECORDS)
    got = bench(base, "-r", str(RECORDS), "EVALSHA", sha, "2", "rb:tally", "rb:gone:__rand_int__",
                "rb-job-__rand_int__", "__rand_int__", "succeeded")
    rates["EVALSHA tally note + DEL"] = next(iter(got.values()))
    client.delete("rb:tally")
    return rates


def _forget(client: Any) -> None:
    """Delete the keys farm_commands made."""
    client.delete("rb:tally")
    for pattern in ("rb:inflight:*", "rb:gone:*"):
        names = list(client.scan_iter(match=pattern, count=10_000))
        for i in range(0, len(names), 10_000):
            client.delete(*names[i:i + 10_000])


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
    client = redis.Redis(host=args.host, port=int(args.port), db=int(DB))
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
            for name, rps in farm_commands(base, client).items():
                rates.setdefault(name, []).append(rps)
    finally:
        _forget(client)
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
