"""Deployment files, generated from the farm's own definitions.

`farm deploy compose|k8s|skypilot` writes files that run workers per VRAM class. Files that
drift from the code are worse than none, so nothing here is written by hand: the classes and
every shared limit come from the settings, every queue and Redis list from `farm.queues`, each
class's load profile from `farm.vram`. This module holds what all targets share (the spec, the
queues of a class, the environment, the grace periods, the writer); one module per target
builds its files as plain data:

    deploy/compose.py    docker compose: Redis, MinIO, a worker per class, Prometheus, Grafana
    deploy/k8s.py        Kubernetes: a Deployment and a KEDA ScaledObject per class
    deploy/skypilot.py   SkyPilot: a spot task per class, on any cloud
    deploy/access.py     least privilege: the S3 policies and Redis ACLs
    deploy/gpus.py       which GPUs fall in which class; a class needs cards of its own
    deploy/monitoring.py the metrics exporter, scrape configuration, alert rules, dashboard
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any

import yaml

from farm import models, queues
from farm.errors import ConfigError, UsageError
from farm.settings import Settings

TARGETS = ("compose", "k8s", "skypilot")

# The longest one stage may run, in seconds. No pool enforces it (the worker runs Celery's solo
# pool, which has no time limits: DESIGN.md §6); it is the promise the platform's grace period
# is sized by, so a worker told to stop can always finish the stage it holds.
DEFAULT_HARD_LIMIT = 1800
# What a draining worker needs beyond its stage: the store writes, the ack, the heartbeat key
# removed. The platform's grace period is the hard limit plus this.
DRAIN_MARGIN = 120

# FARM_STOP_GRACE on spot machines (SkyPilot): a reclaimed spot VM gets about 30 s between the
# shutdown signal and power-off on GCP and Azure (AWS gives a 2-minute notice), so a worker
# there hands back any stage that will not finish in 25 s (worker/drain.py).
SPOT_STOP_GRACE = 25

# One worker per container, so the ready file needs no "{name}" in it (worker/runtime.py).
READY_FILE = "/tmp/farm/ready"
# Each worker serves /metrics here (FARM_METRICS_PORT): one worker per container or pod, so one
# port for all. Not 9400, which NVIDIA's DCGM exporter takes on many GPU nodes.
METRICS_PORT = 9460
# The model cache volume: the models a worker pulls from the farm's store (its catalog, pushed
# once with `farm models push`: no per-pod Hub download), Hub downloads (HF_HOME) for what the
# catalog does not hold, and built tiny models (FARM_HOME/models).
MODEL_CACHE = "/models"
HF_HOME = f"{MODEL_CACHE}/huggingface"
FARM_HOME_IN_CONTAINER = f"{MODEL_CACHE}/farm"
MODEL_CACHE_DIR = f"{FARM_HOME_IN_CONTAINER}/model-cache"
# FARM_MODEL_CACHE_GB: the pulled models' share of the volume (k8s gives it 60 GiB): SDXL base
# and refiner in fp16 take about 13 GB, so several versions fit before the oldest is evicted
MODEL_CACHE_GB = 40

# A deployment serves the real model unless told otherwise; a job names its model, so the
# served set must match what users submit (`farm submit --model sdxl-base`).
DEFAULT_MODELS = (models.SDXL_BASE.name,)
DEFAULT_MAX_REPLICAS = 4
DEFAULT_NAMESPACE = "farm"
DEFAULT_BUCKET = "farm"

# Settings every process of one farm must agree on: the classes (routing), the caps (a worker
# checks every message again against its own), the reliability timings. They are written into
# every worker's environment and into farm.env for the machines that submit.
SHARED_SETTINGS = ("vram_classes", "visibility_timeout", "heartbeat_interval", "heartbeat_ttl",
                   "intermediate_ttl_hours", "max_steps", "max_pixels", "max_side",
                   "max_images_per_job", "max_prompt_chars", "max_jobs_per_batch", "s3_region")


def _version() -> str:
    try:
        return metadata.version("farm")
    except metadata.PackageNotFoundError:  # running from a source tree that was not installed
        return "0.0.0"


DEFAULT_IMAGE = f"farm-worker:{_version()}"
# the broker for compose and for the in-cluster Redis of the Kubernetes files
REDIS_IMAGE = "valkey/valkey:9.0.3"
DEFAULT_CONTROL_IMAGE = f"farm-control:{_version()}"


@dataclass(frozen=True)
class DeploySpec:
    """Everything a target needs, checked once: the classes and models a farm serves, where its
    images are, how far it may scale, and the shared settings of every process."""

    classes: tuple[int, ...]
    models: tuple[str, ...]
    settings_env: dict[str, str]
    image: str = DEFAULT_IMAGE
    control_image: str = DEFAULT_CONTROL_IMAGE
    max_replicas: int = DEFAULT_MAX_REPLICAS
    hard_limit: int = DEFAULT_HARD_LIMIT
    namespace: str = DEFAULT_NAMESPACE
    # host:port of an existing Redis for Kubernetes; None: the files deploy one in the cluster
    redis_address: str | None = None
    # that Redis speaks TLS (rediss://), and the CA certificate (PEM) that signed its own
    redis_tls: bool = False
    redis_ca: str | None = None
    # the S3 store workers outside compose use (compose runs its own MinIO); None: not set
    # where the files were generated, so Kubernetes gets a placeholder and SkyPilot asks for it
    store_url: str | None = None
    s3_endpoint_url: str | None = None

    @property
    def grace_seconds(self) -> int:
        """How long the platform waits for a stopping worker: above the hard limit."""
        return grace_seconds(self.hard_limit)


def grace_seconds(hard_limit: int) -> int:
    grace = hard_limit + DRAIN_MARGIN
    assert grace > hard_limit, "a grace period must exceed the hard time limit"
    return grace


def make_spec(settings: Settings, *, classes: Iterable[int] | None = None,
              model_names: Sequence[str] = (), image: str | None = None,
              control_image: str | None = None,
              max_replicas: int = DEFAULT_MAX_REPLICAS, hard_limit: int = DEFAULT_HARD_LIMIT,
              namespace: str = DEFAULT_NAMESPACE, redis_address: str | None = None,
              redis_ca: Path | None = None) -> DeploySpec:
    """A checked DeploySpec; UsageError or ConfigError names what is wrong and the value."""
    chosen = tuple(sorted(set(classes))) if classes is not None else settings.vram_classes
    if not chosen or min(chosen) <= 0:
        raise UsageError(f"--classes must be positive GB, got {','.join(map(str, chosen))}")
    names = tuple(dict.fromkeys(models.resolve(m).name for m in (model_names or DEFAULT_MODELS)))
    if max_replicas < 1:
        raise UsageError(f"--max-replicas must be at least 1, got {max_replicas}")
    if hard_limit <= 0:
        raise UsageError(f"--hard-limit must be positive seconds, got {hard_limit}")
    if settings.visibility_timeout <= grace_seconds(hard_limit):
        # celery#5935: a stage unacked past the visibility timeout is delivered again while the
        # first copy still runs, so the timeout must outlast the longest stage and its drain.
        raise ConfigError(
            f"FARM_VISIBILITY_TIMEOUT ({settings.visibility_timeout} s) must be above the hard "
            f"time limit plus the drain margin ({grace_seconds(hard_limit)} s)")
    redis = parse_redis(redis_address) if redis_address is not None else None
    ca = read_ca(redis_ca, redis) if redis_ca is not None else None
    return DeploySpec(
        classes=chosen, models=names, settings_env=shared_env(settings.replace(
            vram_classes=chosen)),
        image=image or DEFAULT_IMAGE, control_image=control_image or DEFAULT_CONTROL_IMAGE,
        max_replicas=max_replicas, hard_limit=hard_limit, namespace=namespace,
        redis_address=redis.address if redis else None, redis_tls=bool(redis and redis.tls),
        redis_ca=ca,
        # a file:// store is this machine's disk: no use to workers elsewhere
        store_url=settings.store_url if (settings.store_url or "").startswith("s3://") else None,
        s3_endpoint_url=settings.s3_endpoint_url)


@dataclass(frozen=True)
class RedisEndpoint:
    host: str
    port: int
    tls: bool

    @property
    def address(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"


REDIS_FORMS = "host:port, redis://host[:port] or rediss://host[:port] (TLS)"


def parse_redis(text: str) -> RedisEndpoint:
    """--redis: where an existing Redis listens. Credentials are not taken (each role of the
    farm gets its own user, deploy/access.py), nor a database other than 0 (the ACL channel
    rules name database 0)."""
    from urllib.parse import urlsplit

    def refuse(why: str) -> UsageError:
        return UsageError(f"--redis must be {REDIS_FORMS}; {why}, got {text!r}")

    value = text.strip()
    if "://" in value:
        parts = urlsplit(value)
        if parts.scheme not in ("redis", "rediss"):
            raise refuse(f"the scheme {parts.scheme!r} is neither redis nor rediss")
        if parts.username or parts.password:
            raise refuse("it takes no user or password (the files give each role its own)")
        if parts.path.strip("/") not in ("", "0") or parts.query or parts.fragment:
            raise refuse("the files use database 0 and take nothing after the host")
        tls = parts.scheme == "rediss"
        try:
            port = parts.port or 6379
        except ValueError:
            raise refuse("the port is not a number from 1 to 65535") from None
        host = parts.hostname or ""
    else:
        tls = False
        host, sep, port_text = value.rpartition(":")
        if not sep:
            raise refuse("a bare host needs its port")
        host = host.strip("[]")
        if not port_text.isdigit() or not 1 <= int(port_text) <= 65535:
            raise refuse("the port is not a number from 1 to 65535")
        port = int(port_text)
    if not host or any(c in host for c in "/@ "):
        raise refuse("the host is missing or malformed")
    return RedisEndpoint(host=host, port=port, tls=tls)


def read_ca(path: Path, redis: RedisEndpoint | None) -> str:
    """--redis-ca: the PEM certificate that signed the Redis server's, for a rediss:// Redis."""
    if redis is None or not redis.tls:
        raise UsageError(f"--redis-ca is for a TLS Redis (--redis rediss://HOST:PORT), got "
                         f"--redis-ca {path} without one")
    try:
        text = path.read_text()
    except OSError as exc:
        raise UsageError(f"--redis-ca cannot read {path}: {exc.strerror}") from None
    if "-----BEGIN CERTIFICATE-----" not in text:
        raise UsageError(f"--redis-ca must be a PEM certificate (-----BEGIN CERTIFICATE-----), "
                         f"got {path}")
    return text


