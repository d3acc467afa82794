"""Telling a batch's webhook (`farm submit --notify URL`) that the batch ended: one POST of its
summary as JSON, signed, retried with backoff, at most once per batch.

    POST <url>
    Content-Type: application/json
    X-Farm-Batch: <batch>
    X-Farm-Signature: sha256=<hex HMAC-SHA256 of the body with FARM_WEBHOOK_SECRET>

A receiver checks the signature with the same secret (`signature(body, secret)` here).
Several workers may finish a batch's last jobs at the same moment: each may call `deliver`, and
the first to create `batches/<batch>/notified.json` (create-once) is the one that sends; it
then records how the delivery went there. The endpoint's answer never touches the batch: the
sender runs it beside the work (a background thread), and gives up after DELIVERY_ATTEMPTS.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
import time
import urllib.error
import urllib.request
from typing import Any
from urllib.parse import urlparse

from farm import keys
from farm.errors import AlreadyExists, UsageError
from farm.store import Store, put_json

log = logging.getLogger("farm.webhook")

SIGNATURE_HEADER = "X-Farm-Signature"
# one try waits this long for an answer; a slow receiver must not hold a worker's thread long
TIMEOUT_SECONDS = 10.0
# tries 1 s, 2 s, 4 s, 8 s apart: a receiver restarting within about a quarter minute still
# hears; at most about a minute in all with the timeouts
DELIVERY_ATTEMPTS = 5
FIRST_BACKOFF_SECONDS = 1.0


def check_url(url: str) -> str:
    """A webhook URL must be http(s) with a host."""
    parsed = urlparse(url)
    if parsed.scheme not in ("http", "https") or not parsed.netloc:
        raise UsageError(f"--notify must be an http:// or https:// URL, got {url!r}")
    return url


def signature(body: bytes, secret: str) -> str:
    return "sha256=" + hmac.new(secret.encode(), body, hashlib.sha256).hexdigest()


def payload(summary: Any, gallery: str | None = None) -> bytes:
    """The JSON body: the batch, its state and counts, every failed job with its error."""
    return json.dumps({"event": "batch.ended", "batch": summary.batch, "state": summary.state,
                       "jobs": summary.jobs, "counts": summary.counts,
                       "failed": summary.failed, "created_at": summary.created_at,
                       "finished_at": summary.finished_at, "gallery": gallery},
                      sort_keys=True).encode()


def post(url: str, body: bytes, secret: str | None, batch: str,
         attempts: int = DELIVERY_ATTEMPTS, backoff: float = FIRST_BACKOFF_SECONDS
         ) -> tuple[bool, str]:
    """POST `body`, retrying a failure (no answer, a 5xx, 408 or 429) with backoff; a 2xx is
    delivered. Returns (delivered, what the last try got)."""
    headers = {"Content-Type": "application/json", "X-Farm-Batch": batch,
               "User-Agent": "farm-webhook"}
    if secret:
        headers[SIGNATURE_HEADER] = signature(body, secret)
    got = ""
    for attempt in range(1, attempts + 1):
        request = urllib.request.Request(url, data=body, headers=headers, method="POST")
        try:
            with urllib.request.urlopen(request, timeout=TIMEOUT_SECONDS) as response:
                return True, f"HTTP {response.status}"
        except urllib.error.HTTPError as exc:
            got = f"HTTP {exc.code}"
            if exc.code < 500 and exc.code not in (408, 429):
                return False, got   # the receiver refused it: trying again will not help
        except OSError as exc:   # no answer: refused, unreachable, timed out (URLError)
            got = str(getattr(exc, "reason", exc))
        if attempt < attempts:
            time.sleep(backoff * 2 ** (attempt - 1))
    return False, got


def deliver(store: Store, summary: Any, secret: str | None,
            attempts: int = DELIVERY_ATTEMPTS) -> bool:
    """Send the batch's summary to its webhook, unless someone already claimed that. True when
    this call delivered it."""
    if not summary.notify:
        return False
    key = keys.notified_key(summary.batch)
    try:
        version = put_json(store, key, {"state": "sending", "url": summary.notify,
                                        "at": time.time()}, create_once=True)
    except AlreadyExists:
        return False   # another process sends (or sent) it
    if not secret:
        log.warning("batch %s: FARM_WEBHOOK_SECRET is not set; its webhook is sent unsigned",
                    summary.batch)
    ok, got = post(summary.notify, payload(summary), secret, summary.batch, attempts)
    log.log(logging.INFO if ok else logging.WARNING, "batch %s: webhook %s %s (%s)",
            summary.batch, summary.notify, "delivered" if ok else "not delivered", got)
    try:
        put_json(store, key, {"state": "delivered" if ok else "failed", "url": summary.notify,
                              "answer": got, "at": time.time()}, if_match=version)
    except Exception as exc:  # noqa: BLE001 - the delivery happened either way
        log.warning("batch %s: could not record its webhook's delivery: %s", summary.batch, exc)
    return ok
