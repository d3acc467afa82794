"""`farm gallery BATCH`: a static HTML page of a batch's images (templates/gallery.html.j2):
a thumbnail of each with its prompt, seed, size, model, sampler and timings, links to the full
PNG and its sidecar, and a text filter (a few lines of plain JavaScript).

Three places it can go:

    local  (--out DIR)   DIR/index.html, the images and sidecars beside it (as `farm results`
                         lays them out, so the two share a folder), DIR/thumbs/
    store  (--store)     batches/<id>/gallery/index.html and gallery/thumbs/, linking to the
                         batch's images by relative links (../images/...)
    shared (--share)     batches/<id>/gallery/shared.html, whose every link is presigned, and one
                         presigned link to the page itself: it works without credentials until
                         it expires (S3 only)
"""

from __future__ import annotations

import json
import tempfile
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

from farm import keys
from farm.scheduler.results import Landed, land
from farm.scheduler.sheets import THUMBS
from farm.settings import Settings
from farm.store import DOWNLOAD_THREADS, Store, presign

INDEX = "index.html"
SHARED = "shared.html"


@dataclass(frozen=True)
class Card:
    name: str            # the image's file name without .png
    prompt: str
    negative: str
    seed: str
    size: str
    model: str
    sampler: str
    timings: str
    image_href: str
    sidecar_href: str
    thumb_href: str

    @property
    def text(self) -> str:
        """What the filter matches, lowercased."""
        return " ".join((self.name, self.prompt, self.negative, self.seed, self.size,
                         self.model, self.sampler)).lower()


def card(sidecar: dict[str, Any], name: str, hrefs: Callable[[str], str]) -> Card:
    """A card from an image's sidecar; `hrefs` turns "x.png", "x.json", "thumbs/x.jpg" into
    the links the page uses."""
    timings = sidecar.get("timings") or {}
    return Card(
        name=name, prompt=str(sidecar.get("prompt", "")),
        negative=str(sidecar.get("negative_prompt") or ""),
        seed=str(sidecar.get("seed", "")),
        size=f"{sidecar.get('width', '?')}x{sidecar.get('height', '?')}",
        model=str(sidecar.get("model", "")),
        sampler=f"{sidecar.get('scheduler', '')}, {sidecar.get('steps', '?')} steps, "
                f"cfg {sidecar.get('guidance', '?')}",
        timings=", ".join(f"{k} {v}" for k, v in sorted(timings.items())) or "-",
        image_href=hrefs(f"{name}.png"), sidecar_href=hrefs(f"{name}.json"),
        thumb_href=hrefs(f"{THUMBS}/{name}.jpg"))


def render(batch: str, cards: list[Card], note: str = "") -> str:
    import jinja2

    template = resources.files("farm.scheduler").joinpath("templates/gallery.html.j2")
    env = jinja2.Environment(autoescape=True, undefined=jinja2.StrictUndefined)
    page: str = env.from_string(template.read_text()).render(
        batch=batch, cards=sorted(cards, key=lambda c: c.name), note=note)
    return page


def _card_of(item: Landed, hrefs: Callable[[str], str]) -> Card:
    return card(json.loads(item.sidecar.read_text()), item.path.stem, hrefs)


def write_local(store: Store, batch: str, out: Path, settings: Settings, *,
                follow: bool = False, on_image: Callable[[Landed | str], None] | None = None,
                client: Any = None) -> Path:
    """The batch's images into `out` (skipping those already whole), and `out/index.html`."""
    cards = []
    for item in land(store, batch, out, settings, follow=follow, client=client):
        if isinstance(item, Landed):
            cards.append(_card_of(item, lambda rel: rel))
        if on_image is not None:
            on_image(item)
    page = out / INDEX
    page.write_text(render(batch, cards))
    return page


def publish(store: Store, batch: str, settings: Settings, *, share_seconds: int | None = None,
            on_image: Callable[[Landed | str], None] | None = None, client: Any = None) -> str:
    """The gallery into the store beside the batch; returns its key, or with `share_seconds`
    a presigned link to a page whose every link is presigned for as long."""
    gallery = keys.gallery_prefix(batch)
    images = keys.images_prefix(batch)

    def hrefs(rel: str) -> str:
        key = gallery + rel if rel.startswith(f"{THUMBS}/") else images + rel
        if share_seconds is not None:
            return presign(store, key, share_seconds)
        return "../images/" + rel if key.startswith(images) else rel

    cards = []
    with tempfile.TemporaryDirectory(prefix="farm-gallery-") as tmp, \
            ThreadPoolExecutor(max_workers=DOWNLOAD_THREADS) as uploads:
        sent: list[Future[str]] = []
        for item in land(store, batch, Path(tmp), settings, client=client):
            if isinstance(item, Landed):
                cards.append(_card_of(item, hrefs))
                thumb = item.thumb.read_bytes()
                item.path.unlink()  # only the thumbnail is needed: disk stays small too
                sent.append(uploads.submit(store.put, f"{gallery}{THUMBS}/{item.path.stem}.jpg",
                                           thumb, content_type="image/jpeg"))
            if on_image is not None:
                on_image(item)
        for future in sent:
            future.result()
    name = SHARED if share_seconds is not None else INDEX
    note = ""
    if share_seconds is not None:
        until = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime(time.time() + share_seconds))
        note = f"links work until {until}"
    store.put(gallery + name, render(batch, cards, note).encode(),
              content_type="text/html; charset=utf-8")
    return presign(store, gallery + name, share_seconds) if share_seconds is not None \
        else gallery + name