def shared_env(settings: Settings) -> dict[str, str]:
    """The FARM_* variables every process of the farm must share, as the settings hold them."""
    env = {}
    for name in SHARED_SETTINGS:
        value = getattr(settings, name)
        if isinstance(value, tuple):
            value = ",".join(str(v) for v in value)
        env[f"FARM_{name.upper()}"] = str(value)
    return env


# -- queues ------------------------------------------------------------------------------------


def served_routes(spec: DeploySpec) -> list[str]:
    """The routes the workers serve: each model, and each base+refiner pair they hold both of."""
    return queues.routes(spec.models)


def class_queues(spec: DeploySpec, vram_class: int) -> list[str]:
    """Every queue holding stages planned for this class, for every served route and priority."""
    return [q for route in served_routes(spec) for q in queues.class_queues(route, vram_class)]


def class_lists(spec: DeploySpec, vram_class: int) -> list[str]:
    """The Redis lists those queues are made of: what a scaler of this class must count."""
    return [name for q in class_queues(spec, vram_class) for name in queues.redis_lists(q)]


def all_queues(spec: DeploySpec) -> list[str]:
    return [q for c in spec.classes for q in class_queues(spec, c)]


# -- the worker ---------------------------------------------------------------------------------


def worker_env(spec: DeploySpec, vram_class: int, stop_grace: int | None = None
               ) -> dict[str, str]:
    """A worker's settings, without secrets (the broker URL, S3 keys). FARM_STOP_GRACE is the
    platform's grace period (default: the one compose and Kubernetes are given, so a stopping
    worker there always finishes its stage)."""
    return {
        **spec.settings_env,
        "FARM_VRAM": str(vram_class),
        "FARM_STOP_GRACE": str(spec.grace_seconds if stop_grace is None else stop_grace),
        # cuda:0, not auto: a container that lost its GPU must fail, not render on the CPU
        "FARM_DEVICE": "cuda:0",
        "FARM_READY_FILE": READY_FILE,
        "FARM_METRICS_PORT": str(METRICS_PORT),
        "FARM_HOME": FARM_HOME_IN_CONTAINER,
        "FARM_MODEL_CACHE_DIR": MODEL_CACHE_DIR,
        "FARM_MODEL_CACHE_GB": str(MODEL_CACHE_GB),
        "HF_HOME": HF_HOME,
    }


