"""The model store's variants on the tiny models: bytes of each component before and after (fp16,
fp8), and how far the images drift: fp8 against fp16, and fp16 against the fp32 source, per
pixel (0-255), over the same seeds on CPU (worker/push.py, docs/models.md)."""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

from benchmarks._stats import machine_busy, table

SEEDS = (1, 2, 3, 4)
SIZE = 128
STEPS = 8


def _images(model: Any, settings: Any) -> list[Any]:
    import numpy as np

    from farm.jobs import JobSpec
    from farm.worker import pipelines

    out = []
    for seed in SEEDS:
        spec = JobSpec.from_dict({"prompt": "a lighthouse on a cliff at dusk", "seed": seed,
                                  "steps": STEPS, "width": SIZE, "height": SIZE}, settings)
        out += [np.asarray(image, dtype=np.int16) for image in pipelines.render(model, spec)]
    return out


def _diff(a: list[Any], b: list[Any]) -> dict[str, float]:
    import numpy as np

    deltas = np.concatenate([np.abs(x - y).ravel() for x, y in zip(a, b, strict=True)])
    return {"max": int(deltas.max()), "mean": round(float(deltas.mean()), 3),
            "share_changed": round(float((deltas > 0).mean()), 4)}


def run() -> dict[str, Any]:
    from farm import models
    from farm.settings import Settings
    from farm.store import open_store
    from farm.worker import pipelines, tiny
    from farm.worker.push import push

    busy = machine_busy()
    work = Path(tempfile.mkdtemp(prefix="farm-bench-variants-"))
    figures: dict[str, Any] = {"machine_before": busy, "seeds": list(SEEDS), "size": SIZE,
                               "steps": STEPS, "models": {}}
    try:
        settings = Settings.load(env={"FARM_HOME": str(work), "HF_HUB_OFFLINE": "1"},
                                 threads=1, device="cpu")
        store = open_store(settings)
        rows = []
        for name in tiny.NAMES:
            source = work / "source" / name
            tiny.build_tiny(name, source)
            fp16 = push(store, str(source), name, "fp16", echo=lambda _: None)
            fp8 = push(store, str(source), name, "fp8", echo=lambda _: None)
            if fp16.role == "refiner":  # its images need a base's latents: bytes only
                images: dict[str, Any] = {}
            else:
                images = {label: _images(pipelines.load_model(models.resolve(ref), settings,
                                                              "cpu"), settings)
                          for label, ref in (("fp32", str(source)), ("fp16", fp16.ref),
                                             ("fp8", fp8.ref))}
            entry = {
                "unet_bytes": {"source": fp16.bytes_before["unet"],
                               "fp16": fp16.bytes_after["unet"],
                               "fp8": fp8.bytes_after["unet"]},
                "model_bytes": {"source": sum(fp16.bytes_before.values()),
                                "fp16": sum(fp16.bytes_after.values()),
                                "fp8": sum(fp8.bytes_after.values())},
                "fp8_unet_over_fp16": round(fp8.bytes_after["unet"]
                                            / fp16.bytes_after["unet"], 3),
            }
            if images:
                entry["pixels_fp8_vs_fp16"] = _diff(images["fp8"], images["fp16"])
                entry["pixels_fp16_vs_fp32"] = _diff(images["fp16"], images["fp32"])
            figures["models"][name] = entry
            rows.append([name, entry["unet_bytes"]["source"], entry["unet_bytes"]["fp16"],
                         entry["unet_bytes"]["fp8"], f"{entry['fp8_unet_over_fp16']:.0%}",
                         entry.get("pixels_fp8_vs_fp16", "-"),
                         entry.get("pixels_fp16_vs_fp32", "-")])
        print(table(["model", "UNet bytes source", "fp16", "fp8", "fp8/fp16",
                     "pixels fp8 vs fp16", "pixels fp16 vs fp32"], rows))
    finally:
        shutil.rmtree(work, ignore_errors=True)
    figures["loadavg_after"] = list(os.getloadavg())
    print(f"machine before: {busy}; load average after: {figures['loadavg_after']}")
    return figures
