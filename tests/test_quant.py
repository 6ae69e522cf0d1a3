"""ffa.quant against the plain references (ffa.reference) and against torch's fake-quantize ops.

CPU always; every device-parametrized test also runs on CUDA when a GPU is present (skipped here).
fake_quantize must equal torch bit for bit (values and x gradients); qparam gradients are sums, so
they are judged against a float64 sum of torch's own per-element terms (at most 2x torch's error).
"""

from __future__ import annotations

import math
import os
import platform
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from ffa import reference as R
from ffa.quant import (
    QuantConv2d,
    QuantLinear,
    QuantReLU,
    fake_quantize,
    quant_relu,
    quantize_model,
    quantize_weight,
)

ops = torch.ops.ffa
CUDA = torch.cuda.is_available()
DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(not CUDA, reason="no GPU"))]
FLOATS = [torch.float32, torch.float64]
ALL_FLOATS = FLOATS + [torch.float16, torch.bfloat16]


def gen(seed=0):
    return torch.Generator().manual_seed(seed)


def randn(*shape, seed=0, dtype=torch.float32, device="cpu", scale=1.0):
    return (torch.randn(*shape, generator=gen(seed), dtype=torch.float64) * scale).to(
        device=device, dtype=dtype
    )


def levels(out, bits):
    """Signed integer levels of a multi-bit quantizer output (scale = top level's magnitude / Q)."""
    q = 2 ** (bits - 1) - 1
    top = out.abs().double().amax(dim=tuple(range(1, out.dim())), keepdim=True)
    s = torch.where(top > 0, top / q, torch.ones_like(top))
    return torch.round(out.double() / s)


# ---- quantize_weight -----------------------------------------------------------------------------
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", ALL_FLOATS)
@pytest.mark.parametrize("per_channel", [False, True])
@pytest.mark.parametrize("bits", [1, 2, 3, 4, 5, 8])
def test_quantize_weight_matches_reference(device, dtype, per_channel, bits):
    w = randn(24, 16, 3, 3, seed=bits, dtype=dtype, device=device)
    out = quantize_weight(w, bits, per_channel=per_channel)
    ref = R.quantize_weight(w, bits, per_channel)
    assert out.dtype == dtype and out.shape == w.shape
    # Same zero pattern and signs; values to the reference's own rounding (its float32 sums).
    assert torch.equal(out == 0, ref == 0)
    assert torch.equal(torch.sign(out), torch.sign(ref))
    tol = {torch.float64: 1e-12, torch.float32: 2e-6}.get(dtype, 1e-2)
    torch.testing.assert_close(out.double(), ref.double(), rtol=tol, atol=0)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("bits", [3, 4, 8])
def test_quantize_weight_level_ties(device, bits):
    # max |w| = (2^b - 1) * delta with delta = 1: every odd threshold k * delta is an exact value.
    top = 2**bits - 1
    ints = torch.arange(0, top + 1, dtype=torch.float32)
    below = ints[:-1]  # extras stay under the maximum, so delta stays 1
    mags = torch.cat([ints, below + 0.5, torch.nextafter(below, torch.tensor(1e9))])
    w = torch.cat([mags, -mags]).reshape(1, -1).to(device)
    out = quantize_weight(w, bits)
    ref = R.quantize_weight(w, bits)
    assert torch.equal(levels(out, bits), levels(ref, bits))
    # The rule itself: level q for (2q-1) < |w| <= (2q+1), so the thresholds go down.
    lv = levels(out, bits).abs().flatten()[: top + 1]
    expect = torch.clamp(torch.ceil((ints - 1) / 2), 0, 2 ** (bits - 1) - 1)
    assert torch.equal(lv.cpu(), expect.double())


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", FLOATS)
def test_quantize_weight_level_ties_rounded_delta(device, dtype):
    # delta = 1/15 is not exact: ties sit on the rounded thresholds fl(k * delta).
    delta = torch.tensor(1.0, dtype=dtype) / 15
    ks = torch.arange(1, 15, 2, dtype=dtype)
    thr = ks * delta
    vals = torch.cat(
        [thr, torch.nextafter(thr, torch.ones_like(thr) * 2), torch.ones(1, dtype=dtype)]
    )
    w = torch.cat([vals, -vals]).reshape(1, -1).to(device)
    assert torch.equal(levels(quantize_weight(w, 4), 4), levels(R.quantize_weight(w, 4), 4))


@pytest.mark.parametrize("device", DEVICES)
def test_ternary_tie_keeps_delta(device):
    # mean |w| = 10 exactly, delta = fl(0.7 * 10) = 7: |w| == delta is kept (>=).
    w = torch.tensor([7, -7, 6.5, -6.5, 13, 13, 12, 12, 11.5, 11.5], device=device)
    out = quantize_weight(w, 2)
    assert torch.equal(out, R.quantize_weight(w, 2))
    assert out[0] != 0 and out[2] == 0
    assert out[0].item() == pytest.approx((7 * 2 + 13 * 2 + 12 * 2 + 11.5 * 2) / 10)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("bits", [1, 2, 3, 4, 8])
def test_all_zero_weight_gives_zeros(device, bits):
    w = torch.zeros(8, 4, 3, 3, device=device)
    for pc in (False, True):
        out = quantize_weight(w, bits, per_channel=pc)
        assert torch.equal(out, torch.zeros_like(w))
    w = randn(8, 4, 3, 3, device=device)
    w[3] = 0  # one dead channel
    out = quantize_weight(w, bits, per_channel=True)
    assert torch.isfinite(out).all() and torch.equal(out[3], torch.zeros_like(out[3]))


@pytest.mark.parametrize("device", DEVICES)
def test_quantize_weight_layouts_and_ste(device):
    w = randn(32, 16, 3, 3, seed=3, device=device)
    ref = quantize_weight(w, 4, per_channel=True)
    cl = w.contiguous(memory_format=torch.channels_last)
    out = quantize_weight(cl, 4, per_channel=True)
    assert out.stride() == cl.stride() and torch.equal(out, ref)
    wt = randn(16, 32, seed=4, device=device).t()  # non-contiguous 2-D weight
    assert torch.equal(
        quantize_weight(wt, 3, per_channel=True),
        quantize_weight(wt.contiguous(), 3, per_channel=True),
    )
    sliced = randn(64, 16, 3, 3, seed=5, device=device)[::2]  # not dense
    assert torch.equal(quantize_weight(sliced, 2), quantize_weight(sliced.contiguous(), 2))
    # Straight-through: the gradient to the latent weight is the incoming gradient.
    w = w.requires_grad_()
    g = randn(*w.shape, seed=6, device=device)
    quantize_weight(w, 4).backward(g)
    assert torch.equal(w.grad, g)


def _degenerate_weights(device, dtype):
    """Weights whose per-channel layout is easy to get wrong: (name, weight)."""

    def w(*shape, seed):
        return randn(*shape, seed=seed, dtype=dtype, device=device, scale=2.0)

    return [
        ("[C,1] (Linear(1, C))", w(7, 1, seed=0)),
        ("[C,1,1,1] (Conv2d(1, C, 1))", w(7, 1, 1, 1, seed=1)),
        ("[C,1,1]", w(7, 1, 1, seed=2)),
        ("[C,1] strided", w(1, 7, seed=3).t()),
        ("[C,1,1,1] channels_last", w(7, 1, 1, 1, seed=4).to(memory_format=torch.channels_last)),
        ("one channel [1,K]", w(1, 9, seed=5)),
        ("one channel [1,K,3,3]", w(1, 4, 3, 3, seed=6)),
        ("transposed", w(9, 7, seed=7).t()),
        ("dim 0 in the middle", w(4, 7, 3, seed=8).transpose(0, 1)),
        ("dim 0 fastest, 4-D", w(3, 3, 4, 7, seed=9).permute(3, 2, 0, 1)),
        ("stride-0 rows", w(7, 1, seed=10).expand(7, 5)),
        ("stride-0 channels", w(1, 5, seed=11).expand(7, 5)),
        ("stride-0, 4-D", w(7, 1, 1, 1, seed=12).expand(7, 2, 3, 3)),
        ("sliced", w(14, 5, seed=13)[::2]),
    ]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", FLOATS)
