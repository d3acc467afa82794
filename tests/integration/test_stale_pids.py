"""Pid files outlive their processes, and Linux reuses pids within minutes: `farm down` and the
broker's stop must never signal a process that is not the one they started."""

from __future__ import annotations

import subprocess
import sys
import time
from collections.abc import Iterator

import pytest

from farm import broker, procs
from farm.cli.local import LocalWorker, is_worker, stop_workers
from farm.settings import Settings


@pytest.fixture
def bystander() -> Iterator[subprocess.Popen[bytes]]:
    """Some other process of the same user, now holding a pid a file still names."""
    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
    yield proc
    proc.kill()
    proc.wait()


def test_a_stale_worker_pid_is_left_alone(settings: Settings,
                                          bystander: subprocess.Popen[bytes]) -> None:
    stale = LocalWorker(pid=bystander.pid, name="local-1", log="")
    assert not is_worker(stale)
    assert stop_workers(settings, [stale], grace=1) == 0
    assert bystander.poll() is None, "a process that is not a farm worker was signalled"


def test_a_live_worker_is_recognised_by_its_command_line(settings: Settings) -> None:
    # a process whose command line is a worker's: `... worker --name local-7 ...`
    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)", "worker",
                             "--name", "local-7"], start_new_session=True)
    try:
        # until the child has exec'd, /proc shows the parent's command line
        deadline = time.monotonic() + 10
        while "local-7" not in (procs.command_line(proc.pid) or []):
            assert time.monotonic() < deadline, "the child never showed its command line"
            time.sleep(0.02)
        assert is_worker(LocalWorker(pid=proc.pid, name="local-7", log=""))
        assert not is_worker(LocalWorker(pid=proc.pid, name="local-8", log=""))
        assert stop_workers(settings, [LocalWorker(pid=proc.pid, name="local-7", log="")],
                            grace=5) == 1
        proc.wait(timeout=10)  # it was sleeping for two minutes: it ended because it was told
    finally:
        proc.kill()
        proc.wait()


def test_a_stale_broker_pid_file_is_not_signalled(settings: Settings,
                                                  bystander: subprocess.Popen[bytes]) -> None:
    broker.ensure_broker(settings)
    pidfile = settings.run_dir / "broker.pid"
    real = int(pidfile.read_text())
    try:
        pidfile.write_text(f"{bystander.pid}\n")   # the server died; its pid went to another
        assert broker.stop_broker(settings) is True
        assert bystander.poll() is None, "stop_broker signalled a process that is not Valkey"
    finally:
        pidfile.write_text(f"{real}\n")
        broker.stop_broker(settings)
    assert not broker.embedded_running(settings)
