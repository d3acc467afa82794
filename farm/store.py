"""The object store: where manifests, job records, images and intermediates live.

Two backends behind one small interface: a directory (the embedded default, `file://`) and any
S3-compatible bucket through boto3 (`s3://bucket/prefix`, with FARM_S3_ENDPOINT_URL for MinIO,
R2 or moto). Writes are whole-object and atomic; `create_once=True` never overwrites (a second
writer gets AlreadyExists), which is what makes duplicate deliveries harmless.

Compare-and-set: `get_versioned` returns an object with its version (S3: the ETag; a file: the
sha256 of its bytes), and `put(..., if_match=version)` writes only if the object is still that
version (S3 `If-Match`; a file: under an exclusive lock on its directory), else raises Conflict.
Every job-record write goes through it (farm/lifecycle.py), so a stale writer never wins.

Bulk reads (`farm results`, `farm gallery`): `list_objects` gives each object's size and tag (S3:
its ETag; a file: size and modification time) from the listing alone, 1,000 objects a request on
S3; `download` streams one object to a file (never whole in memory) and moves it into place
whole; `presign` (S3 only) makes a GET link that works without credentials until it expires.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import itertools
import json
import os
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol
from urllib.parse import unquote, urlparse

from farm.errors import (
    AlreadyExists,
    ConfigError,
    Conflict,
    NotFound,
    StoreUnavailable,
    UsageError,
)
from farm.settings import Settings

O_CLOEXEC = getattr(os, "O_CLOEXEC", 0)

# threads that download a batch's images at once (`farm results`, `farm gallery`): enough to hide
# S3's per-request latency, few enough that memory stays small (one object in flight each)
DOWNLOAD_THREADS = 16


class Store(Protocol):
    url: str

    def put(self, key: str, data: bytes, *, create_once: bool = False,
            if_match: str | None = None,
            content_type: str = "application/octet-stream") -> str: ...

    def get(self, key: str) -> bytes: ...

    def get_versioned(self, key: str) -> tuple[bytes, str]: ...

    def exists(self, key: str) -> bool: ...

    def list_keys(self, prefix: str) -> list[str]: ...

    def list_dirs(self, prefix: str) -> list[str]: ...

    def delete(self, key: str) -> None: ...


def put_json(store: Store, key: str, value: Any, *, create_once: bool = False,
             if_match: str | None = None) -> str:
    """Write `value` as compact JSON; returns the object's new version. Compact: Python's C
    encoder (indent=None) is several times faster than the pure-Python one an indent selects,
    and every job writes its record twice."""
    data = json.dumps(value, sort_keys=True, separators=(",", ":")).encode()
    return store.put(key, data, create_once=create_once, if_match=if_match,
                     content_type="application/json")


def get_json(store: Store, key: str) -> Any:
    data = store.get(key)
    try:
        return json.loads(data)
    except ValueError as exc:
        from farm.errors import IntegrityError

        raise IntegrityError(f"{store.url}/{key} is not valid JSON: {exc}") from None


@dataclass(frozen=True)
class ObjectInfo:
    """One object as a listing shows it: `tag` changes whenever its bytes do."""

    key: str
    size: int
    tag: str


def list_objects(store: Store, prefix: str) -> list[ObjectInfo]:
    """Every object under `prefix` with its size and tag, sorted by key."""
    lister = getattr(store, "list_objects", None)
    if lister is not None:
        return list(lister(prefix))
    return [ObjectInfo(key, -1, "") for key in store.list_keys(prefix)]  # size unknown


def download(store: Store, key: str, path: Path) -> ObjectInfo:
    """Stream the object `key` into `path`: written beside it, then moved in whole, so a file
    with the final name is always complete."""
    fetch = getattr(store, "download", None)
    if fetch is not None:
        info: ObjectInfo = fetch(key, path)
        return info
    data = store.get(key)
    _write_whole(path, lambda f: f.write(data))
    return ObjectInfo(key, len(data), _digest(data))


def presign(store: Store, key: str, seconds: int) -> str:
    """An HTTPS GET link to `key` that works without credentials for `seconds`; S3 only."""
    signer = getattr(store, "presign", None)
    if signer is None:
        raise UsageError(f"links that work without credentials need an S3 store "
                         f"(FARM_STORE_URL=s3://bucket/prefix); this farm's store is {store.url}")
    url: str = signer(key, seconds)
    return url


def _write_whole(path: Path, write: Callable[[Any], Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".tmp-")
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
        os.replace(tmp, path)
        tmp = ""
    finally:
        if tmp:
            with contextlib.suppress(OSError):
                os.unlink(tmp)


_TEMP_NAMES = itertools.count()


def _create_beside(folder: str) -> tuple[int, str]:
    """A new empty file in `folder` (made when missing) whose dot name no listing shows and no
    other writer takes: (its descriptor, open for writing; its path)."""
    while True:
        tmp = f"{folder}/.tmp-{os.getpid()}-{next(_TEMP_NAMES)}"
        try:
            return os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | O_CLOEXEC, 0o600), tmp
        except FileNotFoundError:
            os.makedirs(folder, exist_ok=True)
        except FileExistsError:  # left by a process that had this pid before: another name
            continue


def check_key(key: str) -> str:
    """Keys are relative, '/'-separated, and never climb out of the store's prefix."""
    if not key or key.startswith("/") or "\\" in key or "\x00" in key:
        raise ValueError(f"bad store key {key!r}")
    if any(part in ("", ".", "..") for part in key.split("/")):
        raise ValueError(f"bad store key {key!r}")
    return key


