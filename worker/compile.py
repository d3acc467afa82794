"""Compiling a warm worker's UNet once, before its first job, with a fleet-wide cache.

    1. look up the fleet cache: compile artefacts another worker uploaded under a key made of
       everything that makes them valid (torch, device, weights, dtype, backend, buckets...)
    2. wrap the UNet: `inductor` (torch.compile of the whole UNet), `regional` (only its
       repeated transformer blocks: much faster to compile), `onediff`, or `none`
    3. warm every bucket (worker/pipelines.py warm_buckets): this is where compiling happens,
       for each shape a job can bring (bucket × CFG on/off)
    4. upload the artefacts when the cache had none (or a corrupt one): everything compiled
       while warming, so they cover every bucket the worker warms

The UNet is compiled with dynamic height and width (DYNAMIC_SHAPES, without duck sizing:
configure): one graph serves every bucket whose latent sides take the same paths through
the UNet (every SDXL bucket: each side a multiple of 4 latents), and the first bucket warmed
compiles it; a UNet batch of 1 (CFG off) is a graph of its own, since dynamo specialises
size-1 dimensions. Every bucket is still warmed: a guard that splits a bucket off compiles
there, not mid-job, and `recompiles()` checks each job.
"""

from __future__ import annotations

import hashlib
import json
import logging
import platform
import time
from dataclasses import dataclass, field
from typing import Any

from farm.errors import ConfigError, FarmError
from farm.keys import COMPILE_CACHE
from farm.settings import COMPILE_BACKENDS
from farm.store import Store

log = logging.getLogger("farm.worker")

BACKENDS = COMPILE_BACKENDS
CACHE_PREFIX = COMPILE_CACHE
# dynamo keeps this many compiled variants per function before falling back to eager: with
# static shapes nine buckets × CFG on/off (the cut-off halves the UNet batch) is 18, and the
# refiner adds its own
CACHE_SIZE_LIMIT = 64
# One graph with symbolic height and width rather than one per bucket: on CPU (tiny-sdxl,
# regional compile, nine buckets; docs/performance.md, "Compiling every bucket") it compiled
# the nine buckets in 201 s against 387 s (3 graphs against 16), 32 s against 156 s from the
# fleet cache, at the same seconds per image within the noise.
DYNAMIC_SHAPES = True
# dynamo's duck sizing (one symbol for equal sizes): off, see configure()
DUCK_SHAPE = False

ONEDIFF_MISSING = (
    "--compile onediff needs OneDiff (onediff and onediffx 1.2.0, with SiliconFlow's oneflow or "
    "nexfort on torch 2.4.0), which this worker does not have; build "
    "deploy/onediff-worker.Dockerfile, or use --compile inductor")


def default_backend(device: str) -> str:
    """Compiling pays off on a GPU; on a CPU the first compile costs more than it saves. On a
    GPU, `regional`: on an H200 with full-size SDXL (benchmarks/results/gpu_buckets.json,
    docs/performance.md) it compiled and warmed all nine buckets in 21 s with nothing cached
    and 14-15 s from the fleet cache, where the whole-UNet dynamic compile (`inductor`) had
    not finished the first bucket after 340 s."""
    return "regional" if device.startswith("cuda") else "none"


@dataclass
class CompileReport:
    backend: str
    state: str = "eager"           # eager, compiling, compiled
    seconds: float = 0.0           # compiling and warming every bucket
    cache: str = "off"             # off, hit, miss, corrupt
    cache_key: str = ""
    graphs: int = 0                # compiled graphs after warming
    details: dict[str, Any] = field(default_factory=dict)


def check_backend(backend: str) -> None:
    if backend not in BACKENDS:
        raise ConfigError(f"--compile must be one of {', '.join(BACKENDS)}, got {backend!r}")
    if backend == "onediff":
        try:
            import onediffx  # noqa: F401
        except ImportError:
            raise ConfigError(ONEDIFF_MISSING) from None


