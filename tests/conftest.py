"""Shared pytest configuration for the ffa test suite.

Loss-test helpers (inputs, oracles, error criteria) live in tests/loss_helpers.py; this file only
holds what pytest itself needs: markers, thread control and global seeding.
"""

from __future__ import annotations

import pytest
import torch


def pytest_configure(config):
    config.addinivalue_line(
        "markers",
        "torch_threads(n): run the test with torch.set_num_threads(n) (restored afterwards)",
    )


@pytest.fixture(autouse=True)
def _torch_threads(request):
    # Tiny problems gain nothing from intra-op threads, and on a loaded 2-core machine every
    # parallel region's barrier can stall for milliseconds: test modules of tiny cases mark
    # themselves torch_threads(1); the tests that exercise the kernels' parallel paths ask for 2.
    marker = request.node.get_closest_marker("torch_threads")
    if marker is None:
        yield
        return
    old = torch.get_num_threads()
    torch.set_num_threads(marker.args[0])
    try:
        yield
    finally:
        torch.set_num_threads(old)


@pytest.fixture(autouse=True)
def _seed_global_rng():
    # Tests draw their inputs from explicit generators; this only makes any stray use of the global
    # RNG (e.g. fast_feature_affinity_loss with generator=None) reproducible run to run.
    torch.manual_seed(0)
    yield
