"""Loading SDXL pipelines and rendering jobs with them. Imported only by the worker process.

Every model - tiny, Hub or local - goes through diffusers' own `from_pretrained` (or
`from_single_file`), so the tiny models used in tests exercise the real loading path.

Determinism: each image gets its own CPU `torch.Generator` seeded with its image seed, and images
are rendered one at a time. Same seed, same pixels on the same device type and thread count,
whatever else the job asks for: image k of a job equals that image rendered alone with its
image seed, (seed + k) mod 2**32 (JobSpec.image_seeds).
"""

from __future__ import annotations

import hashlib
import logging
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import PIL.Image
import torch
from diffusers import (
    AutoencoderKL,
    AutoencoderTiny,
    StableDiffusionXLImg2ImgPipeline,
    StableDiffusionXLPipeline,
)

from farm.errors import ModelUnavailable
from farm.models import CHECKPOINT_SUFFIXES, VAES, ModelSpec
from farm.settings import Settings
from farm.vram import PROFILES, Profile, catalog_variant
from farm.worker import recipe, tiny
from farm.worker.compile import default_backend
from farm.worker.model import LoadedModel

# the backend a worker renders with: loading is here, rendering in worker/render.py
from farm.worker.render import (
    SCHEDULERS,
    denoise_base,
    ensemble,
    make_scheduler,
    refine,
    render,
    render_batch,
    vae_used,
    warm,
    warm_buckets,
)
from farm.worker.weights import weight_files, weights_hash

# the drop-in VAEs the profiles swap in for real SDXL models: the store's catalog first
# (farm/models.py VAES), then these Hub ids
TAESD_XL = VAES["tiny"].hub_id
FP16_FIX_VAE = VAES["fp16-fix"].hub_id

log = logging.getLogger("farm.worker")


def resolve_device(device: str) -> str:
    """"auto" -> cuda:0 when torch sees a GPU, else cpu; anything else as given."""
    if device == "auto":
        return "cuda:0" if torch.cuda.is_available() else "cpu"
    return device


