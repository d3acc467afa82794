"""Processes the farm starts and later stops by pid: is one still alive, is it still the process
we started (pids are reused within minutes), and stopping a group of them warmly."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import time
from collections.abc import Iterable

# psutil asks each system its own way (Linux: /proc; macOS: sysctl and libproc; Windows: the
# process API), so these answers hold where there is no /proc.
import psutil


def alive(pid: int) -> bool:
    """Running (a zombie child still answers kill(0): it is gone for our purposes)."""
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:  # ZombieProcess is one too
        return False
    except psutil.AccessDenied:  # someone else's: it exists
        return True


def command_line(pid: int) -> list[str] | None:
    """The process's arguments; [] when there is no such process; None when this system will
    not tell (not ours to read)."""
    try:
        return psutil.Process(pid).cmdline()
    except psutil.NoSuchProcess:
        return []
    except psutil.AccessDenied:
        return None


def executable(pid: int) -> str | None:
    """The file the process runs; "" when there is no such process; None when unknown."""
    try:
        return psutil.Process(pid).exe()
    except psutil.NoSuchProcess:
        return ""
    except psutil.AccessDenied:
        return None


def stop_group(procs: Iterable[subprocess.Popen[bytes]], grace: float) -> None:
    """SIGTERM each process's group (a warm shutdown), SIGKILL what is left after `grace`
    seconds; always reaps. For processes started with start_new_session=True."""
    procs = list(procs)
    for proc in procs:
        if proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGTERM)
    deadline = time.monotonic() + grace
    for proc in procs:
        try:
            proc.wait(timeout=max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
