"""Loads the native ops and registers their fake (meta) kernels and autograd with torch.library.

The flow is one-way: ffa.functional -> torch.ops.ffa.* (dispatcher) -> CPU/CUDA kernel.
"""

from __future__ import annotations

import torch

try:
    from . import _C  # noqa: F401  (importing it runs TORCH_LIBRARY(ffa, ...))
except ImportError as e:  # pragma: no cover - only on a broken install
    raise ImportError(
        "ffa's native extension ffa._C failed to load. Build it against the installed torch with "
        "`pip install --no-build-isolation .` (see README)."
    ) from e

ops = torch.ops.ffa


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """float64 stays float64; float32/float16/bfloat16 accumulate and return in float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def _maybe_empty(like: torch.Tensor, wanted: bool) -> torch.Tensor:
    return (
        torch.empty_like(like, memory_format=torch.contiguous_format)
        if wanted
        else like.new_empty(0)
    )


# ---- fake kernels: shapes and dtypes only --------------------------------------------------------
@torch.library.register_fake("ffa::fa_loss")
def _(student, teacher, p, eps):
    return student.new_empty(student.shape[0], dtype=compute_dtype(student.dtype))


@torch.library.register_fake("ffa::fa_loss_backward")
def _(grad, student, teacher, p, eps, output_mask):
    return _maybe_empty(student, output_mask[0]), _maybe_empty(teacher, output_mask[1])


def _ffa_outputs(student, teacher, k):
    """loss [B], Y [B,N,k], P_S [B,Cs,k], P_T [B,Ct,k] in the compute dtype."""
    b, cs, h, w = student.shape
    dt = compute_dtype(student.dtype)
    return (
        student.new_empty(b, dtype=dt),
        student.new_empty(b, h * w, k, dtype=dt),
        student.new_empty(b, cs, k, dtype=dt),
        student.new_empty(b, teacher.shape[1], k, dtype=dt),
    )


@torch.library.register_fake("ffa::ffa_loss")
def _(student, teacher, projection, p, eps):
    return _ffa_outputs(student, teacher, projection.shape[2])


@torch.library.register_fake("ffa::ffa_loss_backward")
def _(grad, student, teacher, projection, y, p_s, p_t, p, eps, output_mask):
    return _maybe_empty(student, output_mask[0]), _maybe_empty(teacher, output_mask[1])


# ---- autograd: backward is itself an op, so it also runs under torch.compile ------------------
def _fa_setup(ctx, inputs, output):
    student, teacher, p, eps = inputs
    ctx.save_for_backward(student, teacher)
    ctx.p, ctx.eps = p, eps


def _fa_backward(ctx, grad):
    student, teacher = ctx.saved_tensors
    mask = [bool(ctx.needs_input_grad[0]), bool(ctx.needs_input_grad[1])]
    gs, gt = ops.fa_loss_backward(grad, student, teacher, ctx.p, ctx.eps, mask)
    return (gs if mask[0] else None), (gt if mask[1] else None), None, None


torch.library.register_autograd("ffa::fa_loss", _fa_backward, setup_context=_fa_setup)


def _ffa_setup(ctx, inputs, output):
    student, teacher, projection, p, eps = inputs
    _, y, p_s, p_t = output
    ctx.mark_non_differentiable(y, p_s, p_t)
    ctx.save_for_backward(student, teacher, projection, y, p_s, p_t)
    ctx.p, ctx.eps = p, eps


def _ffa_backward(ctx, grad, _gy, _gps, _gpt):
    student, teacher, projection, y, p_s, p_t = ctx.saved_tensors
    mask = [bool(ctx.needs_input_grad[0]), bool(ctx.needs_input_grad[1])]
    gs, gt = ops.ffa_loss_backward(
        grad, student, teacher, projection, y, p_s, p_t, ctx.p, ctx.eps, mask
    )
    return (gs if mask[0] else None), (gt if mask[1] else None), None, None, None


torch.library.register_autograd("ffa::ffa_loss", _ffa_backward, setup_context=_ffa_setup)


# ---- FFA with on-the-fly Philox probes (ffa_loss_philox) -----------------------------------------
@torch.library.register_fake("ffa::ffa_loss_philox")
def _(student, teacher, k, p, eps, seed, offset):
    return _ffa_outputs(student, teacher, k)


@torch.library.register_fake("ffa::ffa_loss_philox_backward")
def _(grad, student, teacher, y, p_s, p_t, k, p, eps, seed, offset, output_mask):
    return _maybe_empty(student, output_mask[0]), _maybe_empty(teacher, output_mask[1])


def _ffa_philox_setup(ctx, inputs, output):
    student, teacher, k, p, eps, seed, offset = inputs
    _, y, p_s, p_t = output
    ctx.mark_non_differentiable(y, p_s, p_t)
    ctx.save_for_backward(student, teacher, y, p_s, p_t)
    ctx.k, ctx.p, ctx.eps, ctx.seed, ctx.offset = k, p, eps, seed, offset


def _ffa_philox_backward(ctx, grad, _gy, _gps, _gpt):
    student, teacher, y, p_s, p_t = ctx.saved_tensors
    mask = [bool(ctx.needs_input_grad[0]), bool(ctx.needs_input_grad[1])]
    gs, gt = ops.ffa_loss_philox_backward(
        grad, student, teacher, y, p_s, p_t, ctx.k, ctx.p, ctx.eps, ctx.seed, ctx.offset, mask
    )
    return (gs if mask[0] else None), (gt if mask[1] else None), None, None, None, None, None


torch.library.register_autograd(
    "ffa::ffa_loss_philox", _ffa_philox_backward, setup_context=_ffa_philox_setup
)


def philox_seed_offset(generator: torch.Generator, numel: int) -> tuple[int, int]:
    """(seed, offset) for one ffa_loss_philox call drawing ``numel`` = N * k probes.

    Takes them from ``generator`` the way torch's own CUDA random ops do: its seed, and its Philox
    offset, which is then advanced past the draws this call consumes (4 * ceil(numel / 4)), so
    successive calls and other random ops on the generator never reuse a counter. The seed is
    returned as the signed 64-bit integer with the same bits (the op schema's ``int``). A CPU
    generator (Mersenne Twister, no Philox offset) instead provides a fresh 63-bit seed per call,
    with offset 0. Host-side bookkeeping only: no device synchronization. Not CUDA-graph safe
    (a captured graph would replay the same seed and offset).
    """
    draws = 4 * ((numel + 3) // 4)
    if generator.device.type == "cuda":
        seed = generator.initial_seed()
        offset = generator.get_offset()
        generator.set_offset(offset + draws)
        return (seed - (1 << 64) if seed >= (1 << 63) else seed), offset
    seed = int(torch.randint(0, 2**63 - 1, (1,), generator=generator, dtype=torch.int64))
    return seed, 0
