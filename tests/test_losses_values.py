"""Values and gradients of the FA / FFA losses against the float64 reference (ffa.reference)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from loss_helpers import (
    DEVICES,
    KINDS,
    check_close,
    leaf,
    make_pair,
    make_projection,
    oracle_value_and_grads,
    ours,
    randn,
    ref,
    value_and_grads,
)

import ffa

# Tiny cases: one intra-op thread (see conftest); test_losses_threads.py covers parallel paths.
pytestmark = pytest.mark.torch_threads(1)

# (B, Cs, Ct, H, W): Cs != Ct, odd sizes, batch one, N = 1, one channel, and N around the 256-pixel
# tile of the exact p=1 kernel (N < 256, one full tile, ragged 2 and 3 tiles).
SHAPES = [
    (2, 3, 3, 5, 6),
    (3, 4, 2, 7, 9),
    (1, 2, 5, 1, 1),
    (1, 1, 2, 4, 4),
    (2, 8, 6, 12, 11),
    (2, 3, 4, 16, 16),
    (1, 5, 3, 19, 20),
    (1, 2, 3, 20, 32),
]
SHAPE_IDS = ["x".join(map(str, s)) for s in SHAPES]
FLOATS = [torch.float64, torch.float32]
HALVES = [torch.float16, torch.bfloat16]


def gram_atol(kind, p, grad_scale=None):
    """Absolute float64 slack for exact FA p=2 (Gram identity), 0 otherwise.

    ||D||_F^2 / N^2 is computed as a difference of Gram terms each <= 1, so its float64 error is
    absolute (~1e-16), not relative to a value that can be ~1e-10 (N = 1). The gradient's cancelling
    terms are ~ 4 |g| / N (grad_scale = max|upstream| / N); they are then divided by pixel norms.
    """
    if kind != "fa" or p != 2:
        return 0.0
    return 1e-14 if grad_scale is None else 1e-13 * grad_scale


def _case(kind, shape, dtype, device, *, grad=(True, True)):
    b, cs, ct, h, w = shape
    s, t = make_pair(b, cs, ct, h, w, dtype=dtype, device=device, seed=sum(shape), grad=grad)
    z = make_projection(kind, b, h * w, dtype=dtype, device=device)
    return s, t, z


@pytest.mark.parametrize("reduction", ["none", "mean", "sum"])
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("p", [1, 2])
@pytest.mark.parametrize("shape", SHAPES, ids=SHAPE_IDS)
@pytest.mark.parametrize("dtype", FLOATS, ids=str)
@pytest.mark.parametrize("device", DEVICES)
def test_value_matches_reference(device, dtype, shape, p, kind, reduction):
    s, t, z = _case(kind, shape, dtype, device, grad=(False, False))
    out = ours(kind, s, t, p=p, z=z, reduction=reduction)
    assert out.dtype == dtype and out.device == s.device
    assert out.shape == ((shape[0],) if reduction == "none" else ())
    truth = ref(kind, s, t, p=p, z=z, reduction=reduction, dtype=torch.float64)
    eager = ref(kind, s, t, p=p, z=z, reduction=reduction)
    atol64 = gram_atol(kind, p) * (shape[0] if reduction == "sum" else 1)
    check_close(out, truth, dtype=dtype, eager=eager, atol64=atol64)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("p", [1, 2])
@pytest.mark.parametrize("shape", SHAPES, ids=SHAPE_IDS)
@pytest.mark.parametrize("dtype", FLOATS, ids=str)
@pytest.mark.parametrize("device", DEVICES)
def test_grads_match_reference(device, dtype, shape, p, kind):
    """Student and teacher gradients through autograd.grad with a random upstream gradient."""
    b, _, _, h, w = shape
    s, t, z = _case(kind, shape, dtype, device)
    up = randn(b, dtype=torch.float64, device=device, seed=99)
    out, (gs, gt) = value_and_grads(lambda a, c: ours(kind, a, c, p=p, z=z), s, t, up)
    assert gs.dtype == dtype and gt.dtype == dtype
    assert gs.shape == s.shape and gt.shape == t.shape
    truth, (rs, rt) = oracle_value_and_grads(kind, s, t, p=p, z=z, upstream=up)
    eager, (es, et) = oracle_value_and_grads(kind, s, t, p=p, z=z, upstream=up, dtype=dtype)
    check_close(out, truth, dtype=dtype, eager=eager, atol64=gram_atol(kind, p))
    if dtype == torch.float32 and h * w == 1:
        # N = 1: D_11 = |u_s|^2 - |u_t|^2 is an eps-level difference and the gradient is the tiny
        # non-radial remainder of O(1) terms; float32 gradients are pure rounding (float64 checks).
        return
    atol64 = gram_atol(kind, p, grad_scale=up.abs().max().item() / (h * w))
    check_close(gs, rs, dtype=dtype, eager=es, what="student grad", atol64=atol64)
    check_close(gt, rt, dtype=dtype, eager=et, what="teacher grad", atol64=atol64)


@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("p", [1, 2])
@pytest.mark.parametrize("device", DEVICES)
def test_reduced_backward_matches_reference(device, p, kind, reduction):
    shape = (3, 4, 2, 7, 9)
    s, t, z = _case(kind, shape, torch.float64, device)
    ours(kind, s, t, p=p, z=z, reduction=reduction).backward()
    s2, t2 = s.detach().clone().requires_grad_(), t.detach().clone().requires_grad_()
    ref(kind, s2, t2, p=p, z=z, reduction=reduction).backward()
    check_close(s.grad, s2.grad, dtype=torch.float64)
    check_close(t.grad, t2.grad, dtype=torch.float64)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("p", [1, 2])
@pytest.mark.parametrize("dtype", FLOATS, ids=str)
@pytest.mark.parametrize("device", DEVICES)
def test_teacher_without_grad(device, dtype, p, kind):
    """A teacher that does not require grad gets none (.grad stays None); student grad is right."""
    shape = (2, 3, 4, 6, 7)
    s, t, z = _case(kind, shape, dtype, device, grad=(True, False))
    up = randn(2, dtype=torch.float64, device=device, seed=5)
    out = ours(kind, s, t, p=p, z=z)
    out.backward(up.to(out.dtype))
    assert t.grad is None
    _, (rs, _) = oracle_value_and_grads(kind, s, t, p=p, z=z, upstream=up)
    _, (es, _) = oracle_value_and_grads(kind, s, t, p=p, z=z, upstream=up, dtype=dtype)
    check_close(s.grad, rs, dtype=dtype, eager=es, what="student grad")


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("p", [1, 2])
@pytest.mark.parametrize("device", DEVICES)
def test_teacher_grad_only(device, p, kind):
    shape = (2, 3, 4, 6, 7)
    s, t, z = _case(kind, shape, torch.float64, device, grad=(False, True))
    up = randn(2, dtype=torch.float64, device=device, seed=5)
    ours(kind, s, t, p=p, z=z).backward(up)
    assert s.grad is None
    _, (_, rt) = oracle_value_and_grads(kind, s, t, p=p, z=z, upstream=up)
    check_close(t.grad, rt, dtype=torch.float64)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("p", [1, 2])
@pytest.mark.parametrize("dtype", HALVES, ids=str)
@pytest.mark.parametrize("device", DEVICES)
def test_half_inputs(device, dtype, p, kind):
    """float16/bfloat16 in: float32 result, grads in the input dtype, error <= 2x eager half error.

    The eager reference runs at the half dtype (CPU half matmul works in this torch). The projection
    is drawn in the half dtype too, so the oracle sees exactly the Z that ffa sees.
    """
    shape = (2, 3, 5, 7, 9)
    s, t, z = _case(kind, shape, dtype, device)
    up = randn(2, dtype=torch.float64, device=device, seed=3)
    out, (gs, gt) = value_and_grads(lambda a, b: ours(kind, a, b, p=p, z=z), s, t, up)
    assert out.dtype == torch.float32
    assert gs.dtype == dtype and gt.dtype == dtype
    truth, (rs, rt) = oracle_value_and_grads(kind, s, t, p=p, z=z, upstream=up)
    eager, (es, et) = oracle_value_and_grads(kind, s, t, p=p, z=z, upstream=up, dtype=dtype)
    assert eager.dtype == dtype
    check_close(out, truth, dtype=dtype, eager=eager)
    check_close(gs, rs, dtype=dtype, eager=es, what="student grad")
    check_close(gt, rt, dtype=dtype, eager=et, what="teacher grad")


@pytest.mark.parametrize("dtype", HALVES, ids=str)
@pytest.mark.parametrize("device", DEVICES)
def test_half_inputs_default_generator(device, dtype):
    s, t = make_pair(2, 3, 4, 6, 6, dtype=dtype, device=device)
    out = ffa.fast_feature_affinity_loss(s, t, k=4, p=2, reduction="none")
    out.sum().backward()
    assert out.dtype == torch.float32 and s.grad.dtype == dtype and t.grad.dtype == dtype
    assert torch.isfinite(out).all() and torch.isfinite(s.grad).all()


# ---- edge cases ----------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("p", [1, 2])
@pytest.mark.parametrize(
    "tsize", [(3, 5), (9, 11), (6, 4), (1, 1)], ids=["up", "down", "mixed", "1x1"]
)
@pytest.mark.parametrize("device", DEVICES)
def test_teacher_other_resolution(device, tsize, p, kind):
    """A teacher of another resolution is resized bilinearly (align_corners=True) to the student."""
    b, h, w = 2, 6, 8
    s, t = make_pair(b, 3, 4, h, w, *tsize, dtype=torch.float64, device=device)
    z = make_projection(kind, b, h * w, dtype=torch.float64, device=device)
    up = randn(b, dtype=torch.float64, device=device, seed=11)
    out, (gs, gt) = value_and_grads(lambda a, c: ours(kind, a, c, p=p, z=z), s, t, up)
    assert gt.shape == t.shape
    truth, (rs, rt) = oracle_value_and_grads(kind, s, t, p=p, z=z, upstream=up)
    check_close(out, truth, dtype=torch.float64)
    check_close(gs, rs, dtype=torch.float64)
    # A 1x1 teacher makes A_T constant: its gradient is the eps-level non-radial remainder of
    # per-pixel terms |dL/du_i| / ||t_i|| <= 8 |g| / (N ||t_i||), summed over the N resized pixels.
    # Allow float64 rounding relative to those terms, not to the tiny result.
    n_min = t.detach().norm(dim=1).min().item()
    atol64 = 1e-14 * 8 * up.abs().max().item() / n_min
    check_close(gt, rt, dtype=torch.float64, atol64=atol64)
    # and the resize is the documented one
    t_resized = F.interpolate(t.detach(), size=(h, w), mode="bilinear", align_corners=True)
    check_close(ours(kind, s.detach(), t_resized, p=p, z=z), out, dtype=torch.float64)


DEAD = {
    "student_pixels": lambda s, t: (s[:, :, 1, :].zero_(), s[0, :, 3, 2].zero_()),
    "teacher_pixels": lambda s, t: (t[:, :, :, 0].zero_(),),
    "both_same_pixels": lambda s, t: (s[:, :, 2, 2:4].zero_(), t[:, :, 2, 2:4].zero_()),
    "both_other_pixels": lambda s, t: (s[:, :, 0, :].zero_(), t[:, :, 4, :].zero_()),
    "student_sample": lambda s, t: (s[1].zero_(),),
    "whole_batch": lambda s, t: (s.zero_(), t.zero_()),
}


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("p", [1, 2])
@pytest.mark.parametrize("dead", list(DEAD))
@pytest.mark.parametrize("dtype", FLOATS, ids=str)
@pytest.mark.parametrize("device", DEVICES)
def test_dead_pixels(device, dtype, dead, p, kind):
    """All-zero pixels have zero unit vectors: finite loss and grads, equal to the reference."""
    s, t = make_pair(2, 3, 4, 5, 6, dtype=dtype, device=device, grad=(False, False))
    DEAD[dead](s, t)
    s.requires_grad_(), t.requires_grad_()
    z = make_projection(kind, 2, 30, dtype=dtype, device=device)
    up = randn(2, dtype=torch.float64, device=device, seed=4)
    out, (gs, gt) = value_and_grads(lambda a, b: ours(kind, a, b, p=p, z=z), s, t, up)
    for x in (out, gs, gt):
        assert torch.isfinite(x).all()
    truth, (rs, rt) = oracle_value_and_grads(kind, s, t, p=p, z=z, upstream=up)
    eager, (es, et) = oracle_value_and_grads(kind, s, t, p=p, z=z, upstream=up, dtype=dtype)
    check_close(out, truth, dtype=dtype, eager=eager)
    check_close(gs, rs, dtype=dtype, eager=es, what="student grad")
    check_close(gt, rt, dtype=dtype, eager=et, what="teacher grad")
    if dead == "whole_batch":
        assert (out == 0).all()


def _layouts(device):
    """Non-contiguous and channels_last views of [2, 3, 7, 9] / [2, 4, 7, 9] inputs."""
    g = torch.float64

    def base(shape, seed):
        return randn(shape, dtype=g, device=device, seed=seed)

    return {
        "contiguous": (base((2, 3, 7, 9), 1), base((2, 4, 7, 9), 2)),
        "channels_last": (
            base((2, 3, 7, 9), 1).to(memory_format=torch.channels_last),
            base((2, 4, 7, 9), 2).to(memory_format=torch.channels_last),
        ),
        "nhwc_permuted": (
            base((2, 7, 9, 3), 1).permute(0, 3, 1, 2),
            base((2, 7, 9, 4), 2).permute(0, 3, 1, 2),
        ),
        "sliced": (
            base((3, 6, 9, 12), 1)[::2, ::2, 1:8, 2:11],
            base((2, 5, 7, 10), 2)[:, 1:, :, 1:],
        ),
        "hw_transposed": (
            base((2, 3, 9, 7), 1).transpose(2, 3),
            base((2, 4, 9, 7), 2).transpose(2, 3),
        ),
        "batch_expanded": (base((2, 3, 7, 9), 1), base((1, 4, 7, 9), 2).expand(2, 4, 7, 9)),
        "channel_expanded": (base((2, 1, 7, 9), 1).expand(2, 3, 7, 9), base((2, 4, 7, 9), 2)),
        "channels_last_sliced": (
            base((2, 6, 7, 9), 1).to(memory_format=torch.channels_last)[:, 1:4],
            base((2, 4, 8, 9), 2).to(memory_format=torch.channels_last)[:, :, 1:],
        ),
    }


LAYOUTS = list(_layouts("cpu"))


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("p", [1, 2])
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("device", DEVICES)
def test_layouts(device, layout, p, kind):
    """Strided, permuted, expanded and channels_last inputs give the contiguous result and grads."""
    s0, t0 = _layouts(device)[layout]
    assert s0.shape == (2, 3, 7, 9) and t0.shape[:2] == (2, 4)
    # leaves that keep the views' strides (detach shares storage and strides)
    s = s0.detach().requires_grad_()
    t = t0.detach().requires_grad_()
    assert s.stride() == s0.stride()
    z = make_projection(kind, 2, 63, dtype=torch.float64, device=device)
    up = randn(2, dtype=torch.float64, device=device, seed=6)
    out, (gs, gt) = value_and_grads(lambda a, b: ours(kind, a, b, p=p, z=z), s, t, up)
    sc, tc = s.detach().contiguous().requires_grad_(), t.detach().contiguous().requires_grad_()
    out_c, (gsc, gtc) = value_and_grads(lambda a, b: ours(kind, a, b, p=p, z=z), sc, tc, up)
    truth, (rs, rt) = oracle_value_and_grads(kind, s, t, p=p, z=z, upstream=up)
    check_close(out, truth, dtype=torch.float64)
    check_close(gs, rs, dtype=torch.float64)
    check_close(gt, rt, dtype=torch.float64)
    check_close(out, out_c, dtype=torch.float64)
    check_close(gs, gsc, dtype=torch.float64)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("p", [1, 2])
@pytest.mark.parametrize("device", DEVICES)
def test_channels_last_float32(device, p, kind):
    s, t = make_pair(2, 5, 3, 12, 13, dtype=torch.float32, device=device, grad=(False, False))
    s = s.to(memory_format=torch.channels_last).requires_grad_()
    t = t.to(memory_format=torch.channels_last).requires_grad_()
    z = make_projection(kind, 2, 156, dtype=torch.float32, device=device)
    up = randn(2, dtype=torch.float64, device=device, seed=6)
    out, (gs, gt) = value_and_grads(lambda a, b: ours(kind, a, b, p=p, z=z), s, t, up)
    truth, (rs, rt) = oracle_value_and_grads(kind, s, t, p=p, z=z, upstream=up)
    eager, (es, et) = oracle_value_and_grads(kind, s, t, p=p, z=z, upstream=up, dtype=torch.float32)
    check_close(out, truth, dtype=torch.float32, eager=eager)
    check_close(gs, rs, dtype=torch.float32, eager=es)
    check_close(gt, rt, dtype=torch.float32, eager=et)


@pytest.mark.parametrize("kind", KINDS + ["ffa_generator"])
@pytest.mark.parametrize("device", DEVICES)
def test_empty_batch(device, kind):
    """B=0 (documented): 'none' -> [0], 'sum' -> 0, 'mean' -> NaN (as torch.mean); empty grads."""
    s, t = make_pair(0, 3, 4, 5, 6, dtype=torch.float32, device=device)
    z = make_projection("ffa_nk" if kind == "ffa_generator" else kind, 0, 30, device=device)

    def call(reduction):
        if kind == "ffa_generator":
            return ffa.fast_feature_affinity_loss(s, t, reduction=reduction, generator=None)
        return ours(kind, s, t, p=1, z=z, reduction=reduction)

    none = call("none")
    assert none.shape == (0,) and none.dtype == torch.float32
    total = call("sum")
    assert total.shape == () and total.item() == 0.0
    assert torch.isnan(call("mean"))
    total.backward()
    assert s.grad.shape == s.shape and t.grad.shape == t.shape


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("p", [1, 2])
@pytest.mark.parametrize(
    "dtypes",
    [
        (torch.float32, torch.float64),
        (torch.float64, torch.float32),
        (torch.float16, torch.float32),
        (torch.bfloat16, torch.float16),
    ],
    ids=str,
)
@pytest.mark.parametrize("device", DEVICES)
def test_mixed_dtypes_promote(device, dtypes, p, kind):
    """Student and teacher of different dtypes are promoted (torch.promote_types)."""
    sd, td = dtypes
    common = torch.promote_types(sd, td)
    s, t = make_pair(2, 3, 4, 5, 6, dtype=sd, teacher_dtype=td, device=device)
    z = make_projection(kind, 2, 30, dtype=torch.float64, device=device)
    up = randn(2, dtype=torch.float64, device=device, seed=8)
    out, (gs, gt) = value_and_grads(lambda a, b: ours(kind, a, b, p=p, z=z), s, t, up)
    assert out.dtype == (torch.float64 if common == torch.float64 else torch.float32)
    assert gs.dtype == sd and gt.dtype == td
    # the same as calling with both inputs already promoted
    sp, tp = s.detach().to(common).requires_grad_(), t.detach().to(common).requires_grad_()
    out_p, (gsp, gtp) = value_and_grads(lambda a, b: ours(kind, a, b, p=p, z=z), sp, tp, up)
    torch.testing.assert_close(out, out_p, rtol=0, atol=0)
    torch.testing.assert_close(gs, gsp.to(sd), rtol=0, atol=0)
    torch.testing.assert_close(gt, gtp.to(td), rtol=0, atol=0)


@pytest.mark.parametrize("value", [float("nan"), float("inf"), float("-inf")], ids=str)
@pytest.mark.parametrize("where", ["student", "teacher", "projection"])
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("p", [1, 2])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16], ids=str)
@pytest.mark.parametrize("device", DEVICES)
def test_nonfinite_inputs_propagate(device, dtype, p, kind, where, value):
    """NaN/Inf in an input is never hidden: the affected sample's loss is not finite, others are."""
    if where == "projection" and kind == "fa":
        pytest.skip("exact FA has no projection")
    s, t = make_pair(2, 3, 4, 5, 6, dtype=dtype, device=device, grad=(False, False))
    z = make_projection(kind, 2, 30, dtype=torch.float32, device=device)
    with torch.no_grad():
        if where == "student":
            s[1, 2, 3, 4] = value
        elif where == "teacher":
            t[1, 0, 0, 5] = value
        elif kind == "ffa_bnk":
            z[1, 17, 2] = value
        else:
            z[17, 2] = value
    out = ours(kind, s, t, p=p, z=z)
    bad = [1] if where != "projection" or kind == "ffa_bnk" else [0, 1]
    for i in range(2):
        assert torch.isfinite(out[i]).item() == (i not in bad), (i, out)
    mean = ours(kind, s, t, p=p, z=z, reduction="mean")
    assert not torch.isfinite(mean)


