"""The portable quantization kernels (ffa.quant.portable) against the native CPU ops.

Every portable function is called exactly as the dispatcher calls a kernel (the op's schema
arguments) and compared with torch.ops.ffa.<op> on the CPU: shapes, dtypes, strides and devices,
values bit for bit where the native op is bitwise (fake_quantize values and x gradients,
quant_relu values and x gradient, quantize_weight's zero/sign/NaN pattern), and reductions
(quantize_weight's scale, the step and qparam gradients; float64 sums in another order) within a
few float64 ulps of the sum. A CUDA test (skipped without a GPU) runs the portable kernels on the
device against the native CPU ops, with one-element CPU qparams.
"""

from __future__ import annotations

import itertools
import struct
from fractions import Fraction

import pytest
import torch

from ffa.quant import portable as P

pytestmark = pytest.mark.torch_threads(1)

ops = torch.ops.ffa
CUDA = torch.cuda.is_available()
ALL_FLOATS = [torch.float32, torch.float64, torch.float16, torch.bfloat16]
MASKS2 = [list(m) for m in itertools.product([False, True], repeat=2)]
MASKS3 = [list(m) for m in itertools.product([False, True], repeat=3)]
NAN, INF = float("nan"), float("inf")


def gen(seed):
    return torch.Generator().manual_seed(seed)


def randn(*shape, seed=0, dtype=torch.float32, scale=1.0):
    return (torch.randn(*shape, generator=gen(seed), dtype=torch.float64) * scale).to(dtype)


def signs(t):
    """The sign bits (of zeros too), NaNs left out: a NaN's sign bit is the hardware's choice."""
    return t.signbit() & ~t.isnan()


def assert_same(got, want, msg=""):
    """Bitwise equal (NaN == NaN, and the sign of zero too), same metadata."""
    assert got.dtype == want.dtype, msg
    assert got.shape == want.shape, msg
    assert got.device == want.device, msg
    if got.numel() > 1 and (
        want.is_contiguous() or want.is_contiguous(memory_format=torch.channels_last)
    ):
        assert got.stride() == want.stride(), msg
    if got.is_floating_point():
        torch.testing.assert_close(got, want, rtol=0, atol=0, equal_nan=True, msg=msg)
        assert torch.equal(signs(got), signs(want)), msg
    else:
        assert torch.equal(got, want), msg


def assert_sum_close(got, want, rtol, atol=0.0, msg=""):
    """A reduction: same metadata, NaN/Inf in the same places, values to the tolerance."""
    assert got.dtype == want.dtype and got.shape == want.shape, msg
    assert got.device == want.device, msg
    torch.testing.assert_close(got, want, rtol=rtol, atol=atol, equal_nan=True, msg=msg)


def ulp_tol(dtype):
    # float64 sums in another order: a few ulps; float32 results of float64 sums: equal in
    # practice, one float32 ulp allowed; half types: one ulp of the rounded result.
    return {torch.float64: 1e-12, torch.float32: 2e-7}.get(dtype, 1e-2)


# ---- quantize_weight -----------------------------------------------------------------------------
def assert_weight_close(got, w, bits, per_channel, msg=""):
    """The native quantize_weight's zero, sign and NaN pattern exactly; its values (a scale from
    float64 sums) to a few ulps."""
    want = ops.quantize_weight(w, bits, per_channel)
    assert got.dtype == want.dtype and got.shape == want.shape, msg
    assert got.stride() == want.stride(), msg
    assert torch.equal(got == 0, want == 0), msg
    assert torch.equal(got.isnan(), want.isnan()), msg
    assert torch.equal(signs(got), signs(want)), msg
    tol = ulp_tol(w.dtype)
    torch.testing.assert_close(got, want, rtol=tol, atol=0, equal_nan=True, msg=msg)


def _weights(dtype, nonfinite):
    def w(*shape, seed):
        t = randn(*shape, seed=seed, dtype=dtype, scale=2.0)
        if nonfinite and t.numel() > 4:
            flat = t.view(-1) if t.is_contiguous() else None
            if flat is not None:
                flat[3] = NAN
                flat[-2] = INF
        return t

    cases = [
        ("4-D", w(12, 8, 3, 3, seed=0)),
        ("[C,1]", w(7, 1, seed=1)),
        ("[C,1,1,1]", w(7, 1, 1, 1, seed=2)),
        ("[C,1] strided", w(1, 7, seed=3).t()),
        ("[C,1,1,1] channels_last", w(7, 1, 1, 1, seed=4).to(memory_format=torch.channels_last)),
        ("one channel", w(1, 9, seed=5)),
        ("one channel 4-D", w(1, 4, 3, 3, seed=6)),
        ("transposed", w(9, 7, seed=7).t()),
        ("channels_last", w(6, 5, 3, 3, seed=8).to(memory_format=torch.channels_last)),
        ("dim 0 fastest", w(3, 3, 4, 7, seed=9).permute(3, 2, 0, 1)),
        ("expanded", w(7, 1, seed=10).expand(7, 5)),
        ("sliced", w(14, 5, seed=11)[::2]),
        ("1-D", w(33, seed=12)),
    ]
    if nonfinite:  # a channel with -Inf only, one with NaN only
        t = w(5, 6, seed=13)
        t[1, 2], t[3, 4] = -INF, NAN
        cases.append(("nonfinite channels", t))
    return cases


