"""A new GPU worker from process start to ready, full-size SDXL base from the farm's own store:
split into pull, load and compile/warm, the nine SDXL buckets, the worker's default `regional`
compile, each start a real `farm worker` process (embedded broker, empty local inductor cache).

    python -m benchmarks.gpu_cold_start --out gpu-cold-start.json   # CUDA (about 5 min)
    python -m benchmarks.gpu_cold_start --cpu-smoke                  # the same code, tiny, CPU

1. Prepared first, not counted in any start: SDXL base with random weights
   (benchmarks/_sdxl_full.py, fp16) saved as a diffusers folder, its fp16-fix-shaped VAE and a
   TAESD-XL-shaped tiny VAE beside it, all three pushed (`worker/push.py`, as `farm models push`
   does) into a file store on the machine's disk, as `sdxl-base`, `sdxl-vae-fp16-fix` and
   `taesdxl`.
2. Three starts, one after the other:

       in store, not on disk     an empty machine cache: pulled, loaded, compiled from nothing
                                 (its compile artefacts go to the fleet cache)
       in store + compile cache  an empty machine cache again: pulled, loaded, compiled from
                                 the fleet cache (issue 15's target: ready within 60 s)
       on disk + compile cache   the machine cache the start before filled

The file store is read with the same parallel ranged reads and streaming sha256 as S3
(`farm/blobs.py`), but at the speed of this machine's disk, not of a network: over S3 the pull
takes what the link gives (`python -m benchmarks cold_start` measures ranged reads against one
stream over HTTP). The JSON is written after each step, so a run cut short keeps what it has.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

from benchmarks.bench_cold_start import _worker
from farm import broker
from farm.settings import Settings

BASE, FP16_FIX, TINY = "sdxl-base", "sdxl-vae-fp16-fix", "taesdxl"


def prepare(work: Path, store_url: str, smoke: bool) -> dict[str, Any]:
    """Build and push the three models; returns their pushed bytes and the seconds it took."""
    import torch

    from benchmarks import _sdxl_full
    from farm.settings import Settings
    from farm.store import open_store
    from farm.worker.push import push

    t0 = time.perf_counter()
    device = "cpu" if smoke else "cuda:0"
    dtype = torch.float32 if smoke else torch.float16
    pipe = _sdxl_full.build("base", dtype, tiny_models=smoke, device=device)
    folders = {BASE: work / "source" / BASE, FP16_FIX: work / "source" / FP16_FIX,
               TINY: work / "source" / TINY}
    pipe.save_pretrained(folders[BASE], safe_serialization=True)
    _sdxl_full.fp16_fix_vae(pipe.vae).save_pretrained(folders[FP16_FIX],
                                                      safe_serialization=True)
    _sdxl_full.tiny_vae(dtype, tiny_models=smoke, device=device).save_pretrained(
        folders[TINY], safe_serialization=True)
    del pipe
    built_s = time.perf_counter() - t0
    store = open_store(Settings.load(env={"FARM_STORE_URL": store_url,
                                          "FARM_HOME": str(work / "push-home")}))
    pushed = {}
    for name, folder in folders.items():
        manifest = push(store, str(folder), name, echo=lambda _: None)
        pushed[name] = sum(manifest.bytes_after.values())
        shutil.rmtree(folder)  # pushed: a start reads only the store
    return {"build_and_save_s": built_s, "push_s": time.perf_counter() - t0 - built_s,
            "pushed_bytes": pushed}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="gpu-cold-start.json")
    parser.add_argument("--cpu-smoke", action="store_true")
    parser.add_argument("--work", help="where the store and caches go (default: a temp dir)")
    parser.add_argument("--starts", type=int, default=3, choices=(1, 2, 3),
                        help="how many of the three starts, in order (default: all)")
    args = parser.parse_args()
    smoke = args.cpu_smoke
    work = Path(args.work or tempfile.mkdtemp(prefix="farm-gpu-cold-"))
    store_url = f"file://{work / 'store'}"
    figures: dict[str, Any] = {"date": time.strftime("%Y-%m-%d"), "store": "file (local disk)",
                               "compile": "regional", "starts": []}

    def note(**found: Any) -> None:
        figures.update(found)
        Path(args.out).write_text(json.dumps(figures, indent=2, default=str))
        print(json.dumps(found, default=str), flush=True)

    note(prepare=prepare(work, store_url, smoke))
    base = {k: v for k, v in os.environ.items() if not k.startswith("FARM_")}
    base.update({"FARM_STORE_URL": store_url, "HF_HUB_OFFLINE": "1",
                 "PYTHONWARNINGS": "ignore"})
    if smoke:
        base.update({"FARM_BUCKETS": "128x128", "FARM_THREADS": "1"})
    device = "cpu" if smoke else "cuda"
    runs = (("in store, not on disk", work / "cache-1"),
            ("in store + compile cache", work / "cache-2"),
            ("on disk + compile cache", work / "cache-2"))
    for n, (label, cache_dir) in enumerate(runs[:args.starts]):
        env = {**base, "FARM_HOME": str(work / f"home-{n}"),
               "FARM_MODEL_CACHE_DIR": str(cache_dir),
               "TORCHINDUCTOR_CACHE_DIR": str(work / f"inductor-{n}")}
        try:
            row = _worker(env, device=device, model=BASE, backend="regional")
        finally:  # the worker started the embedded broker of its FARM_HOME: stop it
            broker.stop_broker(Settings.load(env={"FARM_HOME": env["FARM_HOME"]}))
        figures["starts"].append({"start": label, **row})
        note(starts=figures["starts"])
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
