"""The fleet's model catalog: models pushed once into the farm's own store, pulled by workers.

    models/blobs/sha256/<digest>             every file of every model, named by its content
    models/manifests/<name>/<version>.json   one version of a model: a ModelManifest

A model is named `name` (its newest version), `name@version`, or `sha256:<digest>` (the
digest of one manifest, or its first 12 or more hex digits). Versions count up from 1 per
name; each version holds one variant (`fp16`: 16-bit weights; `fp8`: the UNet's weights stored
as float8_e4m3fn). A manifest is written create-once, so a version never changes; blobs are
shared by every manifest that lists them and removed with the last one.

No torch here: `farm submit` reads the catalog; pushing lives in worker/push.py, pulling in
worker/model_cache.py, the transfers in farm/blobs.py.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass, field
from typing import Any

from farm import keys
from farm.errors import IntegrityError, NotFound, UsageError, ValidationError
from farm.store import Store, get_json, put_json

NAME = re.compile(r"^[a-z0-9][a-z0-9._-]{0,63}$")
_REF = re.compile(r"^(?P<name>[a-z0-9][a-z0-9._-]{0,63})(@(?P<version>[0-9]{1,6}))?$")
_DIGEST = re.compile(r"^sha256:(?P<hex>[0-9a-f]{12,64})$")
_HEX64 = re.compile(r"^[0-9a-f]{64}$")
VARIANTS = ("fp16", "fp8")
LAYOUTS = ("diffusers", "single-file", "component")
# base and refiner: SDXL pipelines; vae: a load profile's replacement VAE (farm/models.py VAES)
ROLES = ("base", "refiner", "vae")
FORMAT = 1


def is_ref(text: str) -> bool:
    """Whether `text` has the shape of a catalog reference (whether or not it exists)."""
    return bool(_REF.match(text) or _DIGEST.match(text))


def check_name(name: str) -> str:
    if not NAME.match(name):
        raise ValidationError("--name", "must be 1-64 lowercase letters, digits, '.', '_' or "
                              "'-', starting with a letter or digit", name)
    return name


@dataclass(frozen=True)
class ModelFile:
    path: str        # relative path in the model's folder ("unet/diffusion_pytorch_model...")
    size: int
    sha256: str


@dataclass(frozen=True)
class ModelManifest:
    name: str
    version: int
    variant: str                       # fp16 | fp8
    role: str                          # base | refiner | vae, read from the model's config
    layout: str                        # diffusers (a pipeline's folder) | single-file (one
                                       # .safetensors) | component (one VAE's folder)
    files: tuple[ModelFile, ...]
    components: dict[str, str]         # component -> class (model_index.json)
    dtypes: dict[str, list[str]]       # component -> the dtypes of its stored tensors
    source: str                        # what was pushed: Hub id, folder or file
    revision: str                      # the Hub commit, or sha256 of the source's files
    slimming: tuple[str, ...]          # what was changed on the way in
    bytes_before: dict[str, int]       # component -> bytes of its weights as pushed
    bytes_after: dict[str, int]        # component -> bytes of its weights as stored
    created_at: float = 0.0
    format: int = FORMAT
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def ref(self) -> str:
        return f"{self.name}@{self.version}"

    @property
    def size(self) -> int:
        return sum(f.size for f in self.files)

    def encode(self) -> dict[str, Any]:
        return {"format": self.format, "name": self.name, "version": self.version,
                "variant": self.variant, "role": self.role, "layout": self.layout,
                "files": [{"path": f.path, "size": f.size, "sha256": f.sha256}
                          for f in self.files],
                "components": dict(self.components), "dtypes": dict(self.dtypes),
                "source": self.source, "revision": self.revision,
                "slimming": list(self.slimming), "bytes_before": dict(self.bytes_before),
                "bytes_after": dict(self.bytes_after), "created_at": self.created_at,
                "extra": dict(self.extra)}

    @property
    def digest(self) -> str:
        """sha256 of the manifest's canonical JSON: what a sidecar records."""
        data = json.dumps(self.encode(), sort_keys=True, separators=(",", ":")).encode()
        return hashlib.sha256(data).hexdigest()

    @classmethod
    def decode(cls, data: Any, where: str = "manifest") -> ModelManifest:
        """A manifest read from the store; IntegrityError naming the field when it is not one."""
        def bad(what: str, value: Any) -> IntegrityError:
            return IntegrityError(f"{where}: {what}, got {str(value)[:60]!r}")

        if not isinstance(data, dict) or data.get("format") != FORMAT:
            raise bad(f"format must be {FORMAT}", data.get("format") if isinstance(data, dict)
                      else data)
        try:
            files = tuple(ModelFile(str(f["path"]), int(f["size"]), str(f["sha256"]))
                          for f in data["files"])
            manifest = cls(
                name=str(data["name"]), version=int(data["version"]),
                variant=str(data["variant"]), role=str(data["role"]),
                layout=str(data["layout"]), files=files,
                components={str(k): str(v) for k, v in data["components"].items()},
                dtypes={str(k): [str(d) for d in v] for k, v in data["dtypes"].items()},
                source=str(data["source"]), revision=str(data["revision"]),
                slimming=tuple(str(s) for s in data["slimming"]),
                bytes_before={str(k): int(v) for k, v in data["bytes_before"].items()},
                bytes_after={str(k): int(v) for k, v in data["bytes_after"].items()},
                created_at=float(data.get("created_at", 0.0)),
                extra=dict(data.get("extra") or {}))
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            raise bad("is not a model manifest", exc) from None
        if not NAME.match(manifest.name):
            raise bad("name is not a model name", manifest.name)
        if manifest.variant not in VARIANTS:
            raise bad(f"variant must be one of {', '.join(VARIANTS)}", manifest.variant)
        if manifest.role not in ROLES:
            raise bad(f"role must be one of {', '.join(ROLES)}", manifest.role)
        if manifest.layout not in LAYOUTS:
            raise bad(f"layout must be one of {', '.join(LAYOUTS)}", manifest.layout)
        for f in files:
            if not _HEX64.match(f.sha256) or f.size < 0:
                raise bad("files[].sha256 must be 64 hex digits and size >= 0", f)
            parts = f.path.split("/")
            if f.path.startswith("/") or any(p in ("", ".", "..") for p in parts):
                raise bad("files[].path must be a relative path inside the model", f.path)
        return manifest


