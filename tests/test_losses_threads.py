"""Parallel paths and determinism: sizes large enough for every at::parallel_for to split.

N = 48*40 = 1920 pixels: 8 tiles of 256 for exact p=1 (4 folds, two backward parts per thread),
several 256-pixel normalization blocks, and two 1024-pixel FFA reduction chunks. Run with 2 threads
(the tiny-case modules run with 1).
"""

from __future__ import annotations

import pytest
import torch
from loss_helpers import (
    DEVICES,
    KINDS,
    check_close,
    make_pair,
    make_projection,
    oracle_value_and_grads,
    ours,
    randn,
    value_and_grads,
)

import ffa

pytestmark = pytest.mark.torch_threads(2)

SHAPE = (2, 6, 5, 48, 40)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("p", [1, 2])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("device", DEVICES)
def test_parallel_matches_reference(device, dtype, p, kind):
    b, cs, ct, h, w = SHAPE
    s, t = make_pair(b, cs, ct, h, w, dtype=dtype, device=device, seed=3)
    s = s.detach().to(memory_format=torch.channels_last).requires_grad_()  # strided reads too
    z = make_projection(kind, b, h * w, k=6, dtype=dtype, device=device)
    up = randn(b, dtype=torch.float64, device=device, seed=4)
    out, (gs, gt) = value_and_grads(lambda a, c: ours(kind, a, c, p=p, z=z), s, t, up)
    truth, (rs, rt) = oracle_value_and_grads(kind, s, t, p=p, z=z, upstream=up)
    eager, (es, et) = oracle_value_and_grads(kind, s, t, p=p, z=z, upstream=up, dtype=dtype)
    check_close(out, truth, dtype=dtype, eager=eager)
    check_close(gs, rs, dtype=dtype, eager=es, what="student grad")
    check_close(gt, rt, dtype=dtype, eager=et, what="teacher grad")


@pytest.mark.parametrize("kind", KINDS + ["ffa_generator"])
@pytest.mark.parametrize("p", [1, 2])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("device", DEVICES)
def test_deterministic(device, dtype, p, kind):
    """Repeated forward and backward are bitwise identical (same threads, same generator seed)."""
    b, cs, ct, h, w = SHAPE
    s, t = make_pair(b, cs, ct, h, w, dtype=dtype, device=device, seed=8)
    z = make_projection("ffa_nk" if kind == "ffa_generator" else kind, b, h * w, device=device)
    up = randn(b, dtype=torch.float32, device=device, seed=9)

    def run():
        if kind == "ffa_generator":
            g = torch.Generator(device=device).manual_seed(77)

            def fn(a, c):
                return ffa.fast_feature_affinity_loss(a, c, p=p, reduction="none", generator=g)
        else:

            def fn(a, c):
                return ours(kind, a, c, p=p, z=z)

        return value_and_grads(fn, s, t, up)

    (o1, (gs1, gt1)), (o2, (gs2, gt2)) = run(), run()
    assert torch.equal(o1, o2)
    assert torch.equal(gs1, gs2)
    assert torch.equal(gt1, gt2)
