"""Fetch a batch's images and sidecars from the store into a folder, as its jobs succeed.

    farm results BATCH [--follow]
      1. list the batch's job records (S3: one request per 1,000) and read those that changed
         since the last look; a job that succeeded names its images (a batch whose every job
         succeeded needs no record read: its manifest names them all)
      2. each such image is skipped when the file here is whole (the store's size, and the
         store's tag when it was fetched: `.farm-results`), else it and its sidecar are
         streamed to disk on a bounded pool of threads, and its thumbnail is made (when
         sheets or a gallery will use it)
      3. with `follow`, look again every `poll_s` until the batch has ended (status says so,
         scheduler/status.py), then once more
      4. contact sheets of at most SHEET_SIZE images each, from the thumbnails (scheduler/sheets.py)

Memory stays bounded whatever the batch's size: an image is never held whole (it streams to a
file), at most `threads` * 4 downloads are queued at once, and sheets are built a page at a time
from thumbnails on disk.
"""

from __future__ import annotations

import contextlib
import json
import time
from collections.abc import Callable, Iterator
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from farm import keys
from farm.errors import NotFound
from farm.lifecycle import JobRecord, JobState
from farm.scheduler.sheets import thumb_path, thumbnail, write_sheets
from farm.settings import Settings
from farm.store import DOWNLOAD_THREADS, ObjectInfo, Store, get_json, list_objects
from farm.store import download as download_object

INDEX = ".farm-results"   # JSON: image name -> the store tag of the object fetched


@dataclass(frozen=True)
class Landed:
    """One image of the batch, here on disk with its sidecar and thumbnail."""

    key: str          # the image's store key
    path: Path
    sidecar: Path
    thumb: Path       # made only when the caller asked for thumbnails
    fetched: bool     # False: the file here was already whole


@dataclass
class Downloaded:
    folder: Path
    images: list[Path] = field(default_factory=list)
    sidecars: list[Path] = field(default_factory=list)
    contact_sheets: list[Path] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)  # succeeded jobs' images not in the store
    fetched: int = 0
    skipped: int = 0

    @property
    def contact_sheet(self) -> Path | None:
        """The first sheet (the only one for up to SHEET_SIZE images)."""
        return self.contact_sheets[0] if self.contact_sheets else None


class Succeeded:
    """The images of a batch's jobs that succeeded, found a look at a time: each look lists the
    job records and reads only those whose tag changed, never one already final."""

    def __init__(self, store: Store, batch: str) -> None:
        self.store = store
        self.batch = batch
        self.tags: dict[str, str] = {}   # record key -> tag last read
        self.final: set[str] = set()     # record keys of jobs in a final state

    def look(self, pool: ThreadPoolExecutor) -> list[str]:
        """Image keys of the jobs that succeeded since the last look."""
        changed = [o for o in list_objects(self.store, keys.records_prefix(self.batch))
                   if o.key.endswith(".json") and o.key not in self.final
                   and (not o.tag or self.tags.get(o.key) != o.tag)]
        found: list[str] = []
        for info, record in zip(changed, pool.map(self._read, changed), strict=True):
            self.tags[info.key] = info.tag
            if record is None or not record.state.final:
                continue
            self.final.add(info.key)
            if record.state == JobState.SUCCEEDED:
                found.extend(record.images)
        return sorted(found)

    def _read(self, info: ObjectInfo) -> JobRecord | None:
        try:
            return JobRecord.decode(get_json(self.store, info.key))
        except NotFound:
            return None


class Fetcher:
    """Brings images and their sidecars into `folder`, skipping those already whole, and makes
    each one's thumbnail when `thumbs`."""

    def __init__(self, store: Store, batch: str, folder: Path, thumbs: bool = True) -> None:
        self.store = store
        self.batch = batch
        self.folder = folder
        self.thumbs = thumbs
        folder.mkdir(parents=True, exist_ok=True)
        try:
            self.index: dict[str, str] = json.loads((folder / INDEX).read_text())
        except (FileNotFoundError, ValueError):
            self.index = {}
        self.listing: dict[str, ObjectInfo] = {}

    def refresh(self) -> None:
        """What the store holds under the batch's images (sizes and tags: one listing)."""
        listed = list_objects(self.store, keys.images_prefix(self.batch))
        self.listing = {o.key: o for o in listed}

    def fetch(self, key: str) -> Landed | str:
        """One image and its sidecar here; its key when the store does not have them."""
        side_key = keys.sidecar_of(key)
        path = self.folder / key.rsplit("/", 1)[-1]
        side = path.with_suffix(".json")
        fetched = False
        for k, p in ((key, path), (side_key, side)):
            if self._whole(k, p):
                continue
            try:
                info = download_object(self.store, k, p)
            except NotFound:
                return key
            self.index[p.name] = info.tag
            fetched = True
        thumb = thumb_path(self.folder, path)
        if self.thumbs and (fetched or not thumb.exists()):
            thumbnail(path, thumb)
        return Landed(key, path, side, thumb, fetched)

    def _whole(self, key: str, path: Path) -> bool:
        info = self.listing.get(key)
        if info is None or info.size < 0:
            return False
        try:
            size = path.stat().st_size
        except FileNotFoundError:
            return False
        known = self.index.get(path.name)
        return size == info.size and (known is None or known == info.tag)

    def save_index(self) -> None:
        tmp = self.folder / f".tmp-{INDEX}"
        tmp.write_text(json.dumps(self.index, sort_keys=True))
        tmp.replace(self.folder / INDEX)