@pytest.mark.parametrize("per_channel", [False, True])
@pytest.mark.parametrize("bits", [1, 2, 3, 4, 8])
def test_quantize_weight_degenerate_layouts(device, dtype, per_channel, bits):
    # One element per channel, one channel, transposed, stride-0 and non-dense weights: each
    # channel's statistics in its own accumulator, as the reference (which reshapes) computes them.
    tol = {torch.float64: 1e-12, torch.float32: 2e-6}[dtype]
    for name, w in _degenerate_weights(device, dtype):
        out = quantize_weight(w, bits, per_channel=per_channel)
        ref = R.quantize_weight(w, bits, per_channel)
        assert out.shape == w.shape, name
        if w.is_contiguous() or w.is_contiguous(memory_format=torch.channels_last):
            assert out.stride() == w.stride(), name
        assert torch.equal(out == 0, ref == 0), name
        torch.testing.assert_close(out, ref, rtol=tol, atol=0, msg=name)


@pytest.mark.parametrize("device", DEVICES)
def test_quantize_weight_one_element_per_channel(device):
    # Per channel, a lone element is its own scale: bits 1 and 2 give it back exactly.
    w = torch.tensor([[1.0], [2.0], [-4.0]], device=device)
    for bits in (1, 2):
        assert torch.equal(quantize_weight(w, bits, per_channel=True), w)
        assert torch.equal(
            quantize_weight(w.reshape(3, 1, 1, 1), bits, per_channel=True), w.reshape(3, 1, 1, 1)
        )
    for bits in (3, 4, 8):
        torch.testing.assert_close(quantize_weight(w, bits, per_channel=True), w)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", ALL_FLOATS)
@pytest.mark.parametrize("bits", [1, 2, 3, 4, 5, 8])
def test_quantize_weight_nan_propagates(device, dtype, bits):
    # A NaN weight makes its tensor (per channel: its channel) NaN at every width; the other
    # channels are what they are without it. The reference does the same.
    nan = float("nan")
    w = randn(6, 4, 3, seed=bits, dtype=dtype, device=device)
    w[2, 1, 0] = nan
    assert quantize_weight(w, bits).isnan().all()
    assert R.quantize_weight(w, bits).isnan().all()
    out = quantize_weight(w, bits, per_channel=True)
    keep = torch.arange(6, device=device) != 2
    assert out[2].isnan().all() and not out[keep].isnan().any()
    assert torch.equal(out[keep], quantize_weight(w[keep], bits, per_channel=True))
    ref = R.quantize_weight(w, bits, True)
    tol = {torch.float64: 1e-12, torch.float32: 2e-6}.get(dtype, 1e-2)
    torch.testing.assert_close(out.double(), ref.double(), rtol=tol, atol=0, equal_nan=True)
    # One element per channel and transposed weights too.
    col = randn(5, 1, seed=bits, dtype=dtype, device=device)
    col[3] = nan
    for v in (col, col.t().contiguous().t(), col.reshape(5, 1, 1, 1)):
        out = quantize_weight(v, bits, per_channel=True).reshape(5)
        assert out.isnan().tolist() == [False, False, False, True, False]
    wt = randn(4, 6, seed=bits, dtype=dtype, device=device).t()
    wt[1, 2] = nan
    out = quantize_weight(wt, bits, per_channel=True)
    assert out.isnan().all(1).tolist() == [False, True, False, False, False, False]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("per_channel", [False, True])
@pytest.mark.parametrize("bits", [1, 2, 3, 4, 8])
def test_quantize_weight_inf_matches_reference(device, per_channel, bits):
    w = randn(4, 6, seed=bits, device=device)
    w[1, 2], w[3, 0] = float("inf"), -float("inf")
    out = quantize_weight(w, bits, per_channel=per_channel)
    ref = R.quantize_weight(w, bits, per_channel)
    torch.testing.assert_close(out, ref, rtol=2e-6, atol=0, equal_nan=True)


