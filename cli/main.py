"""The `farm` command line. Imports farm and scheduler only; the worker (torch) is imported
lazily inside `farm worker`, so submit/status/results/batches start fast and torch-free."""

from __future__ import annotations

import hashlib
import json
import sys
import time
from pathlib import Path
from typing import Any

import click

from farm.cli.progress import batch_id as _batch_id
from farm.cli.progress import counts as _counts
from farm.cli.progress import exit_unless_succeeded as _exit_unless_succeeded
from farm.cli.progress import watch as _watch
from farm.errors import FarmError, NotFound, UsageError
from farm.settings import Settings
from farm.store import open_store


class FarmGroup(click.Group):
    """Every FarmError becomes one line on stderr and its exit code; no traceback."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except FarmError as exc:
            click.echo(f"error: {exc}", err=True)
            ctx.exit(exc.exit_code)


@click.group(cls=FarmGroup)
@click.version_option(package_name="farm")
def cli() -> None:
    """farm: a distributed render farm for Stable Diffusion XL."""


# -- submit ------------------------------------------------------------------------------------


@cli.command()
@click.argument("prompts", type=str)
@click.option("--model", help="Model name (tiny-sdxl, sdxl-base, ...) or absolute local path.")
@click.option("--steps", type=int, help="Denoising steps.")
@click.option("--guidance", type=float, help="Classifier-free guidance scale.")
@click.option("--size", help="WIDTHxHEIGHT, e.g. 1024x1024.")
@click.option("--seed", type=int, help="Seed of the first image (chosen and recorded if unset).")
@click.option("--n", "n", type=int, help="Images per prompt.")
@click.option("--negative", help="Negative prompt.")
@click.option("--scheduler", help="euler, euler_a, dpmpp_2m or ddim.")
@click.option("--priority", type=int, help="0 (lowest) to 9 (most urgent); default 5.")
@click.option("--min-vram", type=int, help="Run only on workers of at least this many GB.")
@click.option("--refiner", help="Refiner model: the base denoises up to --switch, it the rest.")
@click.option("--switch", type=float, help="Where the refiner takes over (0-1, default 0.9).")
@click.option("--split", type=click.Choice(["auto", "always", "never"]),
              help="Base and refiner on two workers through the store (always), on one "
                   "(never), or auto (default).")
@click.option("--preset", type=click.Choice(["balanced", "fast", "quality", "turbo"]),
              help="Job defaults from the SDXL guide (default: balanced).")
@click.option("--snap", is_flag=True, default=None,
              help="Move sizes that are not a bucket to the nearest bucket (else refused).")
@click.option("--batch-id", help="The batch's id (lowercase letters, digits, dashes). Running "
              "the same submit again with it continues that batch instead of making a new one.")
@click.option("--notify", metavar="URL", help="POST the batch's summary (JSON, signed with "
              "FARM_WEBHOOK_SECRET) to this http(s) URL when the batch ends.")
@click.option("--wait", is_flag=True, help="Wait until the batch ends, showing progress.")
@click.option("--json", "as_json", is_flag=True, help="Print {batch, jobs} as JSON.")
def submit(prompts: str, model: str | None, steps: int | None, guidance: float | None,
           size: str | None, seed: int | None, n: int | None, negative: str | None,
           scheduler: str | None, priority: int | None, min_vram: int | None,
           refiner: str | None, switch: float | None, split: str | None, preset: str | None,
           snap: bool | None, batch_id: str | None, notify: str | None, wait: bool,
           as_json: bool) -> None:
    """Submit PROMPTS (.txt, .jsonl, .csv, or - for stdin) and print the batch id."""
    from farm.scheduler.client import Farm
    from farm.scheduler.parse import detect_format, parse_batch, parse_size

    settings = Settings.load()
    if notify is not None:
        from farm.webhook import check_url

        check_url(notify)   # before anything is read or written
    defaults: dict[str, Any] = {"model": model, "steps": steps, "guidance": guidance,
                                "seed": seed, "n": n, "negative_prompt": negative,
                                "scheduler": scheduler, "priority": priority,
                                "min_vram": min_vram, "refiner": refiner, "switch": switch,
                                "split": split, "preset": preset, "snap": snap}
    if size is not None:
        defaults["width"], defaults["height"] = parse_size(size)
    defaults = {k: v for k, v in defaults.items() if v is not None}
    text = _read_prompts(prompts)
    specs = parse_batch(text, detect_format(prompts), defaults, settings)
    # what a retried submit must repeat: the lines and flags (seeds drawn for lines without
    # one are kept in the manifest, so a retry reuses them)
    request = hashlib.sha256(json.dumps({"text": text, "format": detect_format(prompts),
                                         "defaults": defaults,
                                         **({"notify": notify} if notify else {})},
                                        sort_keys=True).encode()).hexdigest()

    def announce(batch: str) -> None:
        if not as_json:
            click.echo(f"batch {batch}: queueing {len(specs)} jobs", err=True)

    batch = Farm(settings).submit_specs(specs, source=prompts, defaults=defaults,
                                        batch_id=batch_id, request=request, notify=notify,
                                        announce=announce)
    assert batch.submitted is not None
    result = batch.submitted
    snapped = [j for j in result.jobs if j.spec.snapped_from]
    if snapped:
        first = snapped[0].spec
        click.echo(f"{len(snapped)} job(s) snapped to the nearest bucket (e.g. "
                   f"{first.snapped_from} → {first.width}x{first.height})", err=True)
    if as_json:
        click.echo(json.dumps({"batch": result.batch, "jobs": [j.id for j in result.jobs]}))
    else:
        images = sum(j.spec.n for j in result.jobs)
        click.echo(result.batch)
        if result.continued:
            click.echo(f"continued batch {result.batch}: queued {result.sent} of its "
                       f"{len(result.jobs)} jobs again (the others ended or are running); "
                       f"`farm status {result.batch} --watch` follows it", err=True)
        else:
            click.echo(f"submitted {len(result.jobs)} jobs ({images} images); "
                       f"`farm status {result.batch} --watch` follows it", err=True)
    if wait:
        _exit_unless_succeeded(_watch(settings, result.batch, quiet=as_json, detail=False))


def _read_prompts(path: str) -> str:
    try:
        data = sys.stdin.buffer.read() if path == "-" else Path(path).read_bytes()
    except FileNotFoundError:
        raise UsageError(f"PROMPTS file {path!r} does not exist") from None
    except OSError as exc:
        raise UsageError(f"cannot read PROMPTS file {path!r}: {exc.strerror}") from None
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise UsageError(f"PROMPTS file {path!r} must be UTF-8 text (byte {exc.start} is not)") \
            from None


# -- status, results, batches -------------------------------------------------------------------


# a batch of at most this many jobs lists them in `farm status` (its records are read, in
# parallel); a larger one shows its counts, at the same cost whatever its size (`--jobs` lists)
LIST_JOBS_UP_TO = 50


@cli.command()
@click.argument("batch")
@click.option("--json", "as_json", is_flag=True,
              help="Print the status as JSON, with every job (reads every job record).")
@click.option("--jobs", "list_jobs", is_flag=True,
              help=f"List every job with its state and error (reads every job record; batches "
                   f"of up to {LIST_JOBS_UP_TO} jobs always list them).")
@click.option("--watch", is_flag=True, help="Show a progress bar until the batch ends.")
def status(batch: str, as_json: bool, list_jobs: bool, watch: bool) -> None:
    """Counts per state (from the batch's counters: the same cost for any size), and each
    job's state and error."""
    from farm.cli.progress import broker_client
    from farm.scheduler.status import Source, batch_counts, batch_status

    settings = Settings.load()
    batch = _batch_id(batch)
    store = open_store(settings)
    if watch:
        counted = _watch(settings, batch, quiet=as_json, detail=False)
    else:
        counted = batch_counts(store, _quietly(broker_client, settings), batch, settings)
    detail = None
    if as_json or list_jobs or counted.total <= LIST_JOBS_UP_TO:
        detail = batch_status(store, batch, settings)
    shown: Any = detail if detail is not None else counted
    live = _live_workers(settings) if not shown.finished else []
    if detail is not None and not detail.finished:
        detail = detail.with_fleet(live)
    lost = not shown.finished and not shown.half_submitted and _broker_lost(settings, batch)
    if as_json:
        assert detail is not None
        click.echo(json.dumps({**detail.to_json(), "source": counted.source.value,
                               "broker_lost": lost}, indent=2))
        return
    click.echo(f"batch {batch}: {shown.state}  " + _counts(shown.counts))
    if shown.half_submitted:
        click.echo(f"warning: this batch's submit stopped part-way (killed?), so some of its "
                   f"jobs may never have been queued; run the same `farm submit ... --batch-id "
                   f"{batch}` (same prompts and flags) to queue the rest, or `farm cancel "
                   f"{batch}` to drop it", err=True)
    elif shown.state == "aborted":
        assert shown.submit is not None
        click.echo(f"warning: this batch's submit failed ({shown.submit.reason}); workers "
                   f"render none of it; run the same `farm submit ... --batch-id {batch}` "
                   "to submit it again", err=True)
    if lost:
        waiting = counted.total - counted.done
        click.echo(f"warning: the broker has no record of this batch: it lost its data (a "
                   f"restart without persistence?), so its {waiting} unfinished job(s) will "
                   f"never run; `farm resubmit {batch}` queues them again", err=True)
    elif counted.source is Source.RECORDS:
        click.echo(f"note: the broker has no counters for this batch and the store no summary, "
                   f"so its {counted.total} job records were read to count it", err=True)
    if detail is None:
        _summary_lines(counted, live)
        return
    for job in detail.jobs:
        line = f"  {job.id}  {job.state.value:<9}"
        if job.images:
            line += f"  {len(job.images)} image(s)"
        if job.error:
            line += f"  {_fault_words(job.fault)}: {job.error}"
        elif job.failed_attempts:
            line += f"  ({len(job.failed_attempts)} failed attempt(s), worker trouble)"
        if job.note:
            line += f"  ({job.note})"
        if job.waiting:
            line += f"  ({job.waiting})"
        click.echo(line)


# failed jobs `farm status` names for a batch it shows by its counts (`--jobs` names all)
FAILED_LINES = 20


def _summary_lines(counted: Any, live: list[Any]) -> None:
    """What `farm status` says of a large batch beyond its counts: its failed jobs once known,
    and a hint when jobs wait with no live worker at all."""
    failed = counted.failed or []
    for job in failed[:FAILED_LINES]:
        click.echo(f"  {job['id']}  failed     {_fault_words(job.get('fault'))}: "
                   f"{job.get('error')}")
    if len(failed) > FAILED_LINES:
        click.echo(f"  ... and {len(failed) - FAILED_LINES} more failed jobs; `farm status "
                   f"{counted.batch} --jobs` lists every job")
    waiting = counted.by_state.get("queued", 0) + counted.by_state.get("latents_ready", 0)
    if not counted.finished and waiting and not live:
        click.echo(f"  ({waiting} job(s) waiting: no live worker; `farm status "
                   f"{counted.batch} --jobs` says what each needs)")


def _quietly(make: Any, settings: Settings) -> Any:
    """`make(settings)`, or None when the broker cannot be reached (status works offline)."""
    import redis

    try:
        return make(settings)
    except (redis.RedisError, OSError, FarmError):
        return None


def _fault_words(fault: str | None) -> str:
    """Whose fault a failure was, as status says it."""
    return {"worker": "worker trouble",
            "oom": "out of memory", "job": "job error"}.get(fault or "", "error")


def _broker_lost(settings: Settings, batch: str) -> bool:
    """True when the broker answers but has no note of the batch (scheduler/submit.py)."""
    import redis

    from farm import broker
    from farm.scheduler.submit import batch_marker

    if settings.embedded and not broker.embedded_running(settings):
        return False  # not running is not lost: its append-only file comes back with it
    try:
        return not broker.redis_client(settings).exists(batch_marker(batch))
    except (redis.RedisError, OSError):
        return False


def _live_workers(settings: Settings) -> list[Any]:
    """Live workers, or none when the broker cannot be asked (status still works offline)."""
    import redis

    from farm import broker, fleet

    if settings.embedded and not broker.embedded_running(settings):
        return []
    try:
        return fleet.live_workers(broker.redis_client(settings))
    except (redis.RedisError, OSError):  # an unreachable broker only costs the hint
        return []


@cli.command()
@click.option("--json", "as_json", is_flag=True)
@click.option("--limit", type=int, default=20, show_default=True)
def batches(as_json: bool, limit: int) -> None:
    """Recent batches with their state counts, newest first."""
    from farm.cli.progress import broker_client
    from farm.scheduler.status import recent_batches

    settings = Settings.load()
    found = recent_batches(open_store(settings), _quietly(broker_client, settings), settings,
                           limit)
    if as_json:
        click.echo(json.dumps([{"batch": b.batch, "created_at": b.created_at, "state": b.state,
                                "counts": b.counts, "jobs": b.total, "source": b.source.value}
                               for b in found], indent=2))
        return
    if not found:
        click.echo("no batches yet")
    for b in found:
        created = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(b.created_at))
        click.echo(f"{b.batch}  {created}  {b.state:<9}  {b.total:>5} jobs  "
                   + _counts(b.counts))
    counted = [b.batch for b in found if b.source.value == "records"]
    if counted:
        click.echo(f"note: the broker has no counters and the store no summary for "
                   f"{', '.join(counted)}: their job records were read to count them", err=True)