def planned_images(store: Store, batch: str, settings: Settings) -> int:
    """How many images the batch will make when every job succeeds (its manifest)."""
    from farm.records import read_manifest

    return sum(job.spec.n for job in read_manifest(store, batch, settings).jobs)


def batch_ended(store: Store, batch: str, settings: Settings, client: Any = None) -> bool:
    """Whether the batch has ended, at a constant cost (its counters in Redis through `client`,
    or its summary; scheduler/status.py)."""
    from farm.scheduler.status import batch_counts

    return batch_counts(store, client, batch, settings).finished


def all_images_if_succeeded(store: Store, batch: str, settings: Settings,
                            client: Any = None) -> list[str] | None:
    """Every image key of a batch that ended with every job succeeded (status says so), from
    its manifest: no job record needs reading. None for any other batch."""
    from farm.records import read_manifest
    from farm.scheduler.status import batch_counts

    if batch_counts(store, client, batch, settings).state != "succeeded":
        return None
    return sorted(keys.image_key(batch, job.id, k)
                  for job in read_manifest(store, batch, settings).jobs
                  for k in range(job.spec.n))


def land(store: Store, batch: str, folder: Path, settings: Settings, *, follow: bool = False,
         poll_s: float = 1.0, threads: int = DOWNLOAD_THREADS,
         ended: Callable[[], bool] | None = None, client: Any = None, thumbs: bool = True
         ) -> Iterator[Landed | str]:
    """Yield each image of the batch as it lands here (a Landed), or its key when a succeeded
    job's image is not in the store. With `follow`, keep looking until the batch has ended.
    `client`: a Redis client for the batch's counters (None: the store answers). `thumbs`:
    make each image's thumbnail too."""
    ended = ended or (lambda: batch_ended(store, batch, settings, client))
    found = Succeeded(store, batch)
    fetcher = Fetcher(store, batch, folder, thumbs)
    limit = threads * 4
    known = None if follow else all_images_if_succeeded(store, batch, settings, client)
    try:
        with ThreadPoolExecutor(max_workers=threads, thread_name_prefix="results") as pool:
            while True:
                # read whether the batch has ended before the look: a look after the end sees
                # every job's final record
                over = not follow or ended()
                new = known if known is not None else found.look(pool)
                if new:
                    fetcher.refresh()
                pending: set[Future[Landed | str]] = set()
                for key in new:
                    if len(pending) >= limit:
                        done, pending = wait(pending, return_when=FIRST_COMPLETED)
                        yield from (f.result() for f in done)
                    pending.add(pool.submit(fetcher.fetch, key))
                while pending:
                    done, pending = wait(pending, return_when=FIRST_COMPLETED)
                    yield from (f.result() for f in done)
                if over:
                    return
                fetcher.save_index()
                time.sleep(poll_s)
    finally:
        with contextlib.suppress(OSError):
            fetcher.save_index()


def download(store: Store, batch: str, out: Path, settings: Settings, *, follow: bool = False,
             poll_s: float = 1.0, threads: int = DOWNLOAD_THREADS,
             on_image: Callable[[Landed | str], None] | None = None,
             sheets: bool = True, ended: Callable[[], bool] | None = None,
             client: Any = None) -> Downloaded:
    """Every image of the batch's succeeded jobs into `out` (see `land`), then its contact
    sheets (and their thumbnails) unless `sheets` is False. `on_image` hears each image as it
    lands (a progress bar)."""
    got = Downloaded(folder=out)
    for item in land(store, batch, out, settings, follow=follow, poll_s=poll_s,
                     threads=threads, ended=ended, client=client, thumbs=sheets):
        if isinstance(item, str):
            got.missing.append(item)
        else:
            got.images.append(item.path)
            got.sidecars.append(item.sidecar)
            if item.fetched:
                got.fetched += 1
            else:
                got.skipped += 1
        if on_image is not None:
            on_image(item)
    got.images.sort()
    got.sidecars.sort()
    got.missing.sort()
    if sheets and got.images:
        got.contact_sheets = write_sheets(batch, out, got.images)
    return got
