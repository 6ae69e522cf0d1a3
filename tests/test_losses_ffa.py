"""FFA randomness (generators, modules, global RNG) and what the estimator estimates."""

from __future__ import annotations

import math

import pytest
import torch
from loss_helpers import DEVICES, HAS_CUDA, make_pair, randn

import ffa
from ffa import reference

pytestmark = pytest.mark.torch_threads(1)


def _rng_states(device):
    states = [torch.get_rng_state()]
    if HAS_CUDA:
        states.append(torch.cuda.get_rng_state())
    return states


def _assert_rng_unchanged(before, device):
    for a, b in zip(before, _rng_states(device), strict=True):
        assert torch.equal(a, b), "ffa changed torch's global RNG state"


@pytest.mark.parametrize("p", [1, 2])
@pytest.mark.parametrize("device", DEVICES)
def test_generator_same_seed_same_value(device, p):
    s, t = make_pair(2, 3, 4, 5, 6, device=device, grad=(False, False))

    def call(g):
        return ffa.fast_feature_affinity_loss(s, t, k=7, p=p, reduction="none", generator=g)

    a = call(torch.Generator(device=device).manual_seed(42))
    b = call(torch.Generator(device=device).manual_seed(42))
    c = call(torch.Generator(device=device).manual_seed(43))
    assert torch.equal(a, b)
    assert not torch.equal(a, c)


@pytest.mark.parametrize("device", DEVICES)
def test_one_generator_draws_fresh_projections(device):
    s, t = make_pair(2, 3, 4, 5, 6, device=device, grad=(False, False))
    g = torch.Generator(device=device).manual_seed(0)
    state0 = g.get_state()
    first = ffa.fast_feature_affinity_loss(s, t, generator=g, reduction="none")
    second = ffa.fast_feature_affinity_loss(s, t, generator=g, reduction="none")
    assert not torch.equal(g.get_state(), state0), "the generator was not used"
    assert not torch.equal(first, second), "two calls with one generator reused Z"
    # and replaying the generator replays both draws
    g.set_state(state0)
    assert torch.equal(ffa.fast_feature_affinity_loss(s, t, generator=g, reduction="none"), first)
    assert torch.equal(ffa.fast_feature_affinity_loss(s, t, generator=g, reduction="none"), second)


@pytest.mark.parametrize("p", [1, 2])
@pytest.mark.parametrize("device", DEVICES)
def test_module_seed_reproducible(device, p):
    s, t = make_pair(2, 3, 4, 5, 6, device=device, grad=(False, False))
    m1 = ffa.FastFeatureAffinityLoss(k=6, p=p, reduction="none", seed=1234)
    m2 = ffa.FastFeatureAffinityLoss(k=6, p=p, reduction="none", seed=1234)
    m3 = ffa.FastFeatureAffinityLoss(k=6, p=p, reduction="none", seed=1235)
    a1, a2 = m1(s, t), m1(s, t)
    b1, b2 = m2(s, t), m2(s, t)
    assert torch.equal(a1, b1) and torch.equal(a2, b2)
    assert not torch.equal(a1, a2), "the module reused its Z"
    assert not torch.equal(a1, m3(s, t))
    assert m1.seed == 1234


@pytest.mark.parametrize("device", DEVICES)
def test_module_without_seed_is_random(device):
    s, t = make_pair(2, 3, 4, 5, 6, device=device, grad=(False, False))
    m1, m2 = ffa.FastFeatureAffinityLoss(), ffa.FastFeatureAffinityLoss()
    assert isinstance(m1.seed, int) and m1.seed != m2.seed
    assert not torch.equal(m1(s, t), m2(s, t))
    # its seed is recorded, so a run can be replayed
    replay = ffa.FastFeatureAffinityLoss(seed=m1.seed)
    fresh = ffa.FastFeatureAffinityLoss(seed=m1.seed)
    assert torch.equal(replay(s, t), fresh(s, t))


@pytest.mark.parametrize("device", DEVICES)
def test_global_rng_untouched(device):
    """With a generator, a module, or an explicit projection, ffa never touches the global RNG."""
    s, t = make_pair(2, 3, 4, 5, 6, device=device)
    torch.manual_seed(7)
    before = _rng_states(device)
    g = torch.Generator(device=device).manual_seed(1)
    ffa.fast_feature_affinity_loss(s, t, generator=g).backward()
    m = ffa.FastFeatureAffinityLoss(p=2, seed=3)
    m(s, t).backward()
    m(s, t, projection=randn((30, 4), device=device)).backward()
    ffa.fast_feature_affinity_loss(s, t, projection=randn((2, 30, 4), device=device))
    ffa.feature_affinity_loss(s, t).backward()
    ffa.FeatureAffinityLoss(p=2)(s, t).backward()
    _assert_rng_unchanged(before, device)


@pytest.mark.parametrize("device", DEVICES)
def test_default_generator_is_used_when_none(device):
    """generator=None draws from the device's default generator (torch.manual_seed replays it)."""
    s, t = make_pair(2, 3, 4, 5, 6, device=device, grad=(False, False))
    torch.manual_seed(5)
    a = ffa.fast_feature_affinity_loss(s, t, reduction="none")
    after = torch.get_rng_state() if device == "cpu" else torch.cuda.get_rng_state()
    torch.manual_seed(5)
    b = ffa.fast_feature_affinity_loss(s, t, reduction="none")
    assert torch.equal(a, b)
    torch.manual_seed(5)
    fresh = torch.get_rng_state() if device == "cpu" else torch.cuda.get_rng_state()
    assert not torch.equal(after, fresh), "generator=None did not draw from the default generator"