# Student and teacher of equal values: N > Cs + Ct and N < Cs + Ct (the two exact p=2 forms), and
# N = 640 (several 256-pixel tiles of the exact kernel).
EQUAL_SHAPES = [(2, 3, 3, 6, 7), (2, 12, 12, 3, 5), (1, 4, 4, 20, 32)]
# (student layout, teacher layout); FFA runs its GEMMs in the features' own layout, so its
# bitwise-zero guarantee is for equal layouts only.
EQUAL_LAYOUTS = {
    "contiguous": ("contiguous", "contiguous"),
    "channels_last": ("channels_last", "channels_last"),
    "sliced": ("sliced", "sliced"),
    "mixed": ("channels_last", "contiguous"),
}


def _with_layout(x, layout):
    if layout == "channels_last":
        return x.contiguous(memory_format=torch.channels_last)
    if layout == "sliced":
        wide = torch.zeros(x.shape[0], x.shape[1] + 2, *x.shape[2:], dtype=x.dtype, device=x.device)
        wide[:, 1:-1] = x
        return wide[:, 1:-1]
    return x.contiguous()


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("p", [1, 2])
@pytest.mark.parametrize("layouts", list(EQUAL_LAYOUTS))
@pytest.mark.parametrize("shape", EQUAL_SHAPES, ids=["x".join(map(str, s)) for s in EQUAL_SHAPES])
@pytest.mark.parametrize("dtype", FLOATS + HALVES, ids=str)
@pytest.mark.parametrize("device", DEVICES)
def test_student_equals_teacher_is_exactly_zero(device, dtype, shape, layouts, p, kind):
    """Equal unit pixels give bitwise-equal affinities: loss and both gradients exactly 0."""
    if kind != "fa" and layouts == "mixed":
        pytest.skip("FFA's products follow the features' layout")
    b, c, _, h, w = shape
    x = randn((b, c, h, w), dtype=dtype, device=device, seed=sum(shape))
    s = _with_layout(x, EQUAL_LAYOUTS[layouts][0]).requires_grad_()
    t = _with_layout(x, EQUAL_LAYOUTS[layouts][1]).requires_grad_()
    z = make_projection(kind, b, h * w, dtype=dtype, device=device)
    up = randn(b, dtype=torch.float64, device=device, seed=2)
    out, (gs, gt) = value_and_grads(lambda a, d: ours(kind, a, d, p=p, z=z), s, t, up)
    assert torch.equal(out, torch.zeros_like(out)), out
    assert torch.equal(gs, torch.zeros_like(gs)) and torch.equal(gt, torch.zeros_like(gt))


