"""A split base → refiner job over the same ensemble run in one process (tiny models, CPU).

Both variants run interleaved in this process, several rounds. The split variant is the farm's
own stage code (worker/stage.py, worker/split.py) against a real file store: the base stage
writes the safetensors handoff and records latents_ready, the refiner stage reads and verifies
it, refines, writes the PNG and sidecar. The one-process variant calls pipelines.ensemble
and encodes the PNG. The queue hop between the stages is not in either (the overhead benchmark
measures the queue); what this isolates is the cost of handing off through the store.
"""

from __future__ import annotations

import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

ROUNDS = 11
SPEC = {"prompt": "a lighthouse on a cliff", "steps": 20, "width": 128, "height": 128,
        "refiner": "tiny-sdxl-refiner", "switch": 0.8, "split": "always"}


def run() -> dict[str, Any]:
    import torch

    from farm import images, models
    from farm.jobs import Job, JobSpec
    from farm.lifecycle import Stage
    from farm.records import Manifest, SubmitState, create_batch
    from farm.scheduler.plan import plan
    from farm.settings import Settings
    from farm.store import FileStore
    from farm.worker import latents, pipelines
    from farm.worker.stage import Outcome, WorkerContext, run_message

    torch.set_num_threads(1)
    home = Path(tempfile.mkdtemp(prefix="farm-bench-split-"))
    settings = Settings(home=home, threads=1)
    base = pipelines.load_model(models.TINY_BASE, settings, "cpu")
    refiner = pipelines.load_model(models.TINY_REFINER, settings, "cpu")
    store = FileStore(home / "store")

    # time the store's part of the handoff separately, by wrapping the store
    class Timed:
        def __init__(self, inner: FileStore) -> None:
            self.inner, self.seconds, self.url = inner, 0.0, inner.url

        def __getattr__(self, name: str) -> Any:
            fn = getattr(self.inner, name)

            def timed(*a: Any, **k: Any) -> Any:
                t = time.perf_counter()
                try:
                    return fn(*a, **k)
                finally:
                    self.seconds += time.perf_counter() - t
            return timed

    timed_store = Timed(store)
    queued: list[Job] = []
    ctx = WorkerContext(settings=settings, store=timed_store,  # type: ignore[arg-type]
                        models={"tiny-sdxl": base, "tiny-sdxl-refiner": refiner},
                        name="bench", backend=pipelines,
                        enqueue=queued.append)

    def one_process(seed: int) -> float:
        spec = JobSpec.from_dict({**SPEC, "seed": seed}, settings)
        t = time.perf_counter()
        (image,) = pipelines.ensemble(base, refiner, spec)
        images.encode_png(image, images.a1111_parameters(spec, seed, base.weights_hash))
        return time.perf_counter() - t

    def split(seed: int, batch: str) -> tuple[float, float, float]:
        spec = JobSpec.from_dict({**SPEC, "seed": seed}, settings)
        p = plan(spec, settings)
        job = Job(id=f"{batch}-0000", batch=batch, index=0, spec=spec, vram_class=p.vram_class,
                  stage=Stage(p.first_stage), refiner_vram_class=p.refiner_vram_class)
        create_batch(store, Manifest(batch=batch, created_at=0.0, source="b", defaults={},
                                     jobs=[job]), SubmitState.SUBMITTED)
        timed_store.seconds = 0.0
        t = time.perf_counter()
        assert run_message(ctx, job.encode()).outcome is Outcome.LATENTS_READY
        assert run_message(ctx, queued.pop().encode()).outcome is Outcome.SUCCEEDED
        total = time.perf_counter() - t
        # the handoff's own cost: encoding and verifying the safetensors object
        lat, gen = pipelines.denoise_base(base, spec, seed)
        t = time.perf_counter()
        blob = latents.encode_handoff(job, [lat], [gen], {}, base.scheduler_config)
        latents.decode_handoff(blob, job)
        return total, timed_store.seconds, time.perf_counter() - t

    one_process(0)  # warm both paths once
    split(0, "20000101-000000-000000")
    rows: dict[str, list[float]] = {"one_process_s": [], "split_s": [], "store_io_s": [],
                                    "handoff_codec_s": []}
    for r in range(ROUNDS):  # interleaved: A, B, A, B, ...
        rows["one_process_s"].append(one_process(r + 1))
        total, io, codec = split(r + 1, f"20000101-000000-{r + 1:06d}")
        rows["split_s"].append(total)
        rows["store_io_s"].append(io)
        rows["handoff_codec_s"].append(codec)

    med = {k: statistics.median(v) for k, v in rows.items()}
    ratio = med["split_s"] / med["one_process_s"]
    figures = {
        "rounds": ROUNDS, "spec": SPEC,
        "median_s": med, "min_s": {k: min(v) for k, v in rows.items()},
        "max_s": {k: max(v) for k, v in rows.items()},
        "split_over_one_process": ratio,
        "store_share_of_split": med["store_io_s"] / med["split_s"],
        "extra_ms_per_job": (med["split_s"] - med["one_process_s"]) * 1000,
    }
    print(f"split base→refiner job vs one-process ensemble, tiny models, 128², 20 steps, "
          f"switch 0.8, CPU, 1 thread, {ROUNDS} interleaved rounds")
    print(f"{'variant':<28}{'median':>10}{'min':>10}{'max':>10}")
    for k, label in (("one_process_s", "one process"), ("split_s", "split through the store"),
                     ("store_io_s", "  of which store I/O"),
                     ("handoff_codec_s", "  handoff encode + verify")):
        print(f"{label:<28}{med[k] * 1000:>8.1f}ms{min(rows[k]) * 1000:>8.1f}ms"
              f"{max(rows[k]) * 1000:>8.1f}ms")
    print(f"split / one process = {ratio:.3f}; the store's share of a split job = "
          f"{figures['store_share_of_split']:.1%}")
    return figures


if __name__ == "__main__":
    run()
