"""The status part of `python -m benchmarks results` (issue #14): what `farm status` of a
10,000-job batch costs on S3 over HTTP (moto's ThreadedMotoServer), in requests and seconds.

The batch is written through the farm's own code (its manifest and submit record as `farm
submit` writes them, its tally as submit starts it, each job's record by compare-and-set as a
worker commits it, with the worker's tally note), not rendered: 10,000 renders would measure
the renderer. Requests are counted by a botocore event hook on every S3 client (before-send).

    status_running_counts     `batch_counts` while the batch runs: its submit record + tally
    status_ended_summary      the same once it ended: + its summary object
    status_cli                `farm status BATCH` in-process (CliRunner), ended batch
    status_without_redis      the tally gone (Redis lost its data): the summary still answers
    status_from_records       neither (no tally, no summary): every record, in parallel
                              (what `--jobs`/`--json` read; one at a time before the tally)
"""

from __future__ import annotations

import os
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from pathlib import Path
from typing import Any

JOBS = 10_000
TARGET_REQUESTS = 10
TARGET_SECONDS = 0.5
# the job records' states as a batch half-way through has them: queued jobs have none yet
MIX = (("succeeded", 0.55), ("failed", 0.05), ("running", 0.25), ("queued", 0.15))


class Requests:
    """Counts S3 requests through botocore's event system (registered on the default session,
    so every client the farm makes reports here)."""

    def __init__(self) -> None:
        import boto3

        self.count = 0
        boto3.setup_default_session()
        assert boto3.DEFAULT_SESSION is not None
        boto3.DEFAULT_SESSION.events.register("before-send.s3", self._sent)

    def _sent(self, **_: Any) -> None:
        self.count += 1

    def measure(self, fn: Any) -> tuple[Any, int, float]:
        before, t0 = self.count, time.perf_counter()
        value = fn()
        return value, self.count - before, time.perf_counter() - t0


def status_at_scale() -> dict[str, Any]:
    """Every measurement of this part, on one moto server and one embedded broker."""
    import logging

    from moto.server import ThreadedMotoServer

    from farm import broker

    logging.getLogger("werkzeug").setLevel(logging.ERROR)   # moto's line per request
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    home = Path(tempfile.mkdtemp(prefix="farm-bench-status-"))
    saved = {k: os.environ.get(k) for k in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY",
                                            "AWS_DEFAULT_REGION")}
    os.environ.update({"AWS_ACCESS_KEY_ID": "test", "AWS_SECRET_ACCESS_KEY": "test",
                       "AWS_DEFAULT_REGION": "us-east-1"})
    from farm.settings import Settings

    settings = Settings.load(env={"FARM_HOME": str(home),
                                  "FARM_STORE_URL": "s3://bench/renders",
                                  "FARM_S3_ENDPOINT_URL": f"http://{host}:{port}"})
    try:
        counter = Requests()
        import boto3

        boto3.client("s3", endpoint_url=settings.s3_endpoint_url,
                     region_name="us-east-1").create_bucket(Bucket="bench")
        broker.ensure_broker(settings)
        broker.wait_for_broker(settings)
        return _measure(settings, counter)
    finally:
        broker.stop_broker(settings)
        server.stop()
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def _measure(settings: Any, counter: Requests) -> dict[str, Any]:
    from farm import broker, tally
    from farm.scheduler.status import batch_counts
    from farm.store import open_store

    store = open_store(settings)
    client = broker.redis_client(settings)
    batch = "20261203-120000-abcdef"
    t0 = time.perf_counter()
    manifest, held = write_batch(store, client, settings, batch)
    figures: dict[str, Any] = {"jobs": JOBS, "write_seconds": round(time.perf_counter() - t0, 1)}

    def look(name: str) -> None:
        st, requests, seconds = counter.measure(
            lambda: batch_counts(store, client, batch, settings))
        figures[name] = {"requests": requests, "seconds": round(seconds, 4),
                         "source": st.source.value, "state": st.state, "counts": st.counts}

    look("status_running_counts")
    figures["summary_write_seconds"] = round(end_batch(store, client, manifest, held), 1)
    look("status_ended_summary")
    figures["status_cli"] = status_cli(settings, counter, batch)
    client.delete(tally.tally_key(batch))
    look("status_without_redis")
    store.delete(f"batches/{batch}/summary.json")
    look("status_from_records")
    worst = max(figures[k]["requests"] for k in ("status_running_counts", "status_ended_summary",
                                                 "status_without_redis"))
    slowest = max(figures[k]["seconds"] for k in ("status_running_counts", "status_ended_summary",
                                                  "status_without_redis"))
    figures["target"] = {"requests": TARGET_REQUESTS, "seconds": TARGET_SECONDS,
                         "met": worst <= TARGET_REQUESTS and slowest <= TARGET_SECONDS}
    _print(figures)
    return figures