def worker_args(spec: DeploySpec) -> list[str]:
    """Arguments after the image's `farm worker` entrypoint."""
    return [arg for name in spec.models for arg in ("--model", name)]


def worker_command(spec: DeploySpec, vram_class: int) -> str:
    """The same worker as one shell command line (SkyPilot's `run`)."""
    return " ".join(["exec", "farm", "worker", "--vram", str(vram_class), *worker_args(spec)])


def worker_name(vram_class: int) -> str:
    return f"farm-worker-{vram_class}gb"


# -- files -------------------------------------------------------------------------------------


def header(target: str, spec: DeploySpec) -> str:
    return (f"# Generated by `farm deploy {target}` (farm {_version()}) for VRAM classes "
            f"{','.join(map(str, spec.classes))} and models {', '.join(spec.models)}.\n"
            "# Regenerate instead of editing: queue names come from farm/queues.py.\n")


class _Dumper(yaml.SafeDumper):
    """The safe dumper, writing a dict used twice out twice (no &id001 anchors)."""

    def ignore_aliases(self, data: Any) -> bool:
        return True


def _str(dumper: yaml.SafeDumper, data: str) -> yaml.ScalarNode:
    # scripts as literal blocks, as a person would write them
    style = "|" if "\n" in data else None
    return dumper.represent_scalar("tag:yaml.org,2002:str", data, style=style)


