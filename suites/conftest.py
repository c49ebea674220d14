"""pytest integration: ``--impl`` picks implementations, ``--device`` the device; hypothesis profiles."""

from __future__ import annotations

import os

import pytest
from hypothesis import HealthCheck, settings

settings.register_profile(
    "ci", derandomize=True, max_examples=25, deadline=None, print_blob=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
settings.register_profile("dev", max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("conformance")
    group.addoption("--impl", action="append", default=[], help="implementation(s) under test (default: reference; "
                    "or $CONFORMANCE_IMPL)")
    group.addoption("--device", default="cpu", choices=["cpu", "cuda"], help="device for clause checks")
    group.addoption("--xfails", default=None, help="xfail file: lines of 'CLAUSE_ID IMPL_PATTERN reason'")
    group.addoption("--run-slow", action="store_true", help="also run tests marked slow")


def pytest_configure(config: pytest.Config) -> None:
    import torch

    # the suites use tiny shapes: one thread avoids oversubscribing small CI machines
    torch.set_num_threads(int(os.environ.get("CONFORMANCE_TORCH_THREADS", "1")))


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    import torch

    skip_gpu = pytest.mark.skip(reason="needs a CUDA device: torch.cuda.is_available() is False here")
    skip_slow = pytest.mark.skip(reason="slow: run with --run-slow or -m slow")
    markexpr = config.getoption("-m") or ""
    for item in items:
        if "gpu" in item.keywords and not torch.cuda.is_available():
            item.add_marker(skip_gpu)
        if "slow" in item.keywords and not config.getoption("--run-slow") and "slow" not in markexpr:
            item.add_marker(skip_slow)
