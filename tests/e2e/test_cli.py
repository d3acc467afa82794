"""The CLI as a user runs it: subprocesses, an embedded farm, files on disk."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

from PIL import Image

from tests.conftest import ROOT, run_farm


def _pids_of(home: Path) -> list[int]:
    """Every process whose command line or environment mentions this FARM_HOME."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            blob = (entry / "cmdline").read_bytes() + (entry / "environ").read_bytes()
        except OSError:
            continue
        if str(home).encode() in blob:
            found.append(int(entry.name))
    return found


def test_up_submit_watch_results_down(env: dict[str, str], home: Path, tmp_path: Path) -> None:
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("# a comment\na red fox in snow\n\nan old library, dust in sunbeams\n"
                       "a glass teapot on a windowsill\n")
    up = run_farm(env, "up", "--workers", "2", "--device", "cpu", timeout=300)
    try:
        assert up.returncode == 0, up.stderr
        assert "farm is up: 2 worker(s)" in up.stdout
        again = run_farm(env, "up", "--workers", "2")
        assert again.returncode == 0 and "already up" in again.stdout

        sub = run_farm(env, "submit", str(prompts), "--steps", "4", "--size", "152x104",
                       "--seed", "100", "--scheduler", "euler_a", "--n", "2", "--json")
        assert sub.returncode == 0, sub.stderr
        submitted = json.loads(sub.stdout)
        batch = submitted["batch"]
        assert len(submitted["jobs"]) == 3

        watch = run_farm(env, "status", batch, "--watch", timeout=300)
        assert watch.returncode == 0, watch.stderr
        assert "3/3 jobs" in watch.stderr and f"batch {batch}: succeeded" in watch.stdout

        st = json.loads(run_farm(env, "status", batch, "--json").stdout)
        assert st["batch"] == batch and st["state"] == "succeeded"
        assert st["counts"] == {"succeeded": 3}
        assert [len(j["images"]) for j in st["jobs"]] == [2, 2, 2]
        assert all(j["error"] is None for j in st["jobs"])

        listed = json.loads(run_farm(env, "batches", "--json").stdout)
        assert listed[0]["batch"] == batch and listed[0]["counts"] == {"succeeded": 3}

        out = tmp_path / "results"
        res = run_farm(env, "results", batch, "-o", str(out))
        assert res.returncode == 0, res.stderr
        pngs = sorted(out.glob(f"{batch}-*.png"))
        assert len(pngs) == 6
        prompts_seen = set()
        for png in pngs:
            image = Image.open(png)
            image.load()
            assert image.size == (152, 104)
            side = json.loads(png.with_suffix(".json").read_text())
            assert (side["steps"], side["width"], side["height"]) == (4, 152, 104)
            assert side["scheduler"] == "euler_a" and side["worker"] in ("local-1", "local-2")
            assert side["seed"] == 100 + side["image_index"]
            prompts_seen.add(side["prompt"])
        assert prompts_seen == {"a red fox in snow", "an old library, dust in sunbeams",
                                "a glass teapot on a windowsill"}
        sheet = Image.open(out / "contact-sheet.png")
        assert sheet.width > 2 * 152
    finally:
        down = run_farm(env, "down")
    assert down.returncode == 0 and "stopped 2 worker(s) and the embedded broker" in down.stdout
    deadline = time.monotonic() + 10
    while _pids_of(home) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert _pids_of(home) == []
    assert run_farm(env, "down").stdout.strip() == "farm was not running"


def test_bad_input_exits_2_with_one_line_and_submits_nothing(env: dict[str, str],
                                                              tmp_path: Path) -> None:
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "fine"}\n{"prompt": "too many steps", "steps": 500}\n')
    result = run_farm(env, "submit", str(bad))
    assert result.returncode == 2
    assert result.stderr.strip() == (
        "error: line 2: steps must be an integer from 1 to 150, got 500")
    assert not (Path(env["FARM_HOME"]) / "store" / "batches").exists()
    missing = run_farm(env, "submit", str(tmp_path / "nope.txt"))
    assert missing.returncode == 2 and "does not exist" in missing.stderr
    unknown = run_farm(env, "status", "no-such-batch")
    assert unknown.returncode == 2 and unknown.stderr.startswith("error: no batch")


def test_stdin_submit_and_control_commands_never_import_torch(env: dict[str, str]) -> None:
    code = (
        "import sys\n"
        "from farm.cli.main import cli\n"
        "def run(*args, stdin=None):\n"
        "    try:\n"
        "        cli.main(args=list(args), prog_name='farm')\n"
        "    except SystemExit as e:\n"
        "        assert not e.code, e.code\n"
        "import io, json, contextlib\n"
        "sys.stdin = io.TextIOWrapper(io.BytesIO(b'a cat\\na dog\\n'))\n"
        "buf = io.StringIO()\n"
        "with contextlib.redirect_stdout(buf):\n"
        "    run('submit', '-', '--json')\n"
        "batch = json.loads(buf.getvalue())['batch']\n"
        "run('status', batch)\n"
        "run('status', batch, '--json')\n"
        "run('batches')\n"
        "run('results', batch, '-o', sys.argv[1])\n"
        "heavy = [m for m in ('torch', 'diffusers', 'transformers') if m in sys.modules]\n"
        "assert not heavy, heavy\n"
        "print('OK', batch)\n"
    )
    out = Path(env["FARM_HOME"]) / "dl"
    try:
        result = subprocess.run([sys.executable, "-c", code, str(out)], env=env, cwd=ROOT,
                                capture_output=True, text=True, timeout=120)
        assert result.returncode == 0, result.stderr[-2000:]
        assert "OK" in result.stdout
    finally:
        run_farm(env, "down")