# ---- QuantReLU -----------------------------------------------------------------------------------
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", ALL_FLOATS)
@pytest.mark.parametrize("bits", [1, 2, 4, 8])
def test_quant_relu_matches_reference(device, dtype, bits):
    x = randn(4096, seed=bits, dtype=dtype, device=device, scale=2.0)
    g = randn(4096, seed=bits + 100, dtype=dtype, device=device)
    for ste in ("inplt", "idnty", "relu"):
        for ag in ("mean", "ae", "pact", "min"):
            alpha = torch.tensor([0.31], device=device, requires_grad=True)
            xa = x.clone().requires_grad_()
            y = quant_relu(xa, alpha, bits, ste=ste, alpha_grad=ag, rate=0.001)
            assert torch.equal(y, R.quant_relu(x, alpha, bits))
            y.backward(g)
            gi, ga = R.quant_relu_backward(g, x, alpha, bits, ste, ag, 0.001)
            assert torch.equal(xa.grad, gi), (ste, ag)
            torch.testing.assert_close(alpha.grad, ga, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", FLOATS)
def test_quant_relu_ties(device, dtype):
    bits, a = 4, torch.tensor([0.1946])
    av = a.to(dtype)[0]
    k = torch.arange(-1, 2**bits + 2, dtype=dtype)
    pts = k * av  # the level boundaries, incl. a(L-1), aL
    x = torch.cat([pts, torch.nextafter(pts, pts + 1), torch.nextafter(pts, pts - 1)]).to(device)
    x = torch.cat([x, torch.tensor([0.0, -0.0], dtype=dtype, device=device)])
    alpha = a.to(device).requires_grad_()
    xa = x.clone().requires_grad_()
    y = quant_relu(xa, alpha, bits, alpha_grad="ae", rate=1e-3)
    assert torch.equal(y, R.quant_relu(x, alpha, bits))
    g = torch.ones_like(x)
    y.backward(g)
    gi, ga = R.quant_relu_backward(g, x, alpha, bits, "inplt", "ae", 1e-3)
    assert torch.equal(xa.grad, gi)
    torch.testing.assert_close(alpha.grad, ga)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", ALL_FLOATS)
def test_quant_relu_nonfinite_matches_reference(device, dtype):
    # NaN stays NaN (its gradient passes as for an in-range x, its step gradient term is 0);
    # +Inf is the top level, -Inf is 0: exactly the reference's values and gradients.
    x = randn(64, seed=3, dtype=dtype, device=device, scale=2.0)
    x[::7] = float("nan")
    x[1::9], x[2::11] = float("inf"), -float("inf")
    g = randn(64, seed=4, dtype=dtype, device=device)
    for ste in ("inplt", "idnty", "relu"):
        for ag in ("mean", "ae", "pact", "min"):
            alpha = torch.tensor([0.31], device=device, requires_grad=True)
            xa = x.clone().requires_grad_()
            y = quant_relu(xa, alpha, 4, ste=ste, alpha_grad=ag, rate=0.001)
            torch.testing.assert_close(y, R.quant_relu(x, alpha, 4), rtol=0, atol=0, equal_nan=True)
            y.backward(g)
            gi, ga = R.quant_relu_backward(g, x, alpha, 4, ste, ag, 0.001)
            torch.testing.assert_close(xa.grad, gi, rtol=0, atol=0, equal_nan=True)
            assert torch.isfinite(alpha.grad).all()
            torch.testing.assert_close(alpha.grad, ga, rtol=1e-5, atol=1e-6)


def test_quant_relu_alpha_clamp_and_module():
    x = torch.linspace(-1, 30, 301)
    big, small = torch.tensor([7.0]), torch.tensor([-1.0])
    assert torch.equal(quant_relu(x, big, 2), quant_relu(x, torch.tensor([5.0]), 2))
    assert torch.equal(quant_relu(x, small, 2), quant_relu(x, torch.tensor([1e-3]), 2))
    m = QuantReLU(4)
    assert m.alpha.item() == pytest.approx(0.1946)
    with torch.no_grad():
        m.alpha.fill_(9.0)
    m(x)
    assert m.alpha.item() == 5.0  # the stored step is projected, as the released code does
    # The module called twice before backward (a shared ReLU) is fine.
    m = QuantReLU(2)
    xa = x.clone().requires_grad_()
    (m(xa) + m(xa * 2)).sum().backward()
    assert m.alpha.grad is not None
    fixed = QuantReLU(3, alpha=0.5, learn_alpha=False)
    assert "alpha" in dict(fixed.named_buffers()) and not list(fixed.parameters())
    assert QuantReLU(4).state_dict().keys() == {"alpha"}


def test_quant_relu_alpha_gradcheck():
    # d/d alpha of ceil(x/a)*a is ceil(x/a) inside, L above: exactly the "ae" step gradient.
    bits, a0 = 4, 0.3
    k = torch.arange(-2, 2**bits + 3, dtype=torch.float64)
    x = (k + 0.5) * a0  # away from the jumps
    alpha = torch.tensor([a0], dtype=torch.float64, requires_grad=True)
    f = lambda a: quant_relu(x, a, bits, alpha_grad="ae", rate=1.0) * 0.01  # noqa: E731
    assert torch.autograd.gradcheck(f, (alpha,), eps=1e-7, atol=1e-8)


# ---- fake_quantize -------------------------------------------------------------------------------
def near_ties(n, scale, zp, seed=0, dtype=torch.float32, spread=150):
    """Values whose x / scale lands on or within a few ulps of half-integers, plus plain values."""
    g = gen(seed)
    k = torch.randint(-spread, spread, (n,), generator=g).double()
    inv = float(torch.tensor(1.0, dtype=torch.float32) / torch.tensor(scale, dtype=torch.float32))
    x = ((k + 0.5) / inv).float()
    x = (
        x
        + torch.randint(-3, 4, (n,), generator=g).float() * torch.finfo(torch.float32).eps * x.abs()
    )
    plain = torch.randn(n, generator=g) * scale * spread / 2
    return torch.cat([x, plain]).to(dtype)


QRANGES = [(-128, 127), (0, 255), (-8, 7)]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", ALL_FLOATS)
@pytest.mark.parametrize("qrange", QRANGES)
def test_fake_quantize_per_tensor_equals_torch(device, dtype, qrange):
    qmin, qmax = qrange
    s, zp = 0.0371, (qmin + qmax + 1) // 2 - 3
    x = near_ties(20000, s, zp, dtype=dtype).to(device)
    g = randn(*x.shape, seed=1, dtype=dtype, device=device)
    xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
    ya = fake_quantize(xa, s, zp, qmin, qmax)
    yb = torch.fake_quantize_per_tensor_affine(xb, s, zp, qmin, qmax)
    assert torch.equal(ya, yb)
    ya.backward(g)
    yb.backward(g)
    assert torch.equal(xa.grad, xb.grad)
    # Tensor qparams (torch's tensor-qparams overload wants float32 / int32).
    st, zt = torch.tensor([s], device=device), torch.tensor([zp], dtype=torch.int32, device=device)
    assert torch.equal(
        fake_quantize(x, st, zt, qmin, qmax),
        torch.fake_quantize_per_tensor_affine(x, st, zt, qmin, qmax),
    )


def _per_channel_inputs(device, dtype, axis, shape=(6, 10, 7, 5), seed=0):
    x = randn(*shape, seed=seed, dtype=dtype, device=device, scale=3.0)
    c = shape[axis]
    scale = (torch.rand(c, generator=gen(seed + 1)) * 0.1 + 0.01).to(device)
    zi = torch.randint(-10, 10, (c,), generator=gen(seed + 2), dtype=torch.int32).to(device)
    zf = (torch.randn(c, generator=gen(seed + 3)) * 3).to(device)
    return x, scale, zi, zf


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", ALL_FLOATS)
@pytest.mark.parametrize("axis", [0, 1, 3])
@pytest.mark.parametrize("layout", ["contiguous", "channels_last", "permuted"])
def test_fake_quantize_per_channel_equals_torch(device, dtype, axis, layout):
    x, scale, zi, zf = _per_channel_inputs(device, dtype, axis)
    if layout == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
    elif layout == "permuted":
        x = x.permute(3, 2, 1, 0).contiguous().permute(3, 2, 1, 0)
    g = randn(*x.shape, seed=9, dtype=dtype, device=device)
    for zp in (zi, zf):
        xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
        ya = fake_quantize(xa, scale, zp, -128, 127, axis=axis)
        yb = torch.fake_quantize_per_channel_affine(xb, scale, zp, axis, -128, 127)
        assert torch.equal(ya, yb), zp.dtype
        assert ya.stride() == x.stride()
        ya.backward(g)
        yb.backward(g)
        assert torch.equal(xa.grad, xb.grad)


def test_fake_quantize_float_zero_point_fused_rounding():
    # torch's CPU per-channel float-zero-point level is rint(fma(x, 1/s, z)): pick x where the fused
    # and the unfused sums round to different levels.
    s = torch.tensor([0.0371])
    inv = (torch.tensor(1.0) / s).double()
    z = torch.tensor([0.3])
    k = torch.arange(-100, 100).double()
    x = (((k + 0.5) - z.double()) / inv).float()
    x = torch.cat([x + d * torch.finfo(torch.float32).eps * x.abs() for d in range(-4, 5)])
    fused = torch.round(x.double() * inv.float().double() + z.double())
    unfused = torch.round((x * inv.float() + z).double())
    assert (fused != unfused).any()  # the test has teeth
    xs = x.reshape(-1, 1)
    sc, zc = s.expand(xs.shape[0]).contiguous(), z.expand(xs.shape[0]).contiguous()
    assert torch.equal(
        fake_quantize(xs, sc, zc, -128, 127, axis=0),
        torch.fake_quantize_per_channel_affine(xs, sc, zc, 0, -128, 127),
    )


def _lsq_terms_per_element(x, g, s, zp, qmin, qmax, gf):
    """torch's own per-element LSQ terms: its per-channel op with one channel per element."""
    n = x.numel()
    se = s.detach().expand(n).clone().requires_grad_()
    ze = zp.detach().expand(n).clone().requires_grad_()
    y = torch._fake_quantize_learnable_per_channel_affine(
        x.detach().reshape(n, 1), se, ze, 0, qmin, qmax, gf
    )
    y.backward(g.reshape(n, 1))
    return se.grad, ze.grad


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("zp", [3.0, 2.5, -1.5, -1.7, 3.4, 200.0])
def test_fake_quantize_learnable_per_tensor_equals_torch(device, zp):
    qmin, qmax, gf = -128, 127, 0.7
    x = near_ties(20000, 0.0371, zp, seed=4).to(device)
    g = randn(*x.shape, seed=5, device=device)
    sa = torch.tensor([0.0371], device=device, requires_grad=True)
    za = torch.tensor([zp], device=device, requires_grad=True)
    sb, zb = sa.detach().clone().requires_grad_(), za.detach().clone().requires_grad_()
    xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
    ya = fake_quantize(xa, sa, za, qmin, qmax, learnable=True, grad_factor=gf)
    yb = torch._fake_quantize_learnable_per_tensor_affine(xb, sb, zb, qmin, qmax, gf)
    assert torch.equal(ya, yb)
    ya.backward(g)
    yb.backward(g)
    assert torch.equal(xa.grad, xb.grad)
    assert sa.grad.shape == sa.shape and za.grad.shape == za.shape
    # Only x needs a gradient: still torch's LSQ formula for it (its backward zero point).
    xc = x.clone().requires_grad_()
    fake_quantize(xc, sa.detach(), za.detach(), qmin, qmax, learnable=True).backward(g)
    assert torch.equal(xc.grad, xb.grad)
    if zp == math.floor(zp) and device == "cpu":
        # Integral zero point: torch's per-channel op gives the per-element terms; sum them in
        # float64 and hold ffa to at most 2x torch's float32-sum error.
        ts, tz = _lsq_terms_per_element(x, g, sa, za, qmin, qmax, gf)
        for ours, theirs, terms in ((sa.grad, sb.grad, ts), (za.grad, zb.grad, tz)):
            truth = terms.double().sum()
            err_t = (theirs.double() - truth).abs().item()
            assert (ours.double() - truth).abs().item() <= 2 * err_t + 1e-6 * terms.abs().sum()
    else:
        torch.testing.assert_close(sa.grad, sb.grad, rtol=1e-5, atol=1e-3)
        torch.testing.assert_close(za.grad, zb.grad, rtol=1e-5, atol=1e-3)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("axis", [1, 3])
def test_fake_quantize_learnable_per_channel_equals_torch(device, dtype, axis):
    x, scale, _, zf = _per_channel_inputs(device, dtype, axis, shape=(8, 12, 9, 6), seed=7)
    zf[0] = 2.5  # round half to even
    g = randn(*x.shape, seed=8, dtype=dtype, device=device)
    sa, za = scale.clone().requires_grad_(), zf.clone().requires_grad_()
    sb, zb = scale.clone().requires_grad_(), zf.clone().requires_grad_()
    xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
    ya = fake_quantize(xa, sa, za, -128, 127, axis=axis, learnable=True, grad_factor=0.5)
    yb = torch._fake_quantize_learnable_per_channel_affine(xb, sb, zb, axis, -128, 127, 0.5)
    assert torch.equal(ya, yb)
    ya.backward(g)
    yb.backward(g)
    assert torch.equal(xa.grad, xb.grad)
    per_channel_mass = (g.float().abs().sum() * 255 / x.shape[axis]).item()
    torch.testing.assert_close(sa.grad, sb.grad, rtol=1e-4, atol=1e-6 * per_channel_mass)
    torch.testing.assert_close(za.grad, zb.grad, rtol=1e-4, atol=1e-6 * per_channel_mass)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64])