@pytest.mark.parametrize("p", [1, 2])
@pytest.mark.parametrize("dtype", FLOATS, ids=str)
@pytest.mark.parametrize("device", DEVICES)
def test_teacher_equal_on_half_the_pixels(device, dtype, p):
    """Pairs of equal pixels give D_ij = 0 exactly (sign 0), as in the float64 oracle."""
    b, c, h, w = 2, 4, 16, 20
    s, t = make_pair(b, c, c, h, w, dtype=dtype, device=device, grad=(False, False))
    same = torch.rand(h, w, generator=torch.Generator().manual_seed(3)) < 0.5
    t[:, :, same.to(device)] = s[:, :, same.to(device)]
    s.requires_grad_(), t.requires_grad_()
    up = randn(b, dtype=torch.float64, device=device, seed=9)
    out, (gs, gt) = value_and_grads(lambda a, d: ours("fa", a, d, p=p), s, t, up)
    truth, (rs, rt) = oracle_value_and_grads("fa", s, t, p=p, upstream=up)
    eager, (es, et) = oracle_value_and_grads("fa", s, t, p=p, upstream=up, dtype=dtype)
    atol64 = gram_atol("fa", p, grad_scale=up.abs().max().item() / (h * w))
    check_close(out, truth, dtype=dtype, eager=eager, atol64=gram_atol("fa", p))
    check_close(gs, rs, dtype=dtype, eager=es, what="student grad", atol64=atol64)
    check_close(gt, rt, dtype=dtype, eager=et, what="teacher grad", atol64=atol64)


