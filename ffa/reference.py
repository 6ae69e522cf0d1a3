"""Plain, materializing PyTorch versions of every ffa definition.

This module is the oracle of the tests and the baseline of the benchmarks; it is never on ffa's
runtime path. It materializes the B x N x N affinity matrices exactly as the paper's released code
does, so it runs out of memory at the resolutions ffa is built for.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

__all__ = [
    "resize_teacher",
    "unit_pixels",
    "affinity",
    "fa_loss",
    "ffa_loss",
    "ffa_p1_expectation",
    "reduce",
]


def reduce(per_sample: torch.Tensor, reduction: str) -> torch.Tensor:
    if reduction == "mean":
        return per_sample.mean()
    if reduction == "sum":
        return per_sample.sum()
    if reduction == "none":
        return per_sample
    raise ValueError(f"reduction must be 'mean', 'sum' or 'none', got {reduction!r}")


def resize_teacher(teacher: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Bilinear, align_corners=True, as the paper's code; a no-op when the size already matches."""
    if tuple(teacher.shape[-2:]) == tuple(size):
        return teacher
    return F.interpolate(teacher, size=size, mode="bilinear", align_corners=True)


def unit_pixels(x: torch.Tensor, eps: float = 1e-5) -> torch.Tensor:
    """[B,C,H,W] -> U [B,C,N] with columns x_i / (||x_i||_2 + eps).

    Evaluated as (x_i / m_i) / (||x_i / m_i||_2 + eps / m_i) with the constant (detached)
    m_i = max(max_c |x_i|, eps): the same function of x, with the same gradient, but its squares
    neither overflow nor underflow at any input magnitude, and eps / m_i <= 1.
    """
    u = x.flatten(2)
    m = u.detach().abs().amax(dim=1, keepdim=True).clamp_min(eps)
    m = torch.where(m > 0, m, torch.ones_like(m))  # an eps below the dtype's range rounds to 0
    u = u / m
    # (a tensor numerator: `eps / m` would evaluate eps * (1 / m), which overflows for tiny m)
    return u / (torch.linalg.vector_norm(u, dim=1, keepdim=True) + m.new_tensor(eps) / m)


def affinity(x: torch.Tensor, eps: float = 1e-5) -> torch.Tensor:
    """Cosine affinity A = U^T U, [B,N,N] (materialized)."""
    u = unit_pixels(x, eps)
    return u.transpose(1, 2) @ u


def fa_loss(student, teacher, *, p=1, reduction="mean", eps=1e-5):
    """Exact FA: per sample mean_ij |D_ij| (p=1) or mean_ij D_ij^2 (p=2), D = A_S - A_T."""
    teacher = resize_teacher(teacher, student.shape[-2:])
    d = affinity(student, eps) - affinity(teacher, eps)
    per = d.abs().mean(dim=(1, 2)) if p == 1 else d.square().mean(dim=(1, 2))
    return reduce(per, reduction)


def ffa_loss(student, teacher, projection, *, p=1, reduction="mean", eps=1e-5):
    """FFA with an explicit Z ([N,k] or [B,N,k]): sum_i mean_k f((D Z)_ik) / N^2, never N x N."""
    teacher = resize_teacher(teacher, student.shape[-2:])
    us, ut = unit_pixels(student, eps), unit_pixels(teacher, eps)
    n = us.shape[-1]
    z = projection if projection.dim() == 3 else projection.unsqueeze(0)
    y = us.transpose(1, 2) @ (us @ z) - ut.transpose(1, 2) @ (ut @ z)  # [B,N,k]
    f = y.abs() if p == 1 else y.square()
    per = f.mean(dim=2).sum(dim=1) / (n * n)
    return reduce(per, reduction)


def ffa_p1_expectation(student, teacher, *, reduction="mean", eps=1e-5):
    """What FFA p=1 estimates: sqrt(2/pi) * sum_i ||D_i||_2 / N^2 (not FA p=1)."""
    teacher = resize_teacher(teacher, student.shape[-2:])
    d = affinity(student, eps) - affinity(teacher, eps)
    n = d.shape[-1]
    per = math.sqrt(2 / math.pi) * torch.linalg.vector_norm(d, dim=2).sum(dim=1) / (n * n)
    return reduce(per, reduction)


# ---- quantization references ----
# Plain versions of ffa.quant's quantizers, written the way the paper's released code writes them
# (threshold loops, boolean masks, full-size temporaries), generalized to bits 3, 5-8, per-channel
# scales and float16/bfloat16 (computed in float32). Only tests and benchmarks use them.


def _quant_compute(x: torch.Tensor) -> torch.Tensor:
    return x if x.dtype in (torch.float32, torch.float64) else x.float()


