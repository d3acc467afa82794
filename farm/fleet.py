"""Live workers, as each one reports itself: a heartbeat key in Redis that expires.

A worker rewrites `farm:worker:<name>` every `heartbeat_interval` seconds with a TTL of
`heartbeat_ttl`; a worker that dies simply drops off the list when its key expires.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from typing import Any

KEY_PREFIX = "farm:worker:"


class WorkerState:
    STARTING = "starting"   # loading and warming its pipelines; takes no jobs yet
    READY = "ready"         # waiting for a job
    BUSY = "busy"           # running a job
    DRAINING = "draining"   # finishing its current job, then exiting


@dataclass
class WorkerInfo:
    name: str
    host: str
    pid: int
    device: str
    models: list[str]
    queues: list[str]
    vram_class: int = 0
    profile: str = ""
    state: str = WorkerState.STARTING
    current_job: str | None = None
    jobs_done: int = 0
    jobs_failed: int = 0
    started_at: float = 0.0
    last_seen: float = 0.0
    # backend, state (eager/compiling/compiled), seconds, cache (off/hit/miss/corrupt), graphs,
    # recompiles (graphs compiled mid-job: a shape no bucket warmed)
    compile: dict[str, Any] = field(default_factory=dict)
    extra: dict[str, Any] = field(default_factory=dict)

    def encode(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)

    @classmethod
    def decode(cls, raw: bytes | str) -> WorkerInfo:
        data = json.loads(raw)
        known = set(cls.__dataclass_fields__)
        return cls(**{k: v for k, v in data.items() if k in known})


def worker_key(name: str) -> str:
    return KEY_PREFIX + name


def publish(client: Any, info: WorkerInfo, ttl: float) -> None:
    client.set(worker_key(info.name), info.encode(), px=int(ttl * 1000))


def remove(client: Any, name: str) -> None:
    client.delete(worker_key(name))


def live_workers(client: Any) -> list[WorkerInfo]:
    keys = sorted(client.scan_iter(match=KEY_PREFIX + "*", count=500))
    if not keys:
        return []
    workers = []
    for raw in client.mget(keys):
        if raw is None:  # expired between SCAN and MGET
            continue
        try:
            workers.append(WorkerInfo.decode(raw))
        except (ValueError, TypeError):
            continue
    return workers