def load_model(spec: ModelSpec, settings: Settings, device: str,
               profile: Profile | None = None) -> LoadedModel:
    """Load `spec` onto `device` (fp16 on CUDA, fp32 on CPU) the way `profile` says (default:
    everything resident, the model's own VAE). Raises ModelUnavailable."""
    start = time.perf_counter()
    device = resolve_device(device)
    chosen = recipe.resolve(settings.recipe, device, settings.compile or default_backend(device))
    if settings.threads > 0:
        torch.set_num_threads(settings.threads)
    on_cuda = device.startswith("cuda")
    dtype = torch.float16 if on_cuda else torch.float32

    pulled = _pull(spec, settings, profile or PROFILES["resident"])
    if pulled is not None:
        # a catalog model is a base or a refiner as its manifest says (read from its own
        # config when it was pushed), whatever name it was pushed under
        spec = _with_role(spec, pulled)
    cls = StableDiffusionXLImg2ImgPipeline if spec.role == "refiner" else StableDiffusionXLPipeline
    if pulled is not None:
        # the store's catalog first: its copy wins over the Hub and the built tiny models
        source = pulled.path
        try:
            if pulled.manifest.layout == "single-file":
                pipe = _load(spec, lambda: cls.from_single_file(str(source), dtype=dtype))
                weights = [(source.name, source)]
            else:
                pipe = _load(spec, lambda: cls.from_pretrained(source, dtype=dtype,
                                                               use_safetensors=True))
                weights = weight_files(source)
        finally:
            pulled.release()
        if pulled.manifest.variant == "fp8" and not (profile and profile.fp8_weights):
            # stored in fp8: held in fp8 too, each layer cast up to compute
            pipe.unet.enable_layerwise_casting(storage_dtype=torch.float8_e4m3fn,
                                               compute_dtype=dtype)
    elif spec.source == "tiny":
        folder = settings.models_path / spec.ref
        tiny.build_tiny(spec.ref, folder)
        pipe = _load(spec, lambda: cls.from_pretrained(folder, dtype=dtype, use_safetensors=True))
        weights = weight_files(folder)
    elif spec.source == "hub":
        variant = "fp16" if on_cuda else None
        # download() is what from_pretrained(hub_id) does first; doing it here gives us the
        # snapshot folder to hash (and it only reads the cache when HF_HUB_OFFLINE=1)
        snapshot = Path(_load(spec, lambda: cls.download(spec.ref, variant=variant,
                                                         use_safetensors=True)))
        pipe = _load(spec, lambda: cls.from_pretrained(snapshot, dtype=dtype, variant=variant,
                                                       use_safetensors=True))
        weights = weight_files(snapshot, variant)
    elif spec.source == "path":
        path = Path(spec.ref)
        if path.is_dir():
            variant = "fp16" if on_cuda and any(path.glob("*/*.fp16.safetensors")) else None
            pipe = _load(spec, lambda: cls.from_pretrained(path, dtype=dtype, variant=variant))
            weights = weight_files(path, variant)
        elif path.is_file() and path.suffix in CHECKPOINT_SUFFIXES:
            pipe = _load(spec, lambda: cls.from_single_file(str(path), dtype=dtype))
            weights = [(path.name, path)]
        elif path.exists():
            raise ModelUnavailable(
                f"cannot load {spec.ref}: not a diffusers folder or a "
                f"{'/'.join(CHECKPOINT_SUFFIXES)} checkpoint")
        else:
            raise ModelUnavailable(
                f"cannot load {spec.ref}: no such file or folder on this worker; copy the model "
                f"there (diffusers folder or .safetensors file) or name a known model")
    else:
        raise ModelUnavailable(f"cannot load {spec.name}: unknown model source {spec.source!r}")

    profile = profile or PROFILES["resident"]
    own_tiny = None if pulled is None else pulled.folder / tiny.TINY_VAE_FOLDER
    if own_tiny is not None and not own_tiny.is_dir():
        own_tiny = None
    vae_name = _apply_profile(pipe, spec, settings, profile, device, dtype, own_tiny)
    pipe.set_progress_bar_config(disable=True)
    if vae_name == "tiny":
        tiny_vae = pipe.vae
    else:
        tiny_vae = _optional_tiny_vae(spec, settings, device, dtype, own_tiny)
    recipe.apply_at_load(pipe, chosen, (tiny_vae,))
    return LoadedModel(
        name=spec.name, spec=spec, pipe=pipe, device=device, dtype=dtype,
        weights_hash=weights_hash(weights),
        load_seconds=time.perf_counter() - start,
        scheduler_config=dict(pipe.scheduler.config),
        profile=profile.name, vae_name=vae_name, profile_vae=pipe.vae, tiny_vae=tiny_vae,
        recipe=chosen,
        catalog=None if pulled is None else {
            "name": pulled.manifest.name, "version": pulled.manifest.version,
            "variant": pulled.manifest.variant, "manifest": pulled.manifest.digest},
    )


def _pull(spec: ModelSpec, settings: Settings, profile: Profile) -> Any:
    """The model from the store's catalog (worker/model_cache.py), when the catalog has it;
    None for a model it does not hold (then the Hub, a built tiny model, or a local path).
    A bare name gives its newest version of the variant the profile holds in memory."""
    if spec.source == "path":
        return None
    return _pull_ref(spec.name, settings, catalog_variant(profile),
                     required=spec.source == "store")


def _pull_ref(ref: str, settings: Settings, prefer: str | None, required: bool) -> Any:
    """`ref` pulled from the store's catalog into the machine's cache, or None when the
    catalog does not hold it (ModelUnavailable instead when `required`)."""
    from farm import catalog
    from farm.errors import NotFound, StoreUnavailable
    from farm.store import open_store
    from farm.worker.model_cache import ModelCache

    store = open_store(settings)
    try:
        known = required or catalog.has_catalog(store)
    except StoreUnavailable:
        known = True  # no network: the cache may hold it
    if not known:
        return None
    try:
        pulled = ModelCache(settings, echo=log.warning).pull(store, ref, prefer)
    except (NotFound, ModelUnavailable):
        if required:
            raise
        return None
    log.warning("model %s: %s (%s, sha256:%s) %s in %.1f s", ref, pulled.manifest.ref,
                pulled.manifest.variant, pulled.manifest.digest[:12],
                f"pulled {pulled.fetched} blobs ({pulled.fetched_bytes / 1e6:.1f} MB)"
                if pulled.fetched else "from the machine's cache", pulled.seconds)
    return pulled