def test_fake_quantize_learnable_other_dtypes(device, dtype):
    # torch's per-tensor LSQ backward is float32 only. ffa: half types compute in float32 (so they
    # equal torch on the float32 upcast), float64 in float64 (torch's forward supports it).
    if dtype == torch.float64:
        x = randn(5000, seed=2, dtype=dtype, device=device, scale=0.2)
    else:
        x = near_ties(5000, 0.05, 1, seed=2, dtype=dtype).to(device)
    g = randn(*x.shape, seed=3, dtype=dtype, device=device)
    sa = torch.tensor([0.05], device=device, requires_grad=True)
    za = torch.tensor([1.0], device=device, requires_grad=True)
    xa = x.clone().requires_grad_()
    y = fake_quantize(xa, sa, za, -8, 7, learnable=True)
    y.backward(g)
    sb, zb = sa.detach().clone().requires_grad_(), za.detach().clone().requires_grad_()
    xb = x.float().clone().requires_grad_()
    yb = torch._fake_quantize_learnable_per_tensor_affine(xb, sb, zb, -8, 7, 1.0)
    yb.backward(g.float())
    if dtype == torch.float64:
        y64 = torch._fake_quantize_learnable_per_tensor_affine(
            x, sa.detach(), za.detach(), -8, 7, 1.0
        )
        assert torch.equal(y, y64)
        assert (xa.grad.float() != xb.grad).float().mean().item() < 1e-3
    else:
        assert torch.equal(y, yb.to(dtype))
        assert torch.equal(xa.grad, xb.grad.to(dtype))
    torch.testing.assert_close(sa.grad, sb.grad, rtol=1e-3, atol=1e-2)
    torch.testing.assert_close(za.grad, zb.grad, rtol=1e-3, atol=1e-2)
    assert xa.grad.dtype == dtype and sa.grad.dtype == torch.float32


def test_fake_quantize_scale_grad_out_of_range():
    # Outside [qmin, qmax] the output is (qmax|qmin - z) * s: LSQ's scale gradient is exact there.
    x = torch.cat([torch.linspace(2.0, 5.0, 7), torch.linspace(-5.0, -2.0, 7)])
    s = torch.tensor([0.01], requires_grad=True)
    y = fake_quantize(x, s, 0, -8, 7, learnable=True)
    y.sum().backward()
    expect = 7 * 7 + (-8) * 7
    assert s.grad.item() == pytest.approx(expect)


def _layout_variants(x, axis):
    """x in the memory layouts a per-channel kernel can get wrong: (name, tensor equal to x)."""
    d = x.dim()
    order = [i for i in range(d) if i != axis] + [axis]  # the channel axis fastest in memory
    yield "contiguous", x
    yield "channel axis fastest", x.permute(order).contiguous().permute(_inverse(order))
    rev = list(range(d))[::-1]
    yield "reversed dims", x.permute(rev).contiguous().permute(rev)
    for i in range(d):
        if x.shape[i] > 1:  # stride 0 along dim i (an expanded tensor)
            yield f"expanded along {i}", x.narrow(i, 0, 1).expand(x.shape)
    if x.shape[0] > 1:
        yield "sliced", torch.repeat_interleave(x, 2, dim=0)[::2]


def _inverse(perm):
    return [perm.index(i) for i in range(len(perm))]


