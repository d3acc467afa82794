"""`farm models push`: a model slimmed, its files uploaded as blobs, its manifest written.

1. Read the source: a Hub id already in the local Hugging Face cache, a diffusers folder, a
   single-file `.safetensors` checkpoint, or one VAE's folder (`config.json` of an
   AutoencoderKL or AutoencoderTiny: the profiles' replacement VAEs, farm/models.py VAES).
   Pickle checkpoints are refused (loading one runs code). What the model is - a base, a
   refiner or a VAE - is read from its own config (`role`), whatever name it is pushed under.
2. Slim it into a staging folder: safetensors only; 32-bit floating tensors to 16 bit; EMA
   weights dropped where a checkpoint carries both; for the fp8 variant, the UNet's weights as
   float8_e4m3fn exactly where diffusers' layerwise casting stores them in fp8 (norms and
   embeddings stay 16 bit), so a worker loading it with `enable_layerwise_casting` holds what
   was stored.
3. Hash every staged file, upload the blobs the store lacks (several files at once, each a
   parallel multipart upload), then write the manifest create-once as the name's next version.
"""

from __future__ import annotations

import hashlib
import json
import re
import shutil
import tempfile
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from farm import blobs, catalog
from farm.errors import AlreadyExists, UsageError, ValidationError
from farm.store import Store

PICKLE_SUFFIXES = (".ckpt", ".bin", ".pt", ".pth")
WEIGHT_SUFFIXES = (".safetensors", *PICKLE_SUFFIXES)
EXTRA_COMPONENTS = ("vae_tiny",)
VAE_CLASSES = ("AutoencoderKL", "AutoencoderTiny")
# the weights diffusers loads from a component folder; a Hub VAE repository also carries
# single-file copies of the same weights (sdxl_vae.safetensors, taesdxl_decoder.safetensors)
_COMPONENT_WEIGHTS = re.compile(r"^diffusion_pytorch_model(\.fp16)?(-[0-9]+-of-[0-9]+)?"
                                r"\.safetensors(\.index\.json)?$")
FILE_THREADS = 4      # files uploaded at once, each in blobs.UPLOAD_THREADS parts at once
_VARIANT_TAG = re.compile(r"\.fp16(?=[.-])")
_HUB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*/[A-Za-z0-9][A-Za-z0-9._-]*$")


def refuse_pickle(path: str) -> UsageError:
    return UsageError(
        f"refusing {path}: pickle checkpoints ({', '.join(PICKLE_SUFFIXES)}) run code when "
        f"loaded; convert it to .safetensors where you trust it (diffusers' "
        f"scripts/convert_original_stable_diffusion_to_diffusers.py --to_safetensors, or "
        f"safetensors.torch.save_file(torch.load(path, weights_only=True)[...], 'x.safetensors'))"
        f" and push that")


def source_of(source: str) -> tuple[str, Path, str]:
    """(layout, local path, revision) of what `farm models push SOURCE` names."""
    path = Path(source).expanduser()
    if source.endswith(PICKLE_SUFFIXES):
        raise refuse_pickle(source)
    if path.is_file():
        if path.suffix != ".safetensors":
            raise ValidationError("SOURCE", "must be a diffusers folder, a .safetensors file "
                                  "or a Hub id in the local Hugging Face cache", source)
        return "single-file", path.resolve(), ""
    if path.is_dir():
        return _folder_layout(path, source), path.resolve(), ""
    if _HUB_ID.match(source):
        from huggingface_hub import snapshot_download

        try:
            folder = Path(snapshot_download(source, local_files_only=True))
        except Exception as exc:  # LocalEntryNotFoundError and kin
            raise UsageError(f"{source} is not in the local Hugging Face cache; download it "
                             f"first (`hf download {source}`) or push a local folder "
                             f"({type(exc).__name__})") from None
        return _folder_layout(folder, source), folder, folder.name
    raise ValidationError("SOURCE", "must be an existing folder or .safetensors file, or a Hub "
                          "id (org/name) in the local Hugging Face cache", source)