@pytest.mark.parametrize("dtype", FLOATS, ids=str)
@pytest.mark.parametrize("device", DEVICES)
def test_fa_p2_never_negative(device, dtype):
    """Student ~ teacher: the Gram identity cancels to rounding level but never goes below 0."""
    for seed in range(8):
        s = randn((4, 6, 9, 10), dtype=dtype, device=device, seed=seed)
        noise = randn((4, 6, 9, 10), dtype=dtype, device=device, seed=seed + 100)
        for rel in (0.0, 1e-12, 1e-9):
            out = ffa.feature_affinity_loss(s, s + rel * noise, p=2, reduction="none")
            assert (out >= 0).all(), (seed, rel, out)


# Both exact p=2 forms (N x N when N < Cs + Ct, channel Gram matrices otherwise), around the switch
# and across several 256-pixel tiles.
P2_SHAPES = [
    (2, 9, 7, 3, 5),
    (2, 8, 8, 4, 4),
    (2, 8, 9, 4, 4),
    (1, 150, 140, 16, 17),
    (1, 3, 2, 17, 19),
]


@pytest.mark.parametrize("shape", P2_SHAPES, ids=["x".join(map(str, s)) for s in P2_SHAPES])
@pytest.mark.parametrize("dtype", FLOATS + HALVES, ids=str)
@pytest.mark.parametrize("device", DEVICES)
def test_fa_p2_both_forms(device, dtype, shape):
    b, cs, ct, h, w = shape
    s, t = make_pair(b, cs, ct, h, w, dtype=dtype, device=device, seed=sum(shape))
    up = randn(b, dtype=torch.float64, device=device, seed=1)
    out, (gs, gt) = value_and_grads(lambda a, d: ours("fa", a, d, p=2), s, t, up)
    truth, (rs, rt) = oracle_value_and_grads("fa", s, t, p=2, upstream=up)
    eager, (es, et) = oracle_value_and_grads("fa", s, t, p=2, upstream=up, dtype=dtype)
    atol64 = gram_atol("fa", 2, grad_scale=up.abs().max().item() / (h * w))
    check_close(out, truth, dtype=dtype, eager=eager, atol64=gram_atol("fa", 2))
    check_close(gs, rs, dtype=dtype, eager=es, what="student grad", atol64=atol64)
    check_close(gt, rt, dtype=dtype, eager=et, what="teacher grad", atol64=atol64)


