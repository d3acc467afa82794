"""Run one worker process with the stand-in backend (worker/standin.py: no diffusion).

    python -m benchmarks._standin_worker --name lt-1 [--max-jobs N] [--render-seconds S]
                                         [--stats counts.json]

Settings come from FARM_* variables as for `farm worker`. Load tests start several of these as
separate processes so they really compete over Redis and the store. With `--stats` the worker
counts every store call it makes (by operation and by kind of object) and writes the counts
there as JSON when it exits. The fault tests start it through tests/faults.py, which adds the
faults they inject.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import Counter
from pathlib import Path
from typing import Any

from farm.settings import Settings
from farm.store import Store


def key_kind(key: str) -> str:
    """batches/<b>/jobs/<j>.json -> "record", .../manifest.json -> "manifest", images: png/json."""
    if key.endswith("/manifest.json"):
        return "manifest"
    if "/jobs/" in key:
        return "record"
    if "/images/" in key:
        return "image" if key.endswith(".png") else "sidecar"
    return "other"


class CountingStore:
    """A Store that counts calls, e.g. {"put record": 800, "get manifest": 400}."""

    def __init__(self, inner: Store) -> None:
        self.inner = inner
        self.url = inner.url
        self.counts: Counter[str] = Counter()

    def put(self, key: str, data: bytes, *, create_once: bool = False,
            if_match: str | None = None,
            content_type: str = "application/octet-stream") -> str:
        self.counts[f"put {key_kind(key)}"] += 1
        return self.inner.put(key, data, create_once=create_once, if_match=if_match,
                              content_type=content_type)

    def get(self, key: str) -> bytes:
        self.counts[f"get {key_kind(key)}"] += 1
        return self.inner.get(key)

    def get_versioned(self, key: str) -> tuple[bytes, str]:
        self.counts[f"get {key_kind(key)}"] += 1
        return self.inner.get_versioned(key)

    def exists(self, key: str) -> bool:
        self.counts[f"exists {key_kind(key)}"] += 1
        return self.inner.exists(key)

    def list_keys(self, prefix: str) -> list[str]:
        self.counts["list"] += 1
        return self.inner.list_keys(prefix)

    def list_dirs(self, prefix: str) -> list[str]:
        self.counts["list"] += 1
        return self.inner.list_dirs(prefix)

    def delete(self, key: str) -> None:
        self.counts[f"delete {key_kind(key)}"] += 1
        self.inner.delete(key)


def main(argv: list[str] | None = None, backend: Any = None) -> int:
    """Run a stand-in worker; `backend` replaces the stand-in (tests/faults.py injects faults
    through it)."""
    parser = argparse.ArgumentParser(prog="python -m benchmarks._standin_worker",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("--name", required=True)
    parser.add_argument("--max-jobs", type=int, default=None)
    parser.add_argument("--model", action="append", default=[])
    parser.add_argument("--render-seconds", type=float, default=0.0)
    parser.add_argument("--stats", type=Path, default=None)
    args = parser.parse_args(argv)

    from farm.worker.runtime import Worker
    from farm.worker.standin import StandIn

    def echo(line: str) -> None:
        print(line, file=sys.stderr, flush=True)

    worker = Worker(Settings.load(), args.model or ["tiny-sdxl"], device="cpu", name=args.name,
                    max_jobs=args.max_jobs, echo=echo,
                    backend=backend or StandIn(render_seconds=args.render_seconds))
    counting: CountingStore | None = None
    if args.stats is not None:
        ctx = worker.setup()
        counting = CountingStore(ctx.store)
        ctx.store = ctx.manifests.store = counting  # run() keeps the context setup() built
    try:
        return worker.run()
    finally:
        if counting is not None and args.stats is not None:
            stats: dict[str, Any] = {"name": args.name, "jobs": worker.done,
                                     "store_calls": dict(counting.counts)}
            args.stats.write_text(json.dumps(stats, indent=2, sort_keys=True))


if __name__ == "__main__":
    sys.exit(main())
