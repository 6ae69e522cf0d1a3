"""gradcheck of every loss path and torch.library.opcheck of every ffa loss op."""

from __future__ import annotations

import pytest
import torch
from loss_helpers import DEVICES, make_pair, make_projection, randn

import ffa

pytestmark = pytest.mark.torch_threads(1)

ops = torch.ops.ffa
EPS = 1e-5


def _gradcheck_inputs(device, tsize=None, cs=2, ct=3, h=3, w=4):
    # Tiny float64 inputs; with random pixels no |D_ij| or |(DZ)_ik| sits at the kink of |.|.
    return make_pair(2, cs, ct, h, w, *(tsize or ()), dtype=torch.float64, device=device, seed=21)


@pytest.mark.parametrize("tsize", [None, (2, 5)], ids=["same_res", "teacher_resized"])
@pytest.mark.parametrize("kind", ["fa", "ffa_nk", "ffa_bnk"])
@pytest.mark.parametrize("p", [1, 2])
@pytest.mark.parametrize("device", DEVICES)
def test_gradcheck(device, p, kind, tsize):
    s, t = _gradcheck_inputs(device, tsize)
    z = make_projection(kind, 2, 12, k=3, dtype=torch.float64, device=device)
    if kind == "fa":

        def fn(a, b):
            return ffa.feature_affinity_loss(a, b, p=p, reduction="none")
    else:

        def fn(a, b):
            return ffa.fast_feature_affinity_loss(a, b, p=p, reduction="none", projection=z)

    assert torch.autograd.gradcheck(fn, (s, t), eps=1e-6, atol=1e-7, rtol=1e-5)


@pytest.mark.parametrize("p", [1, 2])
@pytest.mark.parametrize("device", DEVICES)
def test_gradcheck_student_only_and_dead_pixel(device, p):
    """Teacher without grad (mask [True, False]) and a dead student pixel among live ones.

    ||x|| has a kink at x = 0, so finite differences cannot check the dead pixel itself (its
    analytic gradient g_u / eps is compared with the reference in test_losses_values); the dead
    pixel is held at zero through a mask and the live pixels are gradchecked around it.
    """
    s, t = _gradcheck_inputs(device)
    t = t.detach()
    live = torch.ones_like(s, dtype=torch.bool)
    live[0, :, 1, 2] = False
    zero = torch.zeros((), dtype=s.dtype, device=device)
    z = randn((12, 4), dtype=torch.float64, device=device, seed=2)

    def fa(x):
        return ffa.feature_affinity_loss(torch.where(live, x, zero), t, p=p, reduction="none")

    def fast(x):
        x = torch.where(live, x, zero)
        return ffa.fast_feature_affinity_loss(x, t, p=p, reduction="none", projection=z)

    for fn in (fa, fast):
        assert torch.autograd.gradcheck(fn, (s,), eps=1e-6, atol=1e-7, rtol=1e-5)


# ---- opcheck -------------------------------------------------------------------------------------


def _op_samples(device):
    """(student, teacher, projection) samples: dtypes, Cs != Ct, layouts, shared/batched Z."""
    f32, f64 = torch.float32, torch.float64
    samples = []
    s, t = make_pair(2, 3, 4, 5, 6, dtype=f32, device=device, seed=1)
    samples.append((s, t, randn((1, 30, 4), dtype=f32, device=device)))
    s, t = make_pair(3, 2, 5, 7, 9, dtype=f64, device=device, seed=2, grad=(True, False))
    samples.append((s, t, randn((3, 63, 2), dtype=f64, device=device)))
    s, t = make_pair(2, 4, 3, 6, 5, dtype=f32, device=device, seed=3, grad=(False, False))
    s = s.to(memory_format=torch.channels_last).requires_grad_()
    t = t.to(memory_format=torch.channels_last).requires_grad_()
    samples.append((s, t, randn((2, 30, 3), dtype=f32, device=device)))
    s, t = make_pair(2, 3, 4, 4, 5, dtype=torch.bfloat16, device=device, seed=4)
    samples.append((s, t, randn((1, 20, 3), dtype=f32, device=device)))
    return samples


# every output_mask on the first sample, both grads on the others (opcheck is slow-ish)
MASKS = ([True, True], [True, False], [False, True], [False, False])


