"""Following a batch from the command line: the progress line of `--watch` and `--wait`, and how
a wait ends."""

from __future__ import annotations

import sys
import time
from typing import Any

import click

from farm.errors import NotFound
from farm.settings import Settings
from farm.store import open_store


def batch_id(text: str) -> str:
    from farm.jobs import is_id

    if not is_id(text):
        raise NotFound(f"{text!r} is not a batch id")
    return text


def counts(counts: dict[str, int]) -> str:
    return " ".join(f"{k}={v}" for k, v in counts.items())


def exit_unless_succeeded(st: Any) -> None:
    """How `--wait` ends: exit 1, with the counts on stderr, when the batch ended any other way
    than succeeded (failed jobs, canceled, aborted); the README's exit codes."""
    if st.state != "succeeded":
        click.echo(f"batch {st.batch} ended {st.state}: {counts(st.counts)}; `farm status "
                   f"{st.batch}` shows each job's error", err=True)
        sys.exit(1)


def broker_client(settings: Settings) -> Any:
    """A Redis client, or None when there is no broker to ask (an embedded one not running)."""
    from farm import broker

    if settings.embedded and not broker.embedded_running(settings):
        return None
    return broker.redis_client(settings)


def watch(settings: Settings, batch: str, quiet: bool = False, detail: bool = True) -> Any:
    """Show a progress line until the batch ends; each look costs the same whatever the batch's
    size (its counters, scheduler/status.py `batch_counts`). Returns its counts, or with
    `detail` every job's state (scheduler/status.py `batch_status`, read once at the end)."""
    from farm.scheduler.status import batch_counts, batch_status

    store = open_store(settings)
    batch = batch_id(batch)
    client = broker_client(settings)
    tty = sys.stderr.isatty()
    last = last_line = ""
    began = time.monotonic()
    first_done: int | None = None
    while True:
        st = batch_counts(store, client, batch, settings)
        total = st.total
        first_done = st.done if first_done is None else first_done
        width = 30
        filled = int(width * st.done / total) if total else width
        core = f"[{'#' * filled}{'-' * (width - filled)}] {st.done}/{total} jobs  " + \
            counts(st.counts)
        line = core + _pace(st.done - first_done, total - st.done, time.monotonic() - began)
        # a terminal's line is redrawn (its clock moves); a log gets a line when counts change
        if not quiet and (tty or core != last):
            click.echo(("\r" + line.ljust(len(last_line))) if tty else line, err=True,
                       nl=not tty)
            last, last_line = core, line
        if st.finished:
            if not quiet and tty:
                click.echo("", err=True)
            return batch_status(store, batch, settings) if detail else st
        time.sleep(0.5)


def _pace(done: int, left: int, seconds: float) -> str:
    """Elapsed time, and the rate and time left once jobs have ended while watching."""
    text = f"  {_clock(seconds)}"
    if done > 0 and seconds > 0:
        rate = done / seconds
        text += f"  {rate * 60:.1f} jobs/min" + (f"  ETA {_clock(left / rate)}" if left else "")
    return text


def _clock(seconds: float) -> str:
    minutes, secs = divmod(int(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}" if hours else f"{minutes}:{secs:02d}"
