"""The README's first examples, run as written: the prompt-file commands and the Python client."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

from tests.conftest import ROOT, farm_cmd, run_farm

README = (ROOT / "README.md").read_text()


def _block(after: str, lang: str) -> str:
    """The first fenced `lang` block after the heading `after`."""
    start = README.index(after)
    match = re.search(rf"```{lang}\n(.*?)```", README[start:], re.S)
    assert match, f"no {lang} block after {after!r}"
    return match.group(1)


def test_the_prompt_file_examples_and_the_python_example_run_as_written(
        env: dict[str, str], tmp_path: Path) -> None:
    env = {**env, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"}
    try:
        for line in _block("### Prompt files", "sh").strip().splitlines():
            done = subprocess.run(["bash", "-c", line], env=env, cwd=tmp_path,
                                  capture_output=True, text=True, timeout=120)
            assert done.returncode == 0, f"{line}\n{done.stderr}"
        script = tmp_path / "example.py"
        script.write_text(_block("### Python", "python"))
        worker = subprocess.Popen(farm_cmd("worker", "--device", "cpu", "--max-jobs", "5"),
                                  env=env, cwd=ROOT, stdout=subprocess.PIPE,
                                  stderr=subprocess.PIPE, text=True)
        try:
            ran = subprocess.run([sys.executable, str(script)], env=env, cwd=tmp_path,
                                 capture_output=True, text=True, timeout=300)
        finally:
            _, err = worker.communicate(timeout=300)
        assert worker.returncode == 0, err[-2000:]
        assert ran.returncode == 0, ran.stderr[-2000:]
        assert ran.stdout.strip() == "succeeded"
        assert len(list(tmp_path.glob("*-000[01]-0.png"))) == 2
    finally:
        run_farm(env, "down")
