"""Fake (meta) kernels and autograd for the ffa quantization ops (schemas in csrc/ops.cpp).

Backward passes are ops too (``quant_relu_backward``, ``fake_quantize_backward``), so they run under
torch.compile; ``quantize_weight`` needs none: its gradient is straight-through (identity). The
autograd of every op (reverse, forward, double backward) is one Function per op, below.
"""

from __future__ import annotations

import torch

from .._autograd import no_double_backward, no_jvp, registers_autograd
from .._ops import ops

__all__ = ["ops"]


def _like_or_empty(t: torch.Tensor, wanted: bool) -> torch.Tensor:
    return torch.empty_like(t) if wanted else t.new_empty(0)


def check_device(t: torch.Tensor, name: str, x: torch.Tensor, *, cpu_scalar_ok: bool) -> None:
    """A quantizer parameter lives on x's device (cpu_scalar_ok: or is a one-element CPU tensor,
    which the CUDA kernels take by value)."""
    if t.device == x.device or (cpu_scalar_ok and t.device.type == "cpu" and t.numel() == 1):
        return
    alt = " or be a one-element CPU tensor" if cpu_scalar_ok else ""
    raise ValueError(f"{name} must be on x's device ({x.device}){alt}, got {t.device}")


# ---- fake kernels: shapes and dtypes only --------------------------------------------------------
# They also run for real inputs whose qparams are on the meta device (the dispatcher picks Meta):
# the device rule is checked here too, so such a call raises instead of returning empty memory.
@torch.library.register_fake("ffa::quantize_weight")
def _(weight, bits, per_channel):
    return torch.empty_like(weight)


@torch.library.register_fake("ffa::quant_relu")
def _(x, alpha, bits, ste, alpha_grad, rate):
    check_device(alpha, "alpha", x, cpu_scalar_ok=True)
    return torch.empty_like(x)


@torch.library.register_fake("ffa::quant_relu_backward")
def _(grad, x, alpha, bits, ste, alpha_grad, rate, output_mask):
    check_device(alpha, "alpha", x, cpu_scalar_ok=True)
    return _like_or_empty(x, output_mask[0]), _like_or_empty(alpha, output_mask[1])


def _check_qparam_devices(x, scale, zero_point, axis) -> None:
    check_device(scale, "scale", x, cpu_scalar_ok=axis is None)
    check_device(zero_point, "zero_point", x, cpu_scalar_ok=axis is None)


@torch.library.register_fake("ffa::fake_quantize")
def _(x, scale, zero_point, quant_min, quant_max, axis, learnable, grad_factor):
    _check_qparam_devices(x, scale, zero_point, axis)
    return torch.empty_like(x)


@torch.library.register_fake("ffa::fake_quantize_backward")
def _(grad, x, scale, zero_point, quant_min, quant_max, axis, learnable, grad_factor, output_mask):
    _check_qparam_devices(x, scale, zero_point, axis)
    return (
        _like_or_empty(x, output_mask[0]),
        _like_or_empty(scale, output_mask[1]),
        _like_or_empty(zero_point, output_mask[2]),
    )


# ---- autograd (ffa/_autograd.py) -----------------------------------------------------------------
# Every quantizer's input gradient is the upstream gradient times a mask (straight-through): a
# diagonal Jacobian. So the forward-mode tangent w.r.t. x is the backward op applied to the tangent,
# and the backward ops, linear in their upstream gradient, are their own derivative w.r.t. it (the
# mask is piecewise constant: its derivative w.r.t. x, alpha, scale and zero point is 0). The step
# and qparam gradients (quant_relu's clamped sum, LSQ's reductions) have no such form: their forward
# mode and double backward raise, as torch's LSQ ops do.
@registers_autograd("quantize_weight")
class QuantizeWeight(torch.autograd.Function):
    @staticmethod
    def setup_context(ctx, inputs, output):
        pass

    @staticmethod
    def backward(ctx, grad):
        return grad, None, None  # straight-through: the latent float weight gets the gradient as is

    @staticmethod
    def jvp(ctx, tw, _bits, _per_channel):
        return tw


def _x_part(backward_op, g, ctx, width: int) -> torch.Tensor | None:
    """The x-gradient of ``backward_op`` for upstream ``g``: the mask applied to g (None: None)."""
    if g is None:
        return None
    return backward_op(g, *ctx.saved_tensors, *ctx.cfg, [True] + [False] * (width - 1))[0]


@registers_autograd("quant_relu")
class QuantRelu(torch.autograd.Function):
    @staticmethod
    def setup_context(ctx, inputs, output):
        x, alpha, *cfg = inputs
        ctx.save_for_backward(x, alpha)
        ctx.save_for_forward(x, alpha)
        ctx.cfg = tuple(cfg)

    @staticmethod
    def backward(ctx, grad):
        mask = [bool(ctx.needs_input_grad[0]), bool(ctx.needs_input_grad[1])]
        gx, ga = ops.quant_relu_backward(grad, *ctx.saved_tensors, *ctx.cfg, mask)
        return (gx if mask[0] else None), (ga if mask[1] else None), None, None, None, None

    @staticmethod
    def jvp(ctx, tx, talpha, *_):
        if talpha is not None:
            raise no_jvp("quant_relu", "w.r.t. alpha (its gradient is a clamped sum)")
        return _x_part(ops.quant_relu_backward, tx, ctx, 2)


def _mark_unrequested(ctx, output, output_mask) -> None:
    """A gradient the backward op was not asked for is an empty placeholder: no derivative."""
    ctx.mark_non_differentiable(
        *[o for o, wanted in zip(output, output_mask, strict=True) if not wanted]
    )