@pytest.mark.parametrize("device", DEVICES)
def test_projection_bypasses_generators(device):
    """An explicit projection is used as given: k comes from it, and no generator is consumed."""
    s, t = make_pair(2, 3, 4, 5, 6, dtype=torch.float64, device=device, grad=(False, False))
    z = randn((30, 3), dtype=torch.float64, device=device)
    g = torch.Generator(device=device).manual_seed(0)
    g_state = g.get_state()
    out = ffa.fast_feature_affinity_loss(s, t, k=15, reduction="none", projection=z, generator=g)
    torch.testing.assert_close(out, reference.ffa_loss(s, t, z, reduction="none"))
    assert torch.equal(g.get_state(), g_state)
    m = ffa.FastFeatureAffinityLoss(k=15, reduction="none", seed=0)
    m_state = m.generator(device).get_state()
    torch.testing.assert_close(m(s, t, projection=z), out, rtol=0, atol=0)
    assert torch.equal(m.generator(device).get_state(), m_state)
    # k from a batched projection too
    zb = randn((2, 30, 1), dtype=torch.float64, device=device)
    torch.testing.assert_close(
        ffa.fast_feature_affinity_loss(s, t, projection=zb, reduction="none"),
        reference.ffa_loss(s, t, zb, reduction="none"),
    )


@pytest.mark.parametrize("device", DEVICES)
def test_projection_is_a_constant(device):
    """No gradient flows to a projection that requires grad."""
    s, t = make_pair(2, 3, 4, 5, 6, device=device)
    z = randn((30, 4), device=device, requires_grad=True)
    ffa.fast_feature_affinity_loss(s, t, projection=z).backward()
    assert z.grad is None and s.grad is not None


@pytest.mark.parametrize("device", DEVICES)
def test_module_generator_per_device(device):
    m = ffa.FastFeatureAffinityLoss(seed=11)
    g = m.generator(device)
    assert g is m.generator(device) and g.device.type == torch.device(device).type
    assert g.initial_seed() == 11


# ---- statistics: what FFA estimates --------------------------------------------------------------


def _draws(s, t, *, p, k, n_draws, seed):
    g = torch.Generator(device=s.device).manual_seed(seed)
    vals = [
        ffa.fast_feature_affinity_loss(s, t, k=k, p=p, reduction="none", generator=g)
        for _ in range(n_draws)
    ]
    return torch.stack(vals)  # [n_draws, B]


def _within_se(draws, target, n_se):
    mean = draws.mean(0)
    se = draws.std(0) / math.sqrt(draws.shape[0])
    z = (mean - target).abs() / se
    assert (z < n_se).all(), f"mean {mean} vs target {target}: {z} standard errors"
    return mean


@pytest.mark.parametrize("device", DEVICES)
def test_ffa_p2_unbiased_for_fa_p2(device):
    """E[FFA p=2] = exact FA p=2: the mean over many fresh projections is within a few SE of it."""
    s, t = make_pair(3, 3, 4, 6, 6, dtype=torch.float64, device=device, grad=(False, False))
    exact = ffa.feature_affinity_loss(s, t, p=2, reduction="none")
    draws = _draws(s, t, p=2, k=4, n_draws=400, seed=0)
    mean = _within_se(draws, exact, n_se=4.0)
    assert torch.allclose(mean, exact, rtol=0.1)


@pytest.mark.parametrize("device", DEVICES)
def test_ffa_p1_estimates_its_expectation_not_fa_p1(device):
    """E[FFA p=1] = sqrt(2/pi) sum_i ||D_i||_2 / N^2, far below exact FA p=1 (~ sqrt(N) times)."""
    s, t = make_pair(3, 3, 4, 8, 8, dtype=torch.float64, device=device, grad=(False, False))
    expected = reference.ffa_p1_expectation(s, t, reduction="none")
    # the expectation, written out independently of ffa.reference
    d = reference.affinity(s) - reference.affinity(t)
    n = d.shape[-1]
    mine = math.sqrt(2 / math.pi) * d.norm(dim=2).sum(dim=1) / n**2
    torch.testing.assert_close(expected, mine)
    draws = _draws(s, t, p=1, k=4, n_draws=300, seed=1)
    _within_se(draws, expected, n_se=4.0)
    fa1 = ffa.feature_affinity_loss(s, t, p=1, reduction="none")
    assert (draws.mean(0) < fa1 / 3).all(), (draws.mean(0), fa1)


@pytest.mark.parametrize("device", DEVICES)
def test_generator_draws_standard_normal_projections(device):
    """Z is i.i.d. N(0,1), probed through a single pixel.

    For N = 1, FFA p=2 is D_11^2 mean_k z_k^2, so its ratio to exact FA p=2 (D_11^2) is
    mean_k z_k^2: mean 1, variance 2/k.
    """
    f64 = dict(dtype=torch.float64, device=device)
    s = torch.tensor([3.0, 4.0], **f64).view(1, 2, 1, 1)
    t = torch.full((1, 2, 1, 1), 1e-3, **f64)  # tiny: D_11 = |u_s|^2 - |u_t|^2 ~ 0.014, not ~eps
    exact = ffa.feature_affinity_loss(s, t, p=2, reduction="none")
    assert exact.item() > 1e-4
    k = 64
    ratios = _draws(s, t, p=2, k=k, n_draws=200, seed=3)[:, 0] / exact[0]
    assert abs(ratios.mean().item() - 1) < 4 * math.sqrt(2 / k / 200)
    assert abs(ratios.var().item() - 2 / k) < 0.5 * 2 / k