_Dumper.add_representer(str, _str)


def dump_yaml(docs: Sequence[Any], comment: str = "") -> str:
    """YAML documents, keys in the order they were built."""
    return comment + yaml.dump_all(list(docs), Dumper=_Dumper, sort_keys=False,
                                   default_flow_style=False, width=100)


def env_file(env: dict[str, str], comment: str) -> str:
    return comment + "".join(f"{k}={v}\n" for k, v in env.items())


def policy_files(bucket: str, prefix: str = "") -> dict[str, str]:
    """The S3 policies of the workers and of the CLI on s3://bucket/prefix, as JSON files."""
    import json

    from farm.deploy.access import s3_policy

    return {f"policies/{role}.json": json.dumps(s3_policy(role, bucket, prefix), indent=2) + "\n"
            for role in ("worker", "cli")}


def store_policy_files(spec: DeploySpec) -> dict[str, str]:
    """policy_files for the spec's store, when it is known."""
    if spec.store_url is None:
        return {}
    bucket, _, prefix = spec.store_url.removeprefix("s3://").partition("/")
    return policy_files(bucket, prefix)


def farm_env_file(spec: DeploySpec) -> str:
    """farm.env: the shared settings, for the machines that submit to this farm."""
    return env_file(spec.settings_env, "# the shared settings of this farm: set them where you "
                    "submit too (plus FARM_BROKER_URL, FARM_STORE_URL)\n")


def render(target: str, spec: DeploySpec) -> dict[str, str]:
    """The files of one target: relative path → text."""
    if target == "compose":
        from farm.deploy import compose as module
    elif target == "k8s":
        from farm.deploy import k8s as module  # type: ignore[no-redef]
    elif target == "skypilot":
        from farm.deploy import skypilot as module  # type: ignore[no-redef]
    else:
        raise UsageError(f"target must be one of {', '.join(TARGETS)}, got {target!r}")
    return module.render(spec)


def write(files: dict[str, str], out: Path) -> list[Path]:
    """Write the files under `out`; returns their paths, in order."""
    written = []
    for rel, text in files.items():
        path = out / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
        written.append(path)
    return written
