"""Compiled, warm workers on CPU with the tiny model: compiled output equals eager within a
stated tolerance, buckets warm before the first job, no job compiles again, and the fleet
compile cache in the store is used by the next worker and survives a corrupt entry."""

from __future__ import annotations

import json
import signal
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest

from farm import broker, models
from farm.jobs import JobSpec
from farm.scheduler.status import batch_status
from farm.scheduler.submit import submit
from farm.settings import Settings
from farm.store import open_store
from farm.worker import compile, pipelines
from tests.conftest import ROOT, farm_cmd, run_farm

# Compiled kernels may fuse and reorder floating-point work, so pixels may differ from eager by
# rounding; more than 2 levels of 255 in any channel would be a real difference.
TOLERANCE = 2


# the full-UNet inductor compile takes minutes on a 2-core CPU: opt-in (`pytest -m slow`);
# `python -m benchmarks compile` checks its pixels against eager too
@pytest.mark.parametrize("backend", ["regional",
                                     pytest.param("inductor", marks=pytest.mark.slow)])
def test_compiled_output_matches_eager(tmp_path: Path, backend: str) -> None:
    import torch

    torch.set_num_threads(1)
    settings = Settings(home=tmp_path, threads=1)
    model = pipelines.load_model(models.TINY_BASE, settings, "cpu")
    spec = JobSpec.from_dict({"prompt": "a lighthouse", "seed": 4, "steps": 4, "width": 64,
                              "height": 64, "cfg_cutoff": 0.5}, settings)
    eager = np.array(pipelines.render(model, spec)[0]).astype(int)
    compile.wrap(model, backend)
    pipelines.warm_buckets(model, ((64, 64),))
    graphs = compile.graphs()
    compiled = np.array(pipelines.render(model, spec)[0]).astype(int)
    assert np.abs(compiled - eager).max() <= TOLERANCE
    assert compile.graphs() == graphs  # the warm-up covered CFG on and off: nothing new


def test_a_square_first_bucket_and_a_wide_one_share_one_graph(tmp_path: Path) -> None:
    """Dynamic height and width without duck sizing: warming 128x128 (latents 16x16) first
    does not tie height to width, so 160x96 and 96x160 (latents 20x12, 12x20: the same paths
    through the UNet) run on its graphs. Duck sizing would compile two more."""
    import torch

    torch.set_num_threads(1)
    torch._dynamo.reset()
    compile.configure()
    model = pipelines.load_model(models.TINY_BASE, Settings(home=tmp_path, threads=1), "cpu")
    # dynamo alone decides the graphs; the eager backend skips inductor's minutes of codegen
    model.pipe.unet = torch.compile(model.pipe.unet, dynamic=compile.DYNAMIC_SHAPES,
                                    backend="eager")
    before = compile.graphs()
    pipelines.warm_buckets(model, ((128, 128),))
    assert compile.graphs() - before == 2  # CFG on (UNet batch 2) and off (batch 1)
    pipelines.warm_buckets(model, ((160, 96), (96, 160)))
    assert compile.graphs() - before == 2


def _job(settings: Settings, seed: int, **fields: object) -> JobSpec:
    return JobSpec.from_dict({"prompt": "warm", "seed": seed, "steps": 4, "width": 64,
                              "height": 64, **fields}, settings)


