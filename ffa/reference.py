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
    """[B,C,H,W] -> U [B,C,N] with columns x_i / (||x_i||_2 + eps)."""
    u = x.flatten(2)
    return u / (torch.linalg.vector_norm(u, dim=1, keepdim=True) + eps)


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
