"""A worker's Prometheus metrics: what it ran, how long it took, and how healthy it is.

Every metric lives in the worker's own registry (one per process, none global), served on
`FARM_METRICS_PORT` / `--metrics-port` at /metrics. The worker calls the small methods below
where each event happens (worker/runtime.py, worker/context.py); nothing else in the worker
touches prometheus_client. docs/metrics.md lists every metric with its labels.

Labels of a stage: `model` (the model, or base+refiner pair, whose queue carried it),
`vram_class` (the worker's class, in GB), `profile` (its load profile), `stage` (full, base,
refiner, pair). A stage's `outcome` is one of worker/context.py's Outcome values.

Nothing here imports torch unless the worker runs on a CUDA device (GPU memory gauges), so a
stand-in worker starts without it.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, Info

from farm.errors import ConfigError
from farm.fleet import WorkerState
from farm.lifecycle import Stage

# stage seconds: from a tiny model on a CPU (well under a second) to SDXL with a refiner on a
# small card (minutes); the top bucket is the deployment's default hard limit
STAGE_BUCKETS = (0.1, 0.25, 0.5, 1, 2, 4, 8, 15, 30, 60, 120, 300, 600, 1800)
STAGE_LABELS = ("model", "vram_class", "profile", "stage")
# outcomes that end a job here, and those whose stage ran to its end (timed in the histogram)
JOB_ENDS = ("succeeded", "failed", "canceled")
COMPLETED = ("succeeded", "latents_ready")
# the outcome label of a stage given back to its queue because the broker or store failed
# under it (a RetryableError: the task's Reject; no attempt counted)
REQUEUED = "requeued"
GPU_MEMORY = {"used": "allocated by tensors now",
              "peak": "allocated by tensors at most, since the worker started",
              "reserved": "held by torch's caching allocator",
              "total": "of the device"}


class WorkerMetrics:
    """The metrics of one worker process, in a registry of its own."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry if registry is not None else CollectorRegistry()
        r = self.registry
        self.info = Info("farm_worker", "The worker: name, host, device, class, profile, "
                         "compile backend, models.", registry=r)
        self.state = Gauge("farm_worker_state", "1 for the state the worker is in.",
                           ["state"], registry=r)
        self.stages = Counter("farm_worker_stages", "Stage messages this worker ended, by "
                              "outcome.", [*STAGE_LABELS, "outcome"], registry=r)
        self.jobs = Counter("farm_worker_jobs", "Jobs that reached a final state on this worker.",
                            ["model", "outcome"], registry=r)
        self.dead_letters = Counter("farm_worker_dead_letters", "Jobs dead-lettered here: a "
                                    "stage failed FARM_MAX_ATTEMPTS times for worker faults.",
                                    ["model", "stage"], registry=r)
        self.seconds = Histogram("farm_worker_stage_seconds", "Seconds of each stage that ran "
                                 "to its end (outcome succeeded or latents_ready).",
                                 STAGE_LABELS, buckets=STAGE_BUCKETS, registry=r)
        self.images = Counter("farm_worker_images", "Images written.", ["model"], registry=r)
        self.steps = Counter("farm_worker_steps", "Denoising steps run.", STAGE_LABELS,
                             registry=r)
        self.step_rate = Gauge("farm_worker_steps_per_second", "Denoising steps per second of "
                               "the latest stage that ran steps.", STAGE_LABELS, registry=r)
        self.compile_seconds = Gauge("farm_worker_compile_seconds", "Seconds compiling and "
                                     "warming a model's buckets at start-up.",
                                     ["model", "backend"], registry=r)
        self.compile_cache = Counter("farm_worker_compile_cache", "Fleet compile cache lookups "
                                     "(result: hit, miss, corrupt, off).",
                                     ["model", "backend", "result"], registry=r)
        self.graphs = Gauge("farm_worker_compiled_graphs", "Graphs compiled in this process.",
                            registry=r)
        self.recompiles = Counter("farm_worker_recompiles", "Graphs compiled mid-job: a shape "
                                  "no warmed bucket had.", registry=r)
        self.handbacks = Counter("farm_worker_handbacks", "Stages handed back on shutdown, to "
                                 "resume on another worker.", ["stage"], registry=r)
        self.takeovers = Counter("farm_worker_takeovers", "Stages this worker took over from a "
                                 "worker that died running them.", ["stage"], registry=r)
        self.recoveries = Counter("farm_worker_recoveries", "Messages this worker put back on "
                                  "their queue (path: sweep of dead workers' and orphaned "
                                  "stages, reconcile of lost messages).", ["path"], registry=r)
        self.heartbeat_age = Gauge("farm_worker_heartbeat_age_seconds", "Seconds since the "
                                   "worker's last successful heartbeat write.", registry=r)
        # on a CUDA device only (watch_gpu); a CPU worker exposes these with no samples
        self.gpu = {name: Gauge(f"farm_worker_gpu_memory_{name}_bytes", f"GPU memory {text}.",
                                ["device"], registry=r) for name, text in GPU_MEMORY.items()}
        self._last_beat = time.monotonic()
        self.heartbeat_age.set_function(lambda: time.monotonic() - self._last_beat)
        self._steps = 0     # steps of the running stage, counted in the step callback

    # -- serving -------------------------------------------------------------------------------

    def serve(self, port: int) -> int:
        """Serve /metrics on `port` (0: a free one) on every interface; returns the port."""
        from prometheus_client import start_http_server

        try:
            server, _ = start_http_server(port, registry=self.registry)
        except OSError as exc:
            raise ConfigError(
                f"--metrics-port {port}: cannot listen ({exc.strerror}); workers on one machine "
                "each need their own port (or 0 for any free one)") from None
        return int(server.server_port)

    # -- who this worker is ---------------------------------------------------------------------

    def identify(self, models: list[str], **labels: Any) -> None:
        """Who the worker is; its models' job and dead-letter counters start at 0, so that
        Prometheus' increase() sees their first count (a series born at 1 shows no increase)."""
        self.info.info({k: str(v) for k, v in labels.items()} | {"models": ",".join(models)})
        for model in models:
            for outcome in JOB_ENDS:
                self.jobs.labels(model, outcome)
            for stage in Stage:
                self.dead_letters.labels(model, stage.value)

    def follow_state(self, current: Callable[[], str | None]) -> None:
        """Read the worker's state at each scrape (it changes in many places)."""
        def is_in(state: str) -> Callable[[], float]:
            return lambda: 1.0 if current() == state else 0.0

        for state in WorkerState:
            self.state.labels(state.value).set_function(is_in(state.value))

    def watch_gpu(self, device: str) -> None:
        """GPU memory gauges for a CUDA device, read at each scrape (none on CPU)."""
        if not device.startswith("cuda"):
            return
        import torch

        dev = torch.device(device)
        read = {"used": torch.cuda.memory_allocated, "peak": torch.cuda.max_memory_allocated,
                "reserved": torch.cuda.memory_reserved}
        def reader(f: Callable[[Any], int]) -> Callable[[], float]:
            return lambda: float(f(dev))

        for name, gauge in self.gpu.items():
            if name in read:
                gauge.labels(device).set_function(reader(read[name]))
        self.gpu["total"].labels(device).set(torch.cuda.get_device_properties(dev).total_memory)

    # -- events -------------------------------------------------------------------------------

    def beat(self) -> None:
        self._last_beat = time.monotonic()

    def compiled(self, model: str, backend: str, cache: str, seconds: float,
                 graphs: int) -> None:
        self.compile_seconds.labels(model, backend).set(seconds)
        self.compile_cache.labels(model, backend, cache).inc()
        self.graphs.set(graphs)

    def stepped(self) -> None:
        """One denoising step of the running stage (the step callback)."""
        self._steps += 1

    def stage_started(self) -> None:
        self._steps = 0

    def stage_ended(self, *, model: str, vram_class: int, profile: str, stage: str,
                    outcome: str, fault: str | None, seconds: float, images: int,
                    job_model: str) -> None:
        labels = (model, str(vram_class), profile, stage)
        self.stages.labels(*labels, outcome).inc()
        if outcome in COMPLETED:
            self.seconds.labels(*labels).observe(seconds)
        if outcome in JOB_ENDS:
            self.jobs.labels(job_model, outcome).inc()
        if outcome == "failed" and fault == "worker":
            self.dead_letters.labels(job_model, stage).inc()
        if outcome == "succeeded" and images:
            self.images.labels(job_model).inc(images)
        if outcome == "handed_back":
            self.handbacks.labels(stage).inc()
        steps, self._steps = self._steps, 0
        if steps:
            self.steps.labels(*labels).inc(steps)
            if outcome in COMPLETED and seconds > 0:
                self.step_rate.labels(*labels).set(steps / seconds)

    def recompiled(self, graphs: int) -> None:
        self.recompiles.inc(graphs)

    def took_over(self, stage: str) -> None:
        self.takeovers.labels(stage).inc()

    def recovered(self, path: str, count: int) -> None:
        if count:
            self.recoveries.labels(path).inc(count)

