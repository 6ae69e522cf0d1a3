"""CUDA implementations of the loss ops: CUDA vs CPU vs the float64 reference, determinism, opcheck,
torch.compile, devices. Skipped without a GPU.

Accuracy rule (flash-attention's): the float64 reference on the same (rounded) inputs is the truth;
a result's error is ||out - ref|| / ||ref||. float64 and full float32 have fixed bounds; TF32, bf16
and fp16 must stay within twice the error PyTorch's own eager computation makes at that precision
(with a small floor, so a lucky eager run cannot fail the test).
"""

from __future__ import annotations

import contextlib
import math
import zlib

import pytest
import torch

from ffa import FastFeatureAffinityLoss, fast_feature_affinity_loss, feature_affinity_loss
from ffa import reference as ref

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
ops = torch.ops.ffa
EPS = 1e-5


@contextlib.contextmanager
def tf32(enabled: bool):
    old = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = enabled
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32 = old


def rel_err(out, want):
    out, want = out.double().cpu(), want.double().cpu()
    assert torch.isfinite(out).all(), "non-finite output"
    return ((out - want).norm() / want.norm().clamp_min(1e-300)).item()


def make_pair(b, cs, ct, h, w, dtype, layout="contiguous", seed=0, device="cuda"):
    """Fresh random features (never zeros) in the requested layout, on `device`."""
    g = torch.Generator().manual_seed(seed)
    s = torch.randn(
        b, cs + (3 if layout == "sliced" else 0), h, w, generator=g, dtype=torch.float64
    )
    t = torch.randn(b, ct, h, w, generator=g, dtype=torch.float64)
    s, t = s.to(device, dtype), t.to(device, dtype)
    if layout == "channels_last":
        s, t = s.to(memory_format=torch.channels_last), t.to(memory_format=torch.channels_last)
    elif layout == "sliced":  # non-contiguous channel slice
        s = s[:, 2 : 2 + cs]
    return s, t


# (label, dtype, allow_tf32)
PRECISIONS = [
    ("fp64", torch.float64, False),
    ("fp32", torch.float32, False),
    ("tf32", torch.float32, True),
    ("bf16", torch.bfloat16, False),
    ("fp16", torch.float16, False),
]
SHAPES = [  # b, cs, ct, h, w: odd N and channels, several 128-row blocks, K > 16-aligned parts
    (1, 3, 5, 7, 9),
    (2, 16, 16, 8, 8),
    (2, 40, 24, 12, 11),
    (2, 64, 64, 37, 40),
]


def _bound(label, torch_err):
    """Allowed relative error for a precision (torch_err: PyTorch eager's error at it, or None)."""
    if label == "fp64":
        return 1e-10
    if label == "fp32":
        return 1e-4
    floor = {"tf32": 1e-3, "bf16": 2e-3, "fp16": 1e-3}[label]
    return max(2 * torch_err, floor)


def _eager_fa(s, t, p):
    return ref.fa_loss(s, t, p=p, reduction="none")


@pytest.mark.parametrize("label,dtype,allow", PRECISIONS, ids=[p[0] for p in PRECISIONS])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("p", [1, 2])
@pytest.mark.parametrize("layout", ["contiguous", "channels_last", "sliced"])
def test_fa_forward(label, dtype, allow, shape, p, layout):
    if shape[3] * shape[4] > 1000 and layout != "contiguous":
        pytest.skip("large shape: contiguous only, to keep the suite fast")
    s, t = make_pair(*shape, dtype, layout, seed=zlib.crc32(repr((shape, p, label)).encode()))
    want = _eager_fa(s.double(), t.double(), p)
    with tf32(allow):
        out = ops.fa_loss(s, t, p, EPS)
        eager = _eager_fa(s, t, p) if label in ("tf32", "bf16", "fp16") else None
    assert out.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    torch_err = rel_err(eager, want) if eager is not None else None
    assert rel_err(out, want) <= _bound(label, torch_err)
    if label in ("fp64", "fp32"):  # the CPU kernel computes the same thing at the same precision
        cpu = ops.fa_loss(s.cpu(), t.cpu(), p, EPS)
        assert rel_err(out, cpu) <= (1e-10 if label == "fp64" else 1e-5)