def _with_role(spec: ModelSpec, pulled: Any) -> ModelSpec:
    """`spec` as the base or refiner its manifest says it is; a VAE is no pipeline."""
    from dataclasses import replace

    role = pulled.manifest.role
    if role not in ("base", "refiner"):
        pulled.release()
        raise ModelUnavailable(f"cannot load {spec.name}: {pulled.manifest.ref} is a {role} "
                               "of the catalog, not a base or refiner model")
    return spec if role == spec.role else replace(spec, role=role)


def _catalog_vae(kind: str, settings: Settings, dtype: torch.dtype) -> Any:
    """The profile's replacement VAE (`kind`: "tiny" or "fp16-fix") from the store's catalog,
    pulled into the machine's cache; None when the catalog does not hold it."""
    wanted = VAES[kind]
    pulled = _pull_ref(wanted.name, settings, "fp16", required=False)
    if pulled is None:
        return None
    try:
        held = pulled.manifest.components.get("vae")
        if pulled.manifest.role != "vae" or held != wanted.cls:
            raise ModelUnavailable(
                f"catalog model {pulled.manifest.ref} must be a {wanted.cls} VAE (push "
                f"{wanted.hub_id} as {wanted.name}), got a {held or pulled.manifest.role}")
        cls = AutoencoderTiny if wanted.cls == "AutoencoderTiny" else AutoencoderKL
        folder = pulled.folder
        vae_spec = ModelSpec(wanted.name, "store", wanted.name, "vae", 0, 0, 0)
        return _load(vae_spec, lambda: cls.from_pretrained(folder, dtype=dtype))
    finally:
        pulled.release()


def _tiny_vae(spec: ModelSpec, settings: Settings, dtype: torch.dtype,
              own: Path | None = None) -> Any:
    """The model's tiny VAE: the one built with a tiny model, or pushed with it (`own`, in the
    machine's cache); else TAESD-XL from the store's catalog, else from the Hub."""
    if spec.source == "tiny":
        own = settings.models_path / spec.ref / tiny.TINY_VAE_FOLDER
    if own is not None:
        folder = own
        return _load(spec, lambda: AutoencoderTiny.from_pretrained(folder, dtype=dtype))
    return _catalog_vae("tiny", settings, dtype) or \
        _load(spec, lambda: AutoencoderTiny.from_pretrained(TAESD_XL, dtype=dtype))


def _optional_tiny_vae(spec: ModelSpec, settings: Settings, device: str,
                       dtype: torch.dtype, own: Path | None = None) -> Any:
    """The tiny VAE for jobs that ask for it; a worker without one decodes those with its own
    VAE and says so in the sidecar (`vae_used`)."""
    try:
        return _tiny_vae(spec, settings, dtype, own).to(device)
    except ModelUnavailable as exc:
        log.warning("no tiny VAE for %s (%s): jobs asking for it decode with the model's own",
                    spec.name, exc)
        return None


def _apply_profile(pipe: Any, spec: ModelSpec, settings: Settings, profile: Profile,
                   device: str, dtype: torch.dtype, own_tiny: Path | None = None) -> str:
    """Fetch the VAE the profile wants for this model (the store's catalog first), apply the
    profile; returns which VAE the pipeline now decodes with."""
    vae, name = None, "default"
    if profile.vae == "tiny":
        vae, name = _tiny_vae(spec, settings, dtype, own_tiny), "tiny"
    elif profile.vae == "fp16-fix" and dtype == torch.float16 and spec.source != "tiny":
        # SDXL's own VAE overflows in fp16; the fix is a fine-tune that does not (the tiny
        # models run in fp32 on CPU, where there is nothing to fix)
        vae = _catalog_vae("fp16-fix", settings, dtype) or \
            _load(spec, lambda: AutoencoderKL.from_pretrained(FP16_FIX_VAE, dtype=dtype))
        name = "fp16-fix"
    apply_profile(pipe, profile, device, dtype, vae)
    return name