def _opcheck(op, args):
    # opcheck raises on failure; the returned dict names each sub-test
    result = torch.library.opcheck(op, args)
    assert all(v == "SUCCESS" for v in result.values()), result


@pytest.mark.parametrize("p", [1, 2])
@pytest.mark.parametrize("device", DEVICES)
def test_opcheck_fa_loss(device, p):
    for s, t, _ in _op_samples(device):
        _opcheck(ops.fa_loss.default, (s, t, p, EPS))


@pytest.mark.parametrize("p", [1, 2])
@pytest.mark.parametrize("device", DEVICES)
def test_opcheck_fa_loss_backward(device, p):
    for i, (s, t, _) in enumerate(_op_samples(device)):
        g = randn(s.shape[0], dtype=torch.float64, device=device, seed=i)
        g = g.to(torch.float64 if s.dtype == torch.float64 else torch.float32)
        for mask in MASKS if i == 0 else MASKS[:1]:
            _opcheck(ops.fa_loss_backward.default, (g, s.detach(), t.detach(), p, EPS, mask))


@pytest.mark.parametrize("p", [1, 2])
@pytest.mark.parametrize("device", DEVICES)
def test_opcheck_ffa_loss(device, p):
    for s, t, z in _op_samples(device):
        z = z.to(torch.float64 if s.dtype == torch.float64 else torch.float32)
        _opcheck(ops.ffa_loss.default, (s, t, z, p, EPS))


@pytest.mark.parametrize("p", [1, 2])
@pytest.mark.parametrize("device", DEVICES)
def test_opcheck_ffa_loss_backward(device, p):
    for i, (s, t, z) in enumerate(_op_samples(device)):
        cd = torch.float64 if s.dtype == torch.float64 else torch.float32
        z = z.to(cd)
        s, t = s.detach(), t.detach()
        _, y, p_s, p_t = ops.ffa_loss(s, t, z, p, EPS)
        g = randn(s.shape[0], dtype=cd, device=device, seed=i)
        for mask in MASKS if i == 0 else MASKS[:1]:
            _opcheck(ops.ffa_loss_backward.default, (g, s, t, z, y, p_s, p_t, p, EPS, mask))


@pytest.mark.parametrize("device", DEVICES)
def test_unneeded_grads_are_empty(device):
    """The backward ops return [0]-shaped tensors for gradients that were not asked for."""
    s, t = make_pair(2, 3, 4, 5, 6, dtype=torch.float32, device=device, grad=(False, False))
    g = torch.ones(2, device=device)
    gs, gt = ops.fa_loss_backward(g, s, t, 1, EPS, [True, False])
    assert gs.shape == s.shape and gt.shape == (0,)
    gs, gt = ops.fa_loss_backward(g, s, t, 2, EPS, [False, True])
    assert gs.shape == (0,) and gt.shape == t.shape
    z = randn((1, 30, 3), device=device)
    _, y, p_s, p_t = ops.ffa_loss(s, t, z, 1, EPS)
    gs, gt = ops.ffa_loss_backward(g, s, t, z, y, p_s, p_t, 1, EPS, [True, False])
    assert gs.shape == s.shape and gt.shape == (0,)


@pytest.mark.parametrize("p", [1, 2])
@pytest.mark.parametrize("device", DEVICES)
def test_ffa_op_outputs(device, p):
    """ffa_loss returns (loss[B], Y = D Z [B,N,k], P_S = U_S Z [B,Cs,k], P_T = U_T Z [B,Ct,k])."""
    from ffa import reference

    s, t = make_pair(2, 3, 4, 5, 6, dtype=torch.float64, device=device, grad=(False, False))
    z = randn((2, 30, 3), dtype=torch.float64, device=device)
    loss, y, p_s, p_t = ops.ffa_loss(s, t, z, p, EPS)
    us, ut = reference.unit_pixels(s, EPS), reference.unit_pixels(t, EPS)
    torch.testing.assert_close(p_s, us @ z)
    torch.testing.assert_close(p_t, ut @ z)
    torch.testing.assert_close(y, us.transpose(1, 2) @ (us @ z) - ut.transpose(1, 2) @ (ut @ z))
    torch.testing.assert_close(loss, reference.ffa_loss(s, t, z, p=p, reduction="none"))
