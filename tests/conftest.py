"""Shared pytest set-up: hypothesis profiles, and one intra-op thread per xdist worker."""

from __future__ import annotations

import os

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
