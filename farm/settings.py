"""One settings object for every process of the farm.

Precedence, lowest first: the defaults below, then `FARM_*` environment variables, then CLI
flags (passed to `Settings.load` as overrides). Nothing else in the farm reads `os.environ`
(boto3 still reads the standard AWS credential variables itself).
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from farm.errors import ConfigError

ENV_PREFIX = "FARM_"
COMPILE_BACKENDS = ("inductor", "regional", "none", "onediff")  # worker/compile.py


@dataclass(frozen=True)
class Settings:
    # where the embedded broker, the default store, built models and logs live
    home: Path = field(default_factory=lambda: Path.home() / ".farm")
    # unset: the embedded Valkey server on a unix socket under `home`, started on demand
    broker_url: str | None = None
    # the CA that signed a TLS broker's certificate (rediss://); unset: the system's CAs
    broker_ca_file: Path | None = None
    # unset: a directory under `home`; else file:///path or s3://bucket/prefix
    store_url: str | None = None
    # for S3-compatible stores (MinIO, R2, moto); unset means AWS itself
    s3_endpoint_url: str | None = None
    s3_region: str = "us-east-1"
    # where tiny models are built and saved; unset: `home`/models
    models_dir: Path | None = None
    # where workers keep the models they pulled from the store's catalog (farm/catalog.py), shared
    # by every worker of the machine; unset: `home`/model-cache
    model_cache_dir: Path | None = None
    # the most that cache holds, in GB: least recently used blobs go first (SDXL base and
    # refiner in fp16 are about 13 GB together)
    model_cache_gb: float = 100.0
    # "auto" picks cuda:0 when torch sees a GPU, else cpu
    device: str = "auto"
    # torch intra-op threads per worker; 0: one on CPU (see worker/runtime.py), torch's on CUDA
    threads: int = 0
    # throughput mode: a worker renders up to this many queued jobs of one queue that share
    # every pipeline input but prompt and seed (same model, size, steps, sampler, guidance,
    # VAE) in one pipeline call (worker/batching.py); each keeps its own message, record and
    # images. 1: off, every job alone (pixels then never depend on what else was queued)
    batch_jobs: int = 1

    # -- VRAM classes (farm/vram.py)
    # the classes a farm routes to, in GB; every process of a farm must agree on them
    vram_classes: tuple[int, ...] = (4, 6, 8, 12, 16, 24, 48, 80)
    # a worker's class: a number from vram_classes, or "auto" (CUDA: from the GPU's memory;
    # CPU: the largest class, since a CPU worker has the machine's RAM)
    vram: str = "auto"
    # a worker's compile backend: inductor, regional, none, onediff; unset: regional on CUDA,
    # none on CPU (worker/compile.py)
    compile: str | None = None
    # a worker's recipe (farm/recipe.py): comma-separated options (fuse-qkv, channels-last,
    # compile-vae, cuda-graphs, fp8) or "none"; unset: the device's default
    recipe: str | None = None
    # a worker's load profile; unset: the one its class implies (farm.vram.PROFILE_BY_CLASS)
    profile: str | None = None
    # measured peak-VRAM figures (JSON rows) replacing the seeded ones
    vram_table: Path | None = None

    # a worker creates this file once it is loaded and warm, and removes it when it stops:
    # a container's readiness probe checks it (deploy/)
    ready_file: Path | None = None

    # the port a worker serves Prometheus metrics on (/metrics, docs/metrics.md); unset: none.
    # 0: a free port the system picks (the worker prints it and lists it in `farm workers
    # --json`). Workers on one machine each need their own: `farm up` gives its i-th worker
    # this port + i. The deployment files use 9460 (one worker per container or pod).
    metrics_port: int | None = None

    # the image sizes a farm renders, for every model ("1024x1024,1152x896"); unset: the nine
    # standard SDXL resolutions, or their eighth-size versions (and 64x64) for tiny models
    buckets: str | None = None

    # -- caps on what one request may ask for (checked at submit and again by the worker)
    max_steps: int = 150
    # SDXL is trained around 1 MP; 4 MP is already far past useful and near 24 GB of VRAM
    max_pixels: int = 2048 * 2048
    max_side: int = 4096
    max_images_per_job: int = 8
    max_prompt_chars: int = 2000
    max_jobs_per_batch: int = 10_000

    # -- reliability (DESIGN.md §6)
    # A task unacked this long is delivered again while the first copy still runs
    # (celery#5935): it must stay far above the longest stage (farm/limits.py checks it), the
    # same on every process. Dead workers are recovered from their heartbeats within a minute
    # (farm/recovery.py); this is only the backstop, so it can be long.
    visibility_timeout: int = 86400
    # a stage that failed for a worker fault (a CUDA error, a crash, a hang, a kill) this many
    # times, on as many workers as there are, is dead-lettered (a poison job)
    max_attempts: int = 3
    # a worker that fails this many stages of different jobs in a row, a worker fault each
    # time, is quarantined: it takes no more work and exits after quarantine_exit_seconds
    # (non-zero, so its platform restarts or replaces it); a restart releases it
    quarantine_after: int = 3
    quarantine_exit_seconds: float = 60.0
    # a stage with no denoising step for this long is hung: its worker exits and the stage is
    # recovered elsewhere (a hung CUDA kernel cannot be interrupted from Python)
    hang_timeout: float = 300.0
    # workers refresh a heartbeat key this often; it expires after heartbeat_ttl
    heartbeat_interval: float = 5.0
    heartbeat_ttl: float = 20.0
    # how long a request keeps retrying an unreachable object store before it gives up
    store_retry_seconds: float = 60.0
    # latents of failed split jobs are kept this long, then `farm clean` removes them
    intermediate_ttl_hours: float = 24.0
    # how long `farm submit` keeps trying an unreachable broker before it gives up
    broker_connect_timeout: float = 10.0
    # seconds the platform allows a worker between SIGTERM and SIGKILL (Kubernetes'
    # terminationGracePeriodSeconds, compose's stop_grace_period, a spot notice). A stage that
    # fits in it finishes; one that does not is handed back with its latents at the next step
    # and resumed by another worker (worker/drain.py). 30: Kubernetes' default.
    stop_grace: float = 30.0

    # the key that signs a batch's end webhook (`farm submit --notify URL`): the POST's
    # X-Farm-Signature is sha256=<HMAC-SHA256 of the body> (farm/webhook.py). The workers send
    # it, so they need it; unset: sent unsigned
    webhook_secret: str | None = field(default=None, repr=False)

    @classmethod
    def load(cls, env: Mapping[str, str] | None = None, **overrides: Any) -> Settings:
        """Defaults, then FARM_* variables from `env` (os.environ if None), then overrides.

        An override of None means "not given on the command line" and is skipped.
        """
        env = os.environ if env is None else env
        values: dict[str, Any] = {}
        for f in fields(cls):
            raw = env.get(ENV_PREFIX + f.name.upper())
            if raw is not None and raw != "":
                values[f.name] = _convert(f.name, f.type, raw, ENV_PREFIX + f.name.upper())
        for name, value in overrides.items():
            if name not in {f.name for f in fields(cls)}:
                raise ConfigError(f"unknown setting {name!r}")
            if value is not None:
                values[name] = value
        if "home" in values:
            values["home"] = Path(values["home"]).expanduser()
        settings = cls(**values)
        settings.check()
        return settings

    def replace(self, **changes: Any) -> Settings:
        return dataclasses.replace(self, **changes)

    def check(self) -> None:
        if self.heartbeat_ttl <= self.heartbeat_interval:
            raise ConfigError(
                f"heartbeat_ttl must be above heartbeat_interval, got {self.heartbeat_ttl} "
                f"<= {self.heartbeat_interval}")
        if not self.vram_classes or min(self.vram_classes) <= 0:
            raise ConfigError(f"vram_classes must be positive GB, got {self.vram_classes}")
        if self.vram != "auto" and (not self.vram.isdigit()
                                    or int(self.vram) not in self.vram_classes):
            classes = ", ".join(str(c) for c in self.vram_classes)
            raise ConfigError(f"vram must be auto or one of the classes {classes}, "
                              f"got {self.vram!r}")
        if self.compile is not None and self.compile not in COMPILE_BACKENDS:
            raise ConfigError(f"compile must be one of {', '.join(COMPILE_BACKENDS)}, got "
                              f"{self.compile!r}")
        if self.recipe is not None:
            from farm.recipe import parse

            parse(self.recipe, "cpu")
        if self.buckets:
            from farm import buckets

            buckets.parse(self.buckets)
        if self.profile is not None:
            from farm.vram import PROFILES

            if self.profile not in PROFILES:
                raise ConfigError(f"profile must be one of {', '.join(PROFILES)}, "
                                  f"got {self.profile!r}")
        for name in ("max_steps", "max_pixels", "max_side", "max_images_per_job",
                     "max_prompt_chars", "max_jobs_per_batch", "visibility_timeout",
                     "max_attempts", "batch_jobs"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"{name} must be positive, got {getattr(self, name)}")
        if self.metrics_port is not None and not 0 <= self.metrics_port <= 65535:
            raise ConfigError(f"metrics_port must be 0 (any free port) to 65535, got "
                              f"{self.metrics_port}")
        if not self.model_cache_gb > 0:
            raise ConfigError(f"model_cache_gb (FARM_MODEL_CACHE_GB) must be positive GB, got "
                              f"{self.model_cache_gb}")
        if not self.stop_grace > 0:
            raise ConfigError(f"stop_grace must be positive seconds, got {self.stop_grace}")
        from farm.limits import check_visibility

        check_visibility(self.visibility_timeout, self.max_steps, self.max_pixels,
                         self.max_images_per_job)

    def bucket_list(self, model: Any) -> tuple[tuple[int, int], ...]:
        """The sizes jobs for `model` (a farm.models.ModelSpec) may ask for."""
        from farm import buckets

        if self.buckets:
            return buckets.parse(self.buckets)
        return buckets.TINY_BUCKETS if model.source == "tiny" else buckets.SDXL_BUCKETS

    # -- derived paths

    @property
    def embedded(self) -> bool:
        """True when the farm runs its own broker (no FARM_BROKER_URL)."""
        return not self.broker_url

    @property
    def run_dir(self) -> Path:
        return self.home / "run"

    @property
    def log_dir(self) -> Path:
        return self.home / "logs"

    @property
    def models_path(self) -> Path:
        return self.models_dir if self.models_dir is not None else self.home / "models"

    @property
    def model_cache_path(self) -> Path:
        return self.model_cache_dir if self.model_cache_dir is not None else \
            self.home / "model-cache"

    @property
    def broker_socket(self) -> Path:
        """The embedded server's unix socket; short enough for the 107-byte sun_path limit."""
        path = self.run_dir / "broker.sock"
        if len(str(path)) < 100:
            return path
        digest = hashlib.sha1(str(self.home).encode()).hexdigest()[:12]
        return Path("/tmp") / f"farm-{digest}.sock"

    @property
    def effective_broker_url(self) -> str:
        if self.broker_url:
            return self.broker_url
        return f"redis+socket://{self.broker_socket}"

    @property
    def effective_store_url(self) -> str:
        if self.store_url:
            return self.store_url
        return (self.home / "store").resolve().as_uri()


def _convert(name: str, type_: Any, raw: str, source: str) -> Any:
    type_name = type_ if isinstance(type_, str) else getattr(type_, "__name__", str(type_))
    try:
        if type_name.startswith("tuple"):
            return tuple(sorted({int(part) for part in raw.split(",") if part.strip()}))
        if type_name.startswith("int"):
            return int(raw)
        if type_name.startswith("float"):
            return float(raw)
        if "Path" in type_name:
            return Path(raw).expanduser()
    except ValueError:
        kind = {"int": "an integer", "tup": "a comma-separated list of integers"}.get(
            type_name[:3], "a number")
        raise ConfigError(f"{source} must be {kind}, got {raw!r}") from None
    return raw
