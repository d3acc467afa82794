"""A stage's end: its images written (the PNG with its `parameters` chunk, and a JSON sidecar
with full provenance), then its record moved to succeeded.

Image writes are fenced by attempt, so the image and sidecar kept are always those of the
attempt the final record names: an attempt writes the sidecar create-once; finding one, it
replaces it only when an older attempt wrote it (a worker presumed dead that was not), and
stops (Superseded) when a newer one did. The PNG follows its sidecar. An attempt that loses the
record's compare-and-set at the end removes the images it wrote, if still its own.
"""

from __future__ import annotations

import json
import logging
import time
from typing import Any

from farm import images as pngs
from farm import keys, lifecycle
from farm.errors import AlreadyExists, FarmError, IntegrityError, NotFound
from farm.lifecycle import Superseded
from farm.store import Store, get_json
from farm.worker.context import Outcome, Result, Run

log = logging.getLogger("farm.worker")


def finish(run: Run, model: Any, pictures: list[Any], render_s: float,
           extra: dict[str, Any] | None = None) -> Result:
    """Write the images, then record success; a superseded attempt keeps nothing."""
    t1 = time.perf_counter()
    written = write_images(run, model, pictures, render_s, extra)
    write_s = time.perf_counter() - t1
    try:
        run.commit(lifecycle.succeed(run.record, written, {"render_s": round(render_s, 4),
                                                           "write_s": round(write_s, 4)}))
    except Superseded:
        discard(run.ctx.store, written, run.record.attempts)
        raise
    return Result(run.job.id, Outcome.SUCCEEDED)


def write_images(run: Run, model: Any, pictures: list[Any], render_s: float,
                 extra: dict[str, Any] | None = None) -> list[str]:
    """Write image k of the job for each picture; returns the image keys. `model` is the one
    that made the pixels (the refiner, for a split job); the record says who ran what."""
    ctx, job, record = run.ctx, run.job, run.record
    spec = job.spec
    base_hash = (extra or {}).get("model_hash", model.weights_hash)
    vae_used = getattr(ctx.backend, "vae_used", None)
    written = []
    for k, (image, seed) in enumerate(zip(pictures, spec.image_seeds(), strict=True)):
        key = keys.image_key(job.batch, job.id, k)
        png = pngs.encode_png(image, pngs.a1111_parameters(spec, seed, base_hash))
        sidecar = {
            **spec.to_dict(),
            "seed": seed, "job_seed": spec.seed, "image_index": k,
            "batch": job.batch, "job": job.id, "image": key,
            "model_hash": base_hash, "model_source": model.spec.ref,
            "model_catalog": getattr(model, "catalog", None),
            "vae_used": vae_used(model, spec) if vae_used is not None else "default",
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
        data = json.dumps(sidecar, indent=2, sort_keys=True).encode()
        _write_fenced(ctx.store, key, png, data, record.attempts)
        written.append(key)
    return written


def _write_fenced(store: Store, key: str, png: bytes, sidecar: bytes, attempt: int) -> None:
    side = keys.sidecar_of(key)
    fresh = True
    try:
        store.put(side, sidecar, create_once=True, content_type="application/json")
    except AlreadyExists:
        other = _attempt_of(store, side)
        if other is not None and other >= attempt:
            raise Superseded(f"{side} belongs to attempt {other}, this is attempt "
                             f"{attempt}") from None
        log.warning("%s was written by attempt %s, superseded by this attempt %d: replacing it",
                    side, other, attempt)
        store.put(side, sidecar, content_type="application/json")
        fresh = False
    if fresh:
        try:
            store.put(key, png, create_once=True, content_type="image/png")
            return
        except AlreadyExists:
            if _attempt_of(store, side) != attempt:
                raise Superseded(f"{side} was taken over by a newer attempt") from None
            # an older attempt's image without its sidecar: this attempt's replaces it
    store.put(key, png, content_type="image/png")


def _attempt_of(store: Store, sidecar: str) -> int | None:
    try:
        value = get_json(store, sidecar).get("attempt")
    except (NotFound, IntegrityError, AttributeError):
        return None
    return value if isinstance(value, int) else None


def discard(store: Store, images: list[str], attempt: int) -> None:
    """Remove a superseded attempt's images where they are still its own."""
    for key in images:
        side = keys.sidecar_of(key)
        try:
            if _attempt_of(store, side) == attempt:
                store.delete(key)
                store.delete(side)
        except FarmError as exc:
            log.warning("could not remove the superseded image %s: %s", key, exc)
