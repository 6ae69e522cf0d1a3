"""nn.Module forms of the losses: thin holders of configuration (and, for FFA, of a generator)."""

from __future__ import annotations

import secrets

import torch
from torch import nn

from .functional import _check_options, fast_feature_affinity_loss, feature_affinity_loss

__all__ = ["FeatureAffinityLoss", "FastFeatureAffinityLoss"]


class FeatureAffinityLoss(nn.Module):
    """Exact FA loss; see :func:`ffa.feature_affinity_loss`. ``forward(student, teacher)``."""

    def __init__(self, p=1, reduction="mean", eps=1e-5):
        super().__init__()
        _check_options(p, reduction, eps)
        self.p, self.reduction, self.eps = p, reduction, eps

    def forward(self, student, teacher):
        return feature_affinity_loss(
            student, teacher, p=self.p, reduction=self.reduction, eps=self.eps
        )

    def extra_repr(self):
        return f"p={self.p}, reduction={self.reduction!r}, eps={self.eps}"


class FastFeatureAffinityLoss(nn.Module):
    """FFA loss; see :func:`ffa.fast_feature_affinity_loss`.

    Owns one ``torch.Generator`` per device, seeded once from ``seed`` (a random seed when None),
    and draws a fresh Z on every call. It never touches the global RNG.
    ``forward(student, teacher, projection=None)``.
    """

    def __init__(self, k=15, p=1, reduction="mean", eps=1e-5, seed=None):
        super().__init__()
        _check_options(p, reduction, eps)
        if isinstance(k, bool) or not isinstance(k, int) or k < 1:
            raise ValueError(f"k must be a positive int, got {k!r}")
        if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int) or seed < 0):
            raise ValueError(f"seed must be a non-negative int or None, got {seed!r}")
        if seed is not None and seed >= 2**64:  # torch.Generator seeds are 64-bit
            raise ValueError(f"seed must be below 2**64 (a 64-bit generator seed), got {seed!r}")
        self.k, self.p, self.reduction, self.eps = k, p, reduction, eps
        self.seed = secrets.randbits(63) if seed is None else seed
        self._generators: dict[torch.device, torch.Generator] = {}

    def generator(self, device) -> torch.Generator:
        """This module's generator on ``device`` (created and seeded from ``seed`` on first use)."""
        device = torch.device(device)
        if device.type != "cpu" and device.index is None:
            device = torch.device(
                device.type, torch.get_device_module(device.type).current_device()
            )
        gen = self._generators.get(device)
        if gen is None:
            gen = torch.Generator(device=device)
            gen.manual_seed(self.seed)
            self._generators[device] = gen
        return gen

    def forward(self, student, teacher, projection=None):
        gen = None if projection is not None else self.generator(student.device)
        return fast_feature_affinity_loss(
            student,
            teacher,
            k=self.k,
            p=self.p,
            reduction=self.reduction,
            eps=self.eps,
            generator=gen,
            projection=projection,
        )

    def extra_repr(self):
        return (
            f"k={self.k}, p={self.p}, reduction={self.reduction!r}, eps={self.eps}, "
            f"seed={self.seed}"
        )
