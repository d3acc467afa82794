"""Queue names, the task name, and how a job's priority becomes a Redis message priority.

The scheduler and the worker both route with these functions, so they cannot drift apart;
deployment files (KEDA triggers) derive their Redis list names from here too.
"""

from __future__ import annotations

from farm import models
from farm.jobs import PRIORITY_MAX, PRIORITY_MIN

# The one task every worker runs; the scheduler sends it by name, so it never imports the worker.
RENDER_TASK = "farm.render"

QUEUE_PREFIX = "farm"

# kombu's Redis transport keeps one list per priority step and serves lower numbers first.
# Ten steps give every job priority its own list (users say 9 = most urgent, kombu 0 = first).
PRIORITY_STEPS = list(range(PRIORITY_MIN, PRIORITY_MAX + 1))
# kombu's default separator is "\x06\x16"; a printable one keeps the list names readable in
# redis-cli and in KEDA triggers.
PRIORITY_SEP = ":"


def queue_name(model: str) -> str:
    """The queue a stage for `model` goes to: farm.tiny-sdxl, farm.sdxl-base, farm.path-…"""
    return f"{QUEUE_PREFIX}.{models.queue_slug(model)}"


def message_priority(job_priority: int) -> int:
    """Job priority 0..9 (9 most urgent) → kombu Redis priority (0 served first)."""
    return PRIORITY_MAX - job_priority


def redis_lists(queue: str) -> list[str]:
    """Every Redis list that holds waiting messages of `queue` (one per priority step)."""
    lists = []
    for step in PRIORITY_STEPS:
        lists.append(queue if step == 0 else f"{queue}{PRIORITY_SEP}{step}")
    return lists