@pytest.mark.parametrize("dtype", ALL_FLOATS, ids=str)
@pytest.mark.parametrize("bits", range(1, 9))
@pytest.mark.parametrize("nonfinite", [False, True], ids=["finite", "nonfinite"])
def test_quantize_weight(dtype, bits, nonfinite):
    for name, w in _weights(dtype, nonfinite):
        for per_channel in (False, True):
            if per_channel and w.dim() < 2:
                continue
            msg = f"{name}, per_channel={per_channel}"
            assert_weight_close(P.quantize_weight(w, bits, per_channel), w, bits, per_channel, msg)


def test_quantize_weight_ties_and_edges():
    # Exact thresholds (delta = 1), thresholds rounded in the compute dtype, a ternary tie, an
    # all-zero channel, a subnormal maximum (delta underflows to 0), signed zeros.
    for bits in (3, 4, 8):
        top = 2**bits - 1
        ints = torch.arange(0, top + 1, dtype=torch.float32)
        below = ints[:-1]
        mags = torch.cat([ints, below + 0.5, torch.nextafter(below, torch.tensor(1e9))])
        w = torch.cat([mags, -mags]).reshape(1, -1)
        assert_weight_close(P.quantize_weight(w, bits, False), w, bits, False)
    for dtype in (torch.float32, torch.float64):
        delta = torch.tensor(1.0, dtype=dtype) / 15
        thr = torch.arange(1, 15, 2, dtype=dtype) * delta
        v = torch.cat([thr, torch.nextafter(thr, thr * 2), torch.ones(1, dtype=dtype)])
        w = torch.cat([v, -v]).reshape(1, -1)
        assert_weight_close(P.quantize_weight(w, 4, False), w, 4, False)
    w = torch.tensor([7, -7, 6.5, -6.5, 13, 13, 12, 12, 11.5, 11.5])
    assert_weight_close(P.quantize_weight(w, 2, False), w, 2, False)
    w = randn(4, 6, seed=1)
    w[2] = 0
    w[1] = torch.tensor([1e-44, -1e-45, 0.0, -0.0, 3e-45, 1e-45])
    w[3, :3] = -0.0
    for bits in range(1, 9):
        for pc in (False, True):
            assert_weight_close(P.quantize_weight(w, bits, pc), w, bits, pc)
    empty = torch.empty(0, 3)
    assert_weight_close(P.quantize_weight(empty, 4, True), empty, 4, True)


# ---- quant_relu ----------------------------------------------------------------------------------
def _relu_inputs(dtype, bits, alpha):
    x = randn(1500, seed=bits, dtype=dtype, scale=2.0)
    x[::37] = NAN
    x[1::41], x[2::43] = INF, -INF
    x[3:5] = torch.tensor([0.0, -0.0], dtype=dtype)
    a = alpha.detach().double().clamp(1e-3, 5.0).to(dtype).reshape(())
    k = torch.arange(-1, 2**bits + 2, dtype=dtype)
    pts = k * a  # the level boundaries in x's dtype: ties
    ties = torch.cat([pts, torch.nextafter(pts, pts + 1), torch.nextafter(pts, pts - 1)])
    return torch.cat([x, ties])


ALPHAS = [
    ("float32", lambda: torch.tensor([0.31])),
    ("float64 0-d", lambda: torch.tensor(0.1946, dtype=torch.float64)),
    ("float16", lambda: torch.tensor([[0.6511]], dtype=torch.float16)),
    ("bfloat16", lambda: torch.tensor([1.2221], dtype=torch.bfloat16)),
    ("above 5", lambda: torch.tensor([7.0])),
    ("below 1e-3", lambda: torch.tensor([-1.0])),
]