def _grads(fn, s, t, need_t=True):
    s = s.detach().clone().requires_grad_()
    t = t.detach().clone().requires_grad_(need_t)
    weights = torch.linspace(0.5, 1.5, s.shape[0], device=s.device, dtype=torch.float64)
    (fn(s, t).double() * weights).sum().backward()
    return s.grad, t.grad


@pytest.mark.parametrize("label,dtype,allow", PRECISIONS, ids=[p[0] for p in PRECISIONS])
@pytest.mark.parametrize("shape", SHAPES[:3], ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("p", [1, 2])
@pytest.mark.parametrize("need_t", [True, False])
def test_fa_backward(label, dtype, allow, shape, p, need_t):
    s, t = make_pair(*shape, dtype, "channels_last" if need_t else "contiguous", seed=7)
    ws, wt = _grads(lambda a, b: _eager_fa(a, b, p), s.double(), t.double(), need_t)
    with tf32(allow):
        gs, gt = _grads(lambda a, b: ops.fa_loss(a, b, p, EPS), s, t, need_t)
        if label in ("tf32", "bf16", "fp16"):
            es, _ = _grads(lambda a, b: _eager_fa(a, b, p), s, t, need_t)
            torch_err = rel_err(es, ws)
        else:
            torch_err = None
    assert gs.dtype == dtype and gs.shape == s.shape
    # p = 1: sign(D) may flip where |D| is at rounding level; such entries are rare and small in the
    # norm, but they make the gradient error larger than the loss error.
    bound = _bound(label, torch_err) * (10 if p == 1 else 1)
    assert rel_err(gs, ws) <= bound
    if need_t:
        assert rel_err(gt, wt) <= bound
    else:
        assert gt is None


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_fa_large_channels_take_the_simt_path(dtype):
    # K = 608 does not fit the resident tensor-core tiles in shared memory: SIMT fallback.
    s, t = make_pair(1, 300, 300, 9, 10, dtype, seed=3)
    label = "bf16" if dtype == torch.bfloat16 else "fp16"
    want = _eager_fa(s.double(), t.double(), 1)
    torch_err = rel_err(_eager_fa(s, t, 1), want)
    assert rel_err(ops.fa_loss(s, t, 1, EPS), want) <= _bound(label, torch_err)
    ws, _ = _grads(lambda a, b: _eager_fa(a, b, 1), s.double(), t.double())
    es, _ = _grads(lambda a, b: _eager_fa(a, b, 1), s, t)
    gs, _ = _grads(lambda a, b: ops.fa_loss(a, b, 1, EPS), s, t)
    assert rel_err(gs, ws) <= 10 * _bound(label, rel_err(es, ws))


# ---- numerics: input scale, tiny eps, ties, the two exact p = 2 forms ----------------------------
# Input scales where squared pixel norms leave the range of the input dtype (float32 squares
# overflow above ~1e19 and underflow below ~1e-19; float64 above ~1e154 and below ~1e-154), with eps
# scaled along: L(c s, c t, c eps) = L(s, t, eps) and the gradients scale by 1 / c, so the oracle is
# the float64 reference on the unscaled values. (label, dtype, allow_tf32, scale)
SCALES = [
    *[(lbl, torch.float32, allow, x) for lbl, allow in (("fp32", False), ("tf32", True))
      for x in (1e-30, 1e-20, 1e20, 1e30)],
    *[("bf16", torch.bfloat16, False, x) for x in (1e-30, 1e30)],
    *[("fp64", torch.float64, False, x) for x in (1e-300, 1e-200, 1e200, 1e300)],
]  # fmt: skip


def _scaled_pair(shape, dtype, scale, seed, layout="contiguous"):
    """Features times `scale` in `dtype`, and the float64 values they hold divided by `scale`."""
    s, t = make_pair(*shape, torch.float64, layout, seed=seed)
    s, t = (s * scale).to(dtype), (t * scale).to(dtype)
    return s, t, s.double() / scale, t.double() / scale


def _rel_err_saturating(out, want):
    """rel_err, except that where the true value overflows the output dtype the output must be
    the same infinity (a gradient g_u / eps of an all-zero pixel with a tiny eps may)."""
    want_rounded = want.to(out.dtype)
    big = ~torch.isfinite(want_rounded)
    assert not torch.isnan(out).any()
    assert torch.equal(out[big], want_rounded[big])
    return rel_err(out[~big], want[~big])


@pytest.mark.parametrize(
    "label,dtype,allow,scale", SCALES, ids=[f"{x[0]}-{x[3]:g}" for x in SCALES]
)
@pytest.mark.parametrize(
    "shape", [(2, 5, 4, 6, 7), (1, 12, 10, 3, 5)], ids=lambda s: "x".join(map(str, s))
)
@pytest.mark.parametrize("p", [1, 2])
def test_fa_extreme_input_scales(label, dtype, allow, scale, shape, p):
    # p = 2: (2, 5, 4, 6, 7) takes the channel form (N >= Cs + Ct), (1, 12, 10, 3, 5) the N x N.
    s, t, s1, t1 = _scaled_pair(shape, dtype, scale, seed=zlib.crc32(repr((shape, p)).encode()))
    eps = EPS * scale
    want = _eager_fa(s1, t1, p)
    ws, wt = _grads(lambda a, b: _eager_fa(a, b, p), s1, t1)
    with tf32(allow):
        out = ops.fa_loss(s, t, p, eps)
        gs, gt = _grads(lambda a, b: ops.fa_loss(a, b, p, eps), s, t)
        # PyTorch's own error at this precision, on the same values unscaled (it fails when scaled)
        eager = _eager_fa(s1.to(dtype), t1.to(dtype), p) if label in ("tf32", "bf16") else None
        es = None
        if eager is not None:
            es, _ = _grads(lambda a, b: _eager_fa(a, b, p), s1.to(dtype), t1.to(dtype))
    bound = _bound(label, rel_err(eager, want) if eager is not None else None)
    assert rel_err(out, want) <= bound
    gbound = _bound(label, rel_err(es, ws) if es is not None else None) * (10 if p == 1 else 1)
    assert _rel_err_saturating(gs, ws / scale) <= gbound
    assert _rel_err_saturating(gt, wt / scale) <= gbound


FFA_SCALES = [x for x in SCALES if x[0] != "tf32"]  # FFA has no tensor-core path


@pytest.mark.parametrize(
    "label,dtype,allow,scale", FFA_SCALES, ids=[f"{x[0]}-{x[3]:g}" for x in FFA_SCALES]
)
@pytest.mark.parametrize("p", [1, 2])
def test_ffa_extreme_input_scales(label, dtype, allow, scale, p):
    s, t, s1, t1 = _scaled_pair((2, 6, 9, 7, 8), dtype, scale, seed=p, layout="channels_last")
    cdt = torch.float64 if dtype == torch.float64 else torch.float32
    z = torch.randn(1, 56, 15, device="cuda", dtype=cdt)
    eps = EPS * scale

    def oracle(a, b):
        return ref.ffa_loss(a, b, z.double(), p=p, reduction="none", eps=EPS)

    want = oracle(s1, t1)
    ws, wt = _grads(oracle, s1, t1)
    out = ops.ffa_loss(s, t, z, p, eps)[0]
    gs, gt = _grads(lambda a, b: ops.ffa_loss(a, b, z, p, eps)[0], s, t)
    bound = 1e-10 if dtype == torch.float64 else 1e-5  # unit pixels in float64, math in float32
    assert rel_err(out, want) <= bound
    gbound = 1e-9 if dtype == torch.float64 else (1e-4 if dtype == torch.float32 else 1e-2)
    assert _rel_err_saturating(gs, ws / scale) <= gbound
    assert _rel_err_saturating(gt, wt / scale) <= gbound


@pytest.mark.parametrize("label,dtype,allow", PRECISIONS[1:4], ids=[p[0] for p in PRECISIONS[1:4]])
@pytest.mark.parametrize("p", [1, 2])
@pytest.mark.parametrize("kind", ["fa", "ffa"])
def test_eps_below_float32_range_with_zero_pixels(label, dtype, allow, p, kind):
    # eps = 1e-40 is subnormal in float32. An all-zero pixel (here in both tensors, and one in the
    # student only) must give u = 0, never NaN; its gradient is g_u / eps (may overflow float32).
    eps = 1e-40
    s, t = make_pair(2, 6, 5, 7, 8, torch.float64, seed=21)
    s[:, :, 0, 0] = 0
    t[:, :, 0, 0] = 0
    s[1, :, 3, 4] = 0
    s, t = s.to(dtype), t.to(dtype)
    z = torch.randn(1, 56, 15, device="cuda", dtype=torch.float32)

    def ours(a, b):
        return ops.fa_loss(a, b, p, eps) if kind == "fa" else ops.ffa_loss(a, b, z, p, eps)[0]

    def oracle(a, b):
        if kind == "fa":
            return ref.fa_loss(a, b, p=p, reduction="none", eps=eps)
        return ref.ffa_loss(a, b, z.double(), p=p, reduction="none", eps=eps)

    want = oracle(s.double(), t.double())
    ws, wt = _grads(oracle, s.double(), t.double())
    with tf32(allow):
        out = ours(s, t)
        gs, gt = _grads(ours, s, t)
    assert torch.isfinite(out).all()
    if kind == "fa":  # the fixed bounds of the emulator's checks at these precisions
        bound = {"fp32": 1e-4, "tf32": 5e-3, "bf16": 2e-2}[label]
        gbound = bound * (10 if p == 1 else 1)
    else:  # features read exactly, float32 math
        bound, gbound = 1e-5, (1e-2 if label == "bf16" else 1e-4)
    assert rel_err(out, want) <= bound
    assert _rel_err_saturating(gs, ws) <= gbound
    assert _rel_err_saturating(gt, wt) <= gbound


# Student and teacher holding equal values (the teacher in another layout): loss and gradients
# exactly 0 on every path. Shapes: p = 2 pixel form (N < Cs + Ct) and channel form; several row
# blocks of the p = 1 kernels.
EQUAL_SHAPES = [(2, 12, 12, 3, 5), (2, 6, 6, 7, 9), (1, 24, 24, 20, 32)]
EQUAL_LAYOUTS = [
    ("contiguous", "contiguous"),
    ("channels_last", "contiguous"),
    ("sliced", "channels_last"),
]


def _with_layout(x, layout):
    if layout == "channels_last":
        return x.contiguous(memory_format=torch.channels_last)
    if layout == "sliced":
        wide = torch.zeros(x.shape[0], x.shape[1] + 3, *x.shape[2:], dtype=x.dtype, device=x.device)
        wide[:, 2:-1] = x
        return wide[:, 2:-1]
    return x.contiguous()


@pytest.mark.parametrize("label,dtype,allow", PRECISIONS, ids=[p[0] for p in PRECISIONS])
@pytest.mark.parametrize("shape", EQUAL_SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("layouts", EQUAL_LAYOUTS, ids=lambda x: "-".join(x))
@pytest.mark.parametrize("p", [1, 2])
@pytest.mark.parametrize("kind", ["fa", "ffa", "ffa_philox"])
def test_student_equals_teacher_is_exactly_zero(label, dtype, allow, shape, layouts, p, kind):
    b, c, _, h, w = shape
    x = make_pair(b, c, c, h, w, dtype, seed=sum(shape))[0]
    s, t = _with_layout(x, layouts[0]), _with_layout(x, layouts[1])
    cdt = torch.float64 if dtype == torch.float64 else torch.float32
    z = torch.randn(1, h * w, 15, device="cuda", dtype=cdt)
    fns = {
        "fa": lambda a, d: ops.fa_loss(a, d, p, EPS),
        "ffa": lambda a, d: ops.ffa_loss(a, d, z, p, EPS)[0],
        "ffa_philox": lambda a, d: ops.ffa_loss_philox(a, d, 15, p, EPS, 5, 0)[0],
    }
    with tf32(allow):
        out, gs, gt = _fwd_bwd(fns[kind], s, t)
    assert torch.equal(out, torch.zeros_like(out)), out
    assert torch.equal(gs, torch.zeros_like(gs)) and torch.equal(gt, torch.zeros_like(gt))


@pytest.mark.parametrize("label,dtype,allow", PRECISIONS, ids=[p[0] for p in PRECISIONS])
@pytest.mark.parametrize("p", [1, 2])
def test_teacher_equal_on_half_the_pixels(label, dtype, allow, p):
    # Pairs of equal pixels give D_ij = 0 exactly (sign 0), as in the float64 oracle; the gradient
    # must match it at the usual tolerance (the fused K-deep product was ~40% off here).
    s, t = make_pair(2, 16, 16, 12, 11, dtype, "channels_last", seed=13)
    same = torch.rand(12, 11, generator=torch.Generator().manual_seed(3)) < 0.5
    t[:, :, same.cuda()] = s[:, :, same.cuda()]
    want = _eager_fa(s.double(), t.double(), p)
    ws, wt = _grads(lambda a, b: _eager_fa(a, b, p), s.double(), t.double())
    with tf32(allow):
        out = ops.fa_loss(s, t, p, EPS)
        gs, gt = _grads(lambda a, b: ops.fa_loss(a, b, p, EPS), s, t)
        low = label in ("tf32", "bf16", "fp16")
        eager = _eager_fa(s, t, p) if low else None
        es, et = _grads(lambda a, b: _eager_fa(a, b, p), s, t) if low else (None, None)
    assert rel_err(out, want) <= _bound(label, rel_err(eager, want) if low else None)
    gmul = 10 if p == 1 else 1
    assert rel_err(gs, ws) <= _bound(label, rel_err(es, ws) if low else None) * gmul
    assert rel_err(gt, wt) <= _bound(label, rel_err(et, wt) if low else None) * gmul


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_fa_p2_never_negative(dtype):
    # Student ~ teacher in the channel form (N >= Cs + Ct): the Gram identity cancels to rounding
    # level but never goes below 0.
    for seed in range(8):
        s, noise = make_pair(4, 6, 6, 9, 10, dtype, seed=seed)
        for rel in (0.0, 1e-12, 1e-9):
            out = ops.fa_loss(s, s + rel * noise, 2, EPS)
            assert (out >= 0).all(), (seed, rel, out)


# Both exact p = 2 forms (N x N when N < Cs + Ct, channel Gram matrices otherwise) around the
# switch, and C = 4096 with N = 4, where the channel form would need 4096^2 Gram matrices.
P2_SHAPES = [
    (2, 9, 7, 3, 5),
    (2, 8, 8, 4, 4),
    (2, 8, 9, 4, 4),
    (1, 150, 140, 16, 17),
    (1, 3, 2, 17, 19),
    (2, 4096, 4096, 2, 2),
]


@pytest.mark.parametrize("shape", P2_SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("label,dtype,allow", PRECISIONS[:2], ids=[p[0] for p in PRECISIONS[:2]])
@pytest.mark.parametrize("need_t", [True, False])
def test_fa_p2_both_forms(shape, label, dtype, allow, need_t):
    s, t = make_pair(*shape, dtype, "channels_last", seed=sum(shape))
    want = _eager_fa(s.double(), t.double(), 2)
    ws, wt = _grads(lambda a, b: _eager_fa(a, b, 2), s.double(), t.double(), need_t)
    out = ops.fa_loss(s, t, 2, EPS)
    gs, gt = _grads(lambda a, b: ops.fa_loss(a, b, 2, EPS), s, t, need_t)
    assert rel_err(out, want) <= _bound(label, None)
    assert rel_err(gs, ws) <= _bound(label, None)
    if need_t:
        assert rel_err(gt, wt) <= _bound(label, None)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("p", [1, 2])
@pytest.mark.parametrize("k", [1, 15, 17, 40])
@pytest.mark.parametrize("bz", [1, 2])
def test_ffa_projection(dtype, p, k, bz):
    s, t = make_pair(2, 24, 40, 13, 11, dtype, "channels_last", seed=k)
    n = s.shape[2] * s.shape[3]
    z = torch.randn(bz, n, k, device="cuda", dtype=torch.float64)
    cdt = torch.float64 if dtype == torch.float64 else torch.float32
    zc = z.to(cdt)
    want = ref.ffa_loss(s.double(), t.double(), zc.double(), p=p, reduction="none")
    bound = 1e-10 if dtype == torch.float64 else 1e-5  # features are read exactly, fp32 math
    loss, y, ps, pt = ops.ffa_loss(s, t, zc, p, EPS)
    assert rel_err(loss, want) <= bound
    cpu = ops.ffa_loss(s.cpu(), t.cpu(), zc.cpu(), p, EPS)
    for a, c in zip((loss, y, ps, pt), cpu, strict=True):
        assert a.dtype == c.dtype and a.shape == c.shape
        assert rel_err(a, c) <= max(bound, 1e-5)

    def fn(a, b):
        return ops.ffa_loss(a, b, zc, p, EPS)[0]

    ws, wt = _grads(
        lambda a, b: ref.ffa_loss(a, b, zc.double(), p=p, reduction="none"), s.double(), t.double()
    )
    gs, gt = _grads(fn, s, t)
    assert gs.dtype == dtype
    gbound = 1e-9 if dtype == torch.float64 else (1e-4 if dtype == torch.float32 else 1e-2)
    assert rel_err(gs, ws) <= gbound and rel_err(gt, wt) <= gbound


def test_ffa_philox_cuda_matches_cpu():
    for dtype, bound in ((torch.float64, 1e-10), (torch.float32, 1e-5), (torch.bfloat16, 1e-5)):
        s, t = make_pair(2, 24, 40, 13, 11, dtype, seed=5)
        for k in (15, 33):
            cuda = ops.ffa_loss_philox(s, t, k, 1, EPS, 1234, 8)
            cpu = ops.ffa_loss_philox(s.cpu(), t.cpu(), k, 1, EPS, 1234, 8)
            for a, c in zip(cuda, cpu, strict=True):
                assert rel_err(a, c) <= bound
            gc = _grads(lambda a, b, k=k: ops.ffa_loss_philox(a, b, k, 2, EPS, 1234, 8)[0], s, t)
            gh = _grads(
                lambda a, b, k=k: ops.ffa_loss_philox(a, b, k, 2, EPS, 1234, 8)[0],
                s.cpu(),
                t.cpu(),
            )
            for a, c in zip(gc, gh, strict=True):  # bf16 gradients: one rounding apart at most
                assert rel_err(a, c) <= (1e-2 if dtype == torch.bfloat16 else 10 * bound)


def _fwd_bwd(fn, s, t):
    s = s.detach().clone().requires_grad_()
    t = t.detach().clone().requires_grad_()
    out = fn(s, t)
    out.sum().backward()
    return out.detach(), s.grad, t.grad


@pytest.mark.parametrize("label,dtype,allow", PRECISIONS, ids=[p[0] for p in PRECISIONS])
def test_bitwise_determinism(label, dtype, allow):
    s, t = make_pair(2, 64, 48, 30, 29, dtype, seed=11)
    z = torch.randn(
        1, 30 * 29, 15, device="cuda", dtype=torch.float64 if label == "fp64" else torch.float32
    )
    fns = [
        lambda a, b: ops.fa_loss(a, b, 1, EPS),
        lambda a, b: ops.fa_loss(a, b, 2, EPS),
        lambda a, b: ops.ffa_loss(a, b, z, 1, EPS)[0],
        lambda a, b: ops.ffa_loss_philox(a, b, 15, 2, EPS, 77, 0)[0],
    ]
    with tf32(allow):
        for fn in fns:
            first = _fwd_bwd(fn, s, t)
            for _ in range(2):
                again = _fwd_bwd(fn, s, t)
                for a, b in zip(first, again, strict=True):
                    assert torch.equal(a, b)


def test_outputs_fully_written():
    # Poison the caching allocator's blocks with NaN, then check that nothing NaN leaks out.
    # Both pools: small blocks (<= 1 MiB) and large segments.
    poison = [
        torch.full((n,), float("nan"), device="cuda") for n in (1 << 8, 1 << 12, 1 << 16, 64 << 20)
    ]
    del poison
    s, t = make_pair(2, 40, 24, 12, 11, torch.bfloat16, seed=2)
    outs = list(_fwd_bwd(lambda a, b: ops.fa_loss(a, b, 1, EPS), s, t))
    outs += list(_fwd_bwd(lambda a, b: ops.ffa_loss_philox(a, b, 15, 1, EPS, 1, 0)[0], s, t))
    outs += list(ops.ffa_loss_philox(s, t, 21, 1, EPS, 1, 0))
    for o in outs:
        assert torch.isfinite(o.float()).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_opcheck(dtype):
    s, t = make_pair(2, 5, 3, 6, 7, dtype, seed=1)
    s.requires_grad_()
    cdt = torch.float32
    z = torch.randn(1, 42, 4, device="cuda", dtype=cdt)
    grad = torch.rand(2, device="cuda", dtype=cdt)
    for p in (1, 2):
        torch.library.opcheck(ops.fa_loss.default, (s, t, p, EPS))
        torch.library.opcheck(
            ops.fa_loss_backward.default, (grad, s.detach(), t, p, EPS, [True, True])
        )
        torch.library.opcheck(ops.ffa_loss.default, (s, t, z, p, EPS))
        loss, y, ps, pt = ops.ffa_loss(s.detach(), t, z, p, EPS)
        torch.library.opcheck(
            ops.ffa_loss_backward.default,
            (grad, s.detach(), t, z, y, ps, pt, p, EPS, [True, False]),
        )
        torch.library.opcheck(ops.ffa_loss_philox.default, (s, t, 4, p, EPS, 5, 0))
        loss, y, ps, pt = ops.ffa_loss_philox(s.detach(), t, 4, p, EPS, 5, 0)
        torch.library.opcheck(
            ops.ffa_loss_philox_backward.default,
            (grad, s.detach(), t, y, ps, pt, 4, p, EPS, 5, 0, [False, True]),
        )


def test_compile_fullgraph():
    s, t = make_pair(2, 16, 8, 10, 9, torch.float32, seed=4)
    z = torch.randn(90, 15, device="cuda")

    def f(a, b):
        return (
            feature_affinity_loss(a, b, p=1)
            + feature_affinity_loss(a, b, p=2)
            + fast_feature_affinity_loss(a, b, projection=z)
            + ops.ffa_loss_philox(a, b, 15, 1, EPS, 3, 0)[0].mean()
        )

    eager = _fwd_bwd(lambda a, b: f(a, b).reshape(1), s, t)
    compiled = _fwd_bwd(lambda a, b: torch.compile(f, fullgraph=True)(a, b).reshape(1), s, t)
    for a, b in zip(eager, compiled, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)


def test_same_seed_same_ffa_value():
    s, t = make_pair(2, 16, 8, 10, 9, torch.float32, seed=6)
    a = FastFeatureAffinityLoss(seed=3)(s, t)
    b = FastFeatureAffinityLoss(seed=3)(s, t)
    assert torch.equal(a, b)
    g1 = torch.Generator(device="cuda").manual_seed(9)
    g2 = torch.Generator(device="cuda").manual_seed(9)
    assert torch.equal(
        fast_feature_affinity_loss(s, t, generator=g1),
        fast_feature_affinity_loss(s, t, generator=g2),
    )


def test_empty_and_tiny():
    s, t = make_pair(0, 4, 4, 3, 3, torch.float32)
    assert ops.fa_loss(s, t, 1, EPS).shape == (0,)
    assert ops.ffa_loss_philox(s, t, 4, 1, EPS, 0, 0)[0].shape == (0,)
    s, t = make_pair(3, 4, 2, 1, 1, torch.float32)  # N = 1
    for p in (1, 2):
        # D_11 = |u_S|^2 - |u_T|^2 ~ 1e-6 (eps-sized): p = 1 agrees to float32 rounding of 1.
        torch.testing.assert_close(
            ops.fa_loss(s, t, p, EPS),
            ops.fa_loss(s.cpu(), t.cpu(), p, EPS).cuda(),
            rtol=1e-5,
            atol=1e-6 if p == 1 else 1e-12,
        )


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 GPUs")
def test_tensor_on_a_non_current_gpu():
    s, t = make_pair(2, 16, 8, 10, 9, torch.bfloat16, seed=8, device="cuda:1")
    z = torch.randn(1, 90, 15, device="cuda:1")
    assert torch.cuda.current_device() == 0
    out = _fwd_bwd(lambda a, b: ops.fa_loss(a, b, 1, EPS) + ops.ffa_loss(a, b, z, 1, EPS)[0], s, t)
    with torch.cuda.device(1):
        want = _fwd_bwd(
            lambda a, b: ops.fa_loss(a, b, 1, EPS) + ops.ffa_loss(a, b, z, 1, EPS)[0], s, t
        )
    for a, b in zip(out, want, strict=True):
        assert a.device == torch.device("cuda:1") and torch.equal(a, b)


def test_mixed_devices_raise():
    s, t = make_pair(2, 4, 4, 5, 5, torch.float32)
    with pytest.raises(ValueError, match="same device"):
        feature_affinity_loss(s, t.cpu())
    with pytest.raises(RuntimeError, match="same device"):
        ops.fa_loss(s, t.cpu(), 1, EPS)
    with pytest.raises(RuntimeError, match="device"):
        ops.ffa_loss(s, t, torch.randn(1, 25, 3), 1, EPS)
    with pytest.raises(RuntimeError, match="grad must be on"):
        ops.fa_loss_backward(torch.ones(2), s, t, 1, EPS, [True, True])
    if torch.cuda.device_count() >= 2:
        with pytest.raises(RuntimeError, match="same device"):
            ops.fa_loss(s, t.to("cuda:1"), 1, EPS)


def test_bad_input_errors_match_cpu():
    s, t = make_pair(2, 4, 4, 5, 5, torch.float32)
    for p in (0, 3):
        with pytest.raises(RuntimeError, match="p must be 1 or 2"):
            ops.fa_loss(s, t, p, EPS)
    with pytest.raises(RuntimeError, match="eps must be positive"):
        ops.fa_loss(s, t, 1, 0.0)
    with pytest.raises(RuntimeError, match="projection must have N=25"):
        ops.ffa_loss(s, t, torch.randn(1, 24, 3, device="cuda"), 1, EPS)


def test_fa_p1_runs_at_256x256():
    # The reference would need B N^2 = 2 * 65536^2 floats (32 GiB) for the affinity difference.
    s, t = make_pair(2, 64, 64, 256, 256, torch.bfloat16, seed=12)
    out = _fwd_bwd(lambda a, b: ops.fa_loss(a, b, 1, EPS), s, t)
    assert all(torch.isfinite(o.float()).all() for o in out)
    # |D_ij| <= 2 for unit pixels; random features give a loss well inside (0, 2).
    assert ((out[0] > 0) & (out[0] < 2)).all()
    assert not math.isnan(out[0].sum().item())