def _worker(env: dict[str, str], name: str, *extra: str) -> subprocess.CompletedProcess[str]:
    result = run_farm(env, "worker", "--device", "cpu", "--compile", "regional", "--name", name,
                      *extra, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    return result


def test_fleet_compile_cache_warm_buckets_and_no_recompiles(env: dict[str, str]) -> None:
    env = {**env, "FARM_BUCKETS": "64x64"}
    settings = Settings.load(env=env)
    store = open_store(settings)
    try:
        # 1. a first worker: nothing cached; it compiles every shape before its first job
        batch = submit(settings, [_job(settings, 1), _job(settings, 2, cfg_cutoff=0.5)]).batch
        log = _worker(env, "first", "--max-jobs", "2").stderr
        assert "compiled and warmed 1 bucket(s)" in log and "fleet cache miss" in log
        assert log.index("compiled and warmed") < log.index("ready") < log.index("succeeded")
        assert "new graph(s) mid-job" not in log  # neither job compiled anything
        assert batch_status(store, batch, settings).state == "succeeded"
        (entry,) = [k for k in store.list_keys("compile-cache/") if k.endswith(".bin")]
        meta = json.loads(store.get(entry.replace(".bin", ".json")))
        assert meta["backend"] == "regional" and meta["bytes"] > 0

        # 2. a second worker, started afterwards, uses what the first uploaded; `farm workers`
        #    shows it
        proc = subprocess.Popen(farm_cmd("worker", "--device", "cpu", "--compile", "regional",
                                         "--name", "second"), env=env, cwd=ROOT,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        try:
            deadline = time.monotonic() + 300
            while True:
                live = json.loads(run_farm(env, "workers", "--json").stdout or "[]")
                if live and live[0]["state"] == "ready":
                    break
                assert proc.poll() is None and time.monotonic() < deadline
                time.sleep(0.5)
            c = live[0]["compile"]
            assert (c["backend"], c["state"], c["cache"]) == ("regional", "compiled", "hit")
            assert c["seconds"] > 0 and c["recompiles"] == 0
            shown = run_farm(env, "workers").stdout
            assert "regional compiled" in shown and "cache hit" in shown
        finally:
            proc.send_signal(signal.SIGTERM)
            _, err = proc.communicate(timeout=60)
        assert proc.returncode == 0, err[-2000:]

        # 3. a corrupt entry is survived: warned about, compiled afresh, replaced
        store.put(entry, b"not compile artefacts at all")
        submit(settings, [_job(settings, 3)])
        log = _worker(env, "third", "--max-jobs", "1").stderr
        assert "ignoring the fleet compile cache entry" in log and "fleet cache corrupt" in log
        assert "succeeded" in log
        meta = json.loads(store.get(entry.replace(".bin", ".json")))
        import hashlib

        assert hashlib.sha256(store.get(entry)).hexdigest() == meta["sha256"]
    finally:
        broker.stop_broker(settings)


def test_onediff_missing_fails_at_boot_with_one_line(env: dict[str, str]) -> None:
    result = run_farm(env, "worker", "--device", "cpu", "--compile", "onediff",
                      "--max-jobs", "1", timeout=120)
    assert result.returncode == 2
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("error: --compile onediff needs OneDiff") and "Dockerfile" in last
    assert "loading" not in result.stderr  # it failed before loading anything
    # ... and before starting an embedded broker it would have left behind
    assert not (Path(env["FARM_HOME"]) / "run" / "broker.pid").exists()


# one worker's compile, in a fresh process with an empty local inductor cache (a new machine):
# the fleet compile cache's entry for its buckets first, then wrap and warm every bucket, then
# upload when the entry was missing; prints what it found and what inductor compiled
_WORKER_COMPILE = """
import json, sys
from pathlib import Path
import torch
from torch._dynamo.utils import counters
from farm import models
from farm.settings import Settings
from farm.store import open_store
from farm.worker import compile, pipelines

torch.set_num_threads(1)
settings = Settings.load(env={"FARM_HOME": sys.argv[1], "FARM_MODELS_DIR": sys.argv[2]},
                         threads=1)
buckets = ((64, 64), (64, 96), (96, 64))
model = pipelines.load_model(models.TINY_BASE, settings, "cpu")
store = open_store(settings)
key = compile.cache_key(model, "regional", buckets, "resident", "cpu")
state = compile.load_cached(store, key)
compile.wrap(model, "regional")
pipelines.warm_buckets(model, buckets)
if state != "hit":
    compile.save_cached(store, key, compile.CompileReport("regional"))
print(json.dumps({"cache": state, "graphs": compile.graphs(),
                  "inductor": {k: int(v) for k, v in counters["inductor"].items()}}))
"""


def test_the_fleet_compile_cache_covers_every_bucket_a_worker_warms(
        tmp_path: Path, models_dir: Path) -> None:
    import os
    import sys

    home = tmp_path / "farm"  # one store (a folder store under FARM_HOME) for both machines

    def new_machine(name: str) -> dict[str, object]:
        env = {**os.environ, "TORCHINDUCTOR_CACHE_DIR": str(tmp_path / f"inductor-{name}"),
               "HF_HUB_OFFLINE": "1", "PYTHONWARNINGS": "ignore"}
        out = subprocess.run([sys.executable, "-c", _WORKER_COMPILE, str(home),
                              str(models_dir)], env=env, cwd=ROOT, capture_output=True,
                             text=True, timeout=900)
        assert out.returncode == 0, out.stderr[-3000:]
        return dict(json.loads(out.stdout.strip().splitlines()[-1]))

    first = new_machine("a")
    assert first["cache"] == "miss"
    compiled = first["inductor"]["fxgraph_cache_miss"]  # type: ignore[index]
    assert compiled >= 2  # a bucket's CFG-on and CFG-off graphs at least
    second = new_machine("b")
    assert second["cache"] == "hit" and second["graphs"] == first["graphs"]
    # every graph of every bucket came from the fleet cache: inductor generated no code
    assert second["inductor"].get("fxgraph_cache_miss", 0) == 0, second  # type: ignore
    assert second["inductor"].get("fxgraph_cache_hit", 0) >= compiled, second  # type: ignore
