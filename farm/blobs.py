"""Moving model files (blobs) between a machine and the store, many streams at once.

Upload: one blob per file, skipped when the store already has it; on S3 a multipart upload of
several parts at once (boto3's transfer manager), on a file store a copy moved in whole.
Download: the blob in ranges of PART_BYTES fetched by THREADS threads at once (S3 ranged GETs,
or reads at offsets of a file store's file) and written at their offsets into a temporary file;
its sha256 follows the ranges in order as they land, so the check ends with the last range. The
file takes its final name only when its digest matches; a mismatch raises IntegrityError and
leaves nothing behind.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
import tempfile
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from farm import keys
from farm.errors import IntegrityError, NotFound, StoreUnavailable
from farm.store import FileStore, S3Store, Store

# S3 serves one stream at tens of MB/s; several streams at once fill a link (each range costs
# one request's time to first byte, 15-30 ms, so ranges stay large)
THREADS = 16
PART_BYTES = 16 << 20
# boto3's multipart upload: parts of this size, this many at once, per file
UPLOAD_PART_BYTES = 16 << 20
UPLOAD_THREADS = 8


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def upload(store: Store, path: Path, digest: str) -> bool:
    """Put the file `path` (whose sha256 is `digest`) as its blob; False when the store
    already had it (nothing sent)."""
    key = keys.blob_key(digest)
    if store.exists(key):
        return False
    if isinstance(store, S3Store):
        from boto3.s3.transfer import TransferConfig

        config = TransferConfig(multipart_threshold=UPLOAD_PART_BYTES,
                                multipart_chunksize=UPLOAD_PART_BYTES,
                                max_concurrency=UPLOAD_THREADS)
        store._call(store.client.upload_file, Filename=str(path), Bucket=store.bucket,
                    Key=store._key(key), Config=config)
        return True
    if isinstance(store, FileStore):
        target = store.root / key
        target.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=".tmp-")
        os.close(fd)
        try:
            shutil.copyfile(path, tmp)
            os.replace(tmp, target)
        finally:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
        return True
    store.put(key, path.read_bytes())
    return True


def blob_size(store: Store, digest: str) -> int:
    """The stored size of a blob; NotFound when it is missing."""
    key = keys.blob_key(digest)
    if isinstance(store, S3Store):
        head = store._call(store.client.head_object, Bucket=store.bucket, Key=store._key(key))
        return int(head["ContentLength"])
    if isinstance(store, FileStore):
        try:
            return (store.root / key).stat().st_size
        except FileNotFoundError:
            raise NotFound(f"{store.url}/{key} does not exist") from None
    return len(store.get(key))


def _read_range(store: Store, key: str, start: int, end: int) -> Any:
    """An iterator of the bytes [start, end) of object `key`."""
    if isinstance(store, S3Store):
        response = store._call(store.client.get_object, Bucket=store.bucket,
                               Key=store._key(key), Range=f"bytes={start}-{end - 1}")
        body = response["Body"]
        try:
            yield from body.iter_chunks(1 << 20)
        finally:
            body.close()
    elif isinstance(store, FileStore):
        try:
            with open(store.root / key, "rb") as fh:
                fh.seek(start)
                left = end - start
                while left > 0 and (chunk := fh.read(min(left, 1 << 20))):
                    left -= len(chunk)
                    yield chunk
        except FileNotFoundError:
            raise NotFound(f"{store.url}/{key} does not exist") from None
    else:
        yield store.get(key)[start:end]


def fetch(store: Store, digest: str, size: int, dest: Path, *, threads: int | None = None,
          part_bytes: int | None = None) -> None:
    """Download blob `digest` of `size` bytes to `dest` (whole, or not at all): `threads`
    ranged reads at once, its sha256 checked as the ranges land. IntegrityError when the bytes
    are not the blob's; NotFound when the store lacks it."""
    key = keys.blob_key(digest)
    threads = threads or THREADS
    part_bytes = part_bytes or PART_BYTES
    ranges = [(start, min(start + part_bytes, size)) for start in range(0, size, part_bytes)]
    done = [False] * len(ranges)
    landed = threading.Condition()
    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=dest.parent, prefix=".tmp-")
    failure: list[BaseException] = []

    def get(index: int) -> None:
        start, end = ranges[index]
        offset = start
        try:
            for chunk in _read_range(store, key, start, end):
                os.pwrite(fd, chunk, offset)
                offset += len(chunk)
            if offset != end:
                raise IntegrityError(f"{store.url}/{key} is shorter than its manifest says "
                                     f"({size} bytes)")
        except BaseException as exc:  # handed to the hashing thread, which raises it
            failure.append(exc)
        with landed:
            done[index] = True
            landed.notify_all()

    try:
        os.ftruncate(fd, size)
        digest_now = hashlib.sha256()
        with ThreadPoolExecutor(max_workers=max(1, threads), thread_name_prefix="pull") as pool:
            for index in range(len(ranges)):
                pool.submit(get, index)
            # hash in order, each range as soon as it and every range before it landed
            for index, (start, end) in enumerate(ranges):
                with landed:
                    landed.wait_for(lambda i=index: done[i] or bool(failure))  # type: ignore[misc]
                if failure:
                    break
                position = start
                while position < end:
                    chunk = os.pread(fd, min(end - position, 1 << 20), position)
                    digest_now.update(chunk)
                    position += len(chunk)
        if failure:
            exc = failure[0]
            if isinstance(exc, OSError):
                raise StoreUnavailable(f"cannot download {store.url}/{key}: {exc}") from None
            raise exc
        if digest_now.hexdigest() != digest:
            raise IntegrityError(f"{store.url}/{key}: downloaded bytes have sha256 "
                                 f"{digest_now.hexdigest()[:16]}..., not the blob's "
                                 f"{digest[:16]}...")
        os.fsync(fd)
        os.replace(tmp, dest)
        tmp = ""
    finally:
        os.close(fd)
        if tmp:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