# -- reading the catalog ----------------------------------------------------------------------


def refs(store: Store) -> list[tuple[str, int]]:
    """Every (name, version) in the catalog, sorted."""
    found = (keys.model_manifest_ref(k) for k in store.list_keys(keys.MODEL_MANIFESTS))
    return sorted(r for r in found if r is not None)


def has_catalog(store: Store) -> bool:
    return bool(store.list_keys(keys.MODEL_MANIFESTS))


def load(store: Store, name: str, version: int) -> ModelManifest:
    key = keys.model_manifest_key(name, version)
    return ModelManifest.decode(get_json(store, key), where=f"{store.url}/{key}")


def manifests(store: Store) -> list[ModelManifest]:
    return [load(store, name, version) for name, version in refs(store)]


def summary(store: Store) -> str:
    """What the catalog holds, for an error message: `a@1, a@2, b@1` (or "nothing")."""
    held = [f"{n}@{v}" for n, v in refs(store)]
    if len(held) > 12:
        held = held[:12] + [f"... ({len(held) - 12} more)"]
    return ", ".join(held) or "nothing"


def find(store: Store, ref: str, prefer_variant: str | None = None) -> ModelManifest:
    """The manifest `ref` names: `name` (its newest version; of `prefer_variant` when the name
    has one), `name@version`, or `sha256:<digest or 12+ hex digits of it>`. NotFound naming
    what the catalog holds when there is no such model."""
    held = refs(store)
    digest = _DIGEST.match(ref)
    if digest:
        hits = [m for m in (load(store, n, v) for n, v in held)
                if m.digest.startswith(digest["hex"])]
        if len(hits) == 1:
            return hits[0]
        if len(hits) > 1:
            raise UsageError(f"model {ref} names {len(hits)} manifests "
                             f"({', '.join(m.ref for m in hits)}); give more digits")
    match = _REF.match(ref)
    if match:
        name, version = match["name"], match["version"]
        versions = sorted(v for n, v in held if n == name)
        if version is not None and int(version) in versions:
            return load(store, name, int(version))
        if version is None and versions:
            newest = [load(store, name, v) for v in reversed(versions)]
            if prefer_variant is not None:
                for manifest in newest:
                    if manifest.variant == prefer_variant:
                        return manifest
            return newest[0]
    raise NotFound(f"model {ref!r} is not in the model catalog of {store.url} "
                   f"(it holds: {summary(store)})")


def roles(store: Store, names: list[str]) -> dict[str, str]:
    """The role (base, refiner, vae) of each of `names` the catalog holds; a name it does not
    hold, or a store that cannot be read, is left out (the caller keeps what it knew)."""
    from farm.errors import FarmError

    found: dict[str, str] = {}
    for name in names:
        try:
            found[name] = find(store, name).role
        except FarmError:
            continue
    return found


def next_version(store: Store, name: str) -> int:
    return max((v for n, v in refs(store) if n == name), default=0) + 1


def write(store: Store, manifest: ModelManifest) -> None:
    """Create-once: a version, once written, never changes (AlreadyExists otherwise)."""
    put_json(store, keys.model_manifest_key(manifest.name, manifest.version),
             manifest.encode(), create_once=True)


def remove(store: Store, ref: str) -> tuple[list[ModelManifest], list[str]]:
    """Remove `name` (every version) or `name@version` / a digest (that one); then every blob
    no remaining manifest lists. Returns (manifests removed, blob digests removed)."""
    if _REF.match(ref) and "@" not in ref:
        gone = [load(store, n, v) for n, v in refs(store) if n == ref]
        if not gone:
            find(store, ref)  # raises NotFound with what the catalog holds
    else:
        gone = [find(store, ref)]
    for manifest in gone:
        store.delete(keys.model_manifest_key(manifest.name, manifest.version))
    kept = {f.sha256 for m in manifests(store) for f in m.files}
    dropped = sorted({f.sha256 for m in gone for f in m.files} - kept)
    for digest in dropped:
        store.delete(keys.blob_key(digest))
    return gone, dropped