def quantize_weight(w: torch.Tensor, bits: int, per_channel: bool = False) -> torch.Tensor:
    """The released quantize_bw (1), quantize_tnn (2), quantize_fbit (4) / quantize_8bit rules.

    A NaN anywhere in the tensor (per channel: in the channel) makes all of it NaN.
    """
    x = _quant_compute(w)
    flat = x.reshape(x.shape[0], -1) if per_channel else x.reshape(1, -1)
    data, sign = flat.abs(), flat.sign()
    if bits == 1:
        out = sign * data.mean(1, keepdim=True)
    elif bits == 2:
        delta = (0.7 * data.mean(1, keepdim=True)).clamp(max=100.0)
        index = data.ge(delta).to(x.dtype)
        scale = (data * index).mean(1, keepdim=True)
        out = scale * index * sign
    else:
        top = 2**bits - 1  # the last odd multiple of delta; levels 0 .. (top - 1) / 2
        delta = (data.amax(1, keepdim=True) / top).clamp(max=10.0)
        q = torch.zeros_like(data)
        for i in range(3, top + 2, 2):
            if i < top:
                index = data.gt((i - 2) * delta).to(x.dtype) * data.le(i * delta).to(x.dtype)
            else:
                index = data.gt((i - 2) * delta).to(x.dtype)
            q += (i - 1) // 2 * index
        num, den = (data * q).sum(1, keepdim=True), (q * q).sum(1, keepdim=True)
        scale = torch.where(den > 0, num / den.clamp(min=1), torch.zeros_like(num))
        out = scale * q * sign
    # A NaN weight makes the statistics of its tensor (per channel: its channel) NaN, and with them
    # every output there, at every width (the formulas above alone hide it at some widths).
    out = out.masked_fill(data.isnan().any(1, keepdim=True), float("nan"))
    return out.reshape(w.shape).to(w.dtype)


def quant_relu(x: torch.Tensor, alpha: torch.Tensor, bits: int) -> torch.Tensor:
    """The released QuantReLUFunction.forward (ffun='quant'), alpha clamped to [1e-3, 5]."""
    xc = _quant_compute(x)
    a = alpha.detach().reshape(()).clamp(1e-3, 5.0).to(xc.dtype)
    level = 2**bits - 1
    out = xc.clone()
    out[xc <= 0] = 0
    ind = xc.gt(0) & xc.le(a * (level - 1))
    out[ind] = (xc[ind] / a).ceil() * a
    out[xc > a * (level - 1)] = a * level
    return out.to(x.dtype)


def quant_relu_backward(grad, x, alpha, bits, ste="inplt", alpha_grad="mean", rate=0.01):
    """The released QuantReLUFunction.backward: (grad_input, grad_alpha shaped like alpha)."""
    xc = _quant_compute(x)
    g = grad.to(xc.dtype)
    a = alpha.detach().reshape(()).clamp(1e-3, 5.0).to(xc.dtype)
    level = 2**bits - 1
    grad_input = g.clone()
    if ste != "idnty":
        grad_input[xc <= 0] = 0
    if ste == "inplt":
        grad_input[xc > a * level] = 0
    g0 = torch.zeros_like(g)
    if alpha_grad == "ae":
        ind = xc.gt(0) & xc.le(a * (level - 1))
        g0[ind] = (xc[ind] / a).ceil()
        g0[xc > a * (level - 1)] = level
    elif alpha_grad == "pact":
        g0[xc > a * level] = level
    elif alpha_grad == "min":
        g0[xc.gt(0) & xc.le(a * level)] = 1
    elif alpha_grad == "mean":
        g0[xc.gt(0) & xc.le(a * level)] = 2 ** (bits - 1)
    else:
        raise ValueError(f"unknown alpha_grad {alpha_grad!r}")
    g0[xc > a * level] = level
    grad_alpha = ((g * g0).sum() * rate).clamp(-1, 1)
    return grad_input.to(x.dtype), grad_alpha.reshape(alpha.shape).to(alpha.dtype)


def fake_quantize(x, scale, zero_point, qmin, qmax, axis=None, learnable=False, grad_factor=1.0):
    """torch's own fake-quantize ops, the definition ffa.quant.fake_quantize reproduces.

    Non-learnable: scale/zero_point are numbers (per tensor) or tensors ([C] float32 / int32 per
    channel). Learnable: float32 tensors ([1] per tensor, [C] per channel).
    """
    if learnable:
        if axis is None:
            return torch._fake_quantize_learnable_per_tensor_affine(
                x, scale, zero_point, qmin, qmax, grad_factor
            )
        return torch._fake_quantize_learnable_per_channel_affine(
            x, scale, zero_point, axis, qmin, qmax, grad_factor
        )
    if axis is None:
        return torch.fake_quantize_per_tensor_affine(x, scale, zero_point, qmin, qmax)
    return torch.fake_quantize_per_channel_affine(x, scale, zero_point, axis, qmin, qmax)
