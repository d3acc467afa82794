"""Which weight files a diffusers folder loads from, and the hash that names them: a worker's
`weights_hash`, the same on every machine that holds the same weights."""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path

from farm import blobs

WEIGHT_SUFFIXES = (".safetensors", ".bin", ".ckpt", ".pt", ".pth")


def weight_files(folder: Path, variant: str | None = None) -> list[tuple[str, Path]]:
    """(relative path, path) of the weight files from_pretrained loads from a diffusers folder.

    Only the component folders that model_index.json names count (a full Hub snapshot also
    holds single-file checkpoints, LoRAs, ONNX exports); per folder the `variant` files if any,
    else the plain ones, and safetensors over pickles, as diffusers chooses.
    """
    index = json.loads((folder / "model_index.json").read_text())
    components = sorted(k for k, v in index.items()
                        if isinstance(v, list) and len(v) == 2 and v[0] is not None)
    chosen: list[tuple[str, Path]] = []
    for component in components:
        files = [f for f in (folder / component).glob("*") if f.name.endswith(WEIGHT_SUFFIXES)]
        marked = [f for f in files if variant and _has_variant(f.name, variant)]
        files = marked or [f for f in files if not _has_variant(f.name, None)]
        if any(f.suffix == ".safetensors" for f in files):
            files = [f for f in files if f.suffix == ".safetensors"]
        chosen += [(f"{component}/{f.name}", f) for f in files]
    return sorted(chosen)


_VARIANT = re.compile(r"\.(fp16|fp32|bf16|fp8|non_ema|ema)[.-]")


def _has_variant(name: str, variant: str | None) -> bool:
    match = _VARIANT.search(name)
    return bool(match) if variant is None else bool(match and match.group(1) == variant)


def weights_hash(files: list[tuple[str, Path]]) -> str:
    """sha256 over "relative path, file sha256" lines, sorted by relative path."""
    total = hashlib.sha256()
    for rel, path in sorted(files):
        total.update(f"{rel}\t{file_sha256(path)}\n".encode())
    return total.hexdigest()


def file_sha256(path: Path) -> str:
    # In a Hugging Face cache a weight file is a link to blobs/<sha256 of its content>: use the
    # name instead of reading gigabytes again.
    target = path.resolve()
    if path.is_symlink() and re.fullmatch(r"[0-9a-f]{64}", target.name):
        return target.name
    return blobs.file_sha256(target)