# -- workers and the local farm ----------------------------------------------------------------


@cli.command()
@click.option("--model", "models_", multiple=True, help="Model to serve (repeat for several).")
@click.option("--device", default=None, help="cpu, cuda:N, or auto (default).")
@click.option("--max-jobs", type=int, default=None, help="Exit after this many jobs.")
@click.option("--name", default=None, help="Worker name (default: host-device-pid).")
@click.option("--vram", default=None,
              help="VRAM class in GB (4, 6, 8, 12, 16, 24, 48, 80) or auto (default).")
@click.option("--profile", default=None, help="Load profile (default: the class's).")
@click.option("--compile", "compile_", default=None,
              type=click.Choice(["inductor", "regional", "none", "onediff"]),
              help="Compile the UNet (default: regional on CUDA, none on CPU).")
@click.option("--recipe", default=None, metavar="OPTIONS",
              help="GPU recipe options, comma-separated: fuse-qkv, channels-last, compile-vae, "
                   "cuda-graphs, fp8; or none (FARM_RECIPE; default: the device's).")
@click.option("--stop-grace", type=float, default=None, metavar="SECONDS",
              help="Seconds the platform allows between SIGTERM and SIGKILL (default 30, "
                   "FARM_STOP_GRACE): a stage that fits finishes, else it is handed back.")
