"""The portable path (ffa/portable.py, ffa/_backend.py): routing, the memory bound, the blocks.

Its values, gradients, errors and compile behaviour are the whole suite's: run it with
FFA_BACKEND=portable (CI runs the loss and quantization files that way). Here: which kernel the
dispatcher picks, the warning, the environment variable, and the parts only the portable kernels
have (row blocks, the unit pixels' backward).
"""

from __future__ import annotations

import warnings

import pytest
import torch
from loss_helpers import check_close, make_pair, peak_rss_growth_mib, randn
from torch._C import DispatchKey, DispatchKeySet

import ffa
from ffa import _backend, portable, reference

LOSS_OPS = [
    "fa_loss",
    "fa_loss_backward",
    "ffa_loss",
    "ffa_loss_backward",
    "ffa_loss_philox",
    "ffa_loss_philox_backward",
]
QUANT_OPS = [
    "quantize_weight",
    "quant_relu",
    "quant_relu_backward",
    "fake_quantize",
    "fake_quantize_backward",
]
# Dispatch keys of devices ffa has no native kernels for (CUDA too in a CPU-only build).
FOREIGN_KEYS = ["MPS", "XPU", "HIP", "PrivateUse1"]


@pytest.fixture
def fresh_warnings(monkeypatch):
    monkeypatch.setattr(_backend, "_warned", set())


def _kernel_origin(name: str, key: str) -> str:
    table = torch._C._dispatch_dump_table(f"ffa::{name}")
    return next(line for line in table.splitlines() if line.startswith(f"{key}:"))


@pytest.mark.parametrize("name", LOSS_OPS + QUANT_OPS)
def test_dispatch_table(name):
    """CPU keeps its native kernel; a device without one gets the portable default kernel."""
    assert "[kernel]" in _kernel_origin(name, "CPU") and "_backend.py" not in _kernel_origin(
        name, "CPU"
    )
    assert torch._C._dispatch_has_kernel_for_dispatch_key(
        f"ffa::{name}", "CompositeExplicitAutograd"
    )
    for key in FOREIGN_KEYS:
        assert "default backend kernel" in _kernel_origin(name, key), key
    assert torch._C._dispatch_has_kernel_for_dispatch_key(f"ffa::{name}", "BackendSelect")


def _on_foreign_device(op, key, *args):
    """The op dispatched as for a device of dispatch key ``key`` (the tensors stay on the CPU)."""
    return op.default.redispatch(DispatchKeySet(getattr(DispatchKey, key)), *args)


@pytest.mark.parametrize("key", FOREIGN_KEYS)
def test_device_without_native_kernels_takes_portable_path(key, fresh_warnings):
    s, t = make_pair(2, 5, 3, 6, 7, dtype=torch.float64, grad=(False, False))
    grad = randn(2, dtype=torch.float64, seed=3)
    with pytest.warns(ffa.PortablePathWarning, match="portable path") as record:
        value = _on_foreign_device(torch.ops.ffa.fa_loss, key, s, t, 1, 1e-5)
        grads = _on_foreign_device(
            torch.ops.ffa.fa_loss_backward, key, grad, s, t, 1, 1e-5, [True, True]
        )
    assert len(record) == 1  # once per process and device type
    check_close(value, torch.ops.ffa.fa_loss(s, t, 1, 1e-5), dtype=torch.float64)
    native = torch.ops.ffa.fa_loss_backward(grad, s, t, 1, 1e-5, [True, True])
    for g, n in zip(grads, native, strict=True):
        check_close(g, n, dtype=torch.float64)


def test_warning_says_how_to_get_cuda_kernels():
    message = _backend._why(torch.device("cuda"))
    assert "nvcc" in message and "nvidia-cuda-nvcc" in message and "no-build-isolation" in message
    assert "mps" in _backend._why(torch.device("mps"))


def test_forced_backend_runs_portable_kernels(monkeypatch):
    """FFA_BACKEND=portable is read at call time and reaches every call: autograd, inference
    mode, compiled graphs. Meta tensors still take the fake kernels."""
    monkeypatch.delenv("FFA_BACKEND", raising=False)
    blocks = []  # calls of the blocked FA loop, which only the portable kernel runs
    monkeypatch.setattr(portable, "_fa_tiled", _recording(portable._fa_tiled, blocks))
    s, t = make_pair(2, 4, 3, 5, 5)
    native = ffa.feature_affinity_loss(s, t)
    assert blocks == []
    monkeypatch.setenv("FFA_BACKEND", "portable")
    forced = ffa.feature_affinity_loss(s, t)
    forced.backward()
    with torch.inference_mode():
        ffa.feature_affinity_loss(s.detach(), t.detach())
    compiled = torch.compile(ffa.feature_affinity_loss, fullgraph=True)(s, t)
    assert len(blocks) == 3
    torch.testing.assert_close(forced, native, rtol=1e-5, atol=0)
    torch.testing.assert_close(compiled, native, rtol=1e-5, atol=0)
    meta = torch.ops.ffa.fa_loss(s.to("meta"), t.to("meta"), 1, 1e-5)
    assert meta.device.type == "meta" and len(blocks) == 3
    monkeypatch.setenv("FFA_BACKEND", "native")
    ffa.feature_affinity_loss(s, t)
    assert len(blocks) == 3


def _recording(fn, log):
    def wrapped(*args, **kwargs):
        log.append(1)
        return fn(*args, **kwargs)

    return wrapped


def test_forced_backend_warns_nothing(monkeypatch, fresh_warnings):
    monkeypatch.setenv("FFA_BACKEND", "portable")
    s, t = make_pair(1, 3, 3, 4, 4)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ffa.feature_affinity_loss(s, t).backward()