# (shape, axis): size-1 axes, channel axes of stride 1, one element per channel.
DEGENERATE_CHANNELS = [
    ((5, 1), 0),
    ((5, 1), 1),
    ((1, 5), 1),
    ((5, 1, 1, 1), 0),
    ((5, 1, 1), 0),
    ((1, 5, 1, 1), 1),
    ((3, 1, 4), 0),
    ((3, 4, 1), 1),
    ((4, 1, 3, 1), 2),
    ((2, 3), 0),
]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("case", DEGENERATE_CHANNELS, ids=str)
def test_fake_quantize_degenerate_layouts_equal_torch(device, case):
    shape, axis = case
    c = shape[axis]
    x0 = randn(*shape, seed=c, device=device, scale=0.3)
    g = randn(*shape, seed=c + 1, device=device)
    scale = (torch.rand(c, generator=gen(2)) * 0.05 + 0.01).to(device)
    zi = torch.randint(-5, 5, (c,), generator=gen(3), dtype=torch.int32).to(device)
    zf = (torch.randn(c, generator=gen(4)) * 3).to(device)
    for name, x in _layout_variants(x0, axis):
        for kind in ("int zero point", "float zero point", "learnable", "learnable per tensor"):
            xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
            if kind.startswith("learnable"):
                s0, z0 = (scale, zf) if kind == "learnable" else (scale[:1], zf[:1])
                sa, za = s0.clone().requires_grad_(), z0.clone().requires_grad_()
                sb, zb = s0.clone().requires_grad_(), z0.clone().requires_grad_()
                if kind == "learnable":
                    ya = fake_quantize(xa, sa, za, -8, 7, axis=axis, learnable=True)
                    yb = torch._fake_quantize_learnable_per_channel_affine(
                        xb, sb, zb, axis, -8, 7, 1.0
                    )
                else:
                    ya = fake_quantize(xa, sa, za, -8, 7, learnable=True)
                    yb = torch._fake_quantize_learnable_per_tensor_affine(xb, sb, zb, -8, 7, 1.0)
            else:
                zp = zi if kind == "int zero point" else zf
                ya = fake_quantize(xa, scale, zp, -8, 7, axis=axis)
                yb = torch.fake_quantize_per_channel_affine(xb, scale, zp, axis, -8, 7)
            ya.backward(g)
            yb.backward(g)
            msg = f"{name}, {kind}"
            assert torch.equal(ya, yb), msg
            assert torch.equal(xa.grad, xb.grad), msg
            if kind.startswith("learnable"):
                torch.testing.assert_close(sa.grad, sb.grad, rtol=1e-5, atol=1e-5, msg=msg)
                torch.testing.assert_close(za.grad, zb.grad, rtol=1e-5, atol=1e-5, msg=msg)


def _with_nonfinite(x):
    """x with NaN, -Inf, -1e30 (levels below quant_min) and +Inf, 1e30 (above) in every channel,
    and x with those replaced by finite values far outside the range (the values ffa's rule
    gives them: a NaN level is below quant_min, levels beyond int64 saturate)."""
    x = x.clone()
    sub = x.clone()
    for k, (v, finite) in enumerate(
        [(math.nan, -1e4), (-math.inf, -1e4), (-1e30, -1e4), (math.inf, 1e4), (1e30, 1e4)]
    ):
        x[:, 2 * k] = v
        sub[:, 2 * k] = finite
    return x, sub


def _torch_fake_quantize(x, s, z, axis, learnable, gf=1.0):
    if learnable:
        if axis is None:
            return torch._fake_quantize_learnable_per_tensor_affine(x, s, z, -8, 7, gf)
        return torch._fake_quantize_learnable_per_channel_affine(x, s, z, axis, -8, 7, gf)
    if axis is None:
        return torch.fake_quantize_per_tensor_affine(x, s, z, -8, 7)
    return torch.fake_quantize_per_channel_affine(x, s, z, axis, -8, 7)


def _fq_grads(fn, x, s, z, g, learnable):
    xa = x.clone().requires_grad_()
    sa, za = (s.clone().requires_grad_(), z.clone().requires_grad_()) if learnable else (s, z)
    y = fn(xa, sa, za)
    y.backward(g)
    return (y.detach(), xa.grad) + ((sa.grad, za.grad) if learnable else ())


NONFINITE_QPARAMS = [  # (axis, learnable, zero-point kind)
    (None, False, "int"),
    (None, True, "float"),
    (0, False, "int"),
    (0, False, "float"),
    (0, True, "float"),
]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("qp", NONFINITE_QPARAMS, ids=str)
def test_fake_quantize_nonfinite_inputs(device, qp):
    # The rule, on every device: a NaN x acts as a level below quant_min (output (qmin - z) s, no
    # x gradient, the clamped branch's LSQ gradients: a NaN activation never poisons a learned
    # scale), +-Inf and levels beyond int64 saturate. The expected values are torch's on x with
    # those entries replaced by finite values far outside the range.
    axis, learnable, zkind = qp
    c = 3
    x, sub = _with_nonfinite(randn(c, 16, seed=5, device=device, scale=0.4))
    g = randn(c, 16, seed=6, device=device)
    n = c if axis is not None else 1
    s = torch.linspace(0.05, 0.09, n, device=device)
    z = torch.tensor([1.0, 2.6, 0.0][:n], device=device)  # zero points >= 0, see below
    if zkind == "int":
        z = z.round().to(torch.int32)
    if learnable and axis is None:
        s, z = s.reshape(1), z.reshape(1)

    def ours(xx, ss, zz):
        return fake_quantize(xx, ss, zz, -8, 7, axis=axis, learnable=learnable)

    def theirs(xx, ss, zz):
        return _torch_fake_quantize(xx, ss, zz, axis, learnable)

    got = _fq_grads(ours, x, s, z, g, learnable)
    want = _fq_grads(theirs, sub, s, z, g, learnable)
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])
    for a, b in zip(got[2:], want[2:], strict=True):
        assert torch.isfinite(a).all()
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-4)
    # torch itself, where its NaN and -Inf results are defined by the hardware's int64
    # conversion (INT64_MIN on x86-64 and, per PTX, on NVIDIA GPUs; the zero points above are
    # >= 0 so that torch's CUDA per-channel kernel does not wrap around): the same values.
    if device == "cuda" or platform.machine().lower() in ("x86_64", "amd64"):
        low = x.clone()
        low[:, 6:10] = sub[:, 6:10]  # keep NaN, -Inf, -1e30; +Inf, +1e30 overflow in torch
        got = _fq_grads(ours, low, s, z, g, learnable)
        want = _fq_grads(theirs, low, s, z, g, learnable)
        assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])
        for a, b in zip(got[2:], want[2:], strict=True):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-4)