class FileStore:
    def __init__(self, root: Path) -> None:
        self.root = root
        self.url = root.as_uri()
        self._root = os.fspath(root)

    def _path(self, key: str) -> Path:
        return self.root / check_key(key)

    def put(self, key: str, data: bytes, *, create_once: bool = False,
            if_match: str | None = None,
            content_type: str = "application/octet-stream") -> str:
        # str paths and plain os calls: a job writes four objects, and pathlib's objects and
        # a mkdir before every write cost more than the write itself on a fast disk
        path = f"{self._root}/{check_key(key)}"
        folder = path.rpartition("/")[0]
        try:
            # Write beside the target, then move it in whole: readers never see half a file.
            fd, tmp = _create_beside(folder)
        except OSError as exc:
            raise StoreUnavailable(f"cannot write {self.url}/{key}: {exc}") from None
        try:
            try:
                view = memoryview(data)
                while view:
                    view = view[os.write(fd, view):]
            finally:
                os.close(fd)
            if create_once:
                try:
                    os.link(tmp, path)  # atomic, and fails when the name exists
                except FileExistsError:
                    raise AlreadyExists(f"{self.url}/{key} already exists") from None
            elif if_match is not None:
                with self._locked(folder):
                    try:
                        with open(path, "rb") as current:
                            version = _digest(current.read())
                    except FileNotFoundError:
                        raise Conflict(f"{self.url}/{key} is gone") from None
                    if version != if_match:
                        raise Conflict(f"{self.url}/{key} changed since it was read")
                    os.replace(tmp, path)
                    tmp = ""
            else:
                os.replace(tmp, path)
                tmp = ""
        except OSError as exc:
            raise StoreUnavailable(f"cannot write {self.url}/{key}: {exc}") from None
        finally:
            if tmp:
                with contextlib.suppress(OSError):
                    os.unlink(tmp)
        return _digest(data)

    @contextlib.contextmanager
    def _locked(self, folder: str) -> Iterator[None]:
        """An exclusive lock on a folder (a dot file, which no listing shows): compare-and-set
        writers of objects in it take turns, across processes."""
        with open(f"{folder}/.lock", "a") as handle:
            fcntl.flock(handle, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(handle, fcntl.LOCK_UN)

    def get(self, key: str) -> bytes:
        try:
            with open(f"{self._root}/{check_key(key)}", "rb") as f:
                return f.read()
        except (FileNotFoundError, NotADirectoryError):
            raise NotFound(f"{self.url}/{key} does not exist") from None
        except OSError as exc:
            raise StoreUnavailable(f"cannot read {self.url}/{key}: {exc}") from None

    def get_versioned(self, key: str) -> tuple[bytes, str]:
        data = self.get(key)
        return data, _digest(data)

    def exists(self, key: str) -> bool:
        return self._path(key).is_file()

    def list_keys(self, prefix: str) -> list[str]:
        base = self.root / prefix.rstrip("/") if prefix else self.root
        if not base.is_dir():
            return []
        keys = []
        for dirpath, _dirs, files in os.walk(base):
            for name in files:
                if not name.startswith("."):  # half-written (.tmp-*) and lock files
                    keys.append(Path(dirpath, name).relative_to(self.root).as_posix())
        return sorted(keys)

    def list_dirs(self, prefix: str) -> list[str]:
        base = self.root / prefix.rstrip("/") if prefix else self.root
        if not base.is_dir():
            return []
        return sorted(p.name for p in base.iterdir() if p.is_dir())

    def delete(self, key: str) -> None:
        try:
            self._path(key).unlink()
        except (FileNotFoundError, NotADirectoryError):
            pass
        except OSError as exc:
            raise StoreUnavailable(f"cannot delete {self.url}/{key}: {exc}") from None


    def list_objects(self, prefix: str) -> list[ObjectInfo]:
        found = []
        for key in self.list_keys(prefix):
            try:
                st = (self.root / key).stat()
            except FileNotFoundError:  # deleted since the walk
                continue
            found.append(ObjectInfo(key, st.st_size, f"{st.st_size}-{st.st_mtime_ns}"))
        return found

    def download(self, key: str, path: Path) -> ObjectInfo:
        source = self._path(key)
        try:
            with open(source, "rb") as src:
                st = os.fstat(src.fileno())
                _write_whole(path, lambda f: shutil.copyfileobj(src, f, 1 << 20))
        except (FileNotFoundError, NotADirectoryError):
            raise NotFound(f"{self.url}/{key} does not exist") from None
        except OSError as exc:
            raise StoreUnavailable(f"cannot copy {self.url}/{key} to {path}: {exc}") from None
        return ObjectInfo(key, st.st_size, f"{st.st_size}-{st.st_mtime_ns}")


def _digest(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


class S3Store:
    def __init__(self, bucket: str, prefix: str, settings: Settings) -> None:
        import boto3
        from botocore.config import Config

        self.bucket = bucket
        self.prefix = prefix.strip("/")
        self.url = f"s3://{bucket}/{self.prefix}".rstrip("/")
        config = Config(
            retries={"mode": "standard", "max_attempts": 5},
            connect_timeout=5, read_timeout=60,
            # `farm results` and `farm gallery` download on a pool of threads sharing this client
            max_pool_connections=DOWNLOAD_THREADS * 2,
            # presigned links signed with SigV4 (boto3 presigns with SigV2 unless told), which
            # every region accepts and which lives up to 7 days (scheduler/share.py)
            signature_version="s3v4",
            # boto3 >= 1.36 adds checksums to every request by default; several S3-compatible
            # stores reject them, so send them only where the API requires one.
            request_checksum_calculation="when_required",
            response_checksum_validation="when_required",
        )
        self.retry_seconds = settings.store_retry_seconds
        self.client = boto3.client("s3", endpoint_url=settings.s3_endpoint_url,
                                   region_name=settings.s3_region, config=config)
        self.light = _LightGets.for_client(self.client)

    def _key(self, key: str) -> str:
        check_key(key)
        return f"{self.prefix}/{key}" if self.prefix else key

    def _call(self, fn: Any, **kwargs: Any) -> Any:
        """One S3 request; while the store is unreachable, try again with backoff for up to
        `store_retry_seconds` (boto3's own retries cover a blip; this covers bad minutes)."""
        deadline = time.monotonic() + self.retry_seconds
        delay = 0.5
        while True:
            try:
                return self._call_once(fn, **kwargs)
            except StoreUnavailable:
                if time.monotonic() + delay > deadline:
                    raise
                time.sleep(delay)
                delay = min(delay * 2, 8.0)

    def _call_once(self, fn: Any, **kwargs: Any) -> Any:
        from botocore.exceptions import BotoCoreError, ClientError, EndpointConnectionError

        try:
            return fn(**kwargs)
        except EndpointConnectionError as exc:
            raise StoreUnavailable(f"cannot reach the object store {self.url}: {exc}") from None
        except ClientError as exc:
            code = exc.response.get("Error", {}).get("Code", "")
            if code in ("NoSuchKey", "404", "NotFound"):
                raise NotFound(f"{self.url}/{kwargs.get('Key', '')} does not exist") from None
            if code in ("PreconditionFailed", "412", "ConditionalRequestConflict"):
                if "IfMatch" in kwargs:
                    raise Conflict(f"{self.url}/{kwargs.get('Key', '')} changed since it was "
                                   "read") from None
                raise AlreadyExists(f"{self.url}/{kwargs.get('Key', '')} already exists") \
                    from None
            if code == "NoSuchBucket":
                raise ConfigError(f"the bucket of {self.url} does not exist") from None
            if code in ("AccessDenied", "InvalidAccessKeyId", "SignatureDoesNotMatch"):
                raise ConfigError(f"the object store {self.url} refused access: {code}") \
                    from None
            raise StoreUnavailable(f"object store {self.url}: {exc}") from None
        except BotoCoreError as exc:
            raise StoreUnavailable(f"object store {self.url}: {exc}") from None

    def put(self, key: str, data: bytes, *, create_once: bool = False,
            if_match: str | None = None,
            content_type: str = "application/octet-stream") -> str:
        kwargs: dict[str, Any] = {"Bucket": self.bucket, "Key": self._key(key), "Body": data,
                                  "ContentType": content_type}
        if create_once:
            kwargs["IfNoneMatch"] = "*"
        elif if_match is not None:
            kwargs["IfMatch"] = if_match
        try:
            response = self._call(self.client.put_object, **kwargs)
        except NotFound:  # If-Match on an object that is gone
            raise Conflict(f"{self.url}/{key} is gone") from None
        return str(response.get("ETag", ""))

    def get(self, key: str) -> bytes:
        return self.get_versioned(key)[0]

    def get_versioned(self, key: str) -> tuple[bytes, str]:
        response = self._call(self.client.get_object, Bucket=self.bucket, Key=self._key(key))
        return bytes(response["Body"].read()), str(response.get("ETag", ""))

    def exists(self, key: str) -> bool:
        try:
            self._call(self.client.head_object, Bucket=self.bucket, Key=self._key(key))
        except NotFound:
            return False
        return True

    def _pages(self, prefix: str, **extra: Any) -> Iterator[dict[str, Any]]:
        token: str | None = None
        while True:
            kwargs: dict[str, Any] = {"Bucket": self.bucket, "Prefix": prefix, **extra}
            if token:
                kwargs["ContinuationToken"] = token
            page = self._call(self.client.list_objects_v2, **kwargs)
            yield page
            if not page.get("IsTruncated"):
                return
            token = page.get("NextContinuationToken")

    def _full_prefix(self, prefix: str) -> str:
        prefix = prefix.strip("/")
        parts = [p for p in (self.prefix, prefix) if p]
        return "/".join(parts) + "/" if parts else ""

    def list_keys(self, prefix: str) -> list[str]:
        full = self._full_prefix(prefix)
        strip = len(self.prefix) + 1 if self.prefix else 0
        keys = [obj["Key"][strip:] for page in self._pages(full)
                for obj in page.get("Contents", [])]
        return sorted(keys)

    def list_dirs(self, prefix: str) -> list[str]:
        full = self._full_prefix(prefix)
        names = [p["Prefix"][len(full):].rstrip("/") for page in self._pages(full, Delimiter="/")
                 for p in page.get("CommonPrefixes", [])]
        return sorted(names)

    def list_objects(self, prefix: str) -> list[ObjectInfo]:
        full = self._full_prefix(prefix)
        strip = len(self.prefix) + 1 if self.prefix else 0
        found = [ObjectInfo(obj["Key"][strip:], int(obj["Size"]), str(obj.get("ETag", "")))
                 for page in self._pages(full) for obj in page.get("Contents", [])]
        return sorted(found, key=lambda o: o.key)

    def download(self, key: str, path: Path) -> ObjectInfo:
        if self.light is not None:
            info = self.light.download(self.bucket, self._key(key), key, path)
            if info is not None:
                return info
            if self.light.off:
                self.light = None
        return self._download(key, path)

    def _download(self, key: str, path: Path) -> ObjectInfo:
        from botocore.exceptions import BotoCoreError

        response = self._call(self.client.get_object, Bucket=self.bucket, Key=self._key(key))
        body = response["Body"]
        def copy(f: Any) -> None:
            for chunk in body.iter_chunks(1 << 20):
                f.write(chunk)

        try:
            _write_whole(path, copy)
        except (BotoCoreError, OSError) as exc:
            raise StoreUnavailable(f"cannot download {self.url}/{key}: {exc}") from None
        finally:
            body.close()
        return ObjectInfo(key, int(response.get("ContentLength", path.stat().st_size)),
                          str(response.get("ETag", "")))

    def presign(self, key: str, seconds: int) -> str:
        url: str = self.client.generate_presigned_url(
            "get_object", Params={"Bucket": self.bucket, "Key": self._key(key)},
            ExpiresIn=seconds)
        return url

    def delete(self, key: str) -> None:
        self._call(self.client.delete_object, Bucket=self.bucket, Key=self._key(key))


class _LightGets:
    """Bulk downloads on a plain urllib3 pool through presigned URLs: per GET, about 30 % less
    client CPU than boto3's get_object, which parses and validates every response through its
    full model (docs/results.md: with 16 threads at S3's latency a download of small images is
    bound by the client's CPU, not the network). The signing is still botocore's
    (credentials, region, endpoint and addressing style as every other request). It is a fast
    path only: anything but a whole 200 answer (a missing key, a refusal, a throttle, a dropped
    connection) returns None, and the caller repeats the GET through boto3, with its retries
    and its error mapping. An answer that says the URL itself will not work here (a redirect
    to another region, a refusal of the signature) turns the fast path `off` for good. Not used
    behind an HTTP proxy (botocore reads the proxy settings; a plain pool would not)."""

    OFF_STATUSES = frozenset((301, 307, 400, 403))

    def __init__(self, client: Any, pool: Any) -> None:
        self.client = client
        self.pool = pool
        self.off = False

    @classmethod
    def for_client(cls, client: Any) -> _LightGets | None:
        import urllib.request

        import botocore.session
        import urllib3
        from botocore.httpsession import get_cert_path

        if urllib.request.getproxies():
            return None
        ca_bundle = botocore.session.get_session().get_config_variable("ca_bundle")
        pool = urllib3.PoolManager(
            maxsize=DOWNLOAD_THREADS * 2, retries=False,
            timeout=urllib3.Timeout(connect=5, read=60),
            cert_reqs="CERT_REQUIRED", ca_certs=get_cert_path(ca_bundle or True))
        return cls(client, pool)

    def download(self, bucket: str, full_key: str, key: str, path: Path) -> ObjectInfo | None:
        """`full_key` of `bucket` streamed into `path` (whole or not at all), or None when the
        caller must fetch it through boto3."""
        import urllib3

        url = self.client.generate_presigned_url(
            "get_object", Params={"Bucket": bucket, "Key": full_key}, ExpiresIn=900)
        try:
            response = self.pool.request("GET", url, preload_content=False, redirect=False)
        except urllib3.exceptions.HTTPError:
            return None
        try:
            if response.status != 200:
                self.off = response.status in self.OFF_STATUSES
                return None

            def copy(f: Any) -> None:
                # urllib3 raises when the body ends short of its Content-Length
                for chunk in response.stream(1 << 20):
                    f.write(chunk)

            _write_whole(path, copy)
        except urllib3.exceptions.HTTPError:
            return None
        finally:
            response.release_conn()
        size = response.headers.get("Content-Length")
        return ObjectInfo(key, int(size) if size else path.stat().st_size,
                          str(response.headers.get("ETag", "")))


def open_store(settings: Settings) -> Store:
    url = settings.effective_store_url
    parsed = urlparse(url)
    if parsed.scheme == "file":
        if parsed.netloc not in ("", "localhost"):
            raise ConfigError(f"FARM_STORE_URL file URLs must be file:///absolute/path, got {url!r}")
        return FileStore(Path(unquote(parsed.path)))
    if parsed.scheme == "s3":
        if not parsed.netloc:
            raise ConfigError(f"FARM_STORE_URL must name a bucket (s3://bucket/prefix), got {url!r}")
        return S3Store(parsed.netloc, parsed.path, settings)
    raise ConfigError(f"FARM_STORE_URL must start with file:// or s3://, got {url!r}")
