"""GPU memory gauges of a CUDA worker, read at each scrape from torch.cuda (faked here: the
test machines have no GPU), and none on a CPU worker."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

import pytest
import torch
from prometheus_client import generate_latest

from farm.worker.metrics import WorkerMetrics
from tests.e2e.test_metrics import parse, total


def test_gpu_memory_is_read_from_torch_at_each_scrape(monkeypatch: pytest.MonkeyPatch) -> None:
    used = {"now": 3 << 30}
    monkeypatch.setattr(torch.cuda, "memory_allocated", lambda dev: used["now"])
    monkeypatch.setattr(torch.cuda, "max_memory_allocated", lambda dev: 7 << 30)
    monkeypatch.setattr(torch.cuda, "memory_reserved", lambda dev: 8 << 30)
    monkeypatch.setattr(torch.cuda, "get_device_properties",
                        lambda dev: SimpleNamespace(total_memory=24 << 30))
    metrics = WorkerMetrics()
    metrics.watch_gpu("cuda:0")

    def scrape() -> Any:
        return parse(generate_latest(metrics.registry).decode())

    first = scrape()
    assert total(first, "farm_worker_gpu_memory_used_bytes", device="cuda:0") == 3 << 30
    assert total(first, "farm_worker_gpu_memory_peak_bytes") == 7 << 30
    assert total(first, "farm_worker_gpu_memory_reserved_bytes") == 8 << 30
    assert total(first, "farm_worker_gpu_memory_total_bytes") == 24 << 30
    used["now"] = 5 << 30
    assert total(scrape(), "farm_worker_gpu_memory_used_bytes") == 5 << 30


def test_a_cpu_worker_has_no_gpu_samples() -> None:
    metrics = WorkerMetrics()
    metrics.watch_gpu("cpu")
    names = {name for name, _, _ in parse(generate_latest(metrics.registry).decode())}
    assert not any(n.startswith("farm_worker_gpu_memory") for n in names)
