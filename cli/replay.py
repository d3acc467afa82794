"""`farm replay IMAGE.png|SIDECAR.json`: submit again the exact job that made one image
(scheduler/replay.py reads it; the Python client's Farm.replay submits it). Imports no torch."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import click

from farm.cli.progress import exit_unless_succeeded, watch
from farm.settings import Settings


@click.command()
@click.argument("image", metavar="IMAGE.png|SIDECAR.json",
                type=click.Path(dir_okay=False, path_type=Path))
@click.option("--batch-id", help="The new batch's id (running the same replay again with it "
              "continues that batch).")
@click.option("--wait", is_flag=True, help="Wait for the render, then check that it was made "
              "with the same weights (exit 1 when not).")
@click.option("--json", "as_json", is_flag=True, help="Print {batch, jobs, model_hash} as JSON.")
def replay(image: Path, batch_id: str | None, wait: bool, as_json: bool) -> None:
    """Submit again the job that made IMAGE (a farm PNG, or its JSON sidecar): the same model,
    seed, sampler, size, steps, guidance, prompts, preset, refiner and switch."""
    from farm.scheduler.client import Farm

    settings = Settings.load()
    batch = Farm(settings).replay(image, batch_id=batch_id)
    found = batch.replayed
    assert found is not None and batch.submitted is not None
    spec = found.spec
    if as_json:
        click.echo(json.dumps({"batch": batch.id, "jobs": [j.id for j in batch.submitted.jobs],
                               "model_hash": found.model_hash}))
    else:
        click.echo(batch.id)
        refiner = f", refiner {spec.refiner} at {spec.switch:g}" if spec.refiner else ""
        click.echo(f"replaying {image}: {spec.model} (weights {found.model_hash[:12]}), seed "
                   f"{spec.seed}, {spec.width}x{spec.height}, {spec.steps} steps "
                   f"{spec.scheduler}{refiner}; `farm status {batch.id} --watch` follows it",
                   err=True)
    if not wait:
        return
    st = watch(settings, batch.id, quiet=as_json)
    exit_unless_succeeded(st)
    for result in batch.iter_results():
        if not found.same_weights(result.sidecar):
            click.echo(f"error: {result.key} was made with other weights: "
                       f"{result.sidecar.get('model_hash', '?')[:12]} on the workers now, "
                       f"{found.model_hash[:12]} when {image} was made", err=True)
            sys.exit(1)
