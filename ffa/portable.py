"""The losses written with differentiable torch ops (no ffa kernel), per sample.

Same definitions and accumulation dtypes as the native kernels, but every step is a torch op, so
autograd differentiates them to any order and on any device. ffa's autograd uses them for the
derivatives the kernels do not provide (double backward of FA p=2 and FFA); they never run on the
first-order path. Memory: O(N C) for FFA, O(N (Cs+Ct) + min(N, Cs+Ct)^2) for FA p=2.
"""

from __future__ import annotations

import torch

from ._ops import compute_dtype

__all__ = ["unit_pixels", "fa_loss", "ffa_loss"]


def unit_pixels(x: torch.Tensor, eps: float) -> torch.Tensor:
    """[B,C,H,W] -> U [B,C,N] in the compute dtype: x_i / (||x_i|| + eps), scale-safe.

    Evaluated as (x_i / m_i) / (||x_i / m_i|| + eps / m_i) with m_i = max(max_c |x_i|, eps), a
    constant to autograd (the value does not depend on it): no square overflows or underflows at
    any input scale, and an all-zero pixel gives 0.
    """
    u = x.flatten(2).to(compute_dtype(x.dtype))
    m = u.detach().abs().amax(dim=1, keepdim=True).clamp_min(eps)
    m = torch.where(m > 0, m, torch.ones_like(m))  # an eps below the dtype's range rounds to 0
    u = u / m
    # a tensor numerator: `eps / m` would be evaluated as eps * (1 / m), which overflows
    return u / (torch.linalg.vector_norm(u, dim=1, keepdim=True) + m.new_tensor(eps) / m)


def _gram_sq(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return (a @ b.mT).square().sum(dim=(1, 2))


def fa_loss(student: torch.Tensor, teacher: torch.Tensor, p: int, eps: float) -> torch.Tensor:
    """Exact FA per sample ([B], the compute dtype); p=2 only (p=1 needs the tiled kernel)."""
    if p != 2:
        raise NotImplementedError("ffa.portable.fa_loss: only p=2 is implemented")
    us = unit_pixels(student, eps).double()
    ut = unit_pixels(teacher, eps).double()
    n = us.shape[-1]
    if n < us.shape[1] + ut.shape[1]:  # the N x N form is the cheaper one
        per = (us.mT @ us - ut.mT @ ut).square().sum(dim=(1, 2))
    else:  # ||D||_F^2 from channel Gram matrices, in float64 (it cancels when S ~ T)
        per = (_gram_sq(us, us) + _gram_sq(ut, ut) - 2 * _gram_sq(us, ut)).clamp(min=0)
    return (per / (n * n)).to(compute_dtype(student.dtype))


def ffa_loss(
    student: torch.Tensor, teacher: torch.Tensor, projection: torch.Tensor, p: int, eps: float
) -> torch.Tensor:
    """FFA per sample ([B]) with Z = ``projection`` ([Bz, N, k]): sum_i mean_k f((DZ)_ik) / N^2."""
    us, ut = unit_pixels(student, eps), unit_pixels(teacher, eps)
    n = us.shape[-1]
    z = projection.to(us.dtype)
    y = us.mT @ (us @ z) - ut.mT @ (ut @ z)
    f = y.abs() if p == 1 else y.square()
    return f.mean(dim=2).sum(dim=1) / (n * n)
