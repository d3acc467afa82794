"""`farm metrics serve`: the control plane's Prometheus exporter. It reads Redis only, and
never a job: each scrape costs O(queues + live workers + active batches) commands, sent in four
pipelined round trips.

    1. live workers        SCAN farm:worker:* and MGET them (farm/fleet.py)
    2. queue depths        LLEN of every queue the farm routes to: the served models' routes
                           x FARM_VRAM_CLASSES x priorities, and every queue a live worker
                           consumes; with them SCARD farm:active-batches, HLEN unacked, and
                           SMEMBERS farm:active-batches
    3. open jobs           SCARD farm:open:<batch> of each active batch

Batches by state: Redis knows only which batches are active (some job not yet ended: the set
`farm:active-batches` that submit fills and the workers empty, farm/recovery.py). How a batch
ended (succeeded, failed, canceled) is in the store's records, which this exporter does not
read; `farm status` and `farm batches` do.

Its Redis user needs only EXPORTER_COMMANDS on EXPORTER_KEYS, read-only (deploy/access.py).
"""

from __future__ import annotations

import logging
import time
from collections import Counter
from collections.abc import Iterable, Iterator, Sequence
from typing import Any

from prometheus_client import CollectorRegistry
from prometheus_client.core import GaugeMetricFamily

from farm import fleet, models, queues, recovery, tally
from farm.lifecycle import FINAL_STATES
from farm.settings import Settings

log = logging.getLogger("farm.exporter")

# the port `farm metrics serve` listens on unless told otherwise (workers: 9460, deploy/)
DEFAULT_PORT = 9461
# every Redis command a scrape sends, besides the connection's own (AUTH, HELLO, CLIENT SETINFO)
EXPORTER_COMMANDS = ("scan", "mget", "llen", "scard", "smembers", "hlen", "hmget")
# every key it reads (glob patterns, as an ACL writes them); all read-only
EXPORTER_KEYS = (f"{queues.QUEUE_PREFIX}.*", f"{fleet.KEY_PREFIX}*", recovery.ACTIVE_BATCHES,
                 f"{recovery.OPEN}*", f"{tally.PREFIX}*", recovery.UNACKED)


def served_queues(settings: Settings, model_names: Sequence[str]) -> list[str]:
    """Every queue stages of `model_names` (default: every known model) can wait on."""
    names = [models.resolve(m).name for m in model_names] or list(models.REGISTRY)
    return [queues.queue_name(route, c, p) for route in queues.routes(names)
            for c in settings.vram_classes for p in queues.PRIORITIES]


