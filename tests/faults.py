"""Fault injection for the fault tests: a stand-in backend (worker/standin.py) that fails on
purpose, and a launcher for stand-in worker processes that use it. Test tools only.

    python -m tests.faults [--crash-on TEXT] [--hang-on TEXT] [--fail-on TEXT] [--broken]
                           [--oom-on TEXT] [--oom-below GB] -- <benchmarks._standin_worker args>

    --crash-on TEXT   exit at once (os._exit(1)) half-way through any job whose prompt contains
                      TEXT: a segfaulting kernel (no exception, no record, the heartbeat stops)
    --hang-on TEXT    stop making step progress half-way (sleep for good): a stuck kernel
    --fail-on TEXT    raise a CUDA error half-way through such a job: a GPU fault
    --broken          raise a CUDA error on every job: a broken GPU
    --oom-on TEXT     raise torch's out-of-memory error half-way through such a job, on a worker
                      whose class is below --oom-below GB (default: every class)
    --gate FILE       half-way through each job, wait until FILE exists: a test decides when
                      this worker's stage may finish
    --die-before-note JOB:FILE
                      exit at once (os._exit(1)) after JOB's final record is written, before the
                      batch's tally hears of it (farm/tally.py), unless FILE exists; FILE is
                      created first, so only one worker dies so
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from typing import Any

from farm.jobs import JobSpec
from farm.worker.standin import StandIn

CUDA_ERROR = "CUDA error: an illegal memory access was encountered"


class OutOfMemoryError(RuntimeError):
    """Named as torch's (torch.OutOfMemoryError), which the worker recognises by name."""


class FaultyStandIn(StandIn):
    def __init__(self, render_seconds: float = 0.0, *, crash_on: str | None = None,
                 hang_on: str | None = None, fail_on: str | None = None, broken: bool = False,
                 oom_on: str | None = None, oom_below: int | None = None,
                 vram_class: int = 0, gate: str | None = None) -> None:
        super().__init__(render_seconds)
        self.gate = gate
        self.crash_on, self.hang_on, self.fail_on = crash_on, hang_on, fail_on
        self.broken, self.oom_on = broken, oom_on
        self.oom_here = oom_below is None or vram_class < oom_below

    def on_step(self, spec: JobSpec, step: int) -> None:
        if self.broken:
            raise RuntimeError(CUDA_ERROR)
        if step < spec.steps // 2:
            return
        if self.gate and step == spec.steps // 2:
            while not os.path.exists(self.gate):
                time.sleep(0.05)
        if self.crash_on and self.crash_on in spec.prompt:
            print(f"faults: prompt contains {self.crash_on!r}: exiting with status 1 "
                  "mid-render", file=sys.stderr, flush=True)
            os._exit(1)
        if self.hang_on and self.hang_on in spec.prompt:
            print(f"faults: prompt contains {self.hang_on!r}: no more step progress",
                  file=sys.stderr, flush=True)
            while True:
                time.sleep(3600)
        if self.fail_on and self.fail_on in spec.prompt:
            raise RuntimeError(CUDA_ERROR)
        if self.oom_on and self.oom_on in spec.prompt and self.oom_here:
            raise OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")


def die_before_note(job: str, marker: str) -> None:
    """Make this worker process die between `job`'s final record write and its tally note."""
    from farm.worker.finisher import Finisher

    noted = Finisher.noted

    def dying(self: Finisher, record: Any) -> None:
        if record.job == job and record.state.final and not os.path.exists(marker):
            open(marker, "w").close()
            print(f"faults: {job} is {record.state.value} in the store; exiting before its "
                  "note", file=sys.stderr, flush=True)
            os._exit(1)
        noted(self, record)

    Finisher.noted = dying  # type: ignore[method-assign]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.faults")
    parser.add_argument("--crash-on")
    parser.add_argument("--hang-on")
    parser.add_argument("--fail-on")
    parser.add_argument("--broken", action="store_true")
    parser.add_argument("--oom-on")
    parser.add_argument("--oom-below", type=int)
    parser.add_argument("--gate")
    parser.add_argument("--render-seconds", type=float, default=0.0)
    parser.add_argument("--die-before-note")
    args, rest = parser.parse_known_args(argv)
    if args.die_before_note:
        die_before_note(*args.die_before_note.split(":", 1))
    from benchmarks._standin_worker import main as run_worker
    from farm.settings import Settings

    vram = Settings.load().vram
    backend: Any = FaultyStandIn(
        args.render_seconds, crash_on=args.crash_on, hang_on=args.hang_on,
        fail_on=args.fail_on, broken=args.broken, oom_on=args.oom_on, oom_below=args.oom_below,
        vram_class=int(vram) if vram.isdigit() else 0, gate=args.gate)
    return run_worker([a for a in rest if a != "--"], backend=backend)


if __name__ == "__main__":
    sys.exit(main())
