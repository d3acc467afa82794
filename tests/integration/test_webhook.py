"""The batch-end webhook (farm/webhook.py) against a real local HTTP server: a failed try is
retried with backoff, a refusal is not, the body is signed, and of several senders at once only
the one that claimed the batch's notified.json sends."""

from __future__ import annotations

import hashlib
import hmac
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest

from farm import keys, webhook
from farm.errors import UsageError
from farm.settings import Settings
from farm.store import get_json, open_store
from farm.summary import Summary


class Endpoint:
    """Answers each POST with the next status of `answers` (the last one from then on)."""

    def __init__(self, answers: list[int]) -> None:
        self.bodies: list[tuple[dict[str, str], bytes]] = []
        bodies = self.bodies

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802 - http.server's name
                body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                bodies.append((dict(self.headers.items()), body))
                self.send_response(answers[min(len(bodies), len(answers)) - 1])
                self.end_headers()

            def log_message(self, *args: Any) -> None:
                return None

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/hook"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()


@pytest.fixture
def endpoint(request: pytest.FixtureRequest) -> Iterator[Endpoint]:
    got = Endpoint(request.param)
    yield got
    got.server.shutdown()
    got.server.server_close()


@pytest.mark.parametrize("endpoint", [[503, 500, 200]], indirect=True)
def test_a_failed_try_is_retried_and_the_body_is_signed(endpoint: Endpoint) -> None:
    ok, got = webhook.post(endpoint.url, b'{"batch": "b"}', "k", "b", attempts=5, backoff=0.01)
    assert (ok, got, len(endpoint.bodies)) == (True, "HTTP 200", 3)
    headers, body = endpoint.bodies[-1]
    assert headers["X-Farm-Signature"] == \
        "sha256=" + hmac.new(b"k", body, hashlib.sha256).hexdigest()


@pytest.mark.parametrize("endpoint", [[404]], indirect=True)
def test_a_refusal_is_not_retried(endpoint: Endpoint) -> None:
    assert webhook.post(endpoint.url, b"{}", None, "b", attempts=5, backoff=0.01) == \
        (False, "HTTP 404")
    assert len(endpoint.bodies) == 1 and "X-Farm-Signature" not in endpoint.bodies[0][0]


def test_an_endpoint_that_is_not_there_gives_up_after_its_tries() -> None:
    ok, got = webhook.post("http://127.0.0.1:9/hook", b"{}", None, "b", attempts=2,
                           backoff=0.01)
    assert not ok and got


@pytest.mark.parametrize("endpoint", [[500]], indirect=True)
def test_of_several_senders_only_the_claimant_sends_and_its_outcome_is_kept(
        endpoint: Endpoint, settings: Settings) -> None:
    store = open_store(settings)
    summary = Summary(batch="b-hook", state="succeeded", jobs=1, counts={"succeeded": 1},
                      created_at=1.0, finished_at=2.0, notify=endpoint.url)
    sent: list[bool] = []
    senders = [threading.Thread(target=lambda: sent.append(
        webhook.deliver(store, summary, "k", attempts=2))) for _ in range(4)]
    for t in senders:
        t.start()
    for t in senders:
        t.join()
    assert len(endpoint.bodies) == 2   # one sender, two tries: the endpoint kept failing
    assert sent == [False] * 4
    kept = get_json(store, keys.notified_key("b-hook"))
    assert (kept["state"], kept["answer"], kept["url"]) == ("failed", "HTTP 500", endpoint.url)


@pytest.mark.parametrize("url", ["ftp://x/y", "example.com/hook", "http://", "file:///tmp/x"])
def test_a_webhook_url_must_be_http(url: str) -> None:
    with pytest.raises(UsageError, match="--notify must be an http:// or https:// URL"):
        webhook.check_url(url)
