"""Shared pytest set-up: hypothesis profiles, one intra-op thread per xdist worker, and CUDA-only tests."""

from __future__ import annotations

import os

import pytest
import torch
from hypothesis import HealthCheck, settings

# `make fuzz` runs with HYPOTHESIS_PROFILE=long; CI and `make test` use the bounded default.
settings.register_profile("default", max_examples=25, deadline=None,
                          suppress_health_check=[HealthCheck.too_slow])
settings.register_profile("long", max_examples=1000, deadline=None,
                          suppress_health_check=[HealthCheck.too_slow])
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "default"))

# With `-n N` on N cores, each worker's own thread pool would oversubscribe the CPUs: tiny convolutions
# then wait on busy threads. One thread per worker keeps small-model tests fast.
if os.environ.get("PYTEST_XDIST_WORKER"):
    torch.set_num_threads(1)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Tests marked ``cuda`` run only where CUDA is available: no CI machine has a GPU, so this is the one
    skip the suite allows. Nothing is deselected: plain ``pytest`` and ``make test`` collect them and report
    them skipped; ``pytest -m cuda`` (bench/gpu.sh) runs them on a GPU machine."""
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device (torch.cuda.is_available() is False)")
    for item in items:
        if item.get_closest_marker("cuda") is not None:
            item.add_marker(skip)
