"""Helpers shared by the loss tests: devices, random inputs, the float64 oracle, error criteria.

The truth is ffa.reference evaluated in float64 on the (rounded) inputs. A kernel's error is judged
flash-attention style: at most 2x the error that the reference makes when evaluated eagerly at the
input dtype, with a floor of a small relative tolerance.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest
import torch

import ffa
from ffa import reference

HAS_CUDA = torch.cuda.is_available()
requires_cuda = pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA device")

# Every numerical test runs on both devices; CUDA is skipped where there is no GPU.
DEVICES = [pytest.param("cpu", id="cpu"), pytest.param("cuda", id="cuda", marks=requires_cuda)]

# "fa": exact loss; "ffa_nk": FFA with a projection [N, k] shared by all; "ffa_bnk": [B, N, k].
KINDS = ["fa", "ffa_nk", "ffa_bnk"]

# Relative floors of the error criteria, per input dtype (float32 is the "1e-4 relative" contract).
RTOL = {torch.float64: 1e-10, torch.float32: 1e-4, torch.float16: 1e-4, torch.bfloat16: 1e-4}


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def randn(shape, *, dtype=torch.float32, device="cpu", seed=0, requires_grad=False) -> torch.Tensor:
    """Fresh N(0,1) values drawn on the CPU (identical across devices), then moved."""
    x = torch.randn(shape, generator=gen(seed), dtype=torch.float64)
    return x.to(device=device, dtype=dtype).requires_grad_(requires_grad)


def make_pair(
    b,
    cs,
    ct,
    h,
    w,
    ht=None,
    wt=None,
    *,
    dtype=torch.float32,
    device="cpu",
    seed=0,
    grad=(True, True),
    teacher_dtype=None,
):
    s = randn((b, cs, h, w), dtype=dtype, device=device, seed=seed, requires_grad=grad[0])
    t = randn(
        (b, ct, ht or h, wt or w),
        dtype=teacher_dtype or dtype,
        device=device,
        seed=seed + 1000,
        requires_grad=grad[1],
    )
    return s, t


def make_projection(kind, b, n, k=5, *, dtype=torch.float32, device="cpu", seed=7):
    if kind == "fa":
        return None
    shape = (n, k) if kind == "ffa_nk" else (b, n, k)
    return randn(shape, dtype=dtype, device=device, seed=seed)


def ours(kind, s, t, *, p, reduction="none", z=None, eps=1e-5):
    if kind == "fa":
        return ffa.feature_affinity_loss(s, t, p=p, reduction=reduction, eps=eps)
    return ffa.fast_feature_affinity_loss(s, t, p=p, reduction=reduction, eps=eps, projection=z)


def ref(kind, s, t, *, p, reduction="none", z=None, eps=1e-5, dtype=None):
    """ffa.reference at `dtype` (None: the inputs' own dtype, i.e. the eager reference)."""
    if dtype is not None:
        s, t = s.to(dtype), t.to(dtype)
        z = None if z is None else z.to(dtype)
    if kind == "fa":
        return reference.fa_loss(s, t, p=p, reduction=reduction, eps=eps)
    return reference.ffa_loss(s, t, z, p=p, reduction=reduction, eps=eps)


def leaf(x: torch.Tensor, dtype=None) -> torch.Tensor:
    """A detached copy (optionally cast) that requires grad iff x does."""
    y = x.detach().to(dtype or x.dtype)
    return y.requires_grad_(x.requires_grad)


def value_and_grads(fn, s, t, upstream):
    """fn(s, t) and d<upstream, fn>/d(s, t) through autograd.grad (None where no grad needed)."""
    out = fn(s, t)
    wanted = [x for x in (s, t) if x.requires_grad]
    grads = torch.autograd.grad(out, wanted, upstream.to(out.dtype)) if wanted else ()
    it = iter(grads)
    return out, tuple(next(it) if x.requires_grad else None for x in (s, t))


def oracle_value_and_grads(kind, s, t, *, p, z=None, upstream, eps=1e-5, dtype=torch.float64):
    """The reference (reduction 'none') and its gradients, evaluated at `dtype` on leaf copies."""
    s2, t2 = leaf(s, dtype), leaf(t, dtype)
    z2 = None if z is None else z.detach().to(dtype)
    return value_and_grads(lambda a, b: ref(kind, a, b, p=p, z=z2, eps=eps), s2, t2, upstream)


def max_err(a, b) -> float:
    return (a.detach().double() - b.detach().double()).abs().max().item() if a.numel() else 0.0


def check_close(actual, truth, *, dtype, eager=None, what="value", atol64=0.0):
    """Judges `actual` against the float64 `truth`.

    float64: elementwise, rtol 1e-10 (atol 1e-10 of the largest magnitude).
    Otherwise: max abs error <= max(2 * eager's max abs error, rtol * max |truth|), where `eager` is
    the reference evaluated at the input dtype (flash-attention style).
    """
    assert actual.shape == truth.shape, (what, actual.shape, truth.shape)
    a, t = actual.detach().double(), truth.detach().double()
    scale = t.abs().max().item() if t.numel() else 0.0
    if dtype == torch.float64:
        torch.testing.assert_close(
            a, t, rtol=1e-10, atol=1e-10 * scale + atol64, msg=lambda m: f"{what}: {m}"
        )
        return
    err = max_err(a, t)
    bound = RTOL[dtype] * scale
    if eager is not None:
        bound = max(bound, 2 * max_err(eager, t))
    bound += 1e-12
    assert err <= bound, f"{what}: max abs error {err:.3e} > bound {bound:.3e} (scale {scale:.3e})"


def peak_rss_growth_mib(script: str, cwd, env: dict | None = None) -> float:
    """Runs ``script`` (which prints its peak-RSS growth in MiB last) in a fresh process, whose peak
    the rest of the test session cannot have raised already, from ``cwd`` (outside the repository,
    whose unbuilt ffa/ would otherwise shadow the installed one), with ``env`` added."""
    run = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(script)],
        capture_output=True,
        text=True,
        check=True,
        cwd=cwd,
        env={**os.environ, **(env or {})},
    )
    return float(run.stdout.strip().splitlines()[-1])
