"""`farm metrics serve|show`: the control plane's Prometheus exporter (scheduler/exporter.py):
queue depths, live workers, active batches, read from Redis only. Imports no torch."""

from __future__ import annotations

import signal
import threading
from typing import Any

import click

from farm.errors import ConfigError, UsageError
from farm.settings import Settings

MODEL_HELP = ("Model whose queues to report (repeat for several; default: every known model). "
              "Queues of live workers are reported as well.")


@click.group()
def metrics() -> None:
    """The farm's queues and workers as Prometheus metrics (docs/metrics.md)."""


def _registry(models_: tuple[str, ...]) -> Any:
    from farm import broker, models
    from farm.scheduler import exporter

    settings = Settings.load()
    for name in models_:
        models.resolve(name, field="--model")
    return exporter.registry(broker.redis_client(settings), settings, models_)


@metrics.command()
@click.option("--port", type=int, default=None,
              help="Port to serve /metrics on (default 9461; 0: any free port).")
@click.option("--model", "models_", multiple=True, help=MODEL_HELP)
def serve(port: int | None, models_: tuple[str, ...]) -> None:
    """Serve /metrics until stopped (SIGTERM or Ctrl-C)."""
    from prometheus_client import start_http_server

    from farm.scheduler.exporter import DEFAULT_PORT

    port = DEFAULT_PORT if port is None else port
    if not 0 <= port <= 65535:
        raise UsageError(f"--port must be 0 (any free port) to 65535, got {port}")
    registry = _registry(models_)
    try:
        server, _ = start_http_server(port, registry=registry)
    except OSError as exc:
        raise ConfigError(f"--port {port}: cannot listen ({exc.strerror})") from None
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    click.echo(f"farm metrics: serving on port {server.server_port} (/metrics)", err=True)
    stop.wait()
    server.shutdown()


@metrics.command()
@click.option("--model", "models_", multiple=True, help=MODEL_HELP)
def show(models_: tuple[str, ...]) -> None:
    """Print one scrape, in Prometheus' text format."""
    from prometheus_client import generate_latest

    click.echo(generate_latest(_registry(models_)).decode(), nl=False)
