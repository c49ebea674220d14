"""pytest-benchmark wiring for the layer benchmarks: environment fingerprint in ``machine_info``.

``pytest suites/bench --benchmark-only --benchmark-json=out.json`` writes pytest-benchmark's JSON with
the project's fingerprint (versions, GPU, git sha) under ``machine_info["conformance"]``; pytest-benchmark's
own storage and ``--benchmark-compare`` / ``--benchmark-compare-fail=median:5%`` work on it, and
``python -m conformance.bench.compare OLD.json NEW.json`` gives the noise-aware verdict.
"""

from __future__ import annotations

from typing import Any

import pytest


def _device(config: pytest.Config) -> str:
    try:
        return config.getoption("--device")
    except ValueError:
        return "cpu"


def pytest_benchmark_update_machine_info(config: pytest.Config, machine_info: dict[str, Any]) -> None:
    from conformance.bench.runner import environment

    env = environment(_device(config))
    machine_info["conformance"] = env
    gpu = env.get("gpu") or {}
    if gpu:
        machine_info["gpu"] = gpu.get("name")


@pytest.fixture(scope="module")
def bench_builder(request: pytest.FixtureRequest):
    """One layer builder per module and device: base layers are built once per shape."""
    from conformance.bench.layers import Builder

    builders: dict[str, Builder] = {}

    def get(device: str) -> Builder:
        if device not in builders:
            builders[device] = Builder(device)
        return builders[device]

    yield get
    builders.clear()