@click.option("--metrics-port", type=int, default=None, metavar="PORT",
              help="Serve Prometheus metrics on this port (FARM_METRICS_PORT; 0: any free "
                   "port; default: none). Each worker on a machine needs its own.")
@click.option("--batch-jobs", type=int, default=None, metavar="N",
              help="Throughput mode: render up to N queued jobs that share model, size, steps "
                   "and sampler in one pipeline call (FARM_BATCH_JOBS; default 1: each alone).")
def worker(models_: tuple[str, ...], device: str | None, max_jobs: int | None,
           name: str | None, vram: str | None, profile: str | None,
           compile_: str | None, recipe: str | None, stop_grace: float | None,
           metrics_port: int | None, batch_jobs: int | None) -> None:
    """Run one worker in the foreground: load and warm its pipelines, then take jobs."""
    import logging

    logging.basicConfig(level=logging.INFO, stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("celery").setLevel(logging.WARNING)
    from farm.worker.runtime import Worker

    settings = Settings.load(device=device, vram=vram, profile=profile, compile=compile_,
                             recipe=recipe, stop_grace=stop_grace, metrics_port=metrics_port,
                             batch_jobs=batch_jobs)
    w = Worker(settings, list(models_), device=settings.device, name=name, max_jobs=max_jobs,
               echo=lambda m: click.echo(m, err=True))
    sys.exit(w.run())


@cli.command()
@click.option("--workers", "n_workers", type=int, default=1, show_default=True)
@click.option("--model", "models_", multiple=True, help="Model to serve (repeat for several).")
@click.option("--device", default="auto", show_default=True, help="cpu, cuda:N or auto.")
@click.option("--vram", default=None,
              help="VRAM class of the workers; a list (4,8,24) is dealt out in turn.")
def up(n_workers: int, models_: tuple[str, ...], device: str, vram: str | None) -> None:
    """Start the embedded farm in the background (broker + N local workers)."""
    from farm.cli import local

    settings = Settings.load()
    running = local.running_workers(settings)
    if running:
        click.echo(f"farm is already up with {len(running)} worker(s) "
                   f"(pids {', '.join(str(w.pid) for w in running)}); `farm down` stops it")
        return
    if n_workers < 1:
        raise UsageError(f"--workers must be at least 1, got {n_workers}")
    classes = [c.strip() for c in vram.split(",")] if vram else []
    for c in classes:
        if c != "auto" and (not c.isdigit() or int(c) not in settings.vram_classes):
            raise UsageError(f"--vram must list classes among "
                             f"{', '.join(map(str, settings.vram_classes))}, got {c!r}")
    started = local.up(settings, workers=n_workers, model_names=list(models_), device=device,
                       echo=lambda m: click.echo(m, err=True), vram=classes)
    click.echo(f"farm is up: {len(started)} worker(s), logs in {settings.log_dir}/")


@cli.command()
@click.option("--json", "as_json", is_flag=True)
def workers(as_json: bool) -> None:
    """Live workers, from their heartbeats."""
    from farm import broker, fleet

    settings = Settings.load()
    if settings.embedded and not broker.embedded_running(settings):
        found: list[fleet.WorkerInfo] = []
    else:
        broker.wait_for_broker(settings)
        found = fleet.live_workers(broker.redis_client(settings))
    found.sort(key=lambda w: (-w.vram_class, w.name))
    if as_json:
        click.echo(json.dumps([w.__dict__ for w in found], indent=2))
        return
    if not found:
        click.echo("no live workers")
        return
    now = time.time()
    header = ("NAME", "HOST", "DEVICE", "CLASS", "PROFILE", "COMPILE", "MODELS", "STATE", "JOB",
              "DONE", "SEEN")
    rows = [(w.name, w.host, w.device, f"{w.vram_class} GB", w.profile, _compile_cell(w),
             ",".join(w.models), w.state, w.current_job or "-", str(w.jobs_done),
             f"{now - w.last_seen:.0f}s ago") for w in found]
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    for row in [header, *rows]:
        click.echo("  ".join(cell.ljust(widths[i]) for i, cell in enumerate(row)).rstrip())
    for w in found:
        if w.state == fleet.WorkerState.QUARANTINED:
            click.echo(f"{w.name} is quarantined (it failed {settings.quarantine_after} stages "
                       f"of different jobs in a row; it exits so its platform restarts it); "
                       f"last error: {w.last_error}")


def _compile_cell(w: Any) -> str:
    c = w.compile or {}
    if not c or c.get("backend") == "none":
        return "none"
    cache = f", cache {c['cache']}" if c.get("cache", "off") != "off" else ""
    return f"{c.get('backend')} {c.get('state')} {c.get('seconds', 0):.0f}s{cache}"


@cli.command()
@click.argument("batch")
def resubmit(batch: str) -> None:
    """Queue again the unfinished jobs of a batch (after the broker lost its data)."""
    from farm.scheduler.submit import resubmit as do_resubmit

    settings = Settings.load()
    again = do_resubmit(settings, _batch_id(batch))
    click.echo(f"queued {len(again)} unfinished job(s) of {batch} again")


@cli.command()
@click.argument("target")
def cancel(target: str) -> None:
    """Cancel a batch or one job: queued stages never start, running ones stop within a step."""
    from farm.scheduler.cancel import cancel as do_cancel

    settings = Settings.load()
    if not _is_id(target):
        raise NotFound(f"{target!r} is not a batch or job id")
    result = do_cancel(settings, open_store(settings), target)
    click.echo(f"batch {result.batch}: {len(result.marked)} canceled, "
               f"{len(result.stopping)} stopping within one step, "
               f"{len(result.done)} already finished")


def _is_id(text: str) -> bool:
    from farm.jobs import is_id

    return is_id(text)


@cli.command()
@click.option("--older-than", type=float, default=None,
              help="Hours since the job ended (default: FARM_INTERMEDIATE_TTL_HOURS, 24).")
@click.option("--dry-run", is_flag=True, help="Only list what would be removed.")
def clean(older_than: float | None, dry_run: bool) -> None:
    """Remove base → refiner latents of jobs that ended (failed or canceled) long enough ago."""
    from farm.scheduler.clean import clean_intermediates

    settings = Settings.load()
    done = clean_intermediates(open_store(settings), settings, older_than, dry_run)
    for key in done.deleted:
        click.echo(("would remove " if dry_run else "removed ") + key)
    click.echo(f"{len(done.deleted)} intermediate(s) {'to remove' if dry_run else 'removed'}, "
               f"{done.kept} kept (jobs still running or ended recently)")


@cli.command()
def down() -> None:
    """Stop the local workers and the embedded broker."""
    from farm.cli import local

    settings = Settings.load()
    workers, broker_stopped = local.down(settings)
    parts = [f"stopped {workers} worker(s)"]
    if broker_stopped:
        parts.append("and the embedded broker")
    click.echo(" ".join(parts) if (workers or broker_stopped) else "farm was not running")


@cli.command()
@click.option("--out", type=click.Path(file_okay=False, path_type=Path),
              default=Path("farm-demo"), show_default=True)
@click.option("--workers", "n_workers", type=int, default=2, show_default=True)
def demo(out: Path, n_workers: int) -> None:
    """Start a farm, render a built-in batch, download it with a contact sheet, stop."""
    from farm.cli.demo import run_demo

    run_demo(Settings.load(), out, n_workers, echo=click.echo)


def _register() -> None:
    from farm.cli.deploy import deploy
    from farm.cli.metrics import metrics
    from farm.cli.models import models
    from farm.cli.replay import replay
    from farm.cli.results import gallery, results

    cli.add_command(deploy)
    cli.add_command(metrics)
    cli.add_command(models)
    cli.add_command(results)
    cli.add_command(gallery)
    cli.add_command(replay)


_register()


def main(argv: list[str] | None = None) -> None:
    cli.main(args=argv, prog_name="farm")


if __name__ == "__main__":
    main()