# Input scales where squared pixel norms overflow or underflow the input dtype (float32 squares
# overflow above ~1e19 and underflow below ~1e-19; float64 above ~1e154 and below ~1e-154). eps is
# scaled with the input, so these are the unscaled losses.
SCALES = [
    *[(torch.float32, x) for x in (1e-30, 1e-20, 1e20, 1e30)],
    *[(torch.bfloat16, x) for x in (1e-30, 1e30)],
    *[(torch.float64, x) for x in (1e-300, 1e-200, 1e200, 1e300)],
]
SCALE_SHAPES = [(2, 5, 4, 6, 7), (1, 12, 10, 3, 5)]  # p=2: Gram form, N x N form


def _check_grads_masked(actual, truth, *, dtype, mask, what, atol64=0.0):
    """check_close on the pixels in `mask` (over [B, H, W]); +-inf must match where the truth
    overflows the output dtype; never NaN."""
    assert not torch.isnan(actual).any(), what
    a = actual.detach().double().permute(0, 2, 3, 1)[mask]
    t = truth.detach().double().permute(0, 2, 3, 1)[mask]
    t_rounded = t.to(actual.dtype).double()
    big = ~torch.isfinite(t_rounded)
    assert torch.equal(a[big], t_rounded[big]), what
    check_close(a[~big], t[~big], dtype=dtype, eager=t_rounded[~big], what=what, atol64=atol64)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("p", [1, 2])