@pytest.mark.parametrize("dtype", ALL_FLOATS, ids=str)
@pytest.mark.parametrize("bits", range(1, 9))
def test_quant_relu(dtype, bits):
    # Two of the steps per case (all of them over the grid), one with a non-contiguous x.
    for (aname, make_alpha), strided in ((ALPHAS[bits % 6], False), (ALPHAS[(bits + 3) % 6], True)):
        alpha = make_alpha()
        x = _relu_inputs(dtype, bits, alpha)
        g = randn(x.numel(), seed=bits + 100, dtype=dtype)
        if strided:  # a non-contiguous x and grad
            x = torch.stack([x, -x], 1)[:, 0]
            g = torch.stack([g, g], 1)[:, 1]
        msg = f"alpha {aname}, strided={strided}"
        assert_same(
            P.quant_relu(x, alpha, bits, "inplt", "mean", 0.01),
            ops.quant_relu(x, alpha, bits, "inplt", "mean", 0.01),
            msg,
        )
        for ste, ag in itertools.product(("inplt", "idnty", "relu"), ("mean", "ae", "pact", "min")):
            for mask in MASKS2:
                rate = 1e-3 if mask[0] else 0.5  # also a step gradient clamped to +-1
                want = ops.quant_relu_backward(g, x, alpha, bits, ste, ag, rate, mask)
                got = P.quant_relu_backward(g, x, alpha, bits, ste, ag, rate, mask)
                m = f"{msg}, {ste}, {ag}, mask={mask}"
                assert_same(got[0], want[0], m)
                assert_sum_close(got[1], want[1], rtol=ulp_tol(alpha.dtype), atol=1e-12, msg=m)


def test_quant_relu_step_gradient_edges():
    # An infinite grad makes the step's sum NaN (inf * 0): the native clamp maps it to -1.
    x = torch.tensor([0.5, -1.0, 2.0, NAN])
    alpha = torch.tensor([0.3])
    for g in (torch.tensor([1.0, INF, 1.0, 1.0]), torch.tensor([INF, 1.0, -INF, 0.0])):
        for ag in ("mean", "ae", "pact", "min"):
            want = ops.quant_relu_backward(g, x, alpha, 2, "inplt", ag, 0.01, [True, True])
            got = P.quant_relu_backward(g, x, alpha, 2, "inplt", ag, 0.01, [True, True])
            assert_same(got[0], want[0])
            assert_same(got[1], want[1])
    e = torch.empty(0)
    for mask in MASKS2:
        want = ops.quant_relu_backward(e, e, alpha, 4, "inplt", "mean", 0.01, mask)
        got = P.quant_relu_backward(e, e, alpha, 4, "inplt", "mean", 0.01, mask)
        assert_same(got[0], want[0])
        assert_same(got[1], want[1])
    assert_same(
        P.quant_relu(e, alpha, 4, "inplt", "mean", 0.01),
        ops.quant_relu(e, alpha, 4, "inplt", "mean", 0.01),
    )


# ---- fake_quantize -------------------------------------------------------------------------------
def near_ties(n, scale, zp, seed, spread=150):
    """Values whose x / scale lands on or within a few ulps of half-integers, plus plain values."""
    g = gen(seed)
    k = torch.randint(-spread, spread, (n,), generator=g).double()
    inv = float(torch.tensor(1.0) / torch.tensor(scale, dtype=torch.float32))
    x = ((k + 0.5 - zp) / inv).float()
    x = x + torch.randint(-3, 4, (n,), generator=g).float() * torch.finfo().eps * x.abs()
    plain = torch.randn(n, generator=g) * scale * spread / 2
    return torch.cat([x, plain])


def _fq_x(dtype, shape, axis, scale, zp, seed):
    """x of `shape` with near-ties for channel 0's qparams, NaN, +-Inf and huge entries."""
    n = 1
    for s in shape:
        n *= s
    x = near_ties(n, scale, zp, seed)[torch.randperm(2 * n, generator=gen(seed))[:n]]
    x = x.reshape(shape).to(dtype)
    flat = x.view(-1)
    flat[5::17], flat[6::19], flat[7::23], flat[8::29] = NAN, INF, -INF, -3e38
    return x


# (name, axis, learnable, zero-point kind): kind in int32, int64, float32, float64, float16.
FQ_MODES = [
    ("per tensor int32", None, False, torch.int32),
    ("per tensor int64", None, False, torch.int64),
    ("per tensor float (trunc)", None, False, torch.float32),
    ("per channel 0 int32", 0, False, torch.int32),
    ("per channel 1 int64", 1, False, torch.int64),
    ("per channel -1 float32", -1, False, torch.float32),
    ("per channel 0 float64", 0, False, torch.float64),
    ("learnable per tensor", None, True, torch.float32),
    ("learnable per tensor float64 zp", None, True, torch.float64),
    ("learnable per tensor int zp", None, True, torch.int32),
    ("learnable per channel 1", 1, True, torch.float32),
    ("learnable per channel 0 float16 zp", 0, True, torch.float16),
]
SCALE_DTYPES = [torch.float32, torch.float64, torch.float16]


