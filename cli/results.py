"""`farm results` and `farm gallery`: a batch's images here, as a gallery, or as links that work
without credentials (docs/results.md)."""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import click

from farm.cli.progress import batch_id, broker_client, counts, exit_unless_succeeded, watch
from farm.errors import UsageError
from farm.settings import Settings
from farm.store import DOWNLOAD_THREADS, Store, open_store

EXPIRES_HELP = "How long links work: 90s, 30m, 12h, 1d (the most: 7d, S3's limit)."


@contextmanager
def progress(store: Store, batch: str, settings: Settings
             ) -> Iterator[Callable[[Any], None]]:
    """A progress bar (rate, ETA) over the batch's images, on stderr; quiet when stdout is not
    a terminal. Yields what to call as each image lands."""
    from tqdm import tqdm

    from farm.scheduler.results import Landed, planned_images

    bar = tqdm(total=planned_images(store, batch, settings), unit="img", desc=batch,
               file=sys.stderr, disable=not sys.stdout.isatty(), dynamic_ncols=True)
    here = 0

    def tick(item: Any) -> None:
        nonlocal here
        if isinstance(item, Landed) and not item.fetched:
            here += 1
            bar.set_postfix_str(f"{here} already here", refresh=False)
        bar.update(1)

    try:
        yield tick
    finally:
        bar.total = bar.n  # failed or canceled jobs make fewer images than planned
        bar.close()


def _client(settings: Settings) -> Any:
    """A Redis client for the batches' counters, or None when the broker cannot be reached
    (the store answers: each batch's summary, else its records)."""
    import redis

    from farm.errors import FarmError

    try:
        return broker_client(settings)
    except (redis.RedisError, OSError, FarmError):
        return None


@click.command()
@click.argument("batch")
@click.option("-o", "--out", type=click.Path(file_okay=False, path_type=Path),
              help="Folder to download into (default: ./BATCH).")
@click.option("--wait", is_flag=True, help="Wait for the batch to end first.")
@click.option("--follow", is_flag=True,
              help="Download each image as its job succeeds; exit when the batch ends.")
@click.option("--urls", is_flag=True,
              help="Print a link to each image that works without credentials (S3), instead.")
@click.option("--expires", default="1d", show_default=True, help=EXPIRES_HELP)
@click.option("--sheets/--no-sheets", default=True, show_default=True,
              help="Make contact sheets (and the thumbnails they are built from).")
def results(batch: str, out: Path | None, wait: bool, follow: bool, urls: bool,
            expires: str, sheets: bool) -> None:
    """Download every image with its JSON sidecar, and contact sheets (100 images each).
    Files already here and whole are skipped."""
    from farm.scheduler.results import download
    from farm.scheduler.share import parse_expires
    from farm.scheduler.status import batch_counts

    settings = Settings.load()
    batch = batch_id(batch)
    store = open_store(settings)
    if urls:
        seconds = parse_expires(expires)
        _print_urls(store, batch, settings, seconds)
        return
    if wait and follow:
        raise UsageError("--wait and --follow: choose one (--follow downloads while it waits)")
    client = _client(settings)
    if wait:
        watch(settings, batch, detail=False)
    else:
        batch_counts(store, client, batch, settings)  # an unknown batch: one line, exit 2
    with progress(store, batch, settings) as tick:
        got = download(store, batch, out or Path(batch), settings, follow=follow, on_image=tick,
                       client=client, sheets=sheets)
    click.echo(f"{len(got.images)} images and sidecars in {got.folder}/ "
               f"({got.fetched} downloaded, {got.skipped} already here)")
    for sheet in got.contact_sheets:
        click.echo(f"contact sheet: {sheet}")
    if got.missing:
        click.echo(f"warning: {len(got.missing)} image(s) of succeeded jobs are not in the "
                   f"store: {', '.join(got.missing[:3])}", err=True)
    st = batch_counts(store, client, batch, settings)
    if not st.finished:
        click.echo(f"batch is still {st.state}: {counts(st.counts)}", err=True)
    if wait or follow:
        exit_unless_succeeded(st)


def _print_urls(store: Store, batch: str, settings: Settings, seconds: int) -> None:
    from concurrent.futures import ThreadPoolExecutor

    from farm.scheduler.results import Succeeded, all_images_if_succeeded
    from farm.scheduler.share import check_shareable, urls

    check_shareable(store)
    images = all_images_if_succeeded(store, batch, settings, _client(settings))  # unknown: exit 2
    if images is None:
        with ThreadPoolExecutor(max_workers=DOWNLOAD_THREADS) as pool:
            images = Succeeded(store, batch).look(pool)
    for url in urls(store, images, seconds):
        click.echo(url)


@click.command()
@click.argument("batch")
@click.option("-o", "--out", type=click.Path(file_okay=False, path_type=Path),
              help="Folder to write it in, with the images (default: ./BATCH).")
@click.option("--store", "into_store", is_flag=True,
              help="Write it into the store beside the batch (batches/BATCH/gallery/).")
@click.option("--share", is_flag=True,
              help="Into the store with presigned links; print one link to it (S3).")
@click.option("--expires", default="1d", show_default=True, help=EXPIRES_HELP)
@click.option("--follow", is_flag=True, help="Wait for the batch to end, downloading as it goes "
                                             "(local galleries).")
def gallery(batch: str, out: Path | None, into_store: bool, share: bool, expires: str,
            follow: bool) -> None:
    """A static HTML gallery of the batch: thumbnails, prompt, seed, size, model, sampler,
    timings, links to each PNG and sidecar, and a text filter."""
    from farm.scheduler.gallery import publish, write_local
    from farm.scheduler.share import check_shareable, parse_expires
    from farm.scheduler.status import batch_counts

    settings = Settings.load()
    batch = batch_id(batch)
    store = open_store(settings)
    if sum((out is not None, into_store, share)) > 1:
        raise UsageError("--out, --store and --share: choose one")
    seconds = parse_expires(expires) if share else None
    if share:
        check_shareable(store)
    client = _client(settings)
    batch_counts(store, client, batch, settings)  # an unknown batch: one line, exit 2
    if into_store or share:
        if follow:
            raise UsageError("--follow writes a local gallery; with --store or --share, run "
                             "it when the batch has ended")
        with progress(store, batch, settings) as tick:
            where = publish(store, batch, settings, share_seconds=seconds, on_image=tick,
                            client=client)
        click.echo(where if share else f"gallery: {store.url}/{where}")
        return
    with progress(store, batch, settings) as tick:
        page = write_local(store, batch, out or Path(batch), settings, follow=follow,
                           on_image=tick, client=client)
    click.echo(f"gallery: {page}")
