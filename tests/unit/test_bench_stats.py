"""The benchmarks' machine probes: they measure the machine and leave nothing behind."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from benchmarks._stats import file_create_us, file_system, summary


def test_the_file_probe_measures_in_the_folder_given_and_leaves_it_as_it_was(
        tmp_path: Path) -> None:
    (tmp_path / "kept.txt").write_text("x")
    cost = file_create_us(tmp_path, files=50)
    assert cost > 0
    assert sorted(os.listdir(tmp_path)) == ["kept.txt"]


def test_the_file_probe_fails_loudly_on_a_folder_it_cannot_write(tmp_path: Path) -> None:
    blocked = tmp_path / "file"
    blocked.write_text("not a folder")
    with pytest.raises(OSError):
        file_create_us(blocked, files=5)


def test_the_file_system_is_read_from_the_longest_mount_holding_the_path(
        tmp_path: Path) -> None:
    mounts = {}
    with open("/proc/mounts") as f:
        for line in f:
            fields = line.split()
            mounts[fields[1]] = fields[2]
    assert file_system("/") == mounts["/"]
    if "/proc" in mounts:
        assert file_system("/proc/self") == mounts["/proc"]
        assert file_system("/procfoo") == mounts["/"]  # a prefix of the name is not a parent
    assert file_system(tmp_path) != "unknown"


def test_summary_keeps_the_median_and_the_ends() -> None:
    s = summary([3.0, 1.0, 2.0])
    assert (s["median"], s["min"], s["max"], s["n"]) == (2.0, 1.0, 3.0, 3)