def _qparams(axis, c, zdtype, sdtype, learnable, seed, qmin, qmax):
    n = 1 if axis is None else c
    scale = (torch.rand(n, generator=gen(seed)) * 0.05 + 0.01).to(sdtype)
    if zdtype.is_floating_point:
        zf = torch.randn(n, generator=gen(seed + 1)) * 3
        if not learnable and axis is None:  # truncated, it must lie in [qmin, qmax]
            zf = zf.clamp(qmin, qmax)
        if learnable:
            zf[0] = 2.5  # rounds half to even; the per-tensor backward zero point is trunc(z + 0.5)
            if n > 1:
                zf[1] = qmax + 4.0  # clamped
        zp = zf.to(zdtype)
    else:
        zp = torch.randint(max(qmin, -5), min(qmax, 5), (n,), generator=gen(seed + 1)).to(zdtype)
    if axis is None:  # per tensor: 0-d and [1] qparams
        shape = () if seed % 2 else (1,)
        scale, zp = scale.reshape(shape), zp.reshape(shape)
    return scale, zp


@pytest.mark.parametrize("dtype", ALL_FLOATS, ids=str)
@pytest.mark.parametrize("mode", FQ_MODES, ids=lambda m: m[0])
def test_fake_quantize(dtype, mode):
    _, axis, learnable, zdtype = mode
    shape = (6, 5, 4, 3)
    for i, (sdtype, (qmin, qmax)) in enumerate(
        itertools.product(SCALE_DTYPES, [(-128, 127), (0, 15)])
    ):
        layout = ("contiguous", "channels_last", "permuted")[i % 3]
        seed = 10 * i + (1 if dtype == torch.float64 else 0)
        c = None if axis is None else shape[axis]
        scale, zp = _qparams(axis, c, zdtype, sdtype, learnable, seed, qmin, qmax)
        x = _fq_x(dtype, shape, axis, float(scale.reshape(-1)[0]), 0.0, seed)
        if layout == "channels_last":
            x = x.contiguous(memory_format=torch.channels_last)
        elif layout == "permuted":
            x = x.permute(3, 1, 2, 0).contiguous().permute(3, 1, 2, 0)
        g = randn(*shape, seed=seed + 7, dtype=dtype)
        gf = 0.7 if i % 2 else 1.0
        args = (scale, zp, qmin, qmax, axis, learnable, gf)
        msg = f"{sdtype}, [{qmin}, {qmax}], {layout}"
        assert_same(P.fake_quantize(x, *args), ops.fake_quantize(x, *args), msg)
        for mask in MASKS3 if i < 2 else [[True, True, True]]:  # every mask on two variants
            if learnable and mask[2] and not zdtype.is_floating_point:
                for fn in (P.fake_quantize_backward, ops.fake_quantize_backward):
                    with pytest.raises(TypeError, match="zero_point"):
                        fn(g, x, *args, mask)
                continue
            want = ops.fake_quantize_backward(g, x, *args, mask)
            got = P.fake_quantize_backward(g, x, *args, mask)
            m = f"{msg}, mask={mask}"
            assert_same(got[0], want[0], m)
            for a, b in zip(got[1:], want[1:], strict=True):
                if not learnable or b.numel() == 0:
                    assert_same(a, b, m)
                else:  # float64 sums rounded once to the qparam dtype
                    assert_sum_close(a, b, rtol=ulp_tol(b.dtype), atol=1e-9, msg=m)


# Per-tensor qparams as one-element tensors of every accepted shape and dtype.
@pytest.mark.parametrize("learnable", [False, True])
def test_fake_quantize_one_element_qparams(learnable):
    x = _fq_x(torch.float32, (8, 9), None, 0.04, 0.0, seed=3)
    g = randn(8, 9, seed=4)
    for shape, sdtype, zdtype in itertools.product(
        [(), (1,), (1, 1)], [torch.float32, torch.float64], [torch.int32, torch.float32]
    ):
        scale = torch.full(shape, 0.04, dtype=sdtype)
        zp = torch.full(shape, 3, dtype=zdtype)
        args = (scale, zp, -8, 7, None, learnable, 1.0)
        assert_same(P.fake_quantize(x, *args), ops.fake_quantize(x, *args))
        mask = [True, True, zdtype.is_floating_point or not learnable]
        got, want = (
            P.fake_quantize_backward(g, x, *args, mask),
            ops.fake_quantize_backward(g, x, *args, mask),
        )
        assert_same(got[0], want[0])
        for a, b in zip(got[1:], want[1:], strict=True):
            assert_sum_close(a, b, rtol=1e-6, atol=1e-9)


