"""A worker's part in a batch's counters and its end: every record it writes (or finds final) is
noted in the batch's tally (farm/tally.py), and when a note says the batch's last job became
final, the batch's summary and webhook (farm/summary.py `conclude`) run in a background thread,
so that neither the recount nor a slow endpoint holds up the next job.

The note that makes the job of the message in hand final also acks that message: it deletes
the worker's in-flight record in the same command (farm/transport.py `settled`), so a job's end
costs the worker one request, not a note and then an ack. Only from the thread that runs the
message, and only while the record holds that one message alone (`hold`)."""

from __future__ import annotations

import logging
import threading
import time
from typing import Any

from farm import recovery, summary, tally, transport
from farm.lifecycle import JobRecord
from farm.records import read_manifest

log = logging.getLogger("farm.worker")

# how long a stopping worker waits for a batch's end it is telling (its summary and webhook)
STOP_WAIT_SECONDS = 90.0


class Finisher:
    def __init__(self, store: Any, client: Any, settings: Any) -> None:
        self.store, self.client, self.settings = store, client, settings
        self.tally = tally.Tally(client)
        self._threads: list[threading.Thread] = []
        self._lock = threading.Lock()
        # (worker, delivery tag, job, thread) of the message in hand, while its final note may
        # ack it
        self._holding: tuple[str, str, str, int] | None = None

    def hold(self, worker: str, tag: str | None, job: str | None) -> None:
        """The calling thread runs message `tag` (of `job`) of `worker`: the note that makes
        the job final acks it, when the worker's in-flight record holds that message."""
        self._holding = None
        if tag and job and transport.holding(worker) == tag:
            self._holding = (worker, tag, job, threading.get_ident())

    def release(self) -> None:
        """The message in hand shares its record (the throughput mode) or has ended: notes
        ack nothing from here on."""
        self._holding = None

    def noted(self, record: JobRecord) -> None:
        """Count a record this worker wrote, or found final; never raises (the record is in
        the store either way, and the next reader or the batch's recount repairs the tally)."""
        held, ack = self._holding, None
        if (held is not None and record.state.final and record.job == held[2]
                and threading.get_ident() == held[3]):
            ack = recovery.INFLIGHT + held[0]
        try:
            got = self.tally.note(record, ack=ack)
        except Exception as exc:  # noqa: BLE001 - see above
            log.warning("job %s: could not count its %s state: %s", record.job,
                        record.state.value, exc)
            return
        if ack is not None and held is not None:
            self._holding = None
            transport.settled(held[0], held[1])
        if got is not None and got.changed and got.ended:
            self.conclude_later(record.batch)

    def conclude_later(self, batch: str) -> None:
        thread = threading.Thread(target=self.conclude, args=(batch,), daemon=True,
                                  name=f"finish-{batch}")
        with self._lock:
            self._threads = [t for t in self._threads if t.is_alive()] + [thread]
        thread.start()

    def conclude(self, batch: str) -> None:
        """Write the batch's summary and tell its webhook, if it ended (idempotent)."""
        try:
            manifest = read_manifest(self.store, batch, self.settings)
            summary.conclude(self.store, self.client, manifest, self.settings.webhook_secret)
        except Exception as exc:  # noqa: BLE001 - reconciling tries again (farm/recovery.py)
            log.warning("batch %s: could not write its summary: %s", batch, exc)

    def wait(self, seconds: float = STOP_WAIT_SECONDS) -> None:
        """Before the worker exits: let the batch ends it is telling finish, for a while."""
        deadline = time.monotonic() + seconds
        with self._lock:
            threads = list(self._threads)
        for thread in threads:
            thread.join(max(0.0, deadline - time.monotonic()))
