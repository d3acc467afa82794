"""Fetch a batch's images and sidecars from the store into a folder, plus a contact sheet."""

from __future__ import annotations

import io
import json
from dataclasses import dataclass
from pathlib import Path

from PIL import Image

from farm import keys
from farm.errors import NotFound
from farm.images import contact_sheet
from farm.scheduler.status import BatchStatus
from farm.store import Store

CONTACT_SHEET = "contact-sheet.png"


@dataclass(frozen=True)
class Downloaded:
    folder: Path
    images: list[Path]
    sidecars: list[Path]
    contact_sheet: Path | None
    missing: list[str]


def download(store: Store, status: BatchStatus, out: Path) -> Downloaded:
    out.mkdir(parents=True, exist_ok=True)
    images: list[Path] = []
    sidecars: list[Path] = []
    missing: list[str] = []
    cells: list[tuple[Image.Image, str]] = []
    for job in status.jobs:
        for key in job.images:
            sidecar_key = keys.sidecar_of(key)
            try:
                png = store.get(key)
                meta = store.get(sidecar_key)
            except NotFound:
                missing.append(key)
                continue
            name = key.rsplit("/", 1)[-1]
            path = out / name
            path.write_bytes(png)
            side = path.with_suffix(".json")
            side.write_bytes(meta)
            images.append(path)
            sidecars.append(side)
            info = json.loads(meta)
            label = f"{info.get('seed', '')} · {info.get('prompt', '')}"
            cells.append((Image.open(io.BytesIO(png)), label))
    sheet_path = None
    if cells:
        sheet = contact_sheet(cells, title=f"batch {status.batch} · {len(cells)} images")
        sheet_path = out / CONTACT_SHEET
        sheet.save(sheet_path)
    return Downloaded(folder=out, images=images, sidecars=sidecars, contact_sheet=sheet_path,
                      missing=missing)
