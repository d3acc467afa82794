"""The machine's cache of models pulled from the store's catalog, shared by its workers.

    <cache>/blobs/<sha256>          a model file, whole and checked (farm/blobs.py fetches it)
    <cache>/blobs/<sha256>.ok       "size mtime_ns" when its hash was last checked; its own
                                    modification time is when a worker last used the blob (LRU)
    <cache>/locks/<sha256>.lock     held exclusively while the blob is checked or fetched, shared
                                    while a worker loads from it (eviction skips it then)
    <cache>/manifests/<name>/<version>.json   the manifests pulled, for a start with no network
    <cache>/models/<manifest digest>/...      the model's folder: links to its blobs

One download per machine: a worker takes a blob's lock before it looks, so a second worker
waits for the first one's download and then finds the blob there. A blob is trusted while its
size and modification time are those recorded when its hash was checked; a truncated file or
one written since is checked again, and fetched again when its hash is wrong. A blob whose
download fails its hash twice is an IntegrityError: the worker stops with one line.
The cache stays under FARM_MODEL_CACHE_GB: before a download, the least recently used blobs
that no worker holds are removed until the new ones fit.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import shutil
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

from farm import blobs, catalog
from farm.errors import ConfigError, IntegrityError, ModelUnavailable, StoreUnavailable
from farm.settings import Settings
from farm.store import Store


@dataclass
class Pulled:
    """A model ready on disk; its blobs stay held (safe from eviction) until release()."""

    manifest: catalog.ModelManifest
    folder: Path                       # the diffusers folder, or the single file's folder
    fetched: int = 0                   # blobs downloaded by this pull
    fetched_bytes: int = 0
    seconds: float = 0.0
    offline: bool = False              # the manifest came from the cache: no store reached
    _held: list[IO[str]] = field(default_factory=list)

    @property
    def path(self) -> Path:
        """What from_pretrained / from_single_file loads."""
        if self.manifest.layout == "single-file":
            return self.folder / self.manifest.files[0].path
        return self.folder

    def release(self) -> None:
        for handle in self._held:
            with contextlib.suppress(OSError):
                fcntl.flock(handle, fcntl.LOCK_UN)
            handle.close()
        self._held.clear()


class ModelCache:
    def __init__(self, settings: Settings, echo: Callable[[str], None] = print) -> None:
        self.root = settings.model_cache_path
        self.budget = int(settings.model_cache_gb * 1e9)
        self.echo = echo
        for part in ("blobs", "locks", "manifests", "models"):
            (self.root / part).mkdir(parents=True, exist_ok=True)

    # -- 1. the manifest: from the store, else (no network) from the cache --------------------

    def manifest(self, store: Store | None, ref: str,
                 prefer_variant: str | None = None) -> tuple[catalog.ModelManifest, bool]:
        """(manifest, offline): the store's answer, or the newest cached one when the store
        cannot be reached."""
        if store is not None:
            try:
                manifest = catalog.find(store, ref, prefer_variant)
            except StoreUnavailable as exc:
                cached = self._cached_manifest(ref, prefer_variant)
                if cached is None:
                    raise ModelUnavailable(f"cannot pull model {ref}: the store is unreachable "
                                           f"and this machine has not cached it ({exc})") \
                        from None
                return cached, True
            path = self.root / "manifests" / manifest.name / f"{manifest.version}.json"
            path.parent.mkdir(parents=True, exist_ok=True)
            _write_text(path, json.dumps(manifest.encode(), indent=2, sort_keys=True))
            return manifest, False
        cached = self._cached_manifest(ref, prefer_variant)
        if cached is None:
            raise ModelUnavailable(f"model {ref} is not cached on this machine")
        return cached, True

    def _cached_manifest(self, ref: str,
                         prefer_variant: str | None) -> catalog.ModelManifest | None:
        found = []
        for path in (self.root / "manifests").glob("*/*.json"):
            with contextlib.suppress(ValueError, OSError, IntegrityError):
                found.append(catalog.ModelManifest.decode(json.loads(path.read_text()),
                                                          where=str(path)))
        found.sort(key=lambda m: (m.name, -m.version))
        for m in found:
            if m.ref == ref or ref.startswith("sha256:") and m.digest.startswith(ref[7:]):
                return m
        named = [m for m in found if m.name == ref]
        preferred = [m for m in named if m.variant == prefer_variant]
        chosen = preferred or named
        return chosen[0] if chosen else None

    # -- 2. the blobs -------------------------------------------------------------------------

    def pull(self, store: Store | None, ref: str, prefer_variant: str | None = None) -> Pulled:
        start = time.perf_counter()
        manifest, offline = self.manifest(store, ref, prefer_variant)
        if offline:
            self.echo(f"store unreachable: using {manifest.ref} "
                      f"(sha256:{manifest.digest[:12]}) as cached on this machine")
        need = {f.sha256: f.size for f in manifest.files}
        if sum(need.values()) > self.budget:
            raise ConfigError(f"model {manifest.ref} needs {sum(need.values()) / 1e9:.1f} GB, "
                              f"more than the model cache's budget FARM_MODEL_CACHE_GB="
                              f"{self.budget / 1e9:g}")
        pulled = Pulled(manifest, self.root / "models" / manifest.digest, offline=offline)
        try:
            for digest, size in sorted(need.items()):
                if self._ensure(store, manifest, digest, size, pulled, set(need)):
                    pulled.fetched += 1
                    pulled.fetched_bytes += size
            self._link(manifest, pulled.folder)
        except BaseException:
            pulled.release()
            raise
        pulled.seconds = time.perf_counter() - start
        return pulled

    def _lock(self, handle: IO[str], mode: int, digest: str, pulled: Pulled) -> None:
        try:
            fcntl.flock(handle, mode | fcntl.LOCK_NB)
        except BlockingIOError:
            self.echo(f"waiting for another process of this machine to fetch blob "
                      f"{digest[:12]} ({pulled.manifest.ref})")
            fcntl.flock(handle, mode)

    def _ensure(self, store: Store | None, manifest: catalog.ModelManifest, digest: str,
                size: int, pulled: Pulled, pinned: set[str]) -> bool:
        """Make blob `digest` present and whole; True when it was downloaded. Leaves it held
        (a shared lock) in `pulled`."""
        path = self.root / "blobs" / digest
        handle = open(self.root / "locks" / f"{digest}.lock", "a")  # noqa: SIM115 (held)
        try:
            # shared first: workers that find the blob whole load from it side by side
            self._lock(handle, fcntl.LOCK_SH, digest, pulled)
            if self._trusted(path, digest, size):
                _touch(path.with_name(digest + ".ok"))
                pulled._held.append(handle)
                return False
            fcntl.flock(handle, fcntl.LOCK_UN)
            self._lock(handle, fcntl.LOCK_EX, digest, pulled)
            state = self._check(path, digest, size)
            fetched = False
            if state != "ok":
                if state != "missing":
                    self.echo(f"cached blob {digest[:12]} of {manifest.ref} is {state}: "
                              "fetching it again")
                if store is None or pulled.offline:
                    raise ModelUnavailable(f"cannot pull model {manifest.ref}: blob "
                                           f"{digest[:12]} is {state} here and the store is "
                                           "unreachable")
                self._make_room(size, pinned)
                for attempt in (1, 2):
                    try:
                        blobs.fetch(store, digest, size, path)
                        break
                    except IntegrityError as exc:
                        if attempt == 2:
                            raise IntegrityError(
                                f"blob sha256:{digest} of model {manifest.ref} failed its "
                                f"hash check twice when fetched from {store.url}: the stored "
                                f"copy is corrupt; push the model again (farm models verify "
                                f"{manifest.ref})") from None
                        self.echo(f"blob {digest[:12]} of {manifest.ref} failed its hash "
                                  f"check ({exc}); fetching it again")
                self._mark_ok(path)
                fetched = True
            _touch(path.with_name(digest + ".ok"))
            fcntl.flock(handle, fcntl.LOCK_SH)  # held while the worker loads from it
        except BaseException:
            handle.close()
            raise
        pulled._held.append(handle)
        return fetched

    def _trusted(self, path: Path, digest: str, size: int) -> bool:
        """Whole and unchanged since its hash was checked (no reading of its bytes)."""
        try:
            st = path.stat()
            ok = path.with_name(digest + ".ok").read_text().strip()
        except OSError:
            return False
        return st.st_size == size and ok == f"{st.st_size} {st.st_mtime_ns}"

    def _check(self, path: Path, digest: str, size: int) -> str:
        """"ok", "missing", or what is wrong with the cached file."""
        try:
            st = path.stat()
        except FileNotFoundError:
            return "missing"
        if st.st_size != size:
            return f"truncated ({st.st_size} of {size} bytes)" if st.st_size < size \
                else f"too long ({st.st_size} of {size} bytes)"
        if self._trusted(path, digest, size):
            return "ok"
        # written since its hash was checked, or never checked here: check it now
        if blobs.file_sha256(path) != digest:
            return "corrupt (its sha256 does not match)"
        self._mark_ok(path)
        return "ok"

    def _mark_ok(self, path: Path) -> None:
        st = path.stat()
        _write_text(path.with_name(path.name + ".ok"), f"{st.st_size} {st.st_mtime_ns}\n")

    # -- 3. the budget ------------------------------------------------------------------------

    def usage(self) -> int:
        return sum(p.stat().st_size for p in (self.root / "blobs").iterdir()
                   if not p.name.endswith(".ok") and not p.name.startswith("."))

    def _make_room(self, size: int, pinned: set[str]) -> None:
        """Remove least recently used blobs, none pinned or held by a worker, until `size`
        more bytes fit in the budget."""
        with open(self.root / "locks" / "evict.lock", "a") as guard:
            fcntl.flock(guard, fcntl.LOCK_EX)
            used = self.usage()
            if used + size <= self.budget:
                return
            candidates = []
            for blob in (self.root / "blobs").iterdir():
                name = blob.name
                if name.endswith(".ok") or name.startswith(".") or name in pinned:
                    continue
                ok = blob.with_name(name + ".ok")
                stamp = ok.stat().st_mtime if ok.exists() else 0.0
                candidates.append((stamp, name, blob.stat().st_size))
            for _stamp, name, blob_size in sorted(candidates):
                if used + size <= self.budget:
                    break
                with open(self.root / "locks" / f"{name}.lock", "a") as other:
                    try:
                        fcntl.flock(other, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    except BlockingIOError:
                        continue  # a worker is loading from it
                    for gone in (self.root / "blobs" / name,
                                 self.root / "blobs" / f"{name}.ok"):
                        with contextlib.suppress(FileNotFoundError):
                            gone.unlink()
                used -= blob_size
                self.echo(f"model cache over its {self.budget / 1e9:g} GB budget: removed "
                          f"blob {name[:12]} ({blob_size / 1e6:.1f} MB), least recently used")
            self._drop_broken_folders()

    def _drop_broken_folders(self) -> None:
        for folder in (self.root / "models").iterdir():
            if any(link.is_symlink() and not link.exists() for link in folder.rglob("*")):
                shutil.rmtree(folder, ignore_errors=True)

    # -- 4. the folder from_pretrained reads ----------------------------------------------------

    def _link(self, manifest: catalog.ModelManifest, folder: Path) -> None:
        """The model's folder of links to its blobs, made beside it and moved in whole. A
        folder that is there is only ever replaced when a link in it is broken (an evicted
        blob): another worker on this machine may be loading from it."""
        if _complete(manifest, folder):
            return
        tmp = Path(tempfile.mkdtemp(dir=folder.parent, prefix=".tmp-"))
        for f in manifest.files:
            link = tmp / f.path
            link.parent.mkdir(parents=True, exist_ok=True)
            link.symlink_to(self.root / "blobs" / f.sha256)
        for _ in range(3):
            try:
                os.rename(tmp, folder)
                return
            except OSError:  # a folder is there: another worker's, made meanwhile?
                if _complete(manifest, folder):
                    break
            # broken links: set it aside whole (a rename), then move ours in
            old = Path(tempfile.mkdtemp(dir=folder.parent, prefix=".old-"))
            with contextlib.suppress(FileNotFoundError):
                os.rename(folder, old / "model")
            shutil.rmtree(old, ignore_errors=True)
        shutil.rmtree(tmp, ignore_errors=True)
        if not _complete(manifest, folder):
            raise OSError(f"could not make the model folder {folder}")


def _complete(manifest: catalog.ModelManifest, folder: Path) -> bool:
    return folder.is_dir() and all((folder / f.path).exists() for f in manifest.files)


def _touch(path: Path) -> None:
    with contextlib.suppress(OSError):
        os.utime(path)


def _write_text(path: Path, text: str) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".tmp-")
    with os.fdopen(fd, "w") as fh:
        fh.write(text)
    os.replace(tmp, path)