@pytest.mark.parametrize("value", ["gpu", "portable2", "1"])
def test_bad_backend_value(monkeypatch, value):
    monkeypatch.setenv("FFA_BACKEND", value)
    s, t = make_pair(1, 3, 3, 4, 4, grad=(False, False))
    with pytest.raises(ValueError, match="FFA_BACKEND must be one of"):
        ffa.feature_affinity_loss(s, t)


@pytest.mark.parametrize("value", ["", "native", "auto", "Portable ", "NATIVE"])
def test_backend_values(monkeypatch, value):
    monkeypatch.setenv("FFA_BACKEND", value)
    expected = "portable" if value.strip().lower() == "portable" else "native"
    assert _backend.backend() == expected


# ---- row blocks ----------------------------------------------------------------------------------
@pytest.mark.parametrize("b", [0, 1, 3, 8])
@pytest.mark.parametrize("n", [1, 7, 100, 4096])
@pytest.mark.parametrize("budget", [64, 4096, 1 << 20])
def test_blocks_cover_once_within_budget(monkeypatch, b, n, budget):
    monkeypatch.setattr(portable, "BLOCK_BYTES", budget)
    seen = torch.zeros(b, n, dtype=torch.int64)
    for bs, i0, i1 in portable._blocks(b, n, 4):
        seen[bs, i0:i1] += 1
        rows, batch = i1 - i0, len(range(b)[bs])
        assert 4 * batch * rows * n * 4 <= budget or (rows == 1 and batch == 1)
    assert bool((seen == 1).all())


@pytest.mark.parametrize("p", [1, 2])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
@pytest.mark.parametrize("budget", [200, 3000, 64 << 20])
def test_blocked_values_and_grads(monkeypatch, p, dtype, budget):
    """Many row blocks and batch chunks (tiny budgets) give the float64 oracle's values; p=2 with
    N < Cs + Ct takes the blocked form too."""
    monkeypatch.setattr(portable, "BLOCK_BYTES", budget)
    cs, ct = (9, 8) if p == 2 else (5, 3)
    s, t = make_pair(3, cs, ct, 3, 5, dtype=dtype, grad=(False, False))
    s[0, :, 1, 1] = 0  # a dead pixel
    t[2, :, :2] = s[2, :ct, :2]  # equal pixels
    up = randn(3, dtype=torch.float64, seed=5).to(portable.compute_dtype(dtype))
    value = portable.fa_loss_kernel(s, t, p, 1e-5)
    gs, gt = portable.fa_loss_backward_kernel(up, s, t, p, 1e-5, [True, True])
    s64, t64 = s.double().requires_grad_(), t.double().requires_grad_()
    truth = reference.fa_loss(s64, t64, p=p, reduction="none")
    rs, rt = torch.autograd.grad(truth, (s64, t64), up.double())
    check_close(value, truth, dtype=dtype)
    check_close(gs, rs, dtype=dtype, what="student grad")
    check_close(gt, rt, dtype=dtype, what="teacher grad")


@pytest.mark.parametrize("scale", [1e-25, 1.0, 1e20])
@pytest.mark.parametrize("channels", [1, 6, 64])
def test_unit_pixels_backward(scale, channels):
    """Scale-safe, and cancellation-free: for one channel the gradient eps / (|x| + eps)^2 is the
    difference of two terms equal to all digits (float64 autograd of the reference gives 0 there
    at 1e20: the closed form is the truth). Judged per pixel against its largest component, with
    a floor of a few float32 subnormal ulps (the gradient itself is ~1e-44 at 1e20)."""
    x = randn((2, channels, 3, 4), seed=channels) * scale
    x[0, :, 0, 0] = 0
    g = randn((2, channels, 12), seed=9)
    _, backward = portable._unit_pixels_and_backward(x, 1e-5)
    x64 = x.double().flatten(2)
    if channels == 1:
        truth = 1e-5 / (x64.abs() + 1e-5).square() * g.double()
    else:
        x64.requires_grad_()
        (truth,) = torch.autograd.grad(reference.unit_pixels(x64, 1e-5), x64, g.double())
    err = (backward(g).double().flatten(2) - truth).abs().amax(dim=1)
    floor = 4 * torch.finfo(torch.float32).smallest_normal * torch.finfo(torch.float32).eps
    bound = 1e-6 * truth.abs().amax(dim=1) + floor
    assert bool((err <= bound).all()), (err / bound).max()


_MEMORY = """
import resource, torch, ffa
from ffa import reference  # noqa: F401  (imports first, outside the measured window)
s = torch.randn(2, 64, 128, 128, requires_grad=True)
t = torch.randn(2, 64, 128, 128)
warm = torch.randn(1, 4, 8, 8, requires_grad=True)
ffa.feature_affinity_loss(warm, warm.detach()).backward()
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
ffa.feature_affinity_loss(s, t).backward()
print((resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024)
"""


def test_memory_bound_at_128x128(tmp_path):
    """Exact FA p=1 fwd+bwd at 128x128, B=2, C=64 on the portable path: the reference needs
    8 GiB there; the blocks stay within 64 MiB, plus O(N C) buffers (float64 gradient sums).
    A fresh process outside the repository (its unbuilt ffa/ would shadow the installed one)."""
    env = {"FFA_BACKEND": "portable", "OMP_NUM_THREADS": "2"}
    grew_mib = peak_rss_growth_mib(_MEMORY, tmp_path, env)
    assert grew_mib < 160, f"peak RSS grew by {grew_mib:.0f} MiB"
