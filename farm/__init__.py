"""farm: a distributed render farm for Stable Diffusion XL. This package is the shared vocabulary
(no torch); `from farm import Farm` is the Python client (farm.scheduler.client), imported only
when asked for, so `import farm` stays light."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from farm.scheduler.client import Batch, Farm, Result

__all__ = ["Batch", "Farm", "Result"]


def __getattr__(name: str) -> Any:
    if name in __all__:
        from farm.scheduler import client

        return getattr(client, name)
    raise AttributeError(f"module 'farm' has no attribute {name!r}")
