"""Live workers, as each one reports itself: a heartbeat key in Redis that expires.

A worker rewrites `farm:worker:<name>` every `heartbeat_interval` seconds with a TTL of
`heartbeat_ttl`; a worker that dies simply drops off the list when its key expires.
"""

from __future__ import annotations

import enum
import json
from dataclasses import asdict, dataclass, field
from typing import Any

KEY_PREFIX = "farm:worker:"


class WorkerState(enum.StrEnum):
    STARTING = "starting"   # loading and warming its pipelines; takes no jobs yet
    READY = "ready"         # waiting for a job
    BUSY = "busy"           # running a job
    DRAINING = "draining"   # finishing its current job, then exiting
    # failed FARM_QUARANTINE_AFTER stages of different jobs in a row (a worker fault each):
    # takes no more work, and exits non-zero after FARM_QUARANTINE_EXIT_SECONDS
    QUARANTINED = "quarantined"


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
    last_error: str | None = None   # the last failure this worker caused (a worker fault)
    incarnation: str = ""   # this process: a restart under the same name has another
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


def alive(client: Any, name: str, incarnation: str | None = None) -> bool:
    """`name` beats; with `incarnation`, as that very process (not a restart of the name)."""
    raw = client.get(worker_key(name))
    if raw is None:
        return False
    if incarnation is None:
        return True
    try:
        return bool(WorkerInfo.decode(raw).incarnation == incarnation)
    except (ValueError, TypeError):
        return False


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


# -- settings every process of a farm must agree on --------------------------------------------

SETTINGS_KEY = "farm:fleet-settings"
SHARED_SETTINGS = ("vram_classes", "buckets", "visibility_timeout", "max_attempts")


def shared_settings(settings: Any) -> dict[str, Any]:
    return {name: getattr(settings, name) for name in SHARED_SETTINGS}


def check_shared(client: Any, settings: Any, *, claim_ttl: float | None = None) -> None:
    """Refuse (ConfigError) settings that differ from those of the live workers. A worker
    claims the key (`claim_ttl`) and keeps it alive with its heartbeat; once no worker is left
    it binds no one (and soon expires): a farm may restart with new settings at once."""
    from farm.errors import ConfigError

    mine = shared_settings(settings)
    encoded = json.dumps(mine, sort_keys=True, default=list)
    if claim_ttl is not None:
        client.set(SETTINGS_KEY, encoded, nx=True, px=int(claim_ttl * 1000))
    raw = client.get(SETTINGS_KEY)
    if raw is None:
        return
    theirs = json.loads(raw)
    differ = [name for name in SHARED_SETTINGS
              if theirs.get(name) != json.loads(json.dumps(mine[name], default=list))]
    if differ and not _any_live(client):
        # the workers that claimed these settings are gone (their claim outlives the last of
        # them by up to its TTL): nothing disagrees, and a new fleet takes its own
        if claim_ttl is not None:
            client.set(SETTINGS_KEY, encoded, px=int(claim_ttl * 1000))
        return
    for name in differ:
        ours = json.loads(json.dumps(mine[name], default=list))
        raise ConfigError(
            f"FARM_{name.upper()} is {_show(ours)} here but {_show(theirs.get(name))} on "
            "the live workers; every process of a farm must agree")
    if claim_ttl is not None:
        client.set(SETTINGS_KEY, encoded, xx=True, px=int(claim_ttl * 1000))


def _any_live(client: Any) -> bool:
    return next(iter(client.scan_iter(match=KEY_PREFIX + "*", count=500)), None) is not None


def _show(value: Any) -> str:
    return ",".join(map(str, value)) if isinstance(value, list) else str(value)
