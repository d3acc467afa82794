"""Bulk downloads from S3 (farm/store.py `download`): the presigned fast path on a plain HTTP
pool, and its fall back to boto3 when an answer is anything but a whole 200.

Faults come from a small HTTP proxy in front of moto's server (a test tool, named as such): it
forwards every request and, for the GETs of chosen keys, answers a chosen status or cuts the
body short, the way S3 throttles (503 SlowDown), refuses (403) or drops a connection."""

from __future__ import annotations

import http.client
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest

from farm.errors import NotFound
from farm.settings import Settings
from farm.store import S3Store, list_objects, open_store


class FaultyProxy(ThreadingHTTPServer):
    """Forwards to `upstream`; `faults` maps a key's last path part to what its next presigned
    GETs meet: ("status", code) or ("short", None), each used `times` times."""

    daemon_threads = True

    def __init__(self, upstream: str) -> None:
        super().__init__(("127.0.0.1", 0), ProxyHandler)
        self.upstream = urlsplit(upstream)
        self.faults: dict[str, tuple[str, int | None, int]] = {}
        # paths of the images' GETs: signed in the query string (the fast path), or in a
        # header (boto3)
        self.presigned_gets: list[str] = []
        self.header_gets: list[str] = []
        self.lock = threading.Lock()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"

    def fault_for(self, path: str) -> tuple[str, int | None] | None:
        name = path.split("?", 1)[0].rsplit("/", 1)[-1]
        with self.lock:
            fault = self.faults.get(name)
            if fault is None or fault[2] <= 0:
                return None
            self.faults[name] = (fault[0], fault[1], fault[2] - 1)
            return fault[0], fault[1]


class ProxyHandler(BaseHTTPRequestHandler):
    server: FaultyProxy
    protocol_version = "HTTP/1.1"

    def log_message(self, format: str, *args: Any) -> None:
        pass

    def _forward(self) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        body = self.rfile.read(length) if length else None
        presigned = "X-Amz-Signature=" in self.path
        fault = None
        if self.command == "GET" and self.path.split("?", 1)[0].endswith(".png"):
            with self.server.lock:
                (self.server.presigned_gets if presigned else
                 self.server.header_gets).append(self.path.split("?", 1)[0])
            if presigned:
                fault = self.server.fault_for(self.path)
        if fault is not None and fault[0] == "status":
            payload = b"<Error><Code>Injected</Code></Error>"
            self.send_response(int(fault[1] or 500))
            self.send_header("Content-Length", str(len(payload)))
            self.end_headers()
            self.wfile.write(payload)
            return
        up = http.client.HTTPConnection(self.server.upstream.hostname or "127.0.0.1",
                                        self.server.upstream.port, timeout=30)
        headers = {k: v for k, v in self.headers.items() if k.lower() != "host"}
        headers["Host"] = self.headers.get("Host", "")
        up.request(self.command, self.path, body=body, headers=headers)
        answer = up.getresponse()
        data = answer.read()
        self.send_response(answer.status)
        for k, v in answer.getheaders():
            if k.lower() not in ("transfer-encoding", "connection", "content-length"):
                self.send_header(k, v)
        self.send_header("Content-Length", str(len(data)))
        if fault is not None:  # "short": half the body, then the connection drops
            self.send_header("Connection", "close")
            self.end_headers()
            self.wfile.write(data[: len(data) // 2])
            self.close_connection = True
        else:
            self.end_headers()
            self.wfile.write(data)
        up.close()

    do_GET = do_PUT = do_HEAD = do_DELETE = do_POST = _forward


@pytest.fixture
def proxy(moto_endpoint: str) -> Iterator[FaultyProxy]:
    server = FaultyProxy(moto_endpoint)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server
    server.shutdown()
    server.server_close()


@pytest.fixture
def store(s3_env: dict[str, str], proxy: FaultyProxy) -> S3Store:
    store = open_store(Settings.load(env={**s3_env, "FARM_S3_ENDPOINT_URL": proxy.url}))
    assert isinstance(store, S3Store)
    return store


@pytest.fixture
def out(tmp_path: Path) -> Path:
    folder = tmp_path / "out"
    folder.mkdir()
    return folder


def _objects(store: S3Store, count: int) -> dict[str, bytes]:
    blobs = {f"batches/b/images/{i}.png": bytes([i]) * (1000 + 37 * i) for i in range(count)}
    for key, data in blobs.items():
        store.put(key, data)
    return blobs


def test_downloads_take_the_presigned_path_and_keep_the_listings_tags(
        store: S3Store, proxy: FaultyProxy, out: Path) -> None:
    blobs = _objects(store, 3)
    listed = {o.key: o for o in list_objects(store, "batches/b/images")}
    for key, data in blobs.items():
        info = store.download(key, out / key.rsplit("/", 1)[-1])
        assert (out / key.rsplit("/", 1)[-1]).read_bytes() == data
        assert (info.key, info.size, info.tag) == (key, len(data), listed[key].tag)
    assert len(proxy.presigned_gets) == 3 and proxy.header_gets == []


def test_a_throttled_or_cut_get_is_repeated_through_boto3_and_lands_whole(
        store: S3Store, proxy: FaultyProxy, out: Path) -> None:
    blobs = _objects(store, 2)
    proxy.faults = {"0.png": ("status", 503, 1), "1.png": ("short", None, 1)}
    for key, data in blobs.items():
        path = out / key.rsplit("/", 1)[-1]
        store.download(key, path)
        assert path.read_bytes() == data
    assert sorted(p.name for p in out.iterdir()) == ["0.png", "1.png"]  # no partial file
    assert len(proxy.header_gets) == 2          # each fetched again through boto3
    assert store.light is not None              # a passing fault keeps the fast path
    store.download("batches/b/images/0.png", out / "again.png")
    assert len(proxy.header_gets) == 2 and len(proxy.presigned_gets) == 3


def test_a_refused_signature_turns_the_fast_path_off(
        store: S3Store, proxy: FaultyProxy, out: Path) -> None:
    blobs = _objects(store, 2)
    proxy.faults = {"0.png": ("status", 403, 5)}
    for key, data in blobs.items():
        path = out / key.rsplit("/", 1)[-1]
        store.download(key, path)
        assert path.read_bytes() == data
    assert store.light is None
    assert len(proxy.presigned_gets) == 1 and len(proxy.header_gets) == 2


def test_a_missing_key_is_not_found_and_leaves_no_file(
        store: S3Store, out: Path) -> None:
    with pytest.raises(NotFound):
        store.download("batches/b/images/none.png", out / "none.png")
    assert list(out.iterdir()) == []
    assert store.light is not None


def test_no_fast_path_behind_an_http_proxy(s3_env: dict[str, str],
                                           monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HTTPS_PROXY", "http://127.0.0.1:3128")
    store = open_store(Settings.load(env=s3_env))
    assert isinstance(store, S3Store) and store.light is None
