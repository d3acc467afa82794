"""Process checks where there is no /proc (macOS): farm.procs must answer through psutil, which
asks each system its own way, and never by reading /proc itself.

The test takes /proc away from farm's own code: every open() or readlink() of a /proc path made
from farm.procs raises FileNotFoundError, as it does on macOS. psutil's Linux backend still
reads /proc beneath it, which is how psutil answers on Linux; on macOS it asks sysctl."""

from __future__ import annotations

import builtins
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from typing import Any

import pytest

from farm import procs
from farm.cli.local import LocalWorker, is_worker


@pytest.fixture
def no_proc_for_farm(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[str]]:
    """/proc as farm.procs would find it on macOS: absent. Yields the paths it tried."""
    tried: list[str] = []
    real_open, real_readlink = builtins.open, os.readlink

    def from_farm() -> bool:
        frame = sys._getframe(2)
        return frame.f_globals.get("__name__") == "farm.procs"

    def fake_open(file: Any, *args: Any, **kwargs: Any) -> Any:
        if str(file).startswith("/proc") and from_farm():
            tried.append(str(file))
            raise FileNotFoundError(2, "No such file or directory", str(file))
        return real_open(file, *args, **kwargs)

    def fake_readlink(path: Any, *args: Any, **kwargs: Any) -> Any:
        if str(path).startswith("/proc") and from_farm():
            tried.append(str(path))
            raise FileNotFoundError(2, "No such file or directory", str(path))
        return real_readlink(path, *args, **kwargs)

    monkeypatch.setattr(builtins, "open", fake_open)
    monkeypatch.setattr(os, "readlink", fake_readlink)
    yield tried


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_alive_without_proc(no_proc_for_farm: list[str]) -> None:
    assert procs.alive(os.getpid()) is True
    assert procs.alive(_dead_pid()) is False
    assert no_proc_for_farm == []


def test_a_zombie_is_not_alive(no_proc_for_farm: list[str]) -> None:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    deadline = time.monotonic() + 10
    # exited and not yet reaped: kill(0) still answers for it
    while procs.alive(proc.pid) and time.monotonic() < deadline:
        time.sleep(0.02)
    try:
        assert procs.alive(proc.pid) is False
        os.kill(proc.pid, 0)  # it still exists as a zombie
    finally:
        proc.wait()


def test_pid_reuse_is_still_detected_without_proc(no_proc_for_farm: list[str]) -> None:
    """A pid a state file names, now held by some other process, is not taken for a worker."""
    args = [sys.executable, "-c", "import time; time.sleep(60)", "worker", "--name", "local-3"]
    bystander = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    worker = subprocess.Popen(args)
    try:
        deadline = time.monotonic() + 10
        while "local-3" not in (procs.command_line(worker.pid) or []):
            assert time.monotonic() < deadline, "the child never showed its command line"
            time.sleep(0.02)
        assert is_worker(LocalWorker(pid=worker.pid, name="local-3", log=""))
        assert not is_worker(LocalWorker(pid=bystander.pid, name="local-3", log=""))
        assert procs.executable(os.getpid()) == os.path.realpath(sys.executable)
        dead = _dead_pid()
        assert procs.command_line(dead) == [] and procs.executable(dead) == ""
        assert no_proc_for_farm == []
    finally:
        for proc in (bystander, worker):
            proc.kill()
            proc.wait()
