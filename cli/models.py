"""`farm models push|ls|show|verify|rm`: the fleet's model catalog in the farm's store
(farm/catalog.py, docs/models.md). Only `push` imports torch (it converts weights)."""

from __future__ import annotations

import json
import re
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import click

from farm import blobs, catalog
from farm.errors import IntegrityError, NotFound, StoreUnavailable
from farm.settings import Settings
from farm.store import open_store


@click.group()
def models() -> None:
    """Models pushed once into the farm's store, pulled by every worker (docs/models.md)."""


def _default_name(source: str) -> str:
    stem = Path(source.rstrip("/")).name
    stem = stem.removesuffix(".safetensors")
    return re.sub(r"[^a-z0-9._-]+", "-", stem.lower()).strip("-._")[:64] or "model"


def _echo_json(value: Any) -> None:
    click.echo(json.dumps(value, indent=2, sort_keys=True))


def _gb(n: int) -> str:
    return f"{n / 1e9:.2f} GB" if n >= 1e8 else f"{n / 1e6:.1f} MB"


@models.command()
@click.argument("source")
@click.option("--name", default=None, help="Catalog name (default: from SOURCE).")
@click.option("--variant", type=click.Choice(catalog.VARIANTS), default="fp16",
              show_default=True, help="fp16: 16-bit weights; fp8: the UNet's in float8_e4m3fn.")
@click.option("--json", "as_json", is_flag=True, help="Print the manifest as JSON.")
def push(source: str, name: str | None, variant: str, as_json: bool) -> None:
    """Slim SOURCE (a diffusers folder, a .safetensors file, a VAE's folder, or a Hub id of
    one in the local Hugging Face cache) and upload it as the next version of NAME. Whether
    it is a base, a refiner or a VAE is read from its config."""
    from farm.worker.push import push as push_model

    settings = Settings.load()
    manifest = push_model(open_store(settings), source, name or _default_name(source), variant,
                          echo=(lambda m: click.echo(m, err=True)) if as_json else click.echo)
    if as_json:
        _echo_json({"digest": manifest.digest, **manifest.encode()})


@models.command(name="ls")
@click.option("--json", "as_json", is_flag=True)
def ls(as_json: bool) -> None:
    """Every model version in the catalog."""
    found = catalog.manifests(open_store(Settings.load()))
    if as_json:
        _echo_json([{"ref": m.ref, "digest": m.digest, "variant": m.variant, "role": m.role,
                     "size": m.size, "files": len(m.files), "source": m.source,
                     "created_at": m.created_at} for m in found])
        return
    if not found:
        click.echo("the catalog is empty: farm models push SOURCE")
        return
    click.echo(f"{'model':<28} {'variant':<7} {'role':<7} {'size':>10} {'digest':<14} source")
    for m in found:
        click.echo(f"{m.ref:<28} {m.variant:<7} {m.role:<7} {_gb(m.size):>10} "
                   f"{m.digest[:12]:<14} {m.source}")


@models.command()
@click.argument("ref")
@click.option("--json", "as_json", is_flag=True)
def show(ref: str, as_json: bool) -> None:
    """One model version: its files, components, dtypes, source and slimming."""
    m = catalog.find(open_store(Settings.load()), ref)
    if as_json:
        _echo_json({"digest": m.digest, **m.encode()})
        return
    created = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(m.created_at))
    click.echo(f"{m.ref}  sha256:{m.digest}\n  variant {m.variant}, role {m.role}, layout "
               f"{m.layout}, {len(m.files)} files, {_gb(m.size)}, pushed {created}\n"
               f"  source {m.source} (revision {m.revision})")
    for part in sorted(m.bytes_after):
        before, after = m.bytes_before.get(part, 0), m.bytes_after[part]
        if not before and not after:  # a component with no weights (scheduler, tokenizer)
            continue
        share = f" ({after / before:.0%})" if before else ""
        click.echo(f"  {part:<16} {', '.join(m.dtypes.get(part, [])):<24} "
                   f"{_gb(before)} -> {_gb(after)}{share}")
    for step in m.slimming:
        click.echo(f"  slimmed: {step}")


@models.command()
@click.argument("ref")
@click.option("--json", "as_json", is_flag=True)
def verify(ref: str, as_json: bool) -> None:
    """Download every blob of a model version and check its sha256; exit 4 when one is
    missing or corrupt."""
    store = open_store(Settings.load())
    m = catalog.find(store, ref)

    def check(f: catalog.ModelFile) -> dict[str, Any]:
        with tempfile.TemporaryDirectory(prefix="farm-verify-") as tmp:
            try:
                blobs.fetch(store, f.sha256, f.size, Path(tmp) / "blob")
                state = "ok"
            except NotFound:
                state = "missing"
            except IntegrityError as exc:
                state = f"corrupt: {exc}"
            except StoreUnavailable as exc:
                state = f"unreadable: {exc}"
        return {"path": f.path, "sha256": f.sha256, "size": f.size, "state": state}

    with ThreadPoolExecutor(max_workers=4) as pool:
        results = list(pool.map(check, m.files))
    bad = [r for r in results if r["state"] != "ok"]
    if as_json:
        _echo_json({"ref": m.ref, "digest": m.digest, "ok": not bad, "files": results})
    else:
        for r in bad:
            click.echo(f"{r['path']}: {r['state']}")
    if bad:
        raise IntegrityError(f"{m.ref}: {len(bad)} of {len(results)} files missing or corrupt "
                             f"in {store.url}; push the model again")
    if not as_json:
        click.echo(f"{m.ref}: all {len(results)} files present and whole ({_gb(m.size)})")


@models.command()
@click.argument("ref")
@click.option("--json", "as_json", is_flag=True)
def rm(ref: str, as_json: bool) -> None:
    """Remove NAME (every version) or NAME@VERSION, and every blob no other version uses."""
    gone, dropped = catalog.remove(open_store(Settings.load()), ref)
    if as_json:
        _echo_json({"removed": [m.ref for m in gone], "blobs_removed": dropped})
        return
    click.echo(f"removed {', '.join(m.ref for m in gone)}; {len(dropped)} blobs deleted")