def write_batch(store: Any, client: Any, settings: Any, batch: str) -> tuple[Any, list[Any]]:
    """A 10,000-job batch as `farm submit` writes it, then each job's record as its worker
    commits it (the MIX of states), with the worker's tally note; in parallel."""
    from farm import lifecycle, tally
    from farm.jobs import JobSpec
    from farm.records import SubmitState, create_batch
    from farm.scheduler.submit import _manifest

    spec = JobSpec.from_dict({"prompt": "a lighthouse at dusk", "steps": 4, "width": 64,
                              "height": 64, "seed": 1}, settings)
    specs = [replace(spec, seed=i + 1) for i in range(JOBS)]
    manifest = _manifest(batch, specs, settings, "bench", {}, "bench")
    create_batch(store, manifest, SubmitState.SUBMITTED)
    tally.start(client, batch, JOBS)
    counter = tally.Tally(client)
    states: list[str] = []
    for state, share in MIX:
        states += [state] * int(JOBS * share)
    states += ["queued"] * (JOBS - len(states))

    def commit(job: Any, state: str) -> Any:
        held = lifecycle.Held(lifecycle.JobRecord(job=job.id, batch=batch), None)
        if state == "queued":
            return held
        record = lifecycle.start(held.record, lifecycle.Stage.FULL, "bench-worker", {},
                                 max_attempts=3)
        if state == "succeeded":
            record = lifecycle.succeed(record, [f"batches/{batch}/images/{job.id}-0.png"], {})
        elif state == "failed":
            record = record.to(lifecycle.JobState.FAILED, error="job error: a bad prompt",
                               error_kind="job")
        return lifecycle.commit(store, held, record, then=counter.note)

    with ThreadPoolExecutor(max_workers=16) as pool:
        held = list(pool.map(commit, manifest.jobs, states))
    return manifest, held


def end_batch(store: Any, client: Any, manifest: Any, held: list[Any]) -> float:
    """Every unfinished job succeeds (as its worker commits it, over the record it holds), then
    the batch's summary is written as the worker that ends it writes it (from its tally and
    its failed jobs' records). Returns the seconds the summary took."""
    from farm import lifecycle, summary, tally

    counter = tally.Tally(client)

    def finish(held: Any) -> None:
        if held.record.state.final:
            return
        record = held.record
        if record.state is lifecycle.JobState.QUEUED:
            record = lifecycle.start(record, lifecycle.Stage.FULL, "bench-worker", {},
                                     max_attempts=3)
        lifecycle.commit(store, held, lifecycle.succeed(record, [], {}), then=counter.note)

    with ThreadPoolExecutor(max_workers=16) as pool:
        list(pool.map(finish, held))
    t0 = time.perf_counter()
    summary.finish(store, client, manifest)
    return time.perf_counter() - t0


def status_cli(settings: Any, counter: Requests, batch: str) -> dict[str, Any]:
    """`farm status BATCH` run in-process, as a user runs it (the broker's and the store's
    settings from FARM_*)."""
    from click.testing import CliRunner

    from farm.cli.main import cli

    env = {"FARM_HOME": str(settings.home), "FARM_STORE_URL": settings.store_url,
           "FARM_S3_ENDPOINT_URL": settings.s3_endpoint_url}
    out, requests, seconds = counter.measure(
        lambda: CliRunner().invoke(cli, ["status", batch], env=env))
    if out.exit_code != 0:
        raise RuntimeError(f"farm status failed: {out.output}")
    return {"requests": requests, "seconds": round(seconds, 4),
            "first_line": out.output.splitlines()[0]}


def _print(figures: dict[str, Any]) -> None:
    print(f"status of a {figures['jobs']:,}-job batch on S3 over HTTP (moto); batch written "
          f"through the farm's code in {figures['write_seconds']} s; its summary (written once "
          f"when it ends, by the worker that ends it) took {figures['summary_write_seconds']} s")
    for name in ("status_running_counts", "status_ended_summary", "status_cli",
                 "status_without_redis", "status_from_records"):
        f = figures[name]
        print(f"  {name:<24} {f['requests']:>6} requests  {f['seconds']:>8.3f} s"
              + (f"  ({f['source']})" if "source" in f else ""))
    t = figures["target"]
    print(f"  target: <= {t['requests']} requests and <= {t['seconds']} s: "
          f"{'met' if t['met'] else 'NOT met'}")


def main() -> int:
    import json

    print(json.dumps(status_at_scale(), indent=2, sort_keys=True))
    return 0
