"""`farm submit --notify URL`: real worker processes (the stand-in backend) tell a real local HTTP
server that their batch ended: one POST, signed with FARM_WEBHOOK_SECRET, even when two workers
finish the batch's last two jobs at the same moment; and the batch's summary lands in the store,
so `farm status` reads one object for it."""

from __future__ import annotations

import hashlib
import hmac
import json
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

from farm import broker, fleet, keys
from farm.lifecycle import JobState
from farm.scheduler.status import Source, batch_counts
from farm.scheduler.submit import submit
from farm.settings import Settings
from farm.store import get_json, open_store
from tests.conftest import run_farm
from tests.e2e.test_lifecycle import FAST, Workers, records, specs, wait

SECRET = "s3cret-for-the-test"


class Receiver:
    """An HTTP server in a thread that keeps every POST it gets (headers, body)."""

    def __init__(self, status: int = 200) -> None:
        posts: list[tuple[dict[str, str], bytes]] = []
        self.posts = posts

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802 - http.server's name
                body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                posts.append((dict(self.headers.items()), body))
                self.send_response(status)
                self.end_headers()

            def log_message(self, *args: Any) -> None:
                return None

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/hooks/farm"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    got = Receiver()
    try:
        yield got
    finally:
        got.close()


def test_two_workers_finishing_the_last_two_jobs_at_once_post_one_signed_summary(
        env: dict[str, str], tmp_path: Path, receiver: Receiver) -> None:
    env = {**env, **FAST, "FARM_WEBHOOK_SECRET": SECRET}
    settings = Settings.load(env=env)
    workers = Workers(env, tmp_path / "logs")
    gate = tmp_path / "gate"
    try:
        broker.ensure_broker(settings)
        client = broker.redis_client(settings)
        for name in ("w-1", "w-2"):
            workers.start(name, "--gate", str(gate))
        wait("two ready workers", lambda: sum(w.state == fleet.WorkerState.READY
                                              for w in fleet.live_workers(client)) == 2,
             logs=workers)
        result = submit(settings, specs(settings, 2), notify=receiver.url)
        # each worker holds one of the two jobs half-way until the gate opens: then both
        # finish the batch's last two jobs at the same moment
        wait("both jobs running, one on each worker", lambda: (
            lambda found: len(found) == 2 and {r.state for r in found.values()} ==
            {JobState.RUNNING} and len({r.worker for r in found.values()}) == 2)(
                records(settings, result.batch)), logs=workers)
        gate.touch()
        store = open_store(settings)

        def delivered() -> bool:
            try:
                return bool(get_json(store, keys.notified_key(result.batch))["state"] ==
                            "delivered")
            except Exception:  # noqa: BLE001 - not written yet
                return False

        wait("the webhook's delivery", delivered, logs=workers)
        # every worker's reconciling has seen the batch end (it leaves the active set), and
        # any second sender would have sent by now
        wait("the batch's end seen by reconciling", lambda: not client.sismember(
            "farm:active-batches", result.batch), logs=workers)
        time.sleep(1.0)
        assert len(receiver.posts) == 1, receiver.posts
        headers, body = receiver.posts[0]
        expected = "sha256=" + hmac.new(SECRET.encode(), body, hashlib.sha256).hexdigest()
        assert headers["X-Farm-Signature"] == expected
        assert headers["X-Farm-Batch"] == result.batch
        sent = json.loads(body)
        assert (sent["batch"], sent["state"], sent["counts"], sent["failed"], sent["jobs"]) == \
            (result.batch, "succeeded", {"succeeded": 2}, [], 2)
        assert sent["gallery"] is None
        # status reads the summary: one object, whatever the batch's size
        counted = batch_counts(store, client, result.batch, settings)
        assert (counted.source, counted.state, counted.done) == (Source.SUMMARY, "succeeded", 2)
    finally:
        workers.stop()
        broker.stop_broker(settings)


def test_a_webhook_that_is_not_http_is_refused_and_nothing_is_submitted(
        env: dict[str, str], tmp_path: Path) -> None:
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a fox\n")
    out = run_farm(env, "submit", str(prompts), "--notify", "ftp://example.com/hook")
    assert out.returncode == 2, out
    assert out.stderr.strip().splitlines() == [
        "error: --notify must be an http:// or https:// URL, got 'ftp://example.com/hook'"]
    assert open_store(Settings.load(env=env)).list_dirs("batches") == []
