"""A batch put straight into a store, as if workers had rendered it: a stand-in for rendering,
for measuring and testing what reads results (`farm results`, `farm gallery`) without workers.

Everything is written through the farm's own builders: the manifest and submit record
(farm/records.py), each job's record (farm/lifecycle.py) and its images and sidecars at the
keys farm/keys.py names, and the summary of a batch whose every job succeeded
(farm/summary.py). Image k of job i is a small flat PNG whose colour comes from its seed.
"""

from __future__ import annotations

import io
import json
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace

from PIL import Image

from farm import keys, summary
from farm.jobs import Job, JobSpec, job_id
from farm.lifecycle import JobRecord, JobState
from farm.records import Manifest, SubmitState, create_batch
from farm.settings import Settings
from farm.store import Store, put_json

PROMPTS = ("a red fox in snow", "an old library, dust in sunbeams", "a glass teapot on a sill",
           "a lighthouse at dusk", "a bowl of lemons")


def png(seed: int, width: int, height: int) -> bytes:
    mixed = (seed * 2654435761) & 0xFFFFFFFF
    colour = ((mixed >> 24) & 0xFF, (mixed >> 16) & 0xFF, (mixed >> 8) & 0xFF)
    image = Image.new("RGB", (width, height), colour)
    for x in range(0, width, 8):  # a stripe, so no two images compress alike
        image.putpixel((x, (seed + x) % height), (255, 255, 255))
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


def fill(store: Store, settings: Settings, batch: str, jobs: int, *, n: int = 1,
         size: int = 64, succeeded: int | None = None, threads: int = 16) -> list[str]:
    """A batch of `jobs` jobs of `n` images each; the first `succeeded` (default: all) have
    succeeded with their images written, the rest are still queued. Returns the image keys."""
    succeeded = jobs if succeeded is None else succeeded
    specs = [JobSpec.from_dict({"prompt": PROMPTS[i % len(PROMPTS)], "seed": 1000 + i * n,
                                "n": n, "steps": 4, "width": size, "height": size}, settings)
             for i in range(jobs)]
    manifest = Manifest(batch=batch, created_at=time.time(), source="filled", defaults={},
                        jobs=[Job(id=job_id(batch, i), batch=batch, index=i, spec=spec,
                                  vram_class=8) for i, spec in enumerate(specs)])
    create_batch(store, manifest, SubmitState.SUBMITTED)

    def finish(i: int) -> list[str]:
        job, spec = manifest.jobs[i], specs[i]
        images = []
        for k, seed in enumerate(spec.image_seeds()):
            key = keys.image_key(batch, job.id, k)
            sidecar = {**spec.to_dict(), "seed": seed, "image_index": k, "batch": batch,
                       "job": job.id, "image": key, "worker": "filled", "attempt": 1,
                       "timings": {"render_s": 0.5, "render_per_image_s": round(0.5 / n, 4)}}
            store.put(keys.sidecar_of(key), json.dumps(sidecar, indent=2).encode(),
                      content_type="application/json")
            store.put(key, png(seed, spec.width, spec.height), content_type="image/png")
            images.append(key)
        now = time.time()
        record = replace(JobRecord(job=job.id, batch=batch), state=JobState.SUCCEEDED,
                         attempts=1, worker="filled", started_at=now - 0.5, finished_at=now,
                         updated_at=now, images=images, timings={"render_s": 0.5})
        put_json(store, keys.record_key(batch, job.id), record.encode())
        return images

    with ThreadPoolExecutor(max_workers=threads) as pool:
        written = [key for images in pool.map(finish, range(succeeded)) for key in images]
    if succeeded == jobs:
        summary.finish(store, None, manifest)   # as the worker finishing the last job does
    return written
