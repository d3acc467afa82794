"""Contact sheets of a downloaded batch, paged: at most SHEET_SIZE images a sheet, built from
the thumbnails made as the images landed (scheduler/results.py), one page in memory at a time.

    contact-sheet.png                        one sheet (up to SHEET_SIZE images)
    contact-sheet-01.png, -02.png, ...       more, in the images' order
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from pathlib import Path

from PIL import Image, ImageOps

from farm.images import contact_sheet

# a 10 x 10 grid of 256-pixel cells: about 2,650 pixels square, still readable on a screen
SHEET_SIZE = 100
SHEET = "contact-sheet"
THUMBS = "thumbs"  # thumbnails, one JPEG per image (contact sheets, the gallery)
THUMB = 256        # pixels on a thumbnail's long side: a sheet's cell, a gallery's card


def thumb_path(folder: Path, image: Path) -> Path:
    return folder / THUMBS / f"{image.stem}.jpg"


def thumbnail(source: Path, out: Path, size: int = THUMB) -> None:
    """A JPEG of the PNG at `source`, `size` pixels on its long side (scaled up or down: tiny
    renders are smaller than a cell), written beside `out` and moved in whole."""
    with Image.open(source) as image:
        thumb = ImageOps.contain(image.convert("RGB"), (size, size), Image.Resampling.LANCZOS)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".tmp-{out.name}")
    thumb.save(tmp, format="JPEG", quality=85)
    tmp.replace(out)


def sheet_names(pages: int) -> list[str]:
    if pages == 1:
        return [f"{SHEET}.png"]
    width = max(2, len(str(pages)))
    return [f"{SHEET}-{n:0{width}d}.png" for n in range(1, pages + 1)]


def label(sidecar: Path) -> str:
    try:
        info = json.loads(sidecar.read_text())
    except (OSError, ValueError):
        return sidecar.stem
    return f"{info.get('seed', '')} · {info.get('prompt', '')}"


def write_sheets(batch: str, folder: Path, images: Sequence[Path]) -> list[Path]:
    """Write the sheets of `images` (sorted) into `folder`, replacing any an earlier run left."""
    for old in folder.glob(f"{SHEET}*.png"):
        old.unlink()
    pages = math.ceil(len(images) / SHEET_SIZE)
    written = []
    for n, name in enumerate(sheet_names(pages)):
        chunk = images[n * SHEET_SIZE:(n + 1) * SHEET_SIZE]
        cells = []
        for path in chunk:
            thumb = Image.open(thumb_path(folder, path))
            thumb.load()
            cells.append((thumb, label(path.with_suffix(".json"))))
        first = n * SHEET_SIZE + 1
        title = (f"batch {batch} · {len(images)} images" if pages == 1 else
                 f"batch {batch} · sheet {n + 1}/{pages} · images {first}-"
                 f"{first + len(chunk) - 1} of {len(images)}")
        # every page of a paged set in the same grid, the last one too
        columns = math.ceil(math.sqrt(SHEET_SIZE)) if pages > 1 else None
        sheet = contact_sheet(cells, title=title, columns=columns)
        sheet.save(folder / name)
        for thumb, _ in cells:
            thumb.close()
        written.append(folder / name)
    return written