def _layout_variants(x, axis):
    """x in the memory layouts a per-channel kernel can get wrong: (name, tensor equal to x)."""
    d = x.dim()
    order = [i for i in range(d) if i != axis] + [axis]  # the channel axis fastest in memory
    inverse = [order.index(i) for i in range(d)]
    yield "contiguous", x
    yield "channel axis fastest", x.permute(order).contiguous().permute(inverse)
    yield (
        "reversed dims",
        x.permute(list(range(d))[::-1]).contiguous().permute(list(range(d))[::-1]),
    )
    for i in range(d):
        if x.shape[i] > 1:
            yield f"expanded along {i}", x.narrow(i, 0, 1).expand(x.shape)
    if x.shape[0] > 1:
        yield "sliced", torch.repeat_interleave(x, 2, dim=0)[::2]


# (shape, axis): size-1 axes, channel axes of stride 1, one element per channel.
DEGENERATE_CHANNELS = [
    ((5, 1), 0),
    ((5, 1), 1),
    ((1, 5), 1),
    ((5, 1, 1, 1), 0),
    ((3, 4, 1), 1),
    ((4, 1, 3, 1), 2),
    ((2, 3), 0),
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("case", DEGENERATE_CHANNELS, ids=str)
def test_fake_quantize_degenerate_layouts(dtype, case):
    shape, axis = case
    c = shape[axis]
    x0 = randn(*shape, seed=c, dtype=dtype, scale=0.3)
    g0 = randn(*shape, seed=c + 1, dtype=dtype)
    scale = torch.rand(c, generator=gen(2)) * 0.05 + 0.01
    zi = torch.randint(-5, 5, (c,), generator=gen(3), dtype=torch.int32)
    zf = torch.randn(c, generator=gen(4)) * 3
    kinds = [
        (scale, zi, axis, False),
        (scale, zf, axis, False),
        (scale, zf, axis, True),
        (scale[:1], zf[:1], None, True),
    ]
    for (name, x), (s, z, ax, learnable) in itertools.product(_layout_variants(x0, axis), kinds):
        rev = list(range(g0.dim()))[::-1]
        g = g0 if "expanded" in name else g0.permute(rev).contiguous().permute(rev)
        args = (s, z, -8, 7, ax, learnable, 1.0)
        msg = f"{name}, axis={ax}, {z.dtype}, learnable={learnable}"
        assert_same(P.fake_quantize(x, *args), ops.fake_quantize(x, *args), msg)
        for mask in MASKS3 if name == "contiguous" else [[True, True, True]]:
            got = P.fake_quantize_backward(g, x, *args, mask)
            want = ops.fake_quantize_backward(g, x, *args, mask)
            assert_same(got[0], want[0], msg)
            for a, b in zip(got[1:], want[1:], strict=True):
                assert_sum_close(a, b, rtol=1e-12 if dtype == torch.float64 else 2e-7, msg=msg)


def test_many_tasks():
    # More elements than one native task (2^15): the native sums run in blocks, in another order.
    x = randn(70007, seed=1, scale=2.0)
    g = randn(70007, seed=2)
    alpha = torch.tensor([0.1946])
    for ag in ("mean", "ae"):
        want = ops.quant_relu_backward(g, x, alpha, 4, "inplt", ag, 1e-4, [True, True])
        got = P.quant_relu_backward(g, x, alpha, 4, "inplt", ag, 1e-4, [True, True])
        assert_same(got[0], want[0])
        assert_sum_close(got[1], want[1], rtol=2e-7)
    x2 = x.reshape(7, 10001).double()
    s, z = torch.tensor([0.02, 0.03, 0.05, 0.07, 0.011, 0.013, 0.017]), torch.randn(7)
    for ax, sc, zp in ((0, s, z), (None, s[:1], z[:1])):
        args = (sc, zp, -128, 127, ax, True, 0.5)
        want = ops.fake_quantize_backward(x2 * 0 + 1, x2, *args, [True, True, True])
        got = P.fake_quantize_backward(x2 * 0 + 1, x2, *args, [True, True, True])
        assert_same(got[0], want[0])
        for a, b in zip(got[1:], want[1:], strict=True):
            assert_sum_close(a, b, rtol=2e-7)
    w = randn(64, 32, 7, 7, seed=3, dtype=torch.float64)
    for bits in (2, 4):
        for pc in (False, True):
            assert_weight_close(P.quantize_weight(w, bits, pc), w, bits, pc)


def test_fake_quantize_fused_rounding_ties():
    # x * (1/s) exactly a float32 midpoint next to k + 0.5, z tiny: fmaf rounds toward z, a float64
    # sum rounded twice would round to even (another level). scale = fl(1/3): 1/scale = 3 exactly.
    s = torch.tensor([1.0 / 3.0])
    assert (torch.tensor([1.0]) / s).item() == 3.0
    xs, zs = [], []
    for k in range(90, 130):
        for sign in (1, -1):
            num = (2 * k + 1) * 2**17 + sign  # 2^18 (k + 0.5) + sign: a float32 midpoint
            if num % 3 == 0 and num // 3 < 2**24:
                for z in (1e-20, -1e-20, 0.0):
                    xs.append(num // 3 * 2.0**-18)
                    zs.append(z)
    x = torch.tensor(xs).reshape(-1, 1)
    sc, zc = s.expand(len(xs)).contiguous(), torch.tensor(zs)
    for fn in (ops.fake_quantize, P.fake_quantize):
        assert fn(x, sc, zc, -1000, 1000, 0, False, 1.0).isfinite().all()
    want = ops.fake_quantize(x, sc, zc, -1000, 1000, 0, False, 1.0)
    assert_same(P.fake_quantize(x, sc, zc, -1000, 1000, 0, False, 1.0), want)
    unfused = torch.round((x.double() * 3 + zc.double().reshape(-1, 1)).float())
    assert (unfused != torch.round(want * 3)).any()  # the test has teeth
    g = torch.ones_like(x)
    for mask in MASKS3:
        got = P.fake_quantize_backward(g, x, sc, zc, -1000, 1000, 0, False, 1.0, mask)
        want = ops.fake_quantize_backward(g, x, sc, zc, -1000, 1000, 0, False, 1.0, mask)
        for a, b in zip(got, want, strict=True):
            assert_same(a, b)


def test_fake_quantize_float64_fused_ties():
    # float64 x within a few ulps of (k + 0.5) / inv: the LSQ level rint(fma(x, inv, zp)) and the
    # float-zero-point level rintf(float(fma(x, inv, zp))) need the exact fused product.
    for scale in (0.0371, 0.1, 1.0 / 3.0, 0.013):
        inv = (torch.tensor(1.0) / torch.tensor(scale, dtype=torch.float32)).double()
        k = torch.arange(-120, 120, dtype=torch.float64)
        base = (k + 0.5) / inv
        x = torch.cat(
            [base + d * torch.finfo(torch.float64).eps * base.abs() for d in range(-3, 4)]
        )
        x = x.reshape(-1, 1)
        g = randn(*x.shape, seed=2, dtype=torch.float64)
        n = x.shape[0]
        for zp, axis, learnable in [
            (torch.tensor([0.3]).expand(n).contiguous(), 0, False),
            (torch.tensor([-1e-9], dtype=torch.float64).expand(n).contiguous(), 0, False),
            (torch.tensor([2.0]), None, True),
            (torch.tensor([2.0]).expand(n).contiguous(), 0, True),
        ]:
            sc = torch.tensor([scale]).expand(zp.numel()).contiguous()
            args = (sc, zp, -128, 127, axis, learnable, 1.0)
            assert_same(P.fake_quantize(x, *args), ops.fake_quantize(x, *args))
            got = P.fake_quantize_backward(g, x, *args, [True, learnable, learnable])
            want = ops.fake_quantize_backward(g, x, *args, [True, learnable, learnable])
            assert_same(got[0], want[0])
            for a, b in zip(got[1:], want[1:], strict=True):
                assert_sum_close(a, b, rtol=1e-6, atol=1e-9)


def _round_f32(fr: Fraction) -> float:
    """The float32 nearest to fr (ties to even), from the float64 nearest and its neighbours."""
    f = torch.tensor(float(fr), dtype=torch.float32)
    cands = [f, torch.nextafter(f, f + 1), torch.nextafter(f, f - 1)]
    best = min(
        cands,
        key=lambda c: (
            abs(Fraction(c.item()) - fr),
            struct.unpack("<I", struct.pack("<f", c.item()))[0] & 1,
        ),
    )
    return best.item()


def test_fma_emulation_is_exact():
    # The emulated fused multiply-adds against exact rational arithmetic.
    g = gen(11)
    n = 400
    a32 = torch.randn(n, generator=g) * torch.exp2(torch.randint(-30, 30, (n,), generator=g))
    b32 = torch.randn(n, generator=g)
    c32 = -a32 * b32 * (1 + torch.randn(n, generator=g) * 1e-6)  # heavy cancellation
    c32[::3] = torch.randn(n, generator=g)[::3] * 1e-20
    got = P._fma_f32(a32, b32, c32)
    for i in range(n):
        fr = Fraction(a32[i].item()) * Fraction(b32[i].item()) + Fraction(c32[i].item())
        assert got[i].item() == _round_f32(fr), i
    a64 = torch.randn(n, generator=g, dtype=torch.float64) * 1e3
    b64 = torch.randn(n, generator=g, dtype=torch.float64)
    c64 = -(a64 * b64) * (1 + torch.randn(n, generator=g, dtype=torch.float64) * 1e-12)
    c64[::4] = torch.randn(n, generator=g, dtype=torch.float64)[::4] * 1e-30
    got = P._fma_f64(a64, b64, c64)
    for i in range(n):
        fr = Fraction(a64[i].item()) * Fraction(b64[i].item()) + Fraction(c64[i].item())
        assert got[i].item() == float(fr), i
    special = torch.tensor([INF, -INF, NAN, 1e300, 2.0**1000], dtype=torch.float64)
    one = torch.ones_like(special)
    torch.testing.assert_close(
        P._fma_f64(special, one * 3, one), special * 3 + 1, rtol=0, atol=0, equal_nan=True
    )


def test_fake_quantize_empty_and_bad_arguments():
    e = torch.empty(0, 3)
    s, z = torch.tensor([0.1]), torch.tensor([1.0])
    for learnable in (False, True):
        args = (s, z, -8, 7, None, learnable, 1.0)
        assert_same(P.fake_quantize(e, *args), ops.fake_quantize(e, *args))
        for mask in MASKS3:
            got = P.fake_quantize_backward(e, e, *args, mask)
            want = ops.fake_quantize_backward(e, e, *args, mask)
            for a, b in zip(got, want, strict=True):
                assert_same(a, b)
    x = torch.randn(4, 3)
    i32 = torch.int32
    bad = [  # (op name, args): the native op and the portable function raise the same error
        ("quantize_weight", (x, 9, False)),
        ("quantize_weight", (x, 0, False)),
        ("quantize_weight", (torch.randn(5), 4, True)),
        ("quantize_weight", (torch.ones(3, dtype=torch.int64), 4, False)),
        ("quant_relu", (torch.arange(4), torch.ones(1), 4, "inplt", "mean", 0.01)),
        ("quant_relu", (x, torch.ones(2), 4, "inplt", "mean", 0.01)),
        ("quant_relu", (x, torch.ones(1), 9, "inplt", "mean", 0.01)),
        ("quant_relu_backward", (x, x, torch.ones(1), 4, "straight", "mean", 0.01, [True, True])),
        ("quant_relu_backward", (x, x, torch.ones(1), 4, "inplt", "max", 0.01, [True, True])),
        ("quant_relu_backward", (x[:2], x, torch.ones(1), 4, "inplt", "mean", 0.01, [True, True])),
        ("quant_relu_backward", (x.double(), x, torch.ones(1), 4, "inplt", "mean", 0.1, [1, 1])),
        ("fake_quantize", (x, torch.tensor(0.1), torch.tensor(0), 5, 5, None, False, 1.0)),
        ("fake_quantize", (x, torch.tensor(0.1), torch.tensor(0), -(2**25), 5, None, False, 1.0)),
        ("fake_quantize", (x, torch.tensor([-0.5]), torch.tensor(0), -8, 7, None, False, 1.0)),
        ("fake_quantize", (x, torch.tensor([NAN]), torch.tensor(0), -8, 7, None, True, 1.0)),
        ("fake_quantize", (x, torch.tensor(0.1), torch.tensor([9], dtype=i32), -8, 7, None, 0, 1)),
        ("fake_quantize", (x, torch.tensor(0.1), torch.tensor(7.9), -8, 6, None, False, 1.0)),
        ("fake_quantize", (x, torch.tensor(0.1), torch.tensor(True), -8, 7, None, False, 1.0)),
        ("fake_quantize", (x, torch.ones(2), torch.zeros(1), -8, 7, None, False, 1.0)),
        ("fake_quantize", (x, torch.ones(3), torch.zeros(3), -8, 7, 2, False, 1.0)),
        ("fake_quantize", (x, torch.ones(4), torch.zeros(3), -8, 7, 0, False, 1.0)),
        ("fake_quantize", (x, torch.tensor([0.1, 0.0, 0.2]), torch.zeros(3), -8, 7, 1, 0, 1.0)),
        ("fake_quantize", (x, torch.ones(3), torch.tensor([0, 99, 0], dtype=i32), -8, 7, 1, 0, 1)),
        ("fake_quantize", (torch.arange(4), torch.ones(1), torch.zeros(1), -8, 7, None, 0, 1.0)),
        ("fake_quantize", (x, torch.ones(1, dtype=i32), torch.zeros(1), -8, 7, None, 0, 1.0)),
        (
            "fake_quantize_backward",
            (x.t(), x, torch.ones(1), torch.zeros(1), -8, 7, None, True, 1.0, [True] * 3),
        ),
        (
            "fake_quantize_backward",
            (x, x, torch.ones(1), torch.zeros(1, dtype=i32), -8, 7, None, True, 1.0, [0, 0, 1]),
        ),
    ]
    for name, args in bad:
        with pytest.raises(Exception) as native:
            getattr(ops, name)(*args)
        with pytest.raises(type(native.value)) as portable:
            getattr(P, name)(*args)
        # The error names the same argument (the native message's first two words).
        assert " ".join(str(native.value).split()[:2]) in str(portable.value), (name, args)
    # What the native op accepts, so does the portable one: a NaN zero point when learnable.
    args = (x, torch.tensor([0.1]), torch.tensor([NAN]), -8, 7, None, True, 1.0)
    assert_same(P.fake_quantize(*args), ops.fake_quantize(*args))


# ---- on a GPU: the portable kernels on the device against the native CPU ops ---------------------
@pytest.mark.skipif(not CUDA, reason="no GPU")
def test_portable_on_cuda_matches_native_cpu():
    dev = "cuda"
    for dtype in ALL_FLOATS:
        w = randn(12, 8, 3, 3, seed=1, dtype=dtype, scale=2.0)
        for bits, pc in itertools.product(range(1, 9), (False, True)):
            got = P.quantize_weight(w.to(dev), bits, pc).cpu()
            want = ops.quantize_weight(w, bits, pc)
            assert torch.equal(got == 0, want == 0)
            torch.testing.assert_close(got, want, rtol=ulp_tol(dtype), atol=0, equal_nan=True)
        alpha = torch.tensor([0.31])
        x = _relu_inputs(dtype, 4, alpha)
        g = randn(x.numel(), seed=5, dtype=dtype)
        for a in (alpha, alpha.to(dev)):  # a one-element CPU step with a CUDA x, or on the device
            got = P.quant_relu_backward(g.to(dev), x.to(dev), a, 4, "inplt", "ae", 1e-3, [1, 1])
            want = ops.quant_relu_backward(g, x, alpha, 4, "inplt", "ae", 1e-3, [True, True])
            assert got[1].device == a.device
            assert_same(got[0].cpu(), want[0])
            assert_sum_close(got[1].cpu(), want[1], rtol=1e-6, atol=1e-12)
            y = P.quant_relu(x.to(dev), a, 4, "inplt", "ae", 1e-3)
            assert_same(y.cpu(), ops.quant_relu(x, alpha, 4, "inplt", "ae", 1e-3))
        for _, axis, learnable, zdtype in FQ_MODES:
            shape = (6, 5, 4, 3)
            c = None if axis is None else shape[axis]
            scale, zp = _qparams(axis, c, zdtype, torch.float32, learnable, 3, -128, 127)
            x = _fq_x(dtype, shape, axis, float(scale.reshape(-1)[0]), 0.0, 3)
            g = randn(*shape, seed=4, dtype=dtype)
            cpu_ok = axis is None  # per-tensor qparams may stay on the CPU
            for s, z in [(scale.to(dev), zp.to(dev))] + ([(scale, zp)] if cpu_ok else []):
                args = (s, z, -128, 127, axis, learnable, 0.7)
                cargs = (scale, zp, -128, 127, axis, learnable, 0.7)
                y = P.fake_quantize(x.to(dev), *args)
                assert_same(y.cpu(), ops.fake_quantize(x, *cargs))
                mask = [True, learnable, learnable and zdtype.is_floating_point]
                got = P.fake_quantize_backward(g.to(dev), x.to(dev), *args, mask)
                want = ops.fake_quantize_backward(g, x, *cargs, mask)
                assert_same(got[0].cpu(), want[0])
                for a, b, q in zip(got[1:], want[1:], (s, z), strict=True):
                    assert a.device == (q.device if b.numel() else a.device)
                    assert_sum_close(a.cpu(), b, rtol=ulp_tol(b.dtype), atol=1e-9)
