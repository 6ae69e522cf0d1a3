"""Fake (meta) kernels and autograd for the ffa quantization ops (schemas in csrc/ops.cpp).

Backward passes are ops too (``quant_relu_backward``, ``fake_quantize_backward``), so they run under
torch.compile; ``quantize_weight`` needs none: its gradient is straight-through (identity).
"""

from __future__ import annotations

import torch

from .._ops import ops

__all__ = ["ops"]


def _like_or_empty(t: torch.Tensor, wanted: bool) -> torch.Tensor:
    return torch.empty_like(t) if wanted else t.new_empty(0)


# ---- fake kernels: shapes and dtypes only --------------------------------------------------------
@torch.library.register_fake("ffa::quantize_weight")
def _(weight, bits, per_channel):
    return torch.empty_like(weight)


@torch.library.register_fake("ffa::quant_relu")
def _(x, alpha, bits, ste, alpha_grad, rate):
    return torch.empty_like(x)


@torch.library.register_fake("ffa::quant_relu_backward")
def _(grad, x, alpha, bits, ste, alpha_grad, rate, output_mask):
    return _like_or_empty(x, output_mask[0]), _like_or_empty(alpha, output_mask[1])


@torch.library.register_fake("ffa::fake_quantize")
def _(x, scale, zero_point, quant_min, quant_max, axis, learnable, grad_factor):
    return torch.empty_like(x)


@torch.library.register_fake("ffa::fake_quantize_backward")
def _(grad, x, scale, zero_point, quant_min, quant_max, axis, learnable, grad_factor, output_mask):
    return (
        _like_or_empty(x, output_mask[0]),
        _like_or_empty(scale, output_mask[1]),
        _like_or_empty(zero_point, output_mask[2]),
    )


# ---- autograd ------------------------------------------------------------------------------------
def _qw_setup(ctx, inputs, output):
    pass


def _qw_backward(ctx, grad):
    return grad, None, None  # straight-through: the latent float weight gets the gradient as is


torch.library.register_autograd("ffa::quantize_weight", _qw_backward, setup_context=_qw_setup)


def _qrelu_setup(ctx, inputs, output):
    x, alpha, bits, ste, alpha_grad, rate = inputs
    ctx.save_for_backward(x, alpha)
    ctx.cfg = (bits, ste, alpha_grad, rate)


def _qrelu_backward(ctx, grad):
    x, alpha = ctx.saved_tensors
    mask = [bool(ctx.needs_input_grad[0]), bool(ctx.needs_input_grad[1])]
    gx, ga = ops.quant_relu_backward(grad, x, alpha, *ctx.cfg, mask)
    return (gx if mask[0] else None), (ga if mask[1] else None), None, None, None, None


torch.library.register_autograd("ffa::quant_relu", _qrelu_backward, setup_context=_qrelu_setup)


def _fq_setup(ctx, inputs, output):
    x, scale, zero_point, quant_min, quant_max, axis, learnable, grad_factor = inputs
    ctx.save_for_backward(x, scale, zero_point)
    ctx.cfg = (quant_min, quant_max, axis, learnable, grad_factor)


def _fq_backward(ctx, grad):
    x, scale, zero_point = ctx.saved_tensors
    quant_min, quant_max, axis, learnable, grad_factor = ctx.cfg
    mask = [
        bool(ctx.needs_input_grad[0]),
        bool(learnable and ctx.needs_input_grad[1]),
        bool(learnable and ctx.needs_input_grad[2]),
    ]
    gx, gs, gz = ops.fake_quantize_backward(
        grad, x, scale, zero_point, quant_min, quant_max, axis, learnable, grad_factor, mask
    )
    return (
        (gx if mask[0] else None),
        (gs if mask[1] else None),
        (gz if mask[2] else None),
        None,
        None,
        None,
        None,
        None,
    )


torch.library.register_autograd("ffa::fake_quantize", _fq_backward, setup_context=_fq_setup)
