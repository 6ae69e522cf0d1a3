"""ffa_loss_philox: FFA with probes regenerated from Philox4x32-10 instead of a projection tensor.

An independent NumPy Philox (checked against the Random123 known-answer vectors) rebuilds Z,
so the op is compared with the plain reference (ffa.reference.ffa_loss) and with ffa_loss on
that Z. Runs on CPU always and on CUDA when present (the CUDA kernels never store Z; same values
as the CPU fallback).
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

import ffa
from ffa import reference
from ffa._ops import philox_seed_offset

ops = torch.ops.ffa
DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
_M32 = np.uint64(0xFFFFFFFF)


def philox4x32_10(ctr, key):
    """Philox4x32-10 on arrays of 32-bit words (held in uint64): ctr = 4 arrays, key = 2 ints."""
    c0, c1, c2, c3 = (np.asarray(c, dtype=np.uint64) for c in ctr)
    k0, k1 = np.uint64(key[0]), np.uint64(key[1])
    for _ in range(10):
        p0 = np.uint64(0xD2511F53) * c0
        p1 = np.uint64(0xCD9E8D57) * c2
        c0, c1, c2, c3 = (
            (p1 >> np.uint64(32)) ^ c1 ^ k0,
            p1 & _M32,
            (p0 >> np.uint64(32)) ^ c3 ^ k1,
            p0 & _M32,
        )
        k0 = (k0 + np.uint64(0x9E3779B9)) & _M32
        k1 = (k1 + np.uint64(0xBB67AE85)) & _M32
    return c0, c1, c2, c3


def philox_normals(n, k, seed, offset):
    """Z [n, k] as csrc/philox.h defines it (float64)."""
    count = n * k
    g = np.arange((count + 3) // 4, dtype=np.uint64) + np.uint64(offset // 4)
    zero = np.zeros_like(g)
    seed &= (1 << 64) - 1
    r = philox4x32_10((g & _M32, g >> np.uint64(32), zero, zero), (seed & 0xFFFFFFFF, seed >> 32))
    out = np.empty((g.size, 4))
    for h, (a, b) in enumerate(((r[0], r[1]), (r[2], r[3]))):
        u1 = (a.astype(np.float64) + 1.0) * 2.0**-32
        u2 = b.astype(np.float64) * 2.0**-32
        rad = np.sqrt(-2.0 * np.log(u1))
        out[:, 2 * h] = rad * np.cos(6.283185307179586 * u2)
        out[:, 2 * h + 1] = rad * np.sin(6.283185307179586 * u2)
    return torch.from_numpy(out.reshape(-1)[:count].reshape(n, k).copy())


def test_numpy_philox_known_answers():
    # Random123 kat_vectors for philox4x32-10.
    cases = [
        ((0, 0, 0, 0), (0, 0), (0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8)),
        (
            (0xFFFFFFFF,) * 4,
            (0xFFFFFFFF, 0xFFFFFFFF),
            (0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD),
        ),
        (
            (0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344),
            (0xA4093822, 0x299F31D0),
            (0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1),
        ),
    ]
    for ctr, key, want in cases:
        got = philox4x32_10([np.array([c], dtype=np.uint64) for c in ctr], key)
        assert tuple(int(x[0]) for x in got) == want


def test_numpy_philox_is_standard_normal():
    z = philox_normals(20000, 5, seed=7, offset=0)
    assert abs(z.mean().item()) < 0.02 and abs(z.std().item() - 1) < 0.02


def _inputs(device, dtype, b=2, cs=5, ct=3, h=6, w=7):
    g = torch.Generator().manual_seed(1234)
    s = torch.randn(b, cs, h, w, generator=g, dtype=torch.float64).to(device, dtype)
    t = torch.randn(b, ct, h, w, generator=g, dtype=torch.float64).to(device, dtype)
    return s, t


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("p", [1, 2])
@pytest.mark.parametrize("k", [1, 15, 37])
def test_matches_reference_with_the_same_z(device, p, k):
    s, t = _inputs(device, torch.float64)
    seed, offset = 987654321, 12
    loss, y, ps, pt = ops.ffa_loss_philox(s, t, k, p, 1e-5, seed, offset)
    z = philox_normals(s.shape[2] * s.shape[3], k, seed, offset).to(device)
    want = reference.ffa_loss(s, t, z, p=p, reduction="none")
    torch.testing.assert_close(loss, want, rtol=1e-10, atol=1e-12)
    ref = ops.ffa_loss(s, t, z.unsqueeze(0), p, 1e-5)
    for a, e in zip((loss, y, ps, pt), ref, strict=True):
        torch.testing.assert_close(a, e, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize(
    "dtype,scale",
    [
        (torch.float32, 1e-30),
        (torch.float32, 1e30),
        (torch.float64, 1e-200),
        (torch.float64, 1e200),
    ],
    ids=str,
)
def test_extreme_scales_and_equal_inputs(device, dtype, scale):
    """Scaled inputs (eps scaled too) give the unscaled loss; equal inputs give exactly 0."""
    s, t = _inputs(device, torch.float64)
    k, seed, offset = 15, 3, 8
    z = philox_normals(s.shape[2] * s.shape[3], k, seed, offset).to(device)
    want = reference.ffa_loss(s, t, z, p=1, reduction="none")
    xs, xt = (s * scale).to(dtype), (t * scale).to(dtype)
    loss = ops.ffa_loss_philox(xs, xt, k, 1, 1e-5 * scale, seed, offset)[0]
    rtol = 1e-10 if dtype == torch.float64 else 1e-4
    torch.testing.assert_close(loss.double(), want, rtol=rtol, atol=0)
    same = ops.ffa_loss_philox(xs, xs.clone(), k, 1, 1e-5 * scale, seed, offset)[0]
    assert torch.equal(same, torch.zeros_like(same))


@pytest.mark.parametrize("device", DEVICES)
def test_backward_matches_projection_path(device):
    s, t = _inputs(device, torch.float64)
    k, seed, offset = 15, 5, 4
    z = philox_normals(s.shape[2] * s.shape[3], k, seed, offset).to(device)
    s1, t1 = s.clone().requires_grad_(), t.clone().requires_grad_()
    ops.ffa_loss_philox(s1, t1, k, 1, 1e-5, seed, offset)[0].sum().backward()
    s2, t2 = s.clone().requires_grad_(), t.clone().requires_grad_()
    ops.ffa_loss(s2, t2, z.unsqueeze(0), 1, 1e-5)[0].sum().backward()
    torch.testing.assert_close(s1.grad, s2.grad, rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(t1.grad, t2.grad, rtol=1e-9, atol=1e-12)


def test_gradcheck_cpu():
    s, t = _inputs("cpu", torch.float64, b=1, cs=3, ct=2, h=3, w=4)
    s.requires_grad_()
    t.requires_grad_()
    for p in (1, 2):
        assert torch.autograd.gradcheck(
            lambda a, b, p=p: ops.ffa_loss_philox(a, b, 4, p, 1e-5, 11, 0)[0], (s, t)
        )


@pytest.mark.parametrize("device", DEVICES)
def test_opcheck(device):
    s, t = _inputs(device, torch.float32)
    s.requires_grad_()
    torch.library.opcheck(ops.ffa_loss_philox.default, (s, t, 6, 1, 1e-5, 3, 8))
    loss, y, ps, pt = ops.ffa_loss_philox(s.detach(), t, 6, 1, 1e-5, 3, 8)
    grad = torch.ones_like(loss)
    torch.library.opcheck(
        ops.ffa_loss_philox_backward.default,
        (grad, s.detach(), t, y, ps, pt, 6, 1, 1e-5, 3, 8, [True, False]),
    )


@pytest.mark.parametrize("device", DEVICES)
def test_offsets_give_new_probes_and_bad_offsets_raise(device):
    s, t = _inputs(device, torch.float32)
    a = ops.ffa_loss_philox(s, t, 15, 1, 1e-5, 1, 0)[0]
    b = ops.ffa_loss_philox(s, t, 15, 1, 1e-5, 1, 0)[0]
    c = ops.ffa_loss_philox(s, t, 15, 1, 1e-5, 1, 4 * math.ceil(42 * 15 / 4))[0]
    assert torch.equal(a, b) and not torch.equal(a, c)
    with pytest.raises(RuntimeError, match="multiple of 4"):
        ops.ffa_loss_philox(s, t, 15, 1, 1e-5, 1, 2)
    with pytest.raises(RuntimeError, match="k must be"):
        ops.ffa_loss_philox(s, t, 0, 1, 1e-5, 1, 0)


@pytest.mark.parametrize("device", DEVICES)
def test_seed_offset_from_generator(device):
    gen = torch.Generator(device=device).manual_seed(3)
    first = philox_seed_offset(gen, 42 * 15)
    second = philox_seed_offset(gen, 42 * 15)
    assert first != second
    gen.manual_seed(3)
    assert philox_seed_offset(gen, 42 * 15) == first
    if device == "cuda":
        assert second[1] - first[1] == 4 * math.ceil(42 * 15 / 4)
    big = torch.Generator(device=device).manual_seed(2**64 - 5)
    seed, _ = philox_seed_offset(big, 8)
    assert -(2**63) <= seed < 2**63


def test_compile_cpu():
    s, t = _inputs("cpu", torch.float32)

    def f(a, b):
        return ops.ffa_loss_philox(a, b, 15, 1, 1e-5, 9, 0)[0].sum()

    torch.testing.assert_close(torch.compile(f, fullgraph=True)(s, t), f(s, t))


def test_exported_names():
    assert ffa.ops.ffa_loss_philox is ops.ffa_loss_philox


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_philox_probes_op(dtype):
    """ffa::philox_probes returns the Z that ffa_loss_philox draws (the NumPy Philox's values)."""
    like = torch.empty(1, 1, 6, 7, dtype=dtype)
    z = ops.philox_probes(like, 5, 987654321, 12)
    assert z.shape == (1, 42, 5) and z.dtype == (
        torch.float64 if dtype == torch.float64 else torch.float32
    )
    torch.testing.assert_close(
        z[0].double(), philox_normals(42, 5, 987654321, 12), rtol=1e-6, atol=1e-6
    )
    torch.library.opcheck(ops.philox_probes.default, (like, 5, 987654321, 12))
    with pytest.raises(RuntimeError, match="like must be 4-D"):
        ops.philox_probes(torch.empty(3), 5, 1, 0)
