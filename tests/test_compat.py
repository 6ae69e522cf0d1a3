"""ffa.compat against a transcription of the paper's released formulas (lzj994/FAQD scripts).

The transcriptions below follow the released code line by line, minus its habits (.cuda(), the
global ``torch.manual_seed(1)`` inside fast_fa_loss: the probe matrix is passed in instead).
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from ffa import compat


# ---- transcriptions of the released code ------------------------------------------------------
def released_fa_loss(feat, ref_feat, order=1):
    batch_size, ch, h, w = feat.shape
    feat = feat.reshape(batch_size, ch, -1)
    feat = torch.div(feat, feat.norm(p=2, dim=1).unsqueeze(1) + 1e-5)
    ft_map = torch.matmul(feat.permute(0, 2, 1), feat)
    ref_feat = F.interpolate(ref_feat, size=(h, w), mode="bilinear", align_corners=True)
    ref_feat = ref_feat.reshape(batch_size, ref_feat.size(1), -1)
    ref_feat = torch.div(ref_feat, ref_feat.norm(p=2, dim=1).unsqueeze(1) + 1e-5)
    refft_map = torch.matmul(ref_feat.permute(0, 2, 1), ref_feat)
    if order == 2:
        return (ft_map - refft_map).norm(p=2) / (h * w)
    return (ft_map - refft_map).norm(p=1) / (h * h * w * w)


def released_fast_fa_loss(feat, ref_feat, vec, order=1):
    """``vec`` [HW, dim] stands for the released ``torch.manual_seed(1); torch.randn(h*w, dim)``."""
    batch_size, ch, h, w = feat.shape
    vec = vec.unsqueeze(0).repeat(batch_size, 1, 1)
    feat = feat.reshape(batch_size, ch, -1)
    feat = torch.div(feat, feat.norm(p=2, dim=1).unsqueeze(1))  # no eps, as released
    ft_map = torch.matmul(feat.permute(0, 2, 1), torch.matmul(feat, vec))
    ref_feat = F.interpolate(ref_feat, size=(h, w), mode="bilinear", align_corners=True)
    ref_feat = ref_feat.reshape(batch_size, ref_feat.size(1), -1)
    ref_feat = torch.div(ref_feat, ref_feat.norm(p=2, dim=1).unsqueeze(1))
    refft_map = torch.matmul(ref_feat.permute(0, 2, 1), torch.matmul(ref_feat, vec))
    if order == 1:
        return (ft_map - refft_map).abs().sum(1).mean(-1).sum() / (h * h * w * w)
    return torch.sqrt((ft_map - refft_map).pow(2).sum(1).mean(-1).sum()) / (h * w)


def released_quantize_bw(kernel):
    delta = kernel.abs().mean()
    sign = kernel.sign().float()
    return sign * delta


def released_quantize_tnn(kernel):
    data = kernel.abs()
    delta = 0.7 * data.mean()
    delta = min(delta, 100.0)
    index = data.ge(delta).float()
    sign = kernel.sign().float()
    scale = (data * index).mean()
    return scale * index * sign


def released_quantize_fbit(kernel):
    data = kernel.abs()
    delta = data.max() / 15
    delta = min(delta, 10.0)
    sign = kernel.sign().float()
    q = 0.0 * data
    for i in range(3, 17, 2):
        if i < 15:
            index = data.gt((i - 2) * delta).float() * data.le(i * delta).float()
        else:
            index = data.gt(13 * delta).float()
        q += (i - 1) / 2 * index
    scale = (data * q).sum() / (q * q).sum()
    return scale * q * sign


# ---- inputs -----------------------------------------------------------------------------------
SHAPES = [  # (student, teacher): same size, teacher larger (resized), odd sizes, batch 1
    ((2, 4, 6, 6), (2, 4, 6, 6)),
    ((3, 5, 7, 5), (3, 8, 14, 9)),
    ((1, 3, 4, 9), (1, 2, 4, 9)),
]


def _pair(s_shape, t_shape, dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)
    s = torch.randn(s_shape, generator=g, dtype=dtype, requires_grad=True)
    t = torch.randn(t_shape, generator=g, dtype=dtype)
    return s, t


def _check_value_and_grad(ours, ref, s, rtol=1e-7, atol=1e-10):
    torch.testing.assert_close(ours, ref, rtol=rtol, atol=atol)
    (g_ours,) = torch.autograd.grad(ours, s)
    (g_ref,) = torch.autograd.grad(ref, s)
    torch.testing.assert_close(g_ours, g_ref, rtol=100 * rtol, atol=100 * atol)


# ---- losses -----------------------------------------------------------------------------------
@pytest.mark.parametrize("shapes", SHAPES)
@pytest.mark.parametrize("order", [1, 2])
def test_fa_loss_matches_released(shapes, order):
    s, t = _pair(*shapes)
    _check_value_and_grad(compat.fa_loss(s, t, order), released_fa_loss(s, t, order), s)
    # default order is 1, as released
    torch.testing.assert_close(compat.fa_loss(s, t), released_fa_loss(s, t))


@pytest.mark.parametrize("shapes", SHAPES)
@pytest.mark.parametrize("order", [1, 2])
@pytest.mark.parametrize("dim", [1, 15])
def test_fast_fa_loss_matches_released_with_projection(shapes, order, dim):
    s, t = _pair(*shapes)
    n = shapes[0][2] * shapes[0][3]
    vec = torch.randn(n, dim, generator=torch.Generator().manual_seed(7), dtype=torch.float64)
    ours = compat.fast_fa_loss(s, t, dim, order, projection=vec)
    # the only numeric difference is eps=1e-5 in the pixel norms: relative O(eps / ||pixel||)
    _check_value_and_grad(ours, released_fast_fa_loss(s, t, vec, order), s, rtol=1e-4, atol=1e-8)


@pytest.mark.parametrize("order", [1, 2])
def test_fast_fa_loss_matches_released_with_generator(order):
    s, t = _pair(*SHAPES[1])
    n = SHAPES[1][0][2] * SHAPES[1][0][3]
    # the released Z is torch.randn(h*w, dim) right after a reseed; a seeded generator gives it here
    vec = torch.randn(n, 15, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    ours = compat.fast_fa_loss(s, t, order=order, generator=torch.Generator().manual_seed(1))
    _check_value_and_grad(ours, released_fast_fa_loss(s, t, vec, order), s, rtol=1e-4, atol=1e-8)


def test_fast_fa_loss_no_global_reseed_fresh_z():
    s, t = _pair(*SHAPES[0])
    torch.manual_seed(1234)
    state = torch.get_rng_state()
    gen = torch.Generator().manual_seed(0)
    a = compat.fast_fa_loss(s, t, generator=gen)
    b = compat.fast_fa_loss(s, t, generator=gen)
    assert torch.equal(torch.get_rng_state(), state)  # the global RNG is neither used nor reset
    assert not torch.equal(a, b)  # a fresh Z per call
    # without a generator the default one is used (advanced, never reseeded)
    c = compat.fast_fa_loss(s, t)
    d = compat.fast_fa_loss(s, t)
    assert not torch.equal(c, d)
    torch.manual_seed(1234)
    torch.testing.assert_close(compat.fast_fa_loss(s, t), c, rtol=0, atol=0)


def test_fast_fa_loss_dead_pixel_is_finite():
    s, t = _pair(*SHAPES[0])
    s = s.detach().clone()
    s[:, :, 0, 0] = 0  # an all-zero pixel, as after a ReLU
    s.requires_grad_()
    vec = torch.randn(36, 15, dtype=torch.float64)
    assert torch.isnan(released_fast_fa_loss(s, t, vec))
    ours = compat.fast_fa_loss(s, t, projection=vec)
    assert torch.isfinite(ours)
    ours.backward()
    assert torch.isfinite(s.grad).all()


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("order", [1, 2])
def test_zero_distance_value_and_grad(order, dtype):
    """Student affinity equal to the teacher's: value 0 and gradient 0 (not NaN), as the released
    fa_loss's ``.norm()`` gives (its fast_fa_loss's bare sqrt gives NaN there; ffa gives 0)."""
    s, _ = _pair(*SHAPES[0], dtype=dtype)
    vec = torch.randn(36, 15, generator=torch.Generator().manual_seed(7), dtype=dtype)
    released = released_fa_loss(s, s.detach().clone(), order)
    assert released.item() == 0
    assert torch.equal(torch.autograd.grad(released, s)[0], torch.zeros_like(s))
    for teacher in (s.detach().clone(), s):
        for loss in (
            compat.fa_loss(s, teacher, order),
            compat.fast_fa_loss(s, teacher, order=order, projection=vec),
        ):
            assert loss.item() == 0
            (g,) = torch.autograd.grad(loss, s)
            assert torch.equal(g, torch.zeros_like(s))


def test_float32_and_order_errors():
    s, t = _pair(*SHAPES[1], dtype=torch.float32)
    torch.testing.assert_close(compat.fa_loss(s, t), released_fa_loss(s, t), rtol=1e-4, atol=1e-6)
    with pytest.raises(ValueError, match="order must be 1 or 2"):
        compat.fa_loss(s, t, order=3)
    with pytest.raises(ValueError, match="order must be 1 or 2"):
        compat.fast_fa_loss(s, t, order=0)


# ---- quantizers -------------------------------------------------------------------------------
QUANTIZERS = [
    (compat.quantize_bw, released_quantize_bw),
    (compat.quantize_tnn, released_quantize_tnn),
    (compat.quantize_fbit, released_quantize_fbit),
]


def _weights():
    g = torch.Generator().manual_seed(3)
    yield torch.randn(16, 8, 3, 3, generator=g)
    yield torch.randn(10, 32, generator=g) * 0.05
    yield torch.randn(7, generator=g)
    # exact ties on the 4-bit level boundaries: max|w| = 7.5 gives delta = 0.5 exactly, and
    # values at odd multiples of delta sit on the thresholds (the released rule is (lo, hi]).
    ties = torch.tensor([0.5, 1.5, 2.5, 3.5, 4.5, 5.5, 6.5, 7.5, 0.25, 1.0, 0.0, 6.0])
    yield torch.cat([ties, -ties]).reshape(4, 6)


@pytest.mark.parametrize("pair", QUANTIZERS, ids=["bw", "tnn", "fbit"])
def test_quantizers_match_released(pair):
    ours_fn, ref_fn = pair
    for w in _weights():
        ours = ours_fn(w)
        assert ours.shape == w.shape and ours.dtype == w.dtype
        torch.testing.assert_close(ours, ref_fn(w), rtol=1e-6, atol=1e-7)
        # float64 too
        torch.testing.assert_close(ours_fn(w.double()), ref_fn(w.double()).double())


@pytest.mark.parametrize("pair", QUANTIZERS, ids=["bw", "tnn", "fbit"])
def test_quantizers_straight_through(pair):
    w = torch.randn(4, 3, 3, 3, requires_grad=True)
    g = torch.randn(4, 3, 3, 3)
    pair[0](w).backward(g)
    torch.testing.assert_close(w.grad, g)
