"""`farm deploy compose|k8s|skypilot`: write deployment files generated from this farm's own
settings and queue definitions (deploy/files.py). Imports no torch."""

from __future__ import annotations

from pathlib import Path

import click

from farm.errors import FarmError, UsageError
from farm.settings import Settings

NEXT_STEPS = {
    "compose": "cp env.example .env, fill it in, then: docker compose up -d",
    # the namespace first (farm.deploy.k8s.APPLY_STEPS)
    "k8s": "fill in secrets/farm-secrets.yaml, then: {apply}",
    "skypilot": "sky jobs launch --secret FARM_BROKER_URL --secret AWS_ACCESS_KEY_ID "
                "--secret AWS_SECRET_ACCESS_KEY {folder}/worker-<CLASS>gb.yaml{where}",
}


def parse_classes(text: str | None) -> list[int] | None:
    if text is None:
        return None
    parts = [p.strip() for p in text.split(",") if p.strip()]
    if not parts or not all(p.isdigit() for p in parts):
        raise UsageError(f"--classes must be a comma-separated list of GB such as 8,12,24, "
                         f"got {text!r}")
    return [int(p) for p in parts]


@click.command()
@click.argument("target", type=click.Choice(["compose", "k8s", "skypilot"]))
@click.option("--classes", help="VRAM classes to run workers for, e.g. 8,12,24 "
                                "(default: FARM_VRAM_CLASSES).")
@click.option("--model", "models_", multiple=True,
              help="Model the workers serve (repeat for several; default sdxl-base).")
@click.option("--out", type=click.Path(file_okay=False, path_type=Path),
              help="Folder to write into (default: ./deploy-out/TARGET).")
@click.option("--max-replicas", type=int, default=4, show_default=True,
              help="k8s: the most workers KEDA starts per class.")
@click.option("--image", help="Worker image (default: farm-worker:VERSION, built from "
                              "deploy/worker.Dockerfile). For skypilot, a pushed image makes "
                              "the tasks run in it instead of installing the checkout.")
@click.option("--control-image", help="Control image for the metrics exporter and the CLI "
                                      "service (default: farm-control:VERSION).")
@click.option("--hard-limit", type=int, default=1800, show_default=True,
              help="Seconds one stage may run; grace periods are set above it.")
@click.option("--namespace", default="farm", show_default=True, help="k8s namespace.")
@click.option("--redis", "redis_address",
              help="k8s: an existing Redis, as host:port, redis://host[:port] or "
                   "rediss://host[:port] for TLS (default: deploy one in the cluster).")
@click.option("--redis-ca", type=click.Path(dir_okay=False, path_type=Path),
              help="k8s: the PEM CA certificate that signed a rediss:// Redis's certificate "
                   "(default: the system's CAs).")
@click.pass_context
def deploy(ctx: click.Context, target: str, classes: str | None, models_: tuple[str, ...],
           out: Path | None, max_replicas: int, image: str | None, control_image: str | None,
           hard_limit: int, namespace: str, redis_address: str | None,
           redis_ca: Path | None) -> None:
    """Write deployment files for TARGET: compose (one host), k8s (Kubernetes + KEDA,
    autoscaling each VRAM class from zero) or skypilot (spot GPUs on any cloud)."""
    from farm.deploy import files as generator

    try:
        settings = Settings.load()
        spec = generator.make_spec(
            settings, classes=parse_classes(classes), model_names=models_, image=image,
            control_image=control_image, max_replicas=max_replicas, hard_limit=hard_limit,
            namespace=namespace, redis_address=redis_address, redis_ca=redis_ca)
        folder = out or Path("deploy-out") / target
        written = generator.write(generator.render(target, spec), folder)
    except FarmError as exc:
        click.echo(f"error: {exc}", err=True)
        ctx.exit(exc.exit_code)
    except OSError as exc:
        click.echo(f"error: cannot write {out or 'deploy-out'}: {exc.strerror}", err=True)
        ctx.exit(UsageError.exit_code)
    for path in written:
        click.echo(f"wrote {path}")
    if target == "skypilot":
        from farm.deploy.skypilot import STOP_GRACE

        # spot VMs get about 30 s: a stage that will not finish in time is handed back
        grace = f"stop grace {STOP_GRACE} s on spot (a longer stage is handed back)"
    else:
        grace = f"grace period {spec.grace_seconds} s (hard limit {spec.hard_limit} s)"
    click.echo(f"{target}: workers for {', '.join(f'{c} GB' for c in spec.classes)} serving "
               f"{', '.join(spec.models)}; {grace}", err=True)
    if spec.classes != settings.vram_classes:
        click.echo(f"note: these files set FARM_VRAM_CLASSES="
                   f"{','.join(map(str, spec.classes))}; set the same where you submit "
                   f"(farm.env), or jobs may be planned for classes no worker serves", err=True)
    if target != "compose" and spec.store_url is None:
        click.echo("note: FARM_STORE_URL is not an s3:// URL here, so the files leave the store "
                   "to fill in (k8s: 00-config.yaml; skypilot: --env FARM_STORE_URL=s3://...)",
                   err=True)
    from farm.deploy.k8s import APPLY_STEPS
    from farm.deploy.skypilot import uses_image

    where = "" if uses_image(spec) else "  (from the repository root: the tasks install the checkout)"
    step = NEXT_STEPS[target].format(folder=folder, apply=" && ".join(APPLY_STEPS), where=where)
    click.echo(f"next: {step}" if target == "skypilot" else f"next: cd {folder} && {step}",
               err=True)