def _backward_op_backward(ctx, op, name: str, ggx, *qparam_grads):
    """Double backward of a quantizer backward op: linear in its upstream gradient (the x part);
    through the step / qparam gradients it raises."""
    if any(g is not None for g in qparam_grads):
        raise no_double_backward(name, "through the step / qparam gradients")
    wanted = ctx.needs_input_grad[0] and ctx.output_mask[0]
    gg = _x_part(op, ggx, ctx, len(ctx.output_mask)) if wanted else None
    return gg, *[None] * (len(ctx.needs_input_grad) - 1)


def _backward_op_jvp(ctx, op, tgrad, width: int, name: str):
    """Tangents of a quantizer backward op: the x-gradient is linear in the upstream gradient (a
    mask, constant in x and the qparams almost everywhere); the qparam gradients have no jvp."""
    if tgrad is not None and any(ctx.output_mask[1:]):
        raise no_jvp(name, "of the step / qparam gradients")
    # Forward AD wants zeros, not None, for a differentiable output (None: the unrequested ones).
    tangents = [
        None if not wanted else torch.zeros_like(t)
        for t, wanted in zip(ctx.saved_tensors, ctx.output_mask, strict=True)
    ]
    if tgrad is not None and ctx.output_mask[0]:
        tangents[0] = _x_part(op, tgrad, ctx, width)
    return tuple(tangents)


@registers_autograd("quant_relu_backward")
class QuantReluBackward(torch.autograd.Function):
    @staticmethod
    def setup_context(ctx, inputs, output):
        _grad, x, alpha, *cfg, output_mask = inputs
        _mark_unrequested(ctx, output, output_mask)
        ctx.save_for_backward(x, alpha)
        ctx.save_for_forward(x, alpha)
        ctx.cfg, ctx.output_mask = tuple(cfg), list(output_mask)

    @staticmethod
    def backward(ctx, ggx, gga):
        return _backward_op_backward(ctx, ops.quant_relu_backward, "quant_relu_backward", ggx, gga)

    @staticmethod
    def jvp(ctx, tgrad, *_):
        return _backward_op_jvp(ctx, ops.quant_relu_backward, tgrad, 2, "quant_relu_backward")


def _refuse_constant_qparams_with_grad(ctx, learnable: bool) -> None:
    """torch's non-learnable fake-quantize ops refuse qparams that require grad; so does ffa."""
    if learnable:
        return
    for i, name in ((1, "scale"), (2, "zero_point")):
        if ctx.needs_input_grad[i]:
            raise RuntimeError(
                "ffa::fake_quantize with learnable=False is not differentiable with respect to "
                f"{name}, which requires grad: pass learnable=True to learn it, or detach it"
            )


@registers_autograd("fake_quantize")
class FakeQuantize(torch.autograd.Function):
    @staticmethod
    def setup_context(ctx, inputs, output):
        x, scale, zero_point, *cfg = inputs
        _refuse_constant_qparams_with_grad(ctx, cfg[3])
        ctx.save_for_backward(x, scale, zero_point)
        ctx.save_for_forward(x, scale, zero_point)
        ctx.cfg = tuple(cfg)

    @staticmethod
    def backward(ctx, grad):
        learnable = ctx.cfg[3]
        mask = [
            bool(ctx.needs_input_grad[0]),
            bool(learnable and ctx.needs_input_grad[1]),
            bool(learnable and ctx.needs_input_grad[2]),
        ]
        gx, gs, gz = ops.fake_quantize_backward(grad, *ctx.saved_tensors, *ctx.cfg, mask)
        return (
            (gx if mask[0] else None),
            (gs if mask[1] else None),
            (gz if mask[2] else None),
            *[None] * 5,
        )

    @staticmethod
    def jvp(ctx, tx, tscale, tzero_point, *_):
        if tscale is not None or tzero_point is not None:
            what = "learnable" if ctx.cfg[3] else "non-learnable (they are constants there)"
            raise no_jvp("fake_quantize", f"w.r.t. scale or zero_point ({what})")
        return _x_part(ops.fake_quantize_backward, tx, ctx, 3)


@registers_autograd("fake_quantize_backward")
class FakeQuantizeBackward(torch.autograd.Function):
    @staticmethod
    def setup_context(ctx, inputs, output):
        _grad, x, scale, zero_point, *cfg, output_mask = inputs
        _mark_unrequested(ctx, output, output_mask)
        ctx.save_for_backward(x, scale, zero_point)
        ctx.save_for_forward(x, scale, zero_point)
        ctx.cfg, ctx.output_mask = tuple(cfg), list(output_mask)

    @staticmethod
    def backward(ctx, ggx, ggs, ggz):
        op = ops.fake_quantize_backward
        return _backward_op_backward(ctx, op, "fake_quantize_backward", ggx, ggs, ggz)

    @staticmethod
    def jvp(ctx, tgrad, *_):
        return _backward_op_jvp(ctx, ops.fake_quantize_backward, tgrad, 3, "fake_quantize_backward")


# ---- portable kernels (ffa/quant/portable.py): devices without native kernels, FFA_BACKEND ------
from .._backend import register_portable  # noqa: E402
from . import portable  # noqa: E402

for _name in (
    "quantize_weight",
    "quant_relu",
    "quant_relu_backward",
    "fake_quantize",
    "fake_quantize_backward",
):
    register_portable(_name, getattr(portable, _name))