# ---- bad input -----------------------------------------------------------------------------------
def test_bad_inputs_name_the_argument():
    w = torch.randn(4, 4)
    with pytest.raises(ValueError, match="bits"):
        quantize_weight(w, 9)
    with pytest.raises(ValueError, match="bits"):
        quantize_weight(w, 0)
    with pytest.raises(ValueError, match="per_channel"):
        quantize_weight(torch.randn(5), 4, per_channel=True)
    with pytest.raises(TypeError, match="w must have a floating"):
        quantize_weight(torch.ones(4, 4, dtype=torch.int64), 4)
    x = torch.randn(10)
    with pytest.raises(ValueError, match="scale"):
        fake_quantize(x, 0.0, 0, -8, 7)
    with pytest.raises(ValueError, match="scale"):
        fake_quantize(x, -1.0, 0, -8, 7)
    with pytest.raises(ValueError, match="scale"):
        fake_quantize(x, torch.tensor([-0.5]), 0, -8, 7)
    with pytest.raises(ValueError, match="scale"):
        fake_quantize(
            torch.randn(3, 2),
            torch.tensor([0.1, 0.0, 0.2]),
            torch.zeros(3, dtype=torch.int32),
            -8,
            7,
            axis=0,
        )
    with pytest.raises(ValueError, match="qmin"):
        fake_quantize(x, 0.1, 0, 7, 7)
    with pytest.raises(ValueError, match="qmin"):
        fake_quantize(x, 0.1, 0, 8, -8)
    with pytest.raises(ValueError, match="zero_point"):
        fake_quantize(x, 0.1, 9, -8, 7)
    with pytest.raises(ValueError, match="zero_point"):
        fake_quantize(x, 0.1, torch.tensor([9], dtype=torch.int32), -8, 7)
    with pytest.raises(ValueError, match="zero_point"):
        fake_quantize(
            torch.randn(2, 3),
            torch.ones(2),
            torch.tensor([0, 99], dtype=torch.int32),
            -8,
            7,
            axis=0,
        )
    with pytest.raises(TypeError, match="x must have a floating"):
        fake_quantize(torch.arange(10), 0.1, 0, -8, 7)
    with pytest.raises(ValueError, match="axis"):
        fake_quantize(x, torch.ones(10), torch.zeros(10), -8, 7, axis=1)
    with pytest.raises(TypeError, match="x must have a floating"):
        quant_relu(torch.arange(10), 0.5, 4)
    for bad in (0.0, -0.2, float("nan")):
        with pytest.raises(ValueError, match="alpha"):
            QuantReLU(4, alpha=bad)
        with pytest.raises(ValueError, match="alpha"):
            quant_relu(x, bad, 4)
    with pytest.raises(ValueError, match="alpha is required"):
        QuantReLU(3)
    with pytest.raises(ValueError, match="bits"):
        QuantReLU(16)
    with pytest.raises(ValueError, match="ste"):
        QuantReLU(4, ste="straight")
    with pytest.raises(ValueError, match="alpha_grad"):
        QuantReLU(4, alpha_grad="max")
    with pytest.raises(ValueError, match="w_bits"):
        QuantConv2d(3, 4, 3, w_bits=10)
    # The ops themselves (what torch.compile calls) raise the same errors.
    with pytest.raises(ValueError, match="bits"):
        ops.quantize_weight(w, 9, False)
    with pytest.raises(ValueError, match="quant_min"):
        ops.fake_quantize(x, torch.tensor(0.1), torch.tensor(0), 5, 5, None, False, 1.0)
    with pytest.raises(TypeError, match="x must be a floating"):
        ops.quant_relu(torch.arange(4), torch.ones(1), 4, "inplt", "mean", 0.01)


def test_qparams_on_another_device_raise():
    # A scale / zero_point / alpha on another device than x was read as garbage (meta qparams
    # returned uninitialized memory): the error names the argument.
    x = torch.randn(4, 3)
    m1 = torch.ones(1, device="meta")
    cases = [
        ("scale", lambda: fake_quantize(x, m1 * 0.1, 0, -8, 7)),
        ("zero_point", lambda: fake_quantize(x, 0.1, torch.zeros(1, device="meta"), -8, 7)),
        ("scale", lambda: fake_quantize(x, m1, m1, -8, 7, learnable=True)),
        ("zero_point", lambda: fake_quantize(x, torch.ones(1), m1, -8, 7, learnable=True)),
        ("scale", lambda: fake_quantize(x, torch.ones(3, device="meta"), 0, -8, 7, axis=1)),
        (
            "zero_point",
            lambda: fake_quantize(x, torch.ones(3), torch.zeros(3, device="meta"), -8, 7, axis=1),
        ),
        ("alpha", lambda: quant_relu(x, torch.ones(1, device="meta"), 4)),
        ("alpha", lambda: QuantReLU(4).to("meta")(x)),
    ]
    for name, call in cases:
        with pytest.raises(ValueError, match=f"{name} must be on x's device"):
            call()
    # Direct op calls: the dispatcher sends a real x with meta qparams to the fake kernels.
    op_cases = [
        ("scale", lambda: ops.fake_quantize(x, m1, m1, -8, 7, None, True, 1.0)),
        ("alpha", lambda: ops.quant_relu(x, m1, 4, "inplt", "mean", 0.01)),
        (
            "zero_point",
            lambda: ops.fake_quantize_backward(
                x, x, torch.ones(1), m1, -8, 7, None, True, 1.0, [True, True, True]
            ),
        ),
    ]
    for name, call in op_cases:
        with pytest.raises(ValueError, match=f"{name} must be on x's device"):
            call()
    # All on meta: the shape-only path still works.
    xm = torch.empty(4, 3, device="meta")
    assert fake_quantize(xm, m1, m1, -8, 7, learnable=True).device.type == "meta"
    assert quant_relu(xm, m1, 4).device.type == "meta"


@pytest.mark.skipif(not CUDA, reason="no GPU")
def test_qparams_device_rules_cuda():
    x = randn(4, 3, device="cuda")
    xc, g, gc = x.cpu(), torch.ones_like(x), torch.ones(4, 3)
    s, z, a = (torch.tensor([v], device="cuda") for v in (0.1, 1.0, 0.3))
    sc, zc, ac = s.cpu(), z.cpu(), a.cpu()
    # A CPU x with CUDA qparams: the Python functions and the ops themselves name the argument.
    bad = [
        ("scale", lambda: fake_quantize(xc, s, 0, -8, 7)),
        ("zero_point", lambda: fake_quantize(xc, sc, z, -8, 7, learnable=True)),
        ("alpha", lambda: quant_relu(xc, a, 4)),
        ("scale", lambda: ops.fake_quantize(xc, s, zc, -8, 7, None, False, 1.0)),
        ("zero_point", lambda: ops.fake_quantize(xc, sc, z, -8, 7, None, True, 1.0)),
        ("alpha", lambda: ops.quant_relu(xc, a, 4, "inplt", "mean", 0.01)),
        (
            "scale",
            lambda: ops.fake_quantize_backward(
                gc, xc, s, zc, -8, 7, None, True, 1.0, [True, True, True]
            ),
        ),
        (
            "alpha",
            lambda: ops.quant_relu_backward(gc, xc, a, 4, "inplt", "mean", 0.01, [True, True]),
        ),
        # Per-channel qparams live on x's device.
        ("scale", lambda: fake_quantize(x, torch.ones(3), torch.zeros(3), -8, 7, axis=1)),
        (
            "scale",
            lambda: ops.fake_quantize(x, torch.ones(3), torch.zeros(3), -8, 7, 1, False, 1.0),
        ),
        ("grad", lambda: ops.quant_relu_backward(gc, x, a, 4, "inplt", "mean", 0.01, [True, True])),
    ]
    for name, call in bad:
        with pytest.raises(ValueError, match=f"{name} must be on x's device"):
            call()
    # One-element CPU qparams with a CUDA x are read on the host: the same values.
    assert torch.equal(
        fake_quantize(x, sc, zc, -8, 7, learnable=True),
        fake_quantize(x, s, z, -8, 7, learnable=True),
    )
    assert torch.equal(quant_relu(x, ac, 4), quant_relu(x, a, 4))
    assert (
        ops.quant_relu_backward(g, x, ac, 4, "inplt", "mean", 0.01, [True, True])[1].device
        == ac.device
    )


