"""Queue names, the task name, and the order in which a worker consumes its queues.

One queue per (model, VRAM class, priority): `farm.tiny-sdxl.8gb.p5`. Each is exactly one Redis
list, so KEDA's Redis scaler can count it, and the order a worker's single BRPOP lists them in is
the whole scheduling policy (see `worker_queues`). The scheduler, the worker and the deployment
files all derive their names from here.

Why not Celery's message priorities: kombu's Redis transport splits a queue into one list per
priority step and, for a worker consuming several queues, orders BRPOP priority-major across
all of them. A 24 GB worker would then take an urgent 4 GB job before its own class's work. With
one queue per priority the order is exactly what we write below.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

from farm import models
from farm.jobs import PRIORITY_MAX, PRIORITY_MIN, Job

# The one task every worker runs; the scheduler sends it by name, so it never imports the worker.
RENDER_TASK = "farm.render"

QUEUE_PREFIX = "farm"

# kombu's Redis transport: a single priority step, so a queue is one list (see module doc)
PRIORITY_STEPS = [0]
PRIORITIES = tuple(range(PRIORITY_MAX, PRIORITY_MIN - 1, -1))   # 9 (most urgent) first


def queue_name(model: str, vram_class: int, priority: int) -> str:
    """farm.<model>.<class>gb.p<priority>; local paths become a short stable digest."""
    if not PRIORITY_MIN <= priority <= PRIORITY_MAX:
        raise ValueError(f"priority must be {PRIORITY_MIN}..{PRIORITY_MAX}, got {priority}")
    return f"{QUEUE_PREFIX}.{models.queue_slug(model)}.{vram_class}gb.p{priority}"


def parse_queue(name: str) -> tuple[str, int, int] | None:
    """(model, VRAM class, priority) of a name `queue_name` made (the model as its queue slug);
    None for any other name."""
    prefix, _, rest = name.partition(".")
    model, _, tail = rest.rpartition(".")
    model, _, size = model.rpartition(".")
    if prefix != QUEUE_PREFIX or not model or not size.endswith("gb") \
            or not size[:-2].isdigit() or not tail.startswith("p") or not tail[1:].isdigit():
        return None
    return model, int(size[:-2]), int(tail[1:])


def stage_queue(job: Job) -> str:
    """The queue a job's current stage goes to."""
    return queue_name(job.stage_model, job.stage_class, job.spec.priority)


def job_queues(job: Job) -> set[str]:
    """Every queue a job's messages can wait on: its first stage's, and its refiner's if split."""
    from dataclasses import replace

    from farm.lifecycle import Stage

    names = {stage_queue(job)}
    if job.refiner_vram_class is not None and job.spec.refiner:
        names.add(stage_queue(replace(job, stage=Stage.REFINER)))
    return names


def routes(model_names: Iterable[str], roles: Mapping[str, str] | None = None) -> list[str]:
    """What a worker serving `model_names` can run: each model, and each base+refiner pair
    it holds both halves of (split policy "never"). `roles`: a model's role where its name
    does not say it (a catalog model: its manifest's, farm/catalog.py `roles`)."""
    names = list(dict.fromkeys(model_names))
    given = roles or {}
    # a local path counts as a base, and so does a catalog model whose role is not given
    role = {n: given.get(n) or models.resolve(n).role for n in names}
    bases = [n for n in names if role[n] == "base"]
    refiners = [n for n in names if role[n] == "refiner"]
    return names + [models.pair_name(b, r) for b in bases for r in refiners]


def worker_queues(model_names: Iterable[str], own_class: int, classes: Iterable[int],
                  roles: Mapping[str, str] | None = None) -> list[str]:
    """Every queue a worker of `own_class` serving `model_names` consumes, in the order it
    takes work: its own class first (most urgent priority first), then each smaller class
    in turn. So it helps smaller cards only when its own class has nothing waiting, and no
    routable queue is left without a consumer: each is served by its own class's workers and
    by every bigger one."""
    names = routes(model_names, roles)
    order = []
    for c in sorted((c for c in classes if c <= own_class), reverse=True):
        for p in PRIORITIES:
            for m in names:
                order.append(queue_name(m, c, p))
    return order


def class_queues(model: str, vram_class: int) -> list[str]:
    """The queues (= Redis lists) holding waiting stages of one (model, class)."""
    return [queue_name(model, vram_class, p) for p in PRIORITIES]


def redis_lists(queue: str) -> list[str]:
    """The Redis lists that hold a queue's waiting messages: with one priority step, itself."""
    return [queue]