def test_a_killed_worker_drops_off_the_list_within_its_heartbeat_ttl(env: dict[str, str]
                                                                      ) -> None:
    import signal

    ready = Path(env["FARM_HOME"]) / "ready"
    env = {**env, "FARM_HEARTBEAT_INTERVAL": "0.5", "FARM_HEARTBEAT_TTL": "2",
           "FARM_READY_FILE": str(ready / "{name}")}
    up = run_farm(env, "up", "--workers", "2", "--vram", "8,24", "--device", "cpu")
    try:
        assert up.returncode == 0, up.stderr
        assert sorted(p.name for p in ready.iterdir()) == ["local-1", "local-2"]
        listed = json.loads(run_farm(env, "workers", "--json").stdout)
        assert sorted((w["name"], w["vram_class"], w["state"]) for w in listed) == [
            ("local-1", 8, "ready"), ("local-2", 24, "ready")]
        victim = next(w for w in listed if w["name"] == "local-1")
        os.kill(victim["pid"], signal.SIGKILL)
        killed_at = time.monotonic()
        while time.monotonic() - killed_at < 10:
            names = [w["name"] for w in json.loads(run_farm(env, "workers", "--json").stdout)]
            if names == ["local-2"]:
                break
            time.sleep(0.3)
        assert names == ["local-2"]
        assert time.monotonic() - killed_at < 2 + 6  # the TTL, plus a few CLI starts
    finally:
        run_farm(env, "down")
    assert [p.name for p in ready.iterdir()] == ["local-1"]  # -9 left it; a clean stop did not


def test_results_wait_exits_1_when_the_batch_ended_with_failed_jobs(env: dict[str, str],
                                                                    tmp_path: Path) -> None:
    """`farm results --wait` downloads what succeeded, then exits 1 when any job failed, also
    when there was nothing to download. A stand-in worker process (worker/standin.py: the real
    worker, no diffusion) renders the plain job and fails the split one (its base stage needs
    latents the stand-in does not have): a failure that is the job's own."""
    from farm import broker, procs
    from farm.images import read_parameters
    from farm.jobs import SEED_MAX
    from farm.settings import Settings
    from farm.worker.standin import seed_colour

    plain = {"prompt": "a plain job", "seed": SEED_MAX, "n": 2, "steps": 4, "width": 64,
             "height": 64}
    split = {"prompt": "needs latents", "seed": 1, "steps": 4, "width": 64, "height": 64,
             "refiner": "tiny-sdxl-refiner", "split": "always", "switch": 0.5}
    mixed, failing = tmp_path / "mixed.jsonl", tmp_path / "failing.jsonl"
    mixed.write_text(json.dumps(plain) + "\n" + json.dumps(split) + "\n")
    failing.write_text(json.dumps(split) + "\n")
    settings = Settings.load(env=env)
    worker: subprocess.Popen[bytes] | None = None
    try:
        batches = []
        for prompts in (mixed, failing):
            sub = run_farm(env, "submit", str(prompts), "--json")
            assert sub.returncode == 0, sub.stderr
            batches.append(json.loads(sub.stdout)["batch"])
        log = tmp_path / "standin.log"
        with open(log, "wb") as sink:
            worker = subprocess.Popen([sys.executable, "-m", "benchmarks._standin_worker",
                                       "--name", "standin-results"], env=env, cwd=ROOT,
                                      stdout=sink, stderr=subprocess.STDOUT,
                                      start_new_session=True)

        out = tmp_path / "mixed"
        res = run_farm(env, "results", batches[0], "--wait", "-o", str(out), timeout=120)
        assert res.returncode == 1, (res.stdout, res.stderr, log.read_text()[-2000:])
        assert f"2 images and sidecars in {out}/" in res.stdout
        assert (f"batch {batches[0]} ended failed: succeeded=1 failed=1; `farm status "
                f"{batches[0]}` shows each job's error") in res.stderr
        # what succeeded is downloaded; image 1's seed wraps past the largest seed to 0
        sides = [json.loads(p.read_text()) for p in sorted(out.glob("*.json"))]
        assert [(s["image_index"], s["seed"]) for s in sides] == [(0, SEED_MAX), (1, 0)]
        png = next(out.glob("*-1.png"))
        assert "Seed: 0," in (read_parameters(png.read_bytes()) or "")
        assert Image.open(png).convert("RGB").getpixel((5, 5)) == seed_colour(0)

        res = run_farm(env, "results", batches[1], "--wait", "-o", str(tmp_path / "failing"),
                       timeout=120)
        assert res.returncode == 1, (res.stdout, res.stderr)
        assert "0 images and sidecars" in res.stdout
        assert f"batch {batches[1]} ended failed: failed=1" in res.stderr
    finally:
        if worker is not None:
            procs.stop_group([worker], 15)
        broker.stop_broker(settings)