@pytest.mark.parametrize("shape", SCALE_SHAPES, ids=["x".join(map(str, s)) for s in SCALE_SHAPES])
@pytest.mark.parametrize("dtype,scale", SCALES, ids=[f"{d}-{x:g}" for d, x in SCALES])
@pytest.mark.parametrize("device", DEVICES)
def test_extreme_input_scales(device, dtype, scale, shape, p, kind):
    """Norms and unit pixels are scale-safe: value and gradients match the float64 oracle."""
    b, cs, ct, h, w = shape
    s, t = make_pair(b, cs, ct, h, w, dtype=torch.float64, device=device, grad=(False, False))
    s, t = leaf(s * scale, dtype).requires_grad_(), leaf(t * scale, dtype).requires_grad_()
    z = make_projection(kind, b, h * w, dtype=dtype, device=device)
    eps = 1e-5 * scale
    up = randn(b, dtype=torch.float64, device=device, seed=5)
    out, (gs, gt) = value_and_grads(lambda a, d: ours(kind, a, d, p=p, z=z, eps=eps), s, t, up)
    truth, (rs, rt) = oracle_value_and_grads(kind, s, t, p=p, z=z, upstream=up, eps=eps)
    check_close(out, truth, dtype=dtype, atol64=gram_atol(kind, p))
    atol64 = gram_atol(kind, p, grad_scale=up.abs().max().item() / (h * w * scale))
    # no eager reference at these scales: the bound is 2x the error of rounding the truth itself
    check_close(gs, rs, dtype=dtype, eager=rs.to(dtype), what="student grad", atol64=atol64)
    check_close(gt, rt, dtype=dtype, eager=rt.to(dtype), what="teacher grad", atol64=atol64)
    # and the same loss as the unscaled inputs
    s1, t1 = (x.detach().double() / scale for x in (s, t))
    unscaled = ref(kind, s1, t1, p=p, z=z, dtype=torch.float64)
    check_close(out, unscaled, dtype=dtype, atol64=gram_atol(kind, p))


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("p", [1, 2])
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("dtype", FLOATS, ids=str)
@pytest.mark.parametrize("device", DEVICES)
def test_pixel_scales_vary_within_a_sample(device, dtype, layout, p, kind):
    """Pixel norms from 1e-20 to 1e20 in one sample (eps 1e-30), next to ordinary pixels: 720
    pixels, so several tiles / blocks of pixels, some entirely ordinary, some not."""
    b, cs, ct, h, w = 1, 6, 5, 24, 30
    s0, t0 = make_pair(b, cs, ct, h, w, dtype=torch.float64, device=device, grad=(False, False))
    g = torch.Generator().manual_seed(11)
    exponent = torch.zeros(b, 1, h, w, dtype=torch.float64)
    exponent[:, :, 18:] = 40 * torch.rand(b, 1, 6, w, generator=g, dtype=torch.float64) - 20
    scale = (10.0**exponent).to(device)
    s = leaf(s0 * scale, dtype).contiguous(memory_format=_FORMATS[layout]).requires_grad_()
    t = leaf(t0 * scale, dtype).contiguous(memory_format=_FORMATS[layout]).requires_grad_()
    z = make_projection(kind, b, h * w, dtype=dtype, device=device)
    up = randn(b, dtype=torch.float64, device=device, seed=5)
    eps = 1e-30
    out, (gs, gt) = value_and_grads(lambda a, d: ours(kind, a, d, p=p, z=z, eps=eps), s, t, up)
    truth, (rs, rt) = oracle_value_and_grads(kind, s, t, p=p, z=z, upstream=up, eps=eps)
    check_close(out, truth, dtype=dtype, atol64=gram_atol(kind, p))
    # gradients scale like 1 / (pixel scale): compare them scaled back to O(1)
    atol64 = gram_atol(kind, p, grad_scale=up.abs().max().item() / (h * w))
    for actual, want, what in ((gs, rs, "student grad"), (gt, rt, "teacher grad")):
        a, r = actual.double() * scale, want * scale
        check_close(a, r, dtype=dtype, eager=r.to(dtype), what=what, atol64=atol64)


