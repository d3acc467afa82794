"""The worker's allocator settings (worker/allocator.py), in a fresh process each: a large block
freed and allocated again is served from memory kept, without faulting its pages in again."""

from __future__ import annotations

import subprocess
import sys

import pytest

from tests.conftest import ROOT

PROBE = """
import resource, sys
if sys.argv[1] == "kept":
    from farm.worker.allocator import keep_freed_memory
    assert keep_freed_memory()
faults = []
for _ in range(4):
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    block = bytearray(64 * 1024 * 1024)   # 16,384 pages, every one written (zeroed)
    del block
    faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
print(min(faults[1:]))
"""


def _faults(mode: str) -> int:
    out = subprocess.run([sys.executable, "-c", PROBE, mode], cwd=ROOT, capture_output=True,
                         text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    return int(out.stdout.strip())


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's malloc")
def test_a_freed_block_is_reused_without_page_faults() -> None:
    assert _faults("default") > 10_000     # unmapped on free, faulted in again
    assert _faults("kept") < 1_000