def _folder_layout(folder: Path, source: str) -> str:
    """"diffusers" (a pipeline: model_index.json) or "component" (one VAE: config.json)."""
    if (folder / "model_index.json").is_file():
        return "diffusers"
    config = folder / "config.json"
    if config.is_file() and _json(config).get("_class_name") in VAE_CLASSES:
        return "component"
    raise ValidationError("SOURCE", "must be a diffusers folder (with model_index.json), a VAE "
                          f"folder (config.json of an {' or '.join(VAE_CLASSES)}), a "
                          ".safetensors file or a Hub id of one", source)


def _json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def push(store: Store, source: str, name: str, variant: str = "fp16",
         echo: Callable[[str], None] = print) -> catalog.ModelManifest:
    """Push `source` as the next version of `name`; returns its manifest."""
    catalog.check_name(name)
    if variant not in catalog.VARIANTS:
        raise ValidationError("--variant", f"must be one of {', '.join(catalog.VARIANTS)}",
                              variant)
    layout, path, revision = source_of(source)
    with tempfile.TemporaryDirectory(prefix="farm-push-") as tmp:
        stage = Path(tmp)
        if layout == "diffusers":
            info = _slim_folder(path, stage, variant)
        elif layout == "component":
            if variant != "fp16":
                raise ValidationError("--variant", "must be fp16 for a VAE (fp8 stores a UNet's "
                                      "weights)", variant)
            info = _slim_vae(path, stage)
        else:
            info = _slim_file(path, stage, variant)
        files = sorted(p for p in stage.rglob("*") if p.is_file())
        entries = []
        for file in files:
            entries.append(catalog.ModelFile(file.relative_to(stage).as_posix(),
                                             file.stat().st_size, blobs.file_sha256(file)))
        revision = revision or info.pop("source_digest")
        with ThreadPoolExecutor(max_workers=FILE_THREADS, thread_name_prefix="push") as pool:
            sent = list(pool.map(lambda e: blobs.upload(store, stage / e.path, e.sha256),
                                 entries))
        for attempt in range(5):
            manifest = catalog.ModelManifest(
                name=name, version=catalog.next_version(store, name), variant=variant,
                role=info["role"], layout=layout, files=tuple(entries),
                components=info["components"], dtypes=info["dtypes"], source=source,
                revision=revision, slimming=tuple(info["slimming"]),
                bytes_before=info["bytes_before"], bytes_after=info["bytes_after"],
                created_at=time.time())
            try:
                catalog.write(store, manifest)
                break
            except AlreadyExists:  # another push took this version number
                if attempt == 4:
                    raise
    new = [e for e, s in zip(entries, sent, strict=True) if s]
    echo(f"pushed {manifest.ref} ({variant}, sha256:{manifest.digest[:12]}): "
         f"{len(entries)} files, {_gb(sum(info['bytes_before'].values()))} -> "
         f"{_gb(sum(info['bytes_after'].values()))} of weights; uploaded {len(new)} new blobs "
         f"({_gb(sum(e.size for e in new))}), {len(entries) - len(new)} already in the store")
    return manifest


def _gb(n: int) -> str:
    return f"{n / 1e9:.2f} GB" if n >= 1e8 else f"{n / 1e6:.1f} MB"


def _dtypes(tensors: dict[str, torch.Tensor]) -> list[str]:
    return sorted({str(t.dtype).removeprefix("torch.") for t in tensors.values()})


def _to16(tensors: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], bool]:
    changed = any(t.dtype == torch.float32 for t in tensors.values())
    return {k: (t.to(torch.float16) if t.dtype == torch.float32 else t).contiguous()
            for k, t in tensors.items()}, changed


