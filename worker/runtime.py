"""A worker's life: set up once (load, warm), then consume jobs until told to stop.

    1. resolve the device and the models it serves
    2. load every pipeline and warm it (heartbeat says "starting" meanwhile)
    3. report ready, then consume its queues with Celery's solo pool, one job at a time (with
       FARM_BATCH_JOBS > 1, one pipeline call for the queued jobs that can share it:
       worker/batching.py)
    4. after --max-jobs jobs, or on SIGTERM/SIGINT, finish the current job and exit
    5. quarantined (FARM_QUARANTINE_AFTER worker faults in a row, on different jobs): stop
       taking work, show it in `farm workers` with the last error, then exit non-zero
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

from farm import broker, catalog, fleet, limits, models, queues, recovery, vram
from farm.errors import RetryableError
from farm.jobs import Job
from farm.lifecycle import Fault
from farm.settings import Settings
from farm.store import open_store
from farm.worker import allocator, batching, compile
from farm.worker.drain import Drain
from farm.worker.finisher import Finisher
from farm.worker.metrics import REQUEUED, WorkerMetrics
from farm.worker.stage import Outcome, Result, WorkerContext, package_versions, resolve, run_job

log = logging.getLogger("farm.worker")

# the exit status of a quarantined worker: its platform restarts or replaces it
QUARANTINED_EXIT = 70


def resolve_device(requested: str) -> str:
    import torch

    if requested in ("", "auto"):
        return "cuda:0" if torch.cuda.is_available() else "cpu"
    if requested.startswith("cuda") and not torch.cuda.is_available():
        from farm.errors import ConfigError

        raise ConfigError(f"--device {requested}: torch sees no CUDA GPU on this machine")
    return requested


def resolve_class(settings: Settings, device: str) -> int:
    """The worker's VRAM class: as declared, or from the GPU's memory (CPU: the largest)."""
    if settings.vram != "auto":
        return int(settings.vram)
    if device.startswith("cuda"):
        import torch

        total = torch.cuda.get_device_properties(torch.device(device)).total_memory
        return vram.detect_class(total, settings.vram_classes)
    return max(settings.vram_classes)


def _hard_limit(job: Job, together: list[batching.Taken] | None = None) -> float:
    """The running stage's hard limit (farm/limits.py); with companions, for all the images of
    the shared call."""
    spec = job.spec
    images = spec.n + sum(t.job.spec.n for t in together or [])
    return limits.stage_seconds(spec.steps, spec.width, spec.height, images)


def default_name(device: str) -> str:
    return f"{socket.gethostname()}-{device.replace(':', '')}-{os.getpid()}"


class Worker:
    def __init__(self, settings: Settings, model_names: list[str], *, device: str = "auto",
                 name: str | None = None, max_jobs: int | None = None,
                 echo: Callable[[str], None] = print, backend: Any = None) -> None:
        self.settings = settings
        self.specs = [models.resolve(m) for m in (model_names or [models.DEFAULT_MODEL])]
        self.device_request = device
        self.name = name
        self.max_jobs = max_jobs
        self.echo = echo
        # what loads, warms and renders: farm.worker.pipelines (diffusers), or a named stand-in for
        # load tests (farm.worker.standin) that must not wait on diffusion
        self.backend = backend
        self.done = 0
        self._stop = threading.Event()
        self.info: fleet.WorkerInfo | None = None
        self.progress: float | None = None  # monotonic time of the running stage's last step
        self.deadline: float | None = None  # when the running stage passes its hard limit
        self.ctx: WorkerContext | None = None
        self.drain = Drain(settings.stop_grace)
        self.incarnation = uuid.uuid4().hex[:12]  # this process, whatever its name
        # the jobs of this worker's latest stages that ended in a worker fault, newest last;
        # any other end clears it (farm/settings.py quarantine_after)
        self.faults: list[str] = []
        self.quarantined_at: float | None = None
        self.metrics = WorkerMetrics()   # served on settings.metrics_port (worker/metrics.py)
        self.finisher: Finisher | None = None   # built in setup: the batches' tallies and ends
        # takes the queued jobs that share a pipeline call (FARM_BATCH_JOBS > 1), built in setup
        self.taker: batching.Taker | None = None

    # -- 1-2: setup, once ---------------------------------------------------------------------

    def setup(self) -> WorkerContext:
        # before anything large is allocated: renders reuse freed memory (worker/allocator.py)
        allocator.keep_freed_memory()
        if self.backend is None:
            from farm.worker import pipelines

            self.backend = pipelines
        pipelines = self.backend
        device = resolve_device(self.device_request)
        if device == "cpu" and self.settings.threads == 0:
            # CPU pixels depend on torch's thread count (reductions split differently), so CPU
            # workers default to one thread: then the same seed gives the same bytes on every
            # CPU worker. FARM_THREADS trades that for speed.
            self.settings = self.settings.replace(threads=1)
        self.name = self.name or default_name(device)
        self.vram_class = resolve_class(self.settings, device)
        profile = vram.PROFILES[self.settings.profile] if self.settings.profile else \
            vram.profile_for(self.vram_class)
        self.compile_backend = self.settings.compile or compile.default_backend(device)
        compile.check_backend(self.compile_backend)  # before the broker and minutes of loading
        broker.ensure_broker(self.settings)
        broker.wait_for_broker(self.settings, timeout=max(30.0,
                                                          self.settings.broker_connect_timeout))
        self.redis = broker.redis_client(self.settings)
        fleet.check_shared(self.redis, self.settings, claim_ttl=3 * self.settings.heartbeat_ttl)
        back = recovery.recover_own(self.redis, self.name)
        if back:
            self.echo(f"worker {self.name}: put back job {back.get('job')}, which this worker "
                      "name was running when it last stopped")
        # a catalog model is a base or a refiner as its manifest says, whatever its name: a
        # refiner pushed as "house-refiner" serves the pair route with a base beside it
        stored = [s.name for s in self.specs if s.source == "store"]
        roles = catalog.roles(open_store(self.settings), stored) if stored else {}
        self.info = fleet.WorkerInfo(
            name=self.name, host=socket.gethostname(), pid=os.getpid(), device=device,
            models=[s.name for s in self.specs],
            queues=queues.worker_queues([s.name for s in self.specs], self.vram_class,
                                        self.settings.vram_classes, roles),
            vram_class=self.vram_class, profile=profile.name, started_at=time.time(),
            compile={"backend": self.compile_backend, "state": "eager", "seconds": 0.0,
                     "cache": "off", "graphs": 0, "recompiles": 0},
            incarnation=self.incarnation)
        self._serve_metrics(device, profile.name)
        self._beat()
        threading.Thread(target=self._heartbeat_loop, name="heartbeat", daemon=True).start()

        store = open_store(self.settings)
        loaded = {}
        for spec in self.specs:
            self.echo(f"worker {self.name}: loading {spec.name} on {device} as a "
                      f"{self.vram_class} GB worker, profile {profile.name}")
            model = pipelines.load_model(spec, self.settings, device, profile)
            self.echo(f"worker {self.name}: {spec.name} loaded in {model.load_seconds:.1f} s "
                      f"(weights {model.weights_hash[:12]})")
            self._compile_and_warm(model, spec, device, profile.name, store)
            loaded[spec.name] = model
        self.app = broker.celery_app(self.settings, in_flight=self.name)
        self.listener = recovery.CancelListener(broker.redis_client(self.settings))
        self.finisher = Finisher(store, self.redis, self.settings)
        if self.settings.batch_jobs > 1:
            self.taker = batching.Taker(self.app, self.redis)
        self.ctx = WorkerContext(
            settings=self.settings, store=store, models=loaded, backend=pipelines,
            name=self.name, versions=package_versions(), threads=self.settings.threads,
            vram_class=self.vram_class, enqueue=self._enqueue,
            canceled=self.listener.canceled,
            canceled_now=self.listener.heard,
            canceled_flag=lambda *ids: recovery.is_canceled(self.redis, *ids),
            holds=lambda worker, job: recovery.holds(self.redis, worker, job),
            alive=lambda worker, incarnation: fleet.alive(self.redis, worker, incarnation),
            others_serve=self._others_serve, tally=self.finisher.noted,
            on_progress=self._progressed, drain=self.drain,
            incarnation=self.incarnation, metrics=self.metrics)
        self.info.state = fleet.WorkerState.READY
        self._beat()
        if self.ready_file is not None:
            self.ready_file.parent.mkdir(parents=True, exist_ok=True)
            self.ready_file.write_text(f"{self.name}\n")
        classes = sorted({q.split(".")[-2] for q in self.info.queues}, key=lambda c: -int(c[:-2]))
        self.echo(f"worker {self.name}: ready ({self.vram_class} GB, {profile.name}); serving "
                  f"{', '.join(self.info.models)} at {', '.join(classes)} (own class first)")
        return self.ctx

    def _serve_metrics(self, device: str, profile: str) -> None:
        """Serve /metrics when FARM_METRICS_PORT is set; the port goes into the heartbeat."""
        assert self.info is not None
        info = self.info
        self.metrics.identify(info.models, worker=info.name, host=info.host, device=device,
                              vram_class=self.vram_class, profile=profile,
                              compile=self.compile_backend, incarnation=self.incarnation)
        self.metrics.follow_state(lambda: str(info.state))
        self.metrics.watch_gpu(device)
        if self.settings.metrics_port is None:
            return
        port = self.metrics.serve(self.settings.metrics_port)
        info.extra["metrics_port"] = port
        self.echo(f"worker {self.name}: metrics on port {port} (/metrics)")

    def _compile_and_warm(self, model: Any, spec: models.ModelSpec, device: str,
                          profile: str, store: Any) -> None:
        """Compile (fleet cache first) and warm every bucket jobs may bring, once."""
        assert self.info is not None
        buckets = self.settings.bucket_list(spec)
        backend = self.compile_backend
        report = compile.CompileReport(backend)
        if backend != "none":
            report.cache_key = compile.cache_key(model, backend, buckets, profile, device)
            report.cache = compile.load_cached(store, report.cache_key)
            compile.wrap(model, backend)
            report.state = "compiling"
            self.info.compile.update(state="compiling", cache=report.cache)
            self._beat()
        warm_all = getattr(self.backend, "warm_buckets", None)
        t0 = time.perf_counter()
        if warm_all is not None:
            warm_all(model, buckets)
        else:  # a backend without buckets (the load-test stand-in)
            self.backend.warm(model)
        report.seconds = time.perf_counter() - t0
        if backend != "none":
            report.state, report.graphs = "compiled", compile.graphs()
            if report.cache != "hit":
                compile.save_cached(store, report.cache_key, report)
        self.info.compile.update(state=report.state, cache=report.cache,
                                 seconds=round(self.info.compile["seconds"] + report.seconds, 2),
                                 graphs=report.graphs)
        self.metrics.compiled(spec.name, backend, report.cache, report.seconds, report.graphs)
        verb = "compiled and warmed" if backend != "none" else "warmed"
        cache = f", fleet cache {report.cache}" if backend != "none" else ""
        self.echo(f"worker {self.name}: {spec.name} {verb} {len(buckets)} bucket(s) in "
                  f"{report.seconds:.1f} s ({backend}{cache})")

    # -- 3-4: consume ---------------------------------------------------------------------

    def handle(self, message: Any, tag: str | None = None, queue: str | None = None) -> None:
        assert self.ctx is not None and self.info is not None and self.finisher is not None
        job_id = message.get("id") if isinstance(message, dict) else None
        stage = message.get("stage") if isinstance(message, dict) else None
        # the heartbeat thread publishes "busy" within an interval: no extra write per job
        self.info.state, self.info.current_job = fleet.WorkerState.BUSY, job_id
        # the message is in this worker's in-flight record, written with its delivery and
        # deleted by its ack (farm/transport.py): should this process die, the sweep puts it
        # back from there
        graphs = compile.graphs() if self.compile_backend != "none" else 0
        self.progress = time.monotonic()
        self.deadline = self.progress + limits.FLOOR_SECONDS
        began = self.progress
        self.metrics.stage_started()
        # the note that ends this message's job acks the message too (worker/finisher.py)
        self.finisher.hold(self.name or "", tag, job_id)
        job: Job | Result | None = None
        try:
            job = resolve(self.ctx, message)
            if isinstance(job, Result):
                result = job
            else:
                together = self._take_companions(job, tag, queue, stage)
                self.deadline = self.progress + _hard_limit(job, together)
                if together:
                    result = self._run_together(job, together, began)
                else:
                    result = run_job(self.ctx, job)
        except RetryableError:
            # the message goes back on its queue (the task's Reject): the transport moves it
            # out of the in-flight record, so no duplicate check takes it for running here
            self._count_stage(job, stage, REQUEUED, None, began)
            raise
        finally:
            self.finisher.release()
            self.progress = None
            self.done += 1
            self.info.current_job = None
            self.info.state = fleet.WorkerState.READY
        self._ended(job, stage, result, began)
        if self.compile_backend != "none" and compile.graphs() > graphs:
            # a shape no bucket warmed: it compiled mid-job (and will be fast next time)
            self.info.compile["recompiles"] += compile.graphs() - graphs
            self.metrics.recompiled(compile.graphs() - graphs)
            log.warning("job %s compiled %d new graph(s) mid-job", result.job,
                        compile.graphs() - graphs)
        if self.max_jobs and self.done >= self.max_jobs:
            self.request_stop()
        if self.info.state != fleet.WorkerState.READY:
            # draining or quarantined: say so at once. Otherwise the heartbeat thread
            # publishes the job counts with its next beat: no Redis command per job here
            self._beat()

    def _ended(self, job: Job | Result | None, stage: Any, result: Result, began: float, *,
               streak: bool = True) -> None:
        """A message's end, in the worker's counts, its fault streak (`streak`), metrics and
        log."""
        assert self.info is not None
        # a stage done counts, whether it finished the job or handed it to a refiner
        if result.outcome in (Outcome.SUCCEEDED, Outcome.LATENTS_READY):
            self.info.jobs_done += 1
        elif result.outcome in (Outcome.FAILED, Outcome.REJECTED, Outcome.CANCELED,
                                Outcome.RETRYING):
            self.info.jobs_failed += 1
        if streak:
            self._note_fault(result)
        self._count_stage(job, stage, result.outcome.value, result.fault, began)
        self.echo(f"worker {self.name}: job {result.job or '(none)'} {result.outcome.value}"
                  + (f": {result.error}" if result.error else ""))

    # -- the throughput mode (worker/batching.py) -------------------------------------------

    def _take_companions(self, job: Job, tag: str | None, queue: str | None,
                         stage: Any) -> list[batching.Taken]:
        """The queued jobs that render with `job` in one call: none unless FARM_BATCH_JOBS > 1
        (and never more than --max-jobs leaves room for). Every message taken is in the
        in-flight record before anything renders."""
        if self.taker is None or not tag or not queue:
            return []
        key = batching.batch_key(job)
        if key is None:
            return []
        room = self.settings.batch_jobs - 1
        if self.max_jobs:
            room = min(room, self.max_jobs - self.done - 1)
        if room <= 0:
            return []
        assert self.ctx is not None
        together = self.taker.take(self.ctx, queue, key, room)
        if together:
            assert self.finisher is not None
            # the record names the companions too: it goes with the lead's ack, after theirs
            self.finisher.release()
            recovery.add_held(self.redis, self.name or "", [t.held() for t in together])
        return together

    def _run_together(self, job: Job, together: list[batching.Taken], began: float) -> Result:
        """Render the lead job and its companions in one call; end each companion (its counts,
        and its message acked or put back); return the lead's end (or raise its
        RetryableError: the task hands its message back)."""
        assert self.ctx is not None and self.taker is not None
        ends = batching.run_together(self.ctx, [job] + [t.job for t in together])
        for taken, end in zip(together, ends[1:], strict=True):
            self.done += 1
            if isinstance(end, RetryableError):
                log.error("handing job %s back to its queue: %s", taken.job.id, end)
                self.taker.put_back(taken.message, taken.queue)
                self._count_stage(taken.job, taken.job.stage, REQUEUED, None, began)
                continue
            self.taker.ack(taken)
            # one shared call is one run of the device: the lead's end alone feeds the fault
            # streak, so a fault of the call does not quarantine the worker N times over
            self._ended(taken.job, taken.job.stage, end, began, streak=False)
        lead = ends[0]
        if isinstance(lead, RetryableError):
            raise lead
        return lead

    def _count_stage(self, job: Job | Result | None, stage: Any, outcome: str, fault: Any,
                     began: float) -> None:
        """The stage's end, in the metrics; a message that named no job counts as model "-"."""
        model, job_model, images = "-", "-", 0
        if isinstance(job, Job):
            model, job_model, stage, images = (job.stage_model, job.spec.model, job.stage,
                                               job.spec.n)
        self.metrics.stage_ended(
            model=model, job_model=job_model, stage=str(stage or "-"), images=images,
            vram_class=self.vram_class, profile=self.info.profile if self.info else "",
            outcome=outcome, fault=None if fault is None else str(fault),
            seconds=time.monotonic() - began)

    def _note_fault(self, result: Result) -> None:
        """Quarantine after `quarantine_after` worker faults in a row, on different jobs."""
        if result.outcome in (Outcome.DUPLICATE, Outcome.REJECTED, Outcome.PUT_BACK):
            return  # nothing ran: neither a fault nor a proof of health
        if result.fault is not Fault.WORKER or result.job is None:
            self.faults.clear()
            return
        assert self.info is not None
        self.info.last_error = result.error
        if result.job not in self.faults:
            self.faults.append(result.job)
        if len(self.faults) >= self.settings.quarantine_after and self.quarantined_at is None:
            self.quarantined_at = time.monotonic()
            self.info.state = fleet.WorkerState.QUARANTINED
            self.echo(f"worker {self.name}: quarantined after failing "
                      f"{len(self.faults)} stages of different jobs in a row (last: "
                      f"{result.error}); taking no more work, exiting in "
                      f"{self.settings.quarantine_exit_seconds:.0f} s")
            self.request_stop()

    def _enqueue(self, job: Job) -> None:
        self.app.send_task(queues.RENDER_TASK, args=[job.encode()],
                           queue=queues.stage_queue(job))

    def _others_serve(self, job: Job) -> bool:
        queue = queues.stage_queue(job)
        return any(w.name != self.name and queue in w.queues
                   and w.state != fleet.WorkerState.QUARANTINED
                   for w in fleet.live_workers(self.redis))

    @property
    def ready_file(self) -> Path | None:
        """FARM_READY_FILE, with "{name}" replaced by this worker's name."""
        if self.settings.ready_file is None:
            return None
        return Path(str(self.settings.ready_file).replace("{name}", self.name or "worker"))

    def request_stop(self) -> None:
        from celery.worker import state as celery_state

        if self.info is not None and self.quarantined_at is None:
            self.info.state = fleet.WorkerState.DRAINING
        celery_state.should_stop = 0  # the consumer loop exits cleanly before the next job

    def _watch_stop(self) -> Drain:
        """The stop request a running stage consults at each step (worker/drain.py): Celery's
        warm shutdown on SIGTERM (or SIGINT) notes its time; the grace is FARM_STOP_GRACE."""
        from celery import signals

        drain = self.drain

        def shutting_down(**_: Any) -> None:
            drain.request()

        signals.worker_shutting_down.connect(shutting_down, weak=False)
        return drain

    def run(self) -> int:
        import signal

        from celery.worker import state as celery_state

        drain = self._watch_stop()

        def early_term(signum: int, frame: Any) -> None:
            # SIGTERM before Celery's consumer has installed its own handler (it may arrive
            # as soon as the heartbeat says ready): stop cleanly, as a warm shutdown would
            drain.request()
            celery_state.should_stop = 0

        signal.signal(signal.SIGTERM, early_term)
        if self.ctx is None:
            self.setup()
        assert self.info is not None
        import warnings

        from celery.platforms import SecurityWarning

        # Containers commonly run as root; JSON-only messages remove the risk the warning is
        # about (pickle), so it is noise here.
        warnings.filterwarnings("ignore", category=SecurityWarning)
        from celery.exceptions import Reject

        app = self.app
        worker = self

        @app.task(name=queues.RENDER_TASK, acks_late=True, bind=True)
        def render_task(task: Any, message: Any) -> None:
            # kombu's Redis transport carries the delivery tag in the message properties
            tag = (task.request.properties or {}).get("delivery_tag")
            queue = (task.request.delivery_info or {}).get("routing_key")
            try:
                worker.handle(message, tag, queue)
            except RetryableError as exc:
                # the broker or store is unwell: hand the stage back rather than lose it
                log.error("handing job back to its queue: %s", exc)
                time.sleep(min(5.0, self.settings.heartbeat_interval))
                raise Reject(str(exc), requeue=True) from None

        self.listener.start()
        threading.Thread(target=self._reconcile_loop, name="reconcile", daemon=True).start()

        crashes: list[float] = []
        exitcode = 0
        try:
            while celery_state.should_stop is None:
                consumer = app.Worker(pool="solo", concurrency=1, queues=self.info.queues,
                                      hostname=f"{self.name}@{socket.gethostname()}",
                                      loglevel="WARNING", quiet=True, without_gossip=True,
                                      without_mingle=True, without_heartbeat=True)
                consumer.start()
                exitcode = int(consumer.exitcode or 0)
                if not consumer.exitcode or celery_state.should_stop is not None \
                        or celery_state.should_terminate is not None:
                    break  # asked to stop (SIGTERM, --max-jobs): not a crash
                # The consumer died under us: a message that is not even JSON kills kombu's
                # Redis reader, for one. It was popped already, so consume again, with the
                # models still warm; give up only when it keeps happening.
                now = time.monotonic()
                crashes = [t for t in crashes if now - t < 60] + [now]
                if len(crashes) > 5:
                    self.echo(f"worker {self.name}: the consumer crashed {len(crashes)} times "
                              "in a minute; giving up")
                    break
                self.echo(f"worker {self.name}: the consumer stopped unexpectedly (exit "
                          f"{consumer.exitcode}); consuming again")
                # a message its in-flight record still holds goes back first: the next
                # consumer's first delivery writes a record of its own
                recovery.recover_own(self.redis, self.name or "")
            if self.quarantined_at is not None:
                exitcode = self._stay_quarantined()
        finally:
            self._stop.set()
            if self.finisher is not None:
                self.finisher.wait()   # a batch's end this worker is telling (summary, webhook)
            if self.taker is not None:
                self.taker.close()     # every message it took was acked or put back
            if self.ready_file is not None:
                self.ready_file.unlink(missing_ok=True)
            try:
                fleet.remove(self.redis, self.name or "")
                # an acked stage deleted its record; one still held (a consumer that gave up
                # mid-stage) goes back on its queue
                recovery.recover_own(self.redis, self.name or "")
            except Exception:  # noqa: BLE001 - the broker may be gone; a sweep puts it back
                pass
            self.echo(f"worker {self.name}: stopped after {self.done} jobs")
        return exitcode

    def _stay_quarantined(self) -> int:
        """Keep beating as quarantined (so `farm workers` shows it, with its last error) until
        quarantine_exit_seconds have passed, then exit non-zero: the platform restarts it."""
        assert self.quarantined_at is not None
        left = self.quarantined_at + self.settings.quarantine_exit_seconds - time.monotonic()
        if left > 0:
            self._stop.wait(left)
        self.echo(f"worker {self.name}: exiting quarantined (status {QUARANTINED_EXIT})")
        return QUARANTINED_EXIT

    # -- heartbeat -------------------------------------------------------------------------

    def _beat(self) -> None:
        if self.info is None:
            return
        self.info.last_seen = time.time()
        try:
            fleet.publish(self.redis, self.info, self.settings.heartbeat_ttl)
            self.metrics.beat()
        except Exception as exc:  # noqa: BLE001 - a missed beat is not a reason to stop work
            log.warning("heartbeat failed: %s", exc)

    def _progressed(self) -> None:
        self.progress = time.monotonic()

    def _reconcile_loop(self) -> None:
        """Find jobs whose message vanished (farm/recovery.py) and queue them again. Its own
        thread: it reads the store, which must never delay a heartbeat."""
        # batch -> (its jobs by id, the queues they use), or None for an aborted batch
        manifests: dict[str, Any] = {}
        while not self._stop.wait(self.settings.heartbeat_interval):
            try:
                self.metrics.recovered("reconcile", len(self.reconcile(manifests)))
            except Exception as exc:  # noqa: BLE001 - the next round (here or elsewhere) retries
                log.warning("reconciling open jobs failed: %s", exc)

    def reconcile(self, manifests: dict[str, Any]) -> list[str]:
        """One round, by one worker of the fleet at a time; returns the jobs queued again."""
        from dataclasses import replace

        from farm.errors import NotFound
        from farm.lifecycle import JobState, Stage, read_record
        from farm.records import read_manifest

        assert self.ctx is not None and self.finisher is not None
        every = max(self.settings.heartbeat_interval, self.settings.heartbeat_ttl / 2)
        if not self.redis.set(recovery.RECONCILE_LOCK, self.name or "", nx=True,
                              px=int(every * 1000)):
            return []
        again = []
        for batch in recovery.active_batches(self.redis):
            if batch not in manifests:
                if len(manifests) > 256:
                    manifests.clear()
                try:
                    manifest = read_manifest(self.ctx.store, batch, self.settings)
                except NotFound:  # cleaned away: nothing left to look for
                    self.redis.srem(recovery.ACTIVE_BATCHES, batch)
                    self.redis.delete(recovery.OPEN + batch, recovery.MISSING + batch)
                    continue
                # read and derived once per batch: its jobs by id, and the queues they use
                manifests[batch] = ({j.id: j for j in manifest.jobs},
                                    set().union(*(queues.job_queues(j) for j in manifest.jobs)))
            jobs, names = manifests[batch]
            done = recovery.ended(self.redis, batch)
            if done:
                # its last job ended: make sure its summary and webhook were done (their
                # finisher may have died); the batch then leaves the active set
                self.finisher.conclude(batch)
            for job_id in recovery.missing_jobs(self.redis, batch, names,
                                                grace=self.settings.heartbeat_ttl, done=done):
                recovery.forget_missing(self.redis, batch, job_id)
                job = jobs.get(job_id)
                record = read_record(self.ctx.store, batch, job_id)
                if job is None or (record is not None and record.state.final):
                    if record is not None:
                        self.finisher.noted(record)
                    recovery.job_ended(self.redis, batch, job_id)
                    continue
                if record is not None and record.state in (JobState.LATENTS_READY,
                                                           JobState.REFINING):
                    job = replace(job, stage=Stage.REFINER)
                if record is not None:
                    job = job.replanned(record.replanned)
                log.warning("job %s was in no queue and held by no worker for %.0f s (its "
                            "message was lost with a worker): queued again", job_id,
                            self.settings.heartbeat_ttl)
                self.ctx.enqueue(job)
                again.append(job_id)
        return again

    def _heartbeat_loop(self) -> None:
        """Beat; sweep up dead workers' stages; watch for a hung stage of our own."""
        while not self._stop.wait(self.settings.heartbeat_interval):
            self._beat()
            try:
                fleet.check_shared(self.redis, self.settings,
                                   claim_ttl=3 * self.settings.heartbeat_ttl)
                self.metrics.recovered("sweep", len(recovery.sweep(
                    self.redis, self.settings.heartbeat_interval,
                    orphan_seconds=self.settings.heartbeat_ttl)))
            except Exception as exc:  # noqa: BLE001 - the next sweep (here or elsewhere) retries
                log.warning("recovery sweep failed: %s", exc)
            began = self.progress
            over = self.deadline is not None and began is not None and \
                time.monotonic() > self.deadline
            if began is not None and (over or time.monotonic() - began >
                                      self.settings.hang_timeout):
                # No step for hang_timeout: a stuck kernel or driver. Python cannot interrupt
                # it, so this process leaves: its heartbeat stops, and the sweep of another
                # worker puts the stage back on its queue (attempts are capped).
                log.error("job %s made no progress for %.0f s: exiting so another worker can "
                          "take it", self.info.current_job if self.info else None,
                          time.monotonic() - began)
                fleet.remove(self.redis, self.name or "")
                os._exit(75)