_FORMATS = {"contiguous": torch.contiguous_format, "channels_last": torch.channels_last}


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("p", [1, 2])
@pytest.mark.parametrize(
    "dtype,eps",
    [
        (torch.float32, 1e-40),
        (torch.float32, 1e-45),
        (torch.bfloat16, 1e-40),
        (torch.float64, 5e-324),
    ],
    ids=str,
)
@pytest.mark.parametrize("device", DEVICES)
def test_tiny_eps_with_dead_pixels(device, dtype, eps, p, kind):
    """Any eps > 0: an all-zero pixel has u = 0 (never NaN); its gradient is g_u / eps."""
    b, h, w = 2, 5, 6
    s, t = make_pair(b, 3, 4, h, w, dtype=dtype, device=device, grad=(False, False))
    DEAD["both_other_pixels"](s, t)
    s[1, :, 3, 2] = 0
    s.requires_grad_(), t.requires_grad_()
    z = make_projection(kind, b, h * w, dtype=dtype, device=device)
    up = randn(b, dtype=torch.float64, device=device, seed=4)
    out, (gs, gt) = value_and_grads(lambda a, d: ours(kind, a, d, p=p, z=z, eps=eps), s, t, up)
    truth, (rs, rt) = oracle_value_and_grads(kind, s, t, p=p, z=z, upstream=up, eps=eps)
    assert torch.isfinite(out).all()
    check_close(out, truth, dtype=dtype, atol64=gram_atol(kind, p))
    atol64 = gram_atol(kind, p, grad_scale=up.abs().max().item() / (h * w))
    for g, r, x, what in ((gs, rs, s, "student grad"), (gt, rt, t, "teacher grad")):
        dead = (x.detach() == 0).all(dim=1)
        assert dead.any()
        for mask, where in ((~dead, " (live pixels)"), (dead, " (dead pixels)")):
            _check_grads_masked(g, r, dtype=dtype, mask=mask, what=what + where, atol64=atol64)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("p", [1, 2])