def configure() -> None:
    """The process-wide compiler settings a worker compiles under: room for every variant its
    buckets need, and no duck sizing. With duck sizing, dynamo gives height and width one
    symbol when the first shape it sees is square (1024x1024), so the first non-square bucket
    compiles the UNet again (graphs for CFG on and off twice over instead of once)."""
    import torch
    import torch.fx.experimental._config as fx_config

    torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit,
                                                CACHE_SIZE_LIMIT)
    fx_config.use_duck_shape = DUCK_SHAPE


def wrap(model: Any, backend: str) -> None:
    """Replace the model's UNet with its compiled form (compiling itself happens on first use)."""
    if backend == "none":
        return
    import torch

    configure()
    from farm.worker import recipe

    pipe, chosen = model.pipe, tuple(getattr(model, "recipe", ()))
    if backend == "inductor":
        pipe.unet = torch.compile(pipe.unet, dynamic=DYNAMIC_SHAPES,
                                  mode=recipe.compile_mode(chosen))
    elif backend == "regional":
        pipe.unet.compile_repeated_blocks(dynamic=DYNAMIC_SHAPES)
    elif backend == "onediff":
        from onediffx import compile_pipe

        model.pipe = compile_pipe(pipe)
        return
    recipe.compile_vae((pipe.vae, getattr(model, "profile_vae", None),
                        getattr(model, "tiny_vae", None)), chosen)


def graphs() -> int:
    """Graphs dynamo compiled in this process so far."""
    from torch._dynamo.utils import counters

    return int(counters["stats"]["unique_graphs"])


def cache_key(model: Any, backend: str, buckets: tuple[tuple[int, int], ...], profile: str,
              device: str) -> str:
    """Everything that makes compile artefacts valid, hashed into the store key."""
    import diffusers
    import torch

    if device.startswith("cuda"):
        name = torch.cuda.get_device_name(torch.device(device))
        capability = ".".join(map(str, torch.cuda.get_device_capability(torch.device(device))))
    else:
        name, capability = platform.machine(), "cpu"
    parts = {"torch": torch.__version__, "diffusers": diffusers.__version__,
             "python": platform.python_version(), "device": name, "capability": capability,
             "weights": model.weights_hash, "dtype": str(model.dtype), "backend": backend,
             "buckets": [list(b) for b in buckets], "profile": profile, "model": model.name,
             "dynamic_shapes": DYNAMIC_SHAPES, "duck_shape": DUCK_SHAPE,
             "recipe": list(getattr(model, "recipe", ()))}
    digest = hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:32]
    return f"{CACHE_PREFIX}/{model.name}/{digest}"


def load_cached(store: Store, key: str) -> str:
    """Load artefacts from the fleet cache into this process: "hit", "miss" or "corrupt"."""
    import torch

    try:  # the .json is written last: without it, the entry is not complete
        meta = json.loads(store.get(f"{key}.json"))
        blob = store.get(f"{key}.bin")
    except FarmError:
        return "miss"
    except ValueError:
        log.warning("ignoring the fleet compile cache entry %s: unreadable metadata", key)
        return "corrupt"
    try:
        if hashlib.sha256(blob).hexdigest() != meta.get("sha256"):
            raise ValueError("checksum mismatch")
        if torch.compiler.load_cache_artifacts(blob) is None:
            raise ValueError("torch found nothing it could use")
    except Exception as exc:  # noqa: BLE001 - a bad entry must never stop a worker
        log.warning("ignoring the fleet compile cache entry %s: %s", key, exc)
        return "corrupt"
    return "hit"


def save_cached(store: Store, key: str, report: CompileReport) -> None:
    import torch

    saved = torch.compiler.save_cache_artifacts()
    if saved is None:
        return
    blob = saved[0]
    meta = {"sha256": hashlib.sha256(blob).hexdigest(), "bytes": len(blob),
            "compile_seconds": round(report.seconds, 2), "created_at": time.time(),
            "backend": report.backend}
    try:
        store.put(f"{key}.bin", blob)
        store.put(f"{key}.json", json.dumps(meta).encode(), content_type="application/json")
    except FarmError as exc:
        log.warning("could not upload compile artefacts to %s: %s", key, exc)
