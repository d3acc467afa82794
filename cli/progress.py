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


def watch(settings: Settings, batch: str, quiet: bool = False) -> Any:
    from farm.scheduler.status import batch_status

    store = open_store(settings)
    batch = batch_id(batch)
    tty = sys.stderr.isatty()
    last = ""
    while True:
        st = batch_status(store, batch, settings)
        total = len(st.jobs)
        width = 30
        filled = int(width * st.done / total) if total else width
        line = (f"[{'#' * filled}{'-' * (width - filled)}] {st.done}/{total} jobs  "
                + counts(st.counts))
        if not quiet and line != last:
            click.echo(("\r" + line) if tty else line, err=True, nl=not tty)
            last = line
        if st.finished:
            if not quiet and tty:
                click.echo("", err=True)
            return st
        time.sleep(0.5)
