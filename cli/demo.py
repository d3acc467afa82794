"""`farm demo`: the whole path on the embedded farm, end to end, with nothing configured."""

from __future__ import annotations

from collections.abc import Callable
from importlib import resources
from pathlib import Path

from farm.cli import local
from farm.cli.progress import watch
from farm.scheduler.parse import parse_batch
from farm.scheduler.results import download
from farm.scheduler.submit import submit
from farm.settings import Settings
from farm.store import open_store


def demo_batch() -> str:
    return resources.files("farm.cli").joinpath("demo.jsonl").read_text()


def run_demo(settings: Settings, out: Path, workers: int, echo: Callable[[str], None]) -> None:
    # 1. a farm: the one already up, or our own (stopped again at the end)
    ours = not local.running_workers(settings)
    if ours:
        echo(f"starting an embedded farm under {settings.home} with {workers} worker(s)...")
        local.up(settings, workers=workers, model_names=["tiny-sdxl"], device="cpu", echo=echo)
    try:
        # 2. the built-in batch
        specs = parse_batch(demo_batch(), "jsonl", {"model": "tiny-sdxl"}, settings)
        result = submit(settings, specs, source="demo.jsonl", defaults={"model": "tiny-sdxl"})
        echo(f"submitted batch {result.batch}: {len(specs)} prompts, "
             f"{sum(s.n for s in specs)} images")
        # 3. progress until it ends
        status = watch(settings, result.batch)
        # 4. images, sidecars and the contact sheet
        got = download(open_store(settings), result.batch, out, settings)
    finally:
        if ours:
            stopped, _ = local.down(settings)
            echo(f"stopped the demo farm ({stopped} workers and the broker)")
    echo(f"batch {result.batch} {status.state}: {len(got.images)} images in {got.folder}/")
    for path in got.images:
        echo(f"  {path}")
    if got.contact_sheet:
        echo(f"contact sheet: {got.contact_sheet}")