@pytest.mark.parametrize("device", DEVICES)
def test_scale_invariance_and_eps(device, p, kind):
    """Unit pixels make the loss (nearly) invariant to a positive per-pixel scale; eps is used."""
    s, t = make_pair(2, 3, 4, 5, 6, dtype=torch.float64, device=device, grad=(False, False))
    z = make_projection(kind, 2, 30, dtype=torch.float64, device=device)
    scale = randn((2, 1, 5, 6), dtype=torch.float64, device=device, seed=3).abs() + 0.5
    a = ours(kind, s, t, p=p, z=z, eps=1e-12)
    b = ours(kind, s * scale, t, p=p, z=z, eps=1e-12)
    torch.testing.assert_close(a, b, rtol=1e-9, atol=0)
    for eps in (1e-3, 0.5):
        check_close(
            ours(kind, s, t, p=p, z=z, eps=eps),
            ref(kind, s, t, p=p, z=z, eps=eps),
            dtype=torch.float64,
        )


# ---- the paper's released code -------------------------------------------------------------------


def paper_fa_loss(feat, ref_feat):
    """Our transcription of the released FAQD fa_loss: a batch *sum* of mean |A_S - A_T|."""
    b, c, h, w = feat.shape
    x = feat.reshape(b, c, h * w)
    x = x / (x.norm(p=2, dim=1, keepdim=True) + 1e-5)
    a_s = x.transpose(1, 2) @ x
    y = F.interpolate(ref_feat, size=(h, w), mode="bilinear", align_corners=True)
    y = y.reshape(b, y.shape[1], h * w)
    y = y / (y.norm(p=2, dim=1, keepdim=True) + 1e-5)
    a_t = y.transpose(1, 2) @ y
    return (a_s - a_t).abs().sum() / (h * h * w * w)


@pytest.mark.parametrize("tsize", [(6, 7), (3, 4), (11, 13)], ids=["same", "up", "down"])
@pytest.mark.parametrize("device", DEVICES)
def test_p1_sum_equals_paper_code(device, tsize):
    s, t = make_pair(3, 4, 6, 6, 7, *tsize, dtype=torch.float64, device=device)
    ours_v = ffa.feature_affinity_loss(s, t, p=1, reduction="sum")
    paper_v = paper_fa_loss(s, t)
    check_close(ours_v, paper_v, dtype=torch.float64)
    s2, t2 = s.detach().clone().requires_grad_(), t.detach().clone().requires_grad_()
    ours_v.backward()
    paper_fa_loss(s2, t2).backward()
    check_close(s.grad, s2.grad, dtype=torch.float64)
    check_close(t.grad, t2.grad, dtype=torch.float64)
    # the module with its defaults reproduces it too (mean = sum / B)
    m = ffa.FeatureAffinityLoss(reduction="sum")
    check_close(m(s.detach(), t.detach()), paper_v, dtype=torch.float64)


@pytest.mark.parametrize("device", DEVICES)
def test_module_defaults_match_functional(device):
    s, t = make_pair(2, 3, 4, 5, 6, dtype=torch.float64, device=device, grad=(False, False))
    z = randn((30, 6), dtype=torch.float64, device=device)
    for p in (1, 2):
        for red in ("mean", "sum", "none"):
            m = ffa.FeatureAffinityLoss(p=p, reduction=red)
            torch.testing.assert_close(
                m(s, t), ffa.feature_affinity_loss(s, t, p=p, reduction=red), rtol=0, atol=0
            )
            fm = ffa.FastFeatureAffinityLoss(p=p, reduction=red, seed=1)
            torch.testing.assert_close(
                fm(s, t, projection=z),
                ffa.fast_feature_affinity_loss(s, t, p=p, reduction=red, projection=z),
                rtol=0,
                atol=0,
            )
    # paper defaults: p=1, mean, eps 1e-5
    torch.testing.assert_close(
        ffa.FeatureAffinityLoss()(s, t), ref("fa", s, t, p=1, reduction="mean")
    )
