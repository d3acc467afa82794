"""The control-plane benchmark's peer: plain Celery on the farm's broker, with a task that writes
the same PNG and JSON sidecar into the same store as the farm's stand-in stage, and nothing else.

    python -m benchmarks._plain_celery --name plain-1      # one worker process (solo pool)

Plain means Celery's own defaults: early acknowledgement (a killed worker loses its task),
prefetching (`worker_prefetch_multiplier` 4), no job records, no duplicate checks, no
recovery, no counters; only JSON messages and no result backend, as the farm. The farm /
plain ratio is what the farm's guarantees cost per job on the same machine.
"""

from __future__ import annotations

import argparse
import json
import socket
import sys
import time
from typing import Any

from farm import broker
from farm.images import encode_png
from farm.settings import Settings
from farm.store import open_store
from farm.worker.standin import seed_colour

TASK = "plain.render"
QUEUE = "plain"


def app_for(settings: Settings) -> Any:
    from celery import Celery

    app = Celery("plain", broker=settings.effective_broker_url, set_as_current=False)
    app.conf.update(task_serializer="json", accept_content=["json"], task_ignore_result=True,
                    worker_hijack_root_logger=False, worker_redirect_stdouts=False)
    return app


def image_keys(batch: str, i: int) -> tuple[str, str]:
    base = f"plain/{batch}/images/{batch}-{i:04d}-0"
    return base + ".png", base + ".json"


def main(argv: list[str] | None = None) -> int:
    import PIL.Image

    parser = argparse.ArgumentParser(prog="python -m benchmarks._plain_celery")
    parser.add_argument("--name", required=True)
    args = parser.parse_args(argv)
    settings = Settings.load()
    broker.wait_for_broker(settings)
    store = open_store(settings)
    app = app_for(settings)
    host = socket.gethostname()

    @app.task(name=TASK)
    def render(job: dict[str, Any]) -> None:
        start = time.time()
        image = PIL.Image.new("RGB", (job["width"], job["height"]), seed_colour(job["seed"]))
        params = (f"{job['prompt']}\nSteps: {job['steps']}, Sampler: euler, Seed: "
                  f"{job['seed']}, Size: {job['width']}x{job['height']}")
        png_key, sidecar_key = image_keys(job["batch"], job["index"])
        store.put(png_key, encode_png(image, params), content_type="image/png")
        sidecar = {**job, "image": png_key, "worker": args.name, "host": host,
                   "started_at": start, "finished_at": time.time()}
        store.put(sidecar_key, json.dumps(sidecar, sort_keys=True).encode(),
                  content_type="application/json")

    worker = app.Worker(pool="solo", concurrency=1, queues=[QUEUE],
                        hostname=f"{args.name}@{host}", loglevel="WARNING", quiet=True,
                        without_gossip=True, without_mingle=True, without_heartbeat=True)
    worker.start()
    return int(worker.exitcode or 0)


if __name__ == "__main__":
    sys.exit(main())