def _slim_folder(folder: Path, stage: Path, variant: str) -> dict[str, Any]:
    """A diffusers folder into `stage`: model_index.json, each component's configs, its weights
    in 16 bit (the fp16 files where the folder has them), the UNet's in fp8 for that variant."""
    index = json.loads((folder / "model_index.json").read_text())
    shutil.copyfile(folder / "model_index.json", stage / "model_index.json")
    components = {k: str(v[1]) for k, v in index.items()
                  if isinstance(v, list) and len(v) == 2 and v[0] is not None}
    # folders beside the pipeline's own that a worker loads too: the tiny VAE (TAESD-XL) of
    # the fast preset, which the tiny models carry (worker/tiny.py)
    components.update({extra: "AutoencoderTiny" for extra in EXTRA_COMPONENTS
                       if (folder / extra / "config.json").is_file()})
    info: dict[str, Any] = {"components": components, "dtypes": {}, "bytes_before": {},
                            "bytes_after": {}, "slimming": set(),
                            "role": _pipeline_role(folder, index)}
    source_digest = hashlib.sha256()
    for component in sorted(components):
        _slim_component(folder / component, stage / component, component,
                        components[component], variant, info, source_digest)
    info["slimming"] = sorted(info["slimming"])
    info["source_digest"] = "sha256:" + source_digest.hexdigest()
    return info


def _pipeline_role(folder: Path, index: dict[str, Any]) -> str:
    """"refiner" or "base", from the weights' own configs, whatever the folder is called or
    which pipeline class saved it: SDXL's UNet embeds 6 time ids (sizes and crop) for a base
    and 5 (sizes and an aesthetic score) for a refiner, beside the second text encoder's
    projection. Without those configs: a pipeline with no first text encoder is a refiner."""
    unet = _json(folder / "unet" / "config.json")
    text2 = _json(folder / "text_encoder_2" / "config.json")
    per_id = unet.get("addition_time_embed_dim")
    total = unet.get("projection_class_embeddings_input_dim")
    projection = text2.get("projection_dim")
    if isinstance(per_id, int) and isinstance(total, int) and isinstance(projection, int) \
            and per_id > 0:
        ids = (total - projection) / per_id
        if ids in (5, 6):
            return "refiner" if ids == 5 else "base"
    first = index.get("text_encoder")
    return "refiner" if not (isinstance(first, list) and first and first[0]) else "base"


def _slim_vae(folder: Path, stage: Path) -> dict[str, Any]:
    """One VAE's folder (AutoencoderTiny or AutoencoderKL) into `stage`: its config and the
    weights diffusers loads, in 16 bit."""
    class_name = str(_json(folder / "config.json")["_class_name"])
    info: dict[str, Any] = {"components": {"vae": class_name}, "dtypes": {},
                            "bytes_before": {}, "bytes_after": {}, "slimming": set(),
                            "role": "vae"}
    source_digest = hashlib.sha256()
    _slim_component(folder, stage, "vae", class_name, "fp16", info, source_digest,
                    loadable_only=True)
    info["slimming"] = sorted(info["slimming"])
    info["source_digest"] = "sha256:" + source_digest.hexdigest()
    return info


def _slim_component(src: Path, dst: Path, component: str, class_name: str, variant: str,
                    info: dict[str, Any], source_digest: Any,
                    loadable_only: bool = False) -> None:
    """One component folder into `dst`: its configs, its weights in 16 bit (the fp16 files
    where it has them), the UNet's in fp8 for that variant; `info` gets its dtypes and bytes."""
    dst.mkdir(parents=True, exist_ok=True)
    present = sorted(p for p in src.iterdir() if p.is_file())
    weights = [p for p in present if p.name.endswith(WEIGHT_SUFFIXES)
               or p.name.endswith(".safetensors.index.json")
               or ".safetensors.index." in p.name]
    if loadable_only:
        # a VAE repository's own folder: only what from_pretrained reads (not its single-file
        # copies of the same weights, its README or sample images)
        kept = [p for p in weights if _COMPONENT_WEIGHTS.match(p.name)
                or p.suffix in PICKLE_SUFFIXES]
        if any(p.suffix == ".safetensors" for p in set(weights) - set(kept)):
            info["slimming"].add("single-file copies of the weights left out")
        weights = kept
        present = [p for p in present if p in weights or p.name == "config.json"]
    for other in set(present) - set(weights):
        shutil.copyfile(other, dst / other.name)
    safe = [p for p in weights if p.suffix == ".safetensors" or ".index." in p.name]
    if weights and not safe:
        raise refuse_pickle(str(weights[0]))
    fp16 = [p for p in safe if _VARIANT_TAG.search(p.name)]
    chosen = fp16 or [p for p in safe if not re.search(r"\.(fp16|fp32|bf16|fp8|non_ema|ema)"
                                                       r"[.-]", p.name)]
    if fp16:
        info["slimming"].add("fp16 files chosen over 32-bit ones")
    if len(safe) < len(weights):
        info["slimming"].add("pickle weight files left out (safetensors only)")
    before = after = 0
    dtypes: set[str] = set()
    for file in chosen:
        target = dst / _VARIANT_TAG.sub("", file.name)
        if file.name.endswith(".json"):  # a sharded file's index: its shard names too
            data = json.loads(file.read_text())
            data["weight_map"] = {k: _VARIANT_TAG.sub("", v)
                                  for k, v in data.get("weight_map", {}).items()}
            target.write_text(json.dumps(data, indent=2))
            continue
        source_digest.update(f"{component}/{file.name}\t{_source_sha(file)}\n".encode())
        before += file.stat().st_size
        tensors, changed = _to16(load_file(file))
        if changed:
            info["slimming"].add("fp32 tensors stored as fp16")
        save_file(tensors, target, metadata={"format": "pt"})
        dtypes.update(_dtypes(tensors))
        after += target.stat().st_size
    if variant == "fp8" and component == "unet":
        after, fp8_dtypes = _unet_to_fp8(dst, class_name)
        dtypes = set(fp8_dtypes)
        info["slimming"].add("unet weights stored as float8_e4m3fn (layerwise casting)")
    info["dtypes"][component] = sorted(dtypes)
    info["bytes_before"][component] = before
    info["bytes_after"][component] = after


