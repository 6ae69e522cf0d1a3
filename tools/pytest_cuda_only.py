"""pytest plugin that keeps only the test cases that run on CUDA (tools/gpu_check.sh loads it with
``-p pytest_cuda_only``, tools/ on PYTHONPATH).

A case runs on CUDA when its node id names cuda (tests/test_cuda_*.py, device parametrizations such
as ``[cuda]`` or ``[cuda-dtype0]``), or when it carries a skip marker conditioned on a GPU (the
tests' ``requires_cuda`` and the like: the reason names CUDA or a GPU). Every other case is
deselected, so ``pytest -p pytest_cuda_only tests`` runs every CUDA case of every file.
"""

from __future__ import annotations

import re

_GPU_REASON = re.compile(r"\b(cuda|gpus?)\b", re.IGNORECASE)


def is_cuda_case(item) -> bool:
    if "cuda" in item.nodeid.lower():
        return True
    reasons = (str(mark.kwargs.get("reason", "")) for mark in item.iter_markers("skipif"))
    return any(_GPU_REASON.search(reason) for reason in reasons)


def pytest_collection_modifyitems(config, items):
    keep = [item for item in items if is_cuda_case(item)]
    drop = [item for item in items if not is_cuda_case(item)]
    if drop:
        config.hook.pytest_deselected(items=drop)
    items[:] = keep