# ---- modules and quantize_model ------------------------------------------------------------------
class SmallCNN(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.relu1 = nn.ReLU()
        self.conv2 = nn.Conv2d(8, 16, 3, padding=1, bias=False)
        self.relu2 = nn.ReLU()
        self.fc = nn.Linear(16, 10)

    def forward(self, x):
        x = self.relu1(self.conv1(x))
        x = self.relu2(self.conv2(x))
        return self.fc(x.mean(dim=(2, 3)))


def test_quantize_model_small_cnn():
    torch.manual_seed(0)
    model = SmallCNN()
    float_state = {k: v.clone() for k, v in model.state_dict().items()}
    opt_before = torch.optim.SGD(model.parameters(), lr=0.1)
    quantize_model(model, 4, a_bits=2, skip=("conv1",))
    assert type(model.conv1) is nn.Conv2d
    assert isinstance(model.conv2, QuantConv2d) and isinstance(model.fc, QuantLinear)
    assert isinstance(model.relu1, QuantReLU) and model.relu1.bits == 2
    # state_dict: the float keys and values are kept; alpha is added; a round trip restores all.
    sd = model.state_dict()
    assert set(sd) == set(float_state) | {"relu1.alpha", "relu2.alpha"}
    for k, v in float_state.items():
        assert torch.equal(sd[k], v)
    clone = quantize_model(SmallCNN(), 4, a_bits=2, skip=("conv1",))
    clone.load_state_dict(sd)
    x = torch.randn(2, 3, 8, 8)
    assert torch.equal(clone(x), model(x))
    # The forward uses the quantized weights.
    h = model.relu1(model.conv1(x))
    expect = F.conv2d(h, R.quantize_weight(model.conv2.weight.detach(), 4), None, padding=1)
    torch.testing.assert_close(model.conv2(h), expect, rtol=1e-5, atol=1e-6)
    # An optimizer built before the swap still updates the float latent weights (STE gradient).
    w0 = model.conv2.weight.detach().clone()
    opt_before.zero_grad()
    model(x).square().mean().backward()
    grad = model.conv2.weight.grad.clone()
    opt_before.step()
    torch.testing.assert_close(model.conv2.weight.detach(), w0 - 0.1 * grad)
    assert model.conv2.weight.detach().unique().numel() > 16  # still float, not quantized
    # A fresh optimizer sees the steps as parameters too.
    names = {n for n, _ in model.named_parameters()}
    assert {"relu1.alpha", "relu2.alpha"} <= names


def test_quantize_model_shared_relu_and_linear_only():
    class Shared(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Linear(4, 4), nn.Linear(4, 4)
            self.act = nn.ReLU()

        def forward(self, x):
            return self.b(self.act(self.a(self.act(x))))

    m = quantize_model(Shared(), 2, a_bits=4, per_channel=True)
    assert isinstance(m.act, QuantReLU) and m.a.per_channel and m.b.w_bits == 2
    out = m(torch.randn(3, 4))
    out.sum().backward()
    assert m.act.alpha.grad is not None
    assert quantize_model(Shared(), 1).act.__class__ is nn.ReLU
    with pytest.raises(ValueError, match="a_bits"):
        quantize_model(Shared(), 4, a_bits=3)


# ---- opcheck, compile, determinism ---------------------------------------------------------------
def _opcheck_cases(device):
    x = randn(3, 4, 5, seed=1, device=device)
    g = randn(3, 4, 5, seed=2, device=device)
    w = randn(6, 4, 3, 3, seed=3, device=device)
    alpha = torch.tensor([0.3], device=device, requires_grad=True)
    s1 = torch.tensor([0.05], device=device, requires_grad=True)
    z1 = torch.tensor([1.3], device=device, requires_grad=True)
    sc = torch.rand(4, generator=gen(5)).add(0.02).to(device).requires_grad_()
    zc = torch.randn(4, generator=gen(6)).to(device).requires_grad_()
    zi = torch.tensor([1, -2, 0, 3], dtype=torch.int32, device=device)
    xr = x.clone().requires_grad_()
    wr = w.clone().requires_grad_()
    return [
        (ops.quantize_weight.default, (wr, 4, True)),
        (ops.quantize_weight.default, (wr, 2, False)),
        (ops.quant_relu.default, (xr, alpha, 4, "inplt", "ae", 0.01)),
        (
            ops.quant_relu_backward.default,
            (g, x, alpha.detach(), 4, "relu", "mean", 0.01, [True, True]),
        ),
        (ops.fake_quantize.default, (xr, s1, z1, -8, 7, None, True, 0.5)),
        (ops.fake_quantize.default, (xr, sc, zc, -8, 7, 1, True, 1.0)),
        (ops.fake_quantize.default, (xr, sc.detach(), zi, -8, 7, 1, False, 1.0)),
        (
            ops.fake_quantize_backward.default,
            (g, x, s1.detach(), z1.detach(), -8, 7, None, True, 1.0, [True, True, True]),
        ),
        (
            ops.fake_quantize_backward.default,
            (g, x, sc.detach(), zi, -8, 7, 1, False, 1.0, [True, False, False]),
        ),
    ]


@pytest.mark.parametrize("device", DEVICES)
def test_opcheck(device):
    for op, args in _opcheck_cases(device):
        torch.library.opcheck(op, args)


@pytest.mark.parametrize("device", DEVICES)
def test_torch_compile_fullgraph(device):
    torch._dynamo.reset()
    w = randn(8, 4, 3, 3, seed=1, device=device).requires_grad_()
    x = randn(2, 4, 6, 6, seed=2, device=device).requires_grad_()
    s = torch.tensor([0.05], device=device, requires_grad=True)
    z = torch.tensor([0.0], device=device, requires_grad=True)
    relu = QuantReLU(4).to(device)

    def step(x, w, s, z):
        h = F.conv2d(x, quantize_weight(w, 4, per_channel=True), padding=1)
        h = relu(h)
        return fake_quantize(h, s, z, -8, 7, learnable=True).square().sum()

    compiled = torch.compile(step, fullgraph=True, dynamic=False)
    args = (x, w, s, z)
    eager = torch.autograd.grad(step(*args), (*args, relu.alpha))
    comp = torch.autograd.grad(compiled(*args), (*args, relu.alpha))
    for a, b in zip(eager, comp, strict=True):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize("device", DEVICES)
def test_torch_compile_dynamic_shapes(device):
    # fullgraph with dynamic shapes (float options become SymFloats there), two input shapes,
    # values and gradients equal to eager.
    torch._dynamo.reset()
    relu = QuantReLU(4).to(device)
    with torch.no_grad():
        relu.alpha.fill_(7.0)  # projected into [1e-3, 5] by the compiled forward as by eager
    alpha = torch.tensor([0.3], device=device, requires_grad=True)
    s1 = torch.tensor([0.05], device=device, requires_grad=True)
    z1 = torch.tensor([0.4], device=device, requires_grad=True)
    sc = torch.linspace(0.03, 0.06, 4, device=device).requires_grad_()
    zc = torch.linspace(-1.0, 1.0, 4, device=device).requires_grad_()
    params = (alpha, s1, z1, sc, zc, relu.alpha)

    def step(x, rate, grad_factor):
        y = relu(x) + quant_relu(x, alpha, 3, alpha_grad="ae", rate=rate)
        y = y + quant_relu(x, 0.25, 2)
        y = y + fake_quantize(x, 0.05, 3, -8, 7)
        y = y + fake_quantize(x, s1, z1, -8, 7, learnable=True, grad_factor=grad_factor)
        y = y + fake_quantize(x, sc, zc, -128, 127, axis=1, learnable=True)
        return y.square().sum()

    compiled = torch.compile(step, fullgraph=True, dynamic=True)
    for shape, rate, gf in (((2, 4, 5, 3), 0.01, 0.5), ((3, 4, 7, 6), 0.02, 0.25)):
        x = randn(*shape, seed=shape[0], device=device).requires_grad_()
        eager = torch.autograd.grad(step(x, rate, gf), (x, *params))
        comp = torch.autograd.grad(compiled(x, rate, gf), (x, *params))
        for a, b in zip(eager, comp, strict=True):
            torch.testing.assert_close(a, b)
    assert relu.alpha.item() == 5.0


def _export_matches_eager(model, *xs):
    ep = torch.export.export(model, (xs[0],))
    for x in xs:
        assert torch.equal(ep.module()(x), model(x))
    return ep


def test_export_quant_modules():
    # torch.export: the exported programs give the eager forward values.
    relu = QuantReLU(4)
    with torch.no_grad():
        relu.alpha.fill_(9.0)  # outside [1e-3, 5]: the kernel's clamp makes the value the same
    x = torch.linspace(-1, 40, 64)
    ep = torch.export.export(relu, (x,))
    assert relu.alpha.item() == 9.0  # exporting leaves the stored step alone
    assert torch.equal(ep.module()(x), QuantReLU(4, alpha=5.0)(x))
    assert torch.equal(ep.module()(x), relu(x))
    assert relu.alpha.item() == 5.0  # eager forward still projects it
    torch.manual_seed(0)
    _export_matches_eager(QuantConv2d(3, 4, 3, padding=1, w_bits=4), *torch.randn(2, 1, 3, 6, 6))
    lin = QuantLinear(5, 3, w_bits=2, per_channel=True)
    _export_matches_eager(lin, *torch.randn(2, 4, 5))
    net = quantize_model(SmallCNN(), 4, a_bits=2, per_channel=True)
    _export_matches_eager(net, *torch.randn(2, 2, 3, 8, 8))


@pytest.mark.parametrize("device", DEVICES)
def test_backward_is_deterministic(device):
    x = near_ties(50000, 0.02, 0, seed=3).to(device).reshape(50, -1)
    s = torch.tensor([0.02], device=device, requires_grad=True)
    z = torch.tensor([0.4], device=device, requires_grad=True)
    alpha = torch.tensor([0.2], device=device, requires_grad=True)
    grads = []
    for _ in range(2):
        for t in (s, z, alpha):
            t.grad = None
        (
            fake_quantize(x, s, z, -8, 7, learnable=True).sum() + quant_relu(x, alpha, 4).sum()
        ).backward()
        grads.append((s.grad.clone(), z.grad.clone(), alpha.grad.clone()))
    for a, b in zip(*grads, strict=True):
        assert torch.equal(a, b)
    if device == "cpu":  # fixed work blocks: the thread count does not change the sums
        n = torch.get_num_threads()
        try:
            torch.set_num_threads(1)
            for t in (s, z):
                t.grad = None
            fake_quantize(x, s, z, -8, 7, learnable=True).sum().backward()
        finally:
            torch.set_num_threads(n)
        assert torch.equal(s.grad, grads[0][0]) and torch.equal(z.grad, grads[0][1])


@pytest.mark.skipif(not CUDA, reason="no GPU")
def test_cuda_ops_never_sync():
    # No host round trip anywhere: qparams and the step stay on the device (or are CPU scalars).
    dev = "cuda"
    w = randn(64, 32, 3, 3, device=dev).requires_grad_()
    x = randn(4, 32, 16, 16, seed=1, device=dev).requires_grad_()
    s = torch.tensor([0.02], device=dev, requires_grad=True)
    z = torch.tensor([1.0], device=dev, requires_grad=True)
    sc = torch.full((32,), 0.03, device=dev, requires_grad=True)
    zc = torch.zeros(32, device=dev, requires_grad=True)
    relu = QuantReLU(4).to(dev)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        h = relu(x) + quantize_weight(w, 4, per_channel=True).sum()
        y = fake_quantize(h, s, z, -128, 127, learnable=True)
        y = y + fake_quantize(h, sc, zc, -128, 127, axis=1, learnable=True)
        y = y + fake_quantize(h, 0.05, 3, -128, 127)
        y.backward(torch.ones_like(y))
    finally:
        torch.cuda.set_sync_debug_mode(0)
    assert s.grad is not None and relu.alpha.grad is not None and w.grad is not None


_ISA_SCRIPT = r"""
import torch, ffa.quant as q
torch.manual_seed(0)
w = torch.randn(32, 16, 3, 3); x = torch.randn(4, 8, 16, 16) * 3
x[0, 0, 0, :4] = torch.tensor([0.5, 1.5, -2.5, 3.5]) * 0.05
x[0, 1, 0, :3] = torch.tensor([float("nan"), float("inf"), -float("inf")])
s = torch.tensor([0.05], requires_grad=True); z = torch.tensor([1.0], requires_grad=True)
a = torch.tensor([0.2], requires_grad=True)
xr = x.clone().requires_grad_()
out = [q.quantize_weight(w, b, per_channel=pc) for b in (1, 2, 4, 8) for pc in (False, True)]
out.append(q.quantize_weight(w.half(), 3).float())
out += [q.quantize_weight(w[:, :1, :1, :1], b, per_channel=True) for b in (2, 4)]
y = q.fake_quantize(xr, s, z, -128, 127, learnable=True)
r = q.quant_relu(xr, a, 4, alpha_grad="ae")
(y.sum() + r.square().sum()).backward()
out += [y, r, xr.grad, s.grad, z.grad, a.grad]
out.append(q.fake_quantize(x, torch.rand(8) + 0.01, torch.randn(8), -8, 7, axis=1))
torch.save(out, "{path}")
"""


def test_isa_variants_agree(tmp_path):
    # The CPU loops are compiled per ISA; FFA_QUANT_ISA forces one (read once per process).
    procs = {}
    for isa in ("base", "avx2"):
        env = dict(os.environ, FFA_QUANT_ISA=isa)
        script = _ISA_SCRIPT.format(path=tmp_path / f"{isa}.pt")
        procs[isa] = subprocess.Popen([sys.executable, "-c", script], env=env, cwd=tmp_path)
    exec(_ISA_SCRIPT.format(path=tmp_path / "default.pt"), {})
    default = torch.load(tmp_path / "default.pt")
    for isa, proc in procs.items():
        assert proc.wait() == 0, isa
        for a, b in zip(torch.load(tmp_path / f"{isa}.pt"), default, strict=True):
            torch.testing.assert_close(a, b, rtol=0, atol=0, equal_nan=True, msg=isa)


@pytest.mark.parametrize("mode", ["grad", "no_grad", "inference_mode"])
def test_op_level_errors_keep_their_type(mode):
    """The native kernels can only raise RuntimeError across the stable ABI; ffa restores the
    ValueError / TypeError of the check on every path, inference mode (no Autograd kernel) too."""
    x = torch.randn(4, 4, requires_grad=mode == "grad")
    context = {"grad": torch.enable_grad, "no_grad": torch.no_grad}.get(mode, torch.inference_mode)
    with context():
        with pytest.raises(ValueError, match="alpha must have exactly one element"):
            torch.ops.ffa.quant_relu(x, torch.ones(2), 4, "inplt", "mean", 0.01)
        with pytest.raises(ValueError, match="quant_min must be less than quant_max"):
            torch.ops.ffa.fake_quantize(x, torch.ones(1), torch.zeros(1), 5, 3, None, False, 1.0)
        with pytest.raises(TypeError, match="x must be a floating-point tensor"):
            torch.ops.ffa.fake_quantize(
                torch.ones(4, dtype=torch.int32),
                torch.ones(1),
                torch.zeros(1),
                0,
                3,
                None,
                False,
                1.0,
            )