def _source_sha(path: Path) -> str:
    target = path.resolve()  # a Hugging Face cache names each blob by its sha256
    if path.is_symlink() and re.fullmatch(r"[0-9a-f]{64}", target.name):
        return target.name
    return blobs.file_sha256(target)


def _unet_to_fp8(folder: Path, class_name: str) -> tuple[int, list[str]]:
    """Replace the staged UNet's weights with the ones layerwise casting stores in fp8."""
    import diffusers

    cls = getattr(diffusers, class_name)
    unet = cls.from_pretrained(folder, dtype=torch.float16)
    unet.enable_layerwise_casting(storage_dtype=torch.float8_e4m3fn,
                                  compute_dtype=torch.float16)
    tensors = {k: v.contiguous() for k, v in unet.state_dict().items()}
    for old in folder.glob("*.safetensors*"):
        old.unlink()
    target = folder / "diffusion_pytorch_model.safetensors"
    save_file(tensors, target, metadata={"format": "pt"})
    return target.stat().st_size, _dtypes(tensors)


def _slim_file(path: Path, stage: Path, variant: str) -> dict[str, Any]:
    """A single-file checkpoint: EMA weights dropped when it has both, 32-bit to 16-bit, and
    for fp8 the UNet's 2-D and 4-D weights (Linear and Conv, not norms) as float8_e4m3fn."""
    tensors = load_file(path)
    slimming = set()
    if any(k.startswith("model_ema.") for k in tensors) and \
            any(k.startswith("model.diffusion_model.") for k in tensors):
        tensors = {k: v for k, v in tensors.items() if not k.startswith("model_ema.")}
        slimming.add("EMA weights dropped")
    tensors, changed = _to16(tensors)
    if changed:
        slimming.add("fp32 tensors stored as fp16")
    if variant == "fp8":
        tensors = {k: (v.to(torch.float8_e4m3fn) if k.startswith("model.diffusion_model.")
                       and v.ndim >= 2 and "norm" not in k and v.dtype == torch.float16 else v)
                   for k, v in tensors.items()}
        slimming.add("unet Linear/Conv weights stored as float8_e4m3fn")
    target = stage / path.name
    save_file(tensors, target, metadata={"format": "pt"})
    role = "base" if any(k.startswith("conditioner.embedders.1.") for k in tensors) \
        else "refiner"
    return {"components": {}, "dtypes": {"checkpoint": _dtypes(tensors)},
            "bytes_before": {"checkpoint": path.stat().st_size},
            "bytes_after": {"checkpoint": target.stat().st_size}, "slimming": sorted(slimming),
            "role": role, "source_digest": "sha256:" + blobs.file_sha256(path)}
