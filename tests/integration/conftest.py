"""Fixtures shared by the integration tests."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from farm import models
from farm.settings import Settings
from farm.worker import pipelines


@pytest.fixture(scope="module")
def loaded(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """The tiny base and refiner, loaded once per test module, and the settings they use."""
    settings = Settings(home=Path(tmp_path_factory.mktemp("models")), threads=1)
    return {"settings": settings,
            "tiny-sdxl": pipelines.load_model(models.TINY_BASE, settings, "cpu"),
            "tiny-sdxl-refiner": pipelines.load_model(models.TINY_REFINER, settings, "cpu")}

