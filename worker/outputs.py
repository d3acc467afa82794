"""Writing a job's images: the PNG (with its `parameters` chunk) and the JSON sidecar with full
provenance, both create-once, so a duplicate delivery keeps the first copy's objects."""

from __future__ import annotations

import json
import logging
import time
from typing import TYPE_CHECKING, Any

from farm import images as pngs
from farm.errors import AlreadyExists
from farm.jobs import Job
from farm.records import JobRecord, image_key, sidecar_key

if TYPE_CHECKING:
    from farm.worker.stage import WorkerContext

log = logging.getLogger("farm.worker")


def write_images(ctx: WorkerContext, job: Job, record: JobRecord, model: Any,
                 pictures: list[Any], render_s: float,
                 extra: dict[str, Any] | None = None) -> list[str]:
    """Write image k of the job for each picture; returns the image keys. `model` is the one
    that made the pixels (the refiner, for a split job); `record.stages` says who ran what."""
    spec = job.spec
    base_hash = (extra or {}).get("model_hash", model.weights_hash)
    keys = []
    for k, (image, seed) in enumerate(zip(pictures, spec.image_seeds(), strict=True)):
        key = image_key(job.batch, job.id, k)
        png = pngs.encode_png(image, pngs.a1111_parameters(spec, seed, base_hash))
        sidecar = {
            **spec.to_dict(),
            "seed": seed, "job_seed": spec.seed, "image_index": k,
            "batch": job.batch, "job": job.id, "image": key,
            "model_hash": base_hash, "model_source": model.spec.ref,
            "worker": ctx.name, "host": ctx.host, "device": str(model.device),
            "threads": ctx.threads, "vram_class": ctx.vram_class,
            "profile": getattr(model, "profile", ""), "planned_vram_class": job.stage_class,
            "dtype": str(model.dtype).replace("torch.", ""), "attempt": record.attempts,
            "started_at": record.started_at, "finished_at": time.time(),
            "timings": {"render_s": round(render_s, 4),
                        "render_per_image_s": round(render_s / max(1, len(pictures)), 4)},
            "stages": record.stages,
            "versions": ctx.versions,
            **{k2: v for k2, v in (extra or {}).items() if k2 != "model_hash"},
        }
        for obj_key, data, ctype in ((key, png, "image/png"),
                                     (sidecar_key(job.batch, job.id, k),
                                      json.dumps(sidecar, indent=2, sort_keys=True).encode(),
                                      "application/json")):
            try:
                ctx.store.put(obj_key, data, create_once=True, content_type=ctype)
            except AlreadyExists:
                log.info("%s exists already (an earlier attempt wrote it); keeping it", obj_key)
        keys.append(key)
    return keys