def apply_profile(pipe: Any, profile: Profile, device: str, dtype: torch.dtype,
                  vae: Any = None) -> None:
    """The class's load profile (farm/vram.py), with `vae` the replacement VAE it calls for.
    Offloading needs an accelerator: on CPU it is a no-op, but the profile is still chosen,
    applied where it can be (VAE, fp8 storage), and recorded."""
    # 1. the VAE: the tiny one (TAESD-XL) or the fp16-fix one, in place of the model's own
    if vae is not None:
        pipe.vae = vae
    # 2. fp8 weight storage: the UNet's weights held as float8, each layer cast up to compute
    if profile.fp8_weights:
        pipe.unet.enable_layerwise_casting(storage_dtype=torch.float8_e4m3fn,
                                           compute_dtype=dtype)
    # 3. where the weights live while it runs
    on_cuda = device.startswith("cuda")
    if on_cuda and profile.offload == "sequential":
        pipe.enable_sequential_cpu_offload(device=device)
    elif on_cuda and profile.offload == "model":
        pipe.enable_model_cpu_offload(device=device)
    else:
        pipe.to(device)


def _load(spec: ModelSpec, load: Callable[[], Any]) -> Any:
    """Run one loading step; turn whatever it raises about missing files into ModelUnavailable."""
    try:
        with tiny.quiet_progress():
            return load()
    except (MemoryError, KeyboardInterrupt):
        raise
    except Exception as exc:  # diffusers/hub raise OSError, ValueError, httpx errors, ...
        raise ModelUnavailable(_explain(spec, exc)) from exc


def _explain(spec: ModelSpec, exc: Exception) -> str:
    from huggingface_hub.errors import (
        GatedRepoError,
        LocalEntryNotFoundError,
        OfflineModeIsEnabled,
        RepositoryNotFoundError,
    )

    detail = _one_line(exc)
    if spec.source == "hub":
        if isinstance(exc, GatedRepoError):
            return (f"cannot load {spec.ref}: the Hub repository is gated; accept its licence "
                    f"and log in with `hf auth login`, then retry ({detail})")
        if isinstance(exc, RepositoryNotFoundError):
            return f"cannot load {spec.ref}: no such repository on the Hub ({detail})"
        offline = isinstance(exc, LocalEntryNotFoundError | OfflineModeIsEnabled | OSError) or (
            "connect" in detail.lower() or "offline" in detail.lower())
        if offline:
            return (f"cannot load {spec.ref}: not in the local Hugging Face cache and the Hub is "
                    f"unreachable; download it first with `hf download {spec.ref}` on a machine "
                    f"with network (then copy the cache, HF_HOME), push it into the farm's "
                    f"store once (`farm models push {spec.ref} --name {spec.name}`), or pass "
                    f"an absolute local path as the model ({detail})")
    if spec.source == "tiny":
        return f"cannot load tiny model {spec.name} from {spec.ref}: {detail}"
    return f"cannot load {spec.ref}: {detail}"


def _one_line(exc: BaseException, limit: int = 200) -> str:
    text = " ".join(str(exc).split()) or type(exc).__name__
    text = f"{type(exc).__name__}: {text}"
    return text if len(text) <= limit else text[: limit - 3] + "..."


def pixels_digest(images: list[PIL.Image.Image]) -> str:
    """sha256 over the raw pixels of images: what "byte-identical output" means here."""
    digest = hashlib.sha256()
    for image in images:
        digest.update(f"{image.mode}{image.size}".encode())
        digest.update(image.tobytes())
    return digest.hexdigest()



__all__ = ["SCHEDULERS", "LoadedModel", "load_model", "apply_profile", "denoise_base", "refine",
           "warm_buckets",
           "ensemble", "render", "render_batch", "warm", "resolve_device",
           "make_scheduler", "vae_used", "weight_files", "weights_hash", "pixels_digest"]
