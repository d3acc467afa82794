"""Shape buckets: the image sizes a farm renders. A compiled UNet is specialised to its input
shape, so workers compile and warm every bucket before taking jobs, and a job must name one
(or ask to be snapped to the nearest with `--snap`)."""

from __future__ import annotations

import math

from farm.errors import ConfigError

# the standard SDXL resolutions, all about one megapixel
SDXL_BUCKETS: tuple[tuple[int, int], ...] = (
    (1024, 1024), (1152, 896), (896, 1152), (1216, 832), (832, 1216), (1344, 768),
    (768, 1344), (1536, 640), (640, 1536))
# the tiny models: the same aspect ratios at an eighth of the size, and 64x64 for quick tests
TINY_BUCKETS: tuple[tuple[int, int], ...] = tuple(
    (w // 8, h // 8) for w, h in SDXL_BUCKETS) + ((64, 64),)


def parse(text: str) -> tuple[tuple[int, int], ...]:
    """"1024x1024,1152x896" → ((1024, 1024), (1152, 896)); ConfigError naming the bad one."""
    out = []
    for part in text.split(","):
        part = part.strip().lower()
        if not part:
            continue
        try:
            w, h = (int(x) for x in part.split("x"))
        except ValueError:
            raise ConfigError(f"FARM_BUCKETS must be WxH sizes separated by commas, got "
                              f"{part!r}") from None
        if w % 8 or h % 8 or w <= 0 or h <= 0:
            raise ConfigError(f"FARM_BUCKETS sizes must be positive multiples of 8, got {part}")
        out.append((w, h))
    if not out:
        raise ConfigError("FARM_BUCKETS must name at least one size")
    return tuple(dict.fromkeys(out))


def nearest(width: int, height: int, buckets: tuple[tuple[int, int], ...]) -> tuple[int, int]:
    """The bucket closest in aspect ratio, then in pixel count."""
    def distance(b: tuple[int, int]) -> tuple[float, float]:
        return (abs(math.log((b[0] / b[1]) / (width / height))),
                abs(math.log((b[0] * b[1]) / (width * height))))
    return min(buckets, key=distance)


def describe(buckets: tuple[tuple[int, int], ...]) -> str:
    return ", ".join(f"{w}x{h}" for w, h in buckets)
