"""Large sizes: N*N beyond 32-bit indexing, and many channels with few pixels.

Large N where N*N overflows 32-bit indexing: 257x257 maps, N = 66049, N^2 = 4.36e9 > 2^32.

N is not a multiple of the 256-pixel tile, so the ragged last tile is visited too. The reference
cannot materialize D here (17 GB in float32), and a chunked float64 oracle takes over a minute on
this 2-core machine, so the exact losses are checked on palette inputs: every pixel takes one of m
(student vector, teacher vector) pairs, assigned at random. D_ij then depends only on the classes of
i and j, and sum_ij f(D_ij) = sum_{c,c'} n_c n_c' f(D_cc') is exact in float64 at O(m^2) cost. The
random assignment means a mis-indexed row or tile reads another class and shows up in the sum.
FFA never builds N x N, so ffa.reference.ffa_loss is its oracle directly.
"""

from __future__ import annotations

import resource

import pytest
import torch
from loss_helpers import DEVICES, check_close, gen, peak_rss_growth_mib, randn

import ffa
from ffa import reference

H = W = 257
N = H * W
EPS = 1e-5


def _palette_case(device, *, h=H, w=W, cs=3, ct=2, ms=4, mt=3, seed=0):
    g, n = gen(seed), h * w

    def palette(m, c, lo, hi):
        v = torch.randn(m, c, generator=g, dtype=torch.float64)
        return v / v.norm(dim=1, keepdim=True) * (lo + (hi - lo) * torch.rand(m, 1, generator=g))

    # Student norms ~0.5, teacher norms ~5: the same-class entries D_cc = |u_s|^2 - |u_t|^2
    # ~ -3.6e-5 stay well clear of 0, so float32 rounding cannot flip their sign (the |.| kink).
    pal_s = palette(ms, cs, 0.4, 0.6).float()
    pal_t = palette(mt, ct, 4.0, 6.0).float()
    a = torch.randint(ms, (n,), generator=g)
    b = torch.randint(mt, (n,), generator=g)
    cls = a * mt + b  # class of each pixel
    counts = torch.bincount(cls, minlength=ms * mt).double()
    student = pal_s[a].T.reshape(1, cs, h, w).contiguous().to(device)
    teacher = pal_t[b].T.reshape(1, ct, h, w).contiguous().to(device)
    # per-class representatives, in float64 from the float32 values the kernel sees
    rep_s = pal_s.double()[torch.arange(ms * mt) // mt]
    rep_t = pal_t.double()[torch.arange(ms * mt) % mt]
    return student, teacher, cls, counts, rep_s, rep_t


def _class_d(rep_s, rep_t):
    us = rep_s / (rep_s.norm(dim=1, keepdim=True) + EPS)
    ut = rep_t / (rep_t.norm(dim=1, keepdim=True) + EPS)
    return us @ us.T - ut @ ut.T


def _palette_oracle(p, cls, counts, rep_s, rep_t, upstream, h=H, w=W):
    """Exact loss and per-pixel gradients (float64) from the class structure."""
    xs, xt = rep_s.clone().requires_grad_(), rep_t.clone().requires_grad_()
    d = _class_d(xs, xt)
    f = d.abs() if p == 1 else d.square()
    loss = (counts[:, None] * counts[None, :] * f).sum() / (h * w) ** 2
    gs, gt = torch.autograd.grad(loss * upstream, (xs, xt))
    # dL/dX_c sums the n_c identical per-pixel gradients of class c
    n = counts.clamp_min(1)[:, None]
    per_pixel = [(g / n)[cls].T.reshape(1, -1, h, w) for g in (gs, gt)]
    return loss.detach(), *per_pixel


def _peak_rss_gib():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


@pytest.mark.parametrize("p", [1, 2])
@pytest.mark.parametrize("device", DEVICES)
def test_exact_fa_large_n(device, p):
    assert N * N > 2**32 and N % 256 != 0
    s, t, cls, counts, rep_s, rep_t = _palette_case(device)
    d = _class_d(rep_s, rep_t)
    off = ~torch.eye(len(counts), dtype=torch.bool)
    assert d.diagonal().abs().min() > 1e-5 and d[off].abs().min() > 1e-2  # no kinks
    up = 0.7
    s.requires_grad_(), t.requires_grad_()
    rss0 = _peak_rss_gib()
    out = ffa.feature_affinity_loss(s, t, p=p, reduction="sum")
    (out * up).backward()
    rss1 = _peak_rss_gib()
    truth, rs, rt = _palette_oracle(p, cls, counts, rep_s, rep_t, up)  # on the CPU
    check_close(out.cpu(), truth, dtype=torch.float32)
    check_close(s.grad.cpu(), rs, dtype=torch.float32, what="student grad")
    check_close(t.grad.cpu(), rt, dtype=torch.float32, what="teacher grad")
    # an N x N float32 matrix would be 16 GiB: the tiled kernels stay in O(N C) memory
    assert rss1 - rss0 < 1.0, f"peak RSS grew by {rss1 - rss0:.2f} GiB"


@pytest.mark.parametrize("p", [1, 2])
@pytest.mark.parametrize("device", DEVICES)
def test_ffa_large_n(device, p):
    s = randn((1, 3, H, W), device=device, seed=1, requires_grad=True)
    t = randn((1, 2, H, W), device=device, seed=2, requires_grad=True)
    z = randn((N, 4), device=device, seed=3)
    out = ffa.fast_feature_affinity_loss(s, t, p=p, reduction="sum", projection=z)
    gs, gt = torch.autograd.grad(out, (s, t))
    s64, t64 = s.detach().double().requires_grad_(), t.detach().double().requires_grad_()
    truth = reference.ffa_loss(s64, t64, z.double(), p=p, reduction="sum")
    rs, rt = torch.autograd.grad(truth, (s64, t64))
    check_close(out, truth, dtype=torch.float32)
    check_close(gs, rs, dtype=torch.float32, what="student grad")
    check_close(gt, rt, dtype=torch.float32, what="teacher grad")


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.torch_threads(1)
def test_palette_oracle_matches_reference_small(device):
    """The palette oracle itself, validated against ffa.reference where N x N fits."""
    h, w = 9, 11
    s, t, cls, counts, rep_s, rep_t = _palette_case(device, h=h, w=w, seed=5)
    for p in (1, 2):
        s64, t64 = s.double().requires_grad_(), t.double().requires_grad_()
        ref = reference.fa_loss(s64, t64, p=p, reduction="sum")
        rs, rt = torch.autograd.grad(ref * 0.7, (s64, t64))
        truth, gs, gt = _palette_oracle(p, cls, counts, rep_s, rep_t, 0.7, h=h, w=w)
        torch.testing.assert_close(truth, ref.detach().cpu())
        torch.testing.assert_close(gs, rs.cpu())
        torch.testing.assert_close(gt, rt.cpu())


_FEW_PIXELS_MANY_CHANNELS = """
import resource, torch, ffa
def run(c):
    g = torch.Generator().manual_seed(0)
    s = torch.randn(1, c, 2, 2, dtype=torch.float64, generator=g, requires_grad=True)
    t = torch.randn(1, c, 2, 2, dtype=torch.float64, generator=g, requires_grad=True)
    ffa.feature_affinity_loss(s, t, p=2).backward()
run(8)  # warm-up: thread pools, BLAS buffers
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
run(4096)
print((resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024)
"""


def test_fa_p2_few_pixels_many_channels_memory(tmp_path):
    """N < Cs + Ct: exact FA p=2 takes the N x N form (O(N C) memory), not the (Cs + Ct)^2 Gram
    matrices (512 MiB in float64 at Cs = Ct = 4096). Measured in a fresh process, whose peak RSS
    the rest of the test session cannot have raised already; it runs outside the repository, whose
    unbuilt ffa/ would otherwise shadow the installed one."""
    grew_mib = peak_rss_growth_mib(_FEW_PIXELS_MANY_CHANNELS, tmp_path)
    assert grew_mib < 64, f"peak RSS grew by {grew_mib:.0f} MiB"


@pytest.mark.parametrize("device", DEVICES)
def test_fa_p2_few_pixels_many_channels_values(device):
    s = randn((2, 1500, 2, 3), dtype=torch.float64, device=device, seed=1, requires_grad=True)
    t = randn((2, 1200, 2, 3), dtype=torch.float64, device=device, seed=2, requires_grad=True)
    out = ffa.feature_affinity_loss(s, t, p=2, reduction="sum")
    gs, gt = torch.autograd.grad(out, (s, t))
    s64, t64 = s.detach().requires_grad_(), t.detach().requires_grad_()
    truth = reference.fa_loss(s64, t64, p=2, reduction="sum")
    rs, rt = torch.autograd.grad(truth, (s64, t64))
    check_close(out, truth, dtype=torch.float64)
    check_close(gs, rs, dtype=torch.float64, what="student grad")
    check_close(gt, rt, dtype=torch.float64, what="teacher grad")
