"""How long a stage may run, and the invariants the timeouts must keep.

A stage's hard limit scales with its work, with a floor: AI Horde's anchor of 30 s + 2 s per
step per 512² megapixel-equivalent, at least 150 s. The broker's visibility timeout must stay
well above the longest stage the caps allow: a message unacknowledged for longer is delivered
again while the first copy still runs (celery#5935).
"""

from __future__ import annotations

from farm.errors import ConfigError

FLOOR_SECONDS = 150.0
BASE_SECONDS, PER_STEP_SECONDS = 30.0, 2.0
MEGAPIXEL_EQUIVALENT = 512 * 512
# the visibility timeout must exceed the longest hard limit by this factor
VISIBILITY_MARGIN = 1.25


def stage_seconds(steps: int, width: int, height: int, images: int = 1) -> float:
    """The hard limit of one stage of `images` images."""
    work = steps * (width * height) / MEGAPIXEL_EQUIVALENT * images
    return max(FLOOR_SECONDS, BASE_SECONDS + PER_STEP_SECONDS * work)


def longest_stage(max_steps: int, max_pixels: int, max_images: int) -> float:
    return stage_seconds(max_steps, max_pixels, 1, max_images)


def check_visibility(visibility_timeout: float, max_steps: int, max_pixels: int,
                     max_images: int) -> None:
    longest = longest_stage(max_steps, max_pixels, max_images)
    if visibility_timeout < VISIBILITY_MARGIN * longest:
        raise ConfigError(
            f"FARM_VISIBILITY_TIMEOUT must be at least {VISIBILITY_MARGIN:g} x the longest "
            f"stage's hard limit ({longest:.0f} s for {max_images} x {max_steps} steps at "
            f"{max_pixels} pixels), got {visibility_timeout:g}; raise it, or lower "
            f"FARM_MAX_STEPS / FARM_MAX_PIXELS / FARM_MAX_IMAGES_PER_JOB")
