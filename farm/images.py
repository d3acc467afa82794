"""PNG files as the farm writes them, and the contact sheet. Pillow only, no torch."""

from __future__ import annotations

import io
import math
from collections.abc import Sequence
from typing import Any

from PIL import Image, ImageDraw, ImageFont, ImageOps, PngImagePlugin

from farm.jobs import JobSpec
from farm.presets import DEFAULT_PRESET

# A1111's names for our samplers, so tools that read its `parameters` chunk understand ours.
A1111_SAMPLERS = {"euler": "Euler", "euler_a": "Euler a", "dpmpp_2m": "DPM++ 2M",
                  "ddim": "DDIM"}


def a1111_parameters(spec: JobSpec, seed: int, weights_hash: str) -> str:
    """The `parameters` text chunk in AUTOMATIC1111's format (prompt, negative, then settings).
    Settings that are not their defaults follow (A1111's names where it has one), so the image
    alone says how to render it again (scheduler/replay.py reads it back)."""
    lines = [spec.prompt]
    if spec.negative_prompt:
        lines.append(f"Negative prompt: {spec.negative_prompt}")
    settings = [
        f"Steps: {spec.steps}",
        f"Sampler: {A1111_SAMPLERS.get(spec.scheduler, spec.scheduler)}",
        f"CFG scale: {number(spec.guidance)}",
        f"Seed: {seed}",
        f"Size: {spec.width}x{spec.height}",
        f"Model hash: {weights_hash[:10]}",
        f"Model: {spec.model}",
    ]
    if spec.refiner is not None:
        settings += [f"Refiner: {spec.refiner}", f"Refiner switch at: {number(spec.switch)}"]
    if spec.cfg_cutoff:
        settings.append(f"CFG cutoff: {number(spec.cfg_cutoff)}")
    if spec.deep_cache:
        settings.append(f"Deep cache: {spec.deep_cache}")
    for name, value, default in (("VAE", spec.vae, "default"),
                                 ("Preset", spec.preset, DEFAULT_PRESET),
                                 ("Split", spec.split, "auto"), ("Min VRAM", spec.min_vram, 0)):
        if value != default:
            settings.append(f"{name}: {value}")
    lines.append(", ".join(settings))
    return "\n".join(lines)


def number(value: float) -> str:
    """A number as short as it can be written and still read back exactly (5, 0.9, 7.123456789)."""
    short = f"{value:g}"
    return short if float(short) == value else repr(float(value))


def encode_png(image: Image.Image, parameters: str) -> bytes:
    """PNG bytes with the `parameters` chunk. Only request data goes in, so the same render
    gives the same bytes on any worker; who made it and when lives in the JSON sidecar."""
    info = PngImagePlugin.PngInfo()
    info.add_text("parameters", parameters)
    buf = io.BytesIO()
    image.save(buf, format="PNG", pnginfo=info)
    return buf.getvalue()


def read_parameters(data: bytes) -> str | None:
    with Image.open(io.BytesIO(data)) as img:
        value = img.text.get("parameters") if hasattr(img, "text") else None
    return value


def contact_sheet(items: Sequence[tuple[Image.Image, str]], *, cell: int = 256,
                  columns: int | None = None, title: str = "") -> Image.Image:
    """One PNG with every image of a batch in a grid, each labelled under it."""
    if not items:
        raise ValueError("a contact sheet needs at least one image")
    columns = columns or min(len(items), max(1, math.ceil(math.sqrt(len(items)))))
    rows = math.ceil(len(items) / columns)
    label_h, pad = 34, 8
    title_h = 30 if title else 0
    width = columns * (cell + pad) + pad
    height = title_h + rows * (cell + label_h + pad) + pad
    sheet = Image.new("RGB", (width, height), (24, 24, 28))
    draw = ImageDraw.Draw(sheet)
    font = _font()
    if title:
        draw.text((pad, 8), title, fill=(235, 235, 235), font=font)
    for i, (image, label) in enumerate(items):
        r, c = divmod(i, columns)
        x = pad + c * (cell + pad)
        y = title_h + pad + r * (cell + label_h + pad)
        # scale up or down to fill the cell: tiny-model renders are smaller than a cell
        thumb = ImageOps.contain(image.convert("RGB"), (cell, cell), Image.Resampling.LANCZOS)
        sheet.paste(thumb, (x + (cell - thumb.width) // 2, y + (cell - thumb.height) // 2))
        for n, text in enumerate(_wrap(label, cell, font, draw)[:2]):
            draw.text((x, y + cell + 3 + n * 15), text, fill=(220, 220, 220), font=font)
    return sheet


def _font() -> Any:
    try:
        return ImageFont.load_default(size=12)
    except TypeError:  # Pillow < 10.1 has no sized default font
        return ImageFont.load_default()


def _wrap(text: str, width: int, font: Any, draw: ImageDraw.ImageDraw) -> list[str]:
    words, lines, line = text.split(), [], ""
    for word in words:
        trial = f"{line} {word}".strip()
        if draw.textlength(trial, font=font) <= width:
            line = trial
        else:
            if line:
                lines.append(line)
            line = word
    if line:
        lines.append(line)
    if len(lines) > 2:
        lines[1] = lines[1][: max(0, len(lines[1]) - 1)] + "…"
    return lines