class FarmCollector:
    """The farm as Redis shows it, read at each scrape."""

    def __init__(self, client: Any, settings: Settings, model_names: Sequence[str] = ()) -> None:
        self.client = client
        self.settings = settings
        self.served = served_queues(settings, model_names)

    def collect(self) -> Iterator[GaugeMetricFamily]:
        t0 = time.perf_counter()
        up = GaugeMetricFamily("farm_exporter_redis_up", "1 when this scrape could read Redis.")
        try:
            state = self.read()
        except Exception as exc:  # noqa: BLE001 - a scrape reports the broker down, never raises
            log.warning("cannot read the farm from Redis: %s", exc)
            up.add_metric([], 0)
            yield up
            return
        up.add_metric([], 1)
        yield up
        yield from self.families(*state)
        took = GaugeMetricFamily("farm_exporter_scrape_seconds", "Seconds this scrape took "
                                 "reading Redis.")
        took.add_metric([], time.perf_counter() - t0)
        yield took

    def describe(self) -> Iterator[GaugeMetricFamily]:
        """Every family collect() yields, without reading Redis (registration, dashboards)."""
        yield GaugeMetricFamily("farm_exporter_redis_up", "")
        yield from self.families([], {}, 0, 0, 0)
        yield GaugeMetricFamily("farm_exporter_scrape_seconds", "")

    def read(self) -> tuple[list[fleet.WorkerInfo], dict[str, int], int, int, int | None]:
        """(live workers, depth by queue, active batches, open jobs, stages running: None when
        this Redis user may not read kombu's `unacked` hash)."""
        workers = fleet.live_workers(self.client)                                   # 1
        # the queues of the models asked for, those live workers consume, and any other queue
        # with stages waiting (a list exists only while it holds some): a catalog pair, say,
        # whose workers have all stopped
        waiting = [k.decode() if isinstance(k, bytes) else k for k in self.client.scan_iter(
            match=f"{queues.QUEUE_PREFIX}.*", count=1000, _type="list")]
        names = list(dict.fromkeys([*self.served, *(q for w in workers for q in w.queues),
                                    *sorted(n for n in waiting if queues.parse_queue(n))]))
        with self.client.pipeline(transaction=False) as pipe:                       # 2
            for name in names:
                pipe.llen(name)
            pipe.scard(recovery.ACTIVE_BATCHES)
            pipe.smembers(recovery.ACTIVE_BATCHES)
            pipe.hlen(recovery.UNACKED)
            *depths, active, batches, running = pipe.execute(raise_on_error=False)
        for value in (*depths, active, batches):
            if isinstance(value, Exception):
                raise value
        if isinstance(running, Exception):
            running = None
        else:   # a worker's own message is in its in-flight record, companions in `unacked`
            running += sum(1 for _ in self.client.scan_iter(match=f"{recovery.INFLIGHT}*",
                                                            count=1000))
        open_jobs = 0
        if batches:
            # each batch's jobs less those its tally counts final; without a tally, its open set
            counters = [tally.TOTAL, *("#" + s.value for s in FINAL_STATES)]
            with self.client.pipeline(transaction=False) as pipe:                   # 3
                for raw in batches:
                    batch = raw.decode() if isinstance(raw, bytes) else raw
                    pipe.hmget(tally.tally_key(batch), counters)
                    pipe.scard(recovery.OPEN + batch)
                got = pipe.execute()
            for (total, *final), members in zip(got[::2], got[1::2], strict=True):
                open_jobs += members if total is None else \
                    max(0, int(total) - sum(int(n or 0) for n in final))
        return workers, dict(zip(names, depths, strict=True)), active, open_jobs, running

    def families(self, workers: list[fleet.WorkerInfo], depths: dict[str, int], active: int,
                 open_jobs: int, running: int | None) -> Iterator[GaugeMetricFamily]:
        labels = ["model", "vram_class", "priority"]
        depth = GaugeMetricFamily("farm_queue_depth", "Stages waiting on a queue (its Redis "
                                  "list's length).", labels=labels)
        consumers = GaugeMetricFamily("farm_queue_consumers", "Live workers that consume a "
                                      "queue (starting, ready, busy or draining).", labels=labels)
        serving = Counter(q for w in workers if w.state != fleet.WorkerState.QUARANTINED
                          for q in w.queues)
        for name, length in depths.items():
            parsed = queues.parse_queue(name)
            if parsed is None:
                continue
            values = [parsed[0], str(parsed[1]), str(parsed[2])]
            depth.add_metric(values, length)
            consumers.add_metric(values, serving[name])
        yield depth
        yield consumers

        by_class = GaugeMetricFamily("farm_workers", "Live workers (a heartbeat key in Redis) "
                                     "by VRAM class and state.", labels=["vram_class", "state"])
        counts = Counter((w.vram_class, str(w.state)) for w in workers)
        for c in sorted({*self.settings.vram_classes, *(w.vram_class for w in workers)}):
            for s in fleet.WorkerState:
                by_class.add_metric([str(c), s.value], counts[(c, s.value)])
        yield by_class

        batches = GaugeMetricFamily("farm_batches", "Batches by state, as Redis knows them: "
                                    "active (some job not ended).", labels=["state"])
        batches.add_metric(["active"], active)
        yield batches
        jobs = GaugeMetricFamily("farm_jobs_open", "Jobs of active batches that have not "
                                 "ended (queued, running, or between stages).")
        jobs.add_metric([], open_jobs)
        yield jobs
        taken = GaugeMetricFamily("farm_stages_running", "Stage messages workers have taken and "
                                  "not yet acknowledged (in-flight records and kombu's unacked hash).")
        if running is not None:
            taken.add_metric([], running)
        yield taken


def registry(client: Any, settings: Settings, model_names: Iterable[str] = ()
             ) -> CollectorRegistry:
    reg = CollectorRegistry()
    reg.register(FarmCollector(client, settings, list(model_names)))
    return reg
