"""The wheel installs one import name, `farm`: the repository's top-level folders (scheduler/,
worker/, cli/, deploy/) go in as farm.scheduler, farm.worker, farm.cli and farm.deploy, so no
generic `cli` or `worker` module lands in a user's site-packages."""

from __future__ import annotations

import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

from tests.conftest import ROOT


def test_the_wheel_installs_only_the_farm_package(tmp_path: Path) -> None:
    # built from a copy: a build leaves build/ and *.egg-info beside the sources it reads
    src = tmp_path / "src"
    for name in ("farm", "scheduler", "worker", "cli", "deploy"):
        shutil.copytree(ROOT / name, src / name, ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, src / name)
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "-w",
                    str(tmp_path / "dist"), str(src)], check=True, capture_output=True,
                   timeout=300)
    (wheel,) = (tmp_path / "dist").glob("farm-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    top = {n.split("/")[0] for n in names if not n.split("/")[0].endswith(".dist-info")}
    assert top == {"farm"}
    for part in ("scheduler/submit.py", "worker/stage.py", "cli/main.py", "deploy/k8s.py",
                 "cli/demo.jsonl"):
        assert f"farm/{part}" in names
    entry = next(n for n in names if n.endswith("entry_points.txt"))
    assert "farm = farm.cli.main:main" in zipfile.ZipFile(wheel).read(entry).decode()
