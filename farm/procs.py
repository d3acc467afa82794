"""Processes the farm starts and later stops by pid: is one still alive, is it still the process
we started (pids are reused within minutes), and stopping a group of them warmly."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import time
from collections.abc import Iterable


def alive(pid: int) -> bool:
    """Running (a zombie child still answers kill(0): it is gone for our purposes)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[-1].split()[0] != "Z"
    except OSError:
        return False


def command_line(pid: int) -> list[str] | None:
    """The process's arguments; [] when there is no such process; None when this system cannot
    tell (no /proc, or not ours to read)."""
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read().decode(errors="replace").split("\0")
    except FileNotFoundError:
        return []
    except OSError:
        return None


def executable(pid: int) -> str | None:
    """The file the process runs; "" when there is no such process; None when unknown."""
    try:
        return os.readlink(f"/proc/{pid}/exe")
    except FileNotFoundError:
        return ""
    except OSError:
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
