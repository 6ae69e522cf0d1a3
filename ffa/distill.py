"""FAQD training pieces: the combined distillation loss and a feature-capturing hook helper.

FAQD (Li, Yang, Yin, Qi, Xin, arXiv 2302.10899) trains a (quantized) student from a teacher
without labels: a KD term on the logits plus the feature-affinity (FA) loss on intermediate
feature maps, plus cross-entropy when labels exist. :class:`FAQDLoss` computes the weighted sum
through ffa's fused FA/FFA kernels; :class:`FeatureHooks` captures the feature maps of named
submodules.
"""

from __future__ import annotations

import secrets
from collections.abc import Sequence
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from .functional import _check_options, fast_feature_affinity_loss, feature_affinity_loss

__all__ = ["FAQDLoss", "FAQDOutput", "FeatureHooks"]

_KDS = ("mse", "kl")
_AFFINITIES = ("exact", "fast")
# Odd 64-bit constant (2^64 / golden ratio): spreads consecutive ranks far apart in seed space.
_RANK_STRIDE = 0x9E3779B97F4A7C15


class FAQDOutput(NamedTuple):
    """Total loss and its unweighted parts (each a float32, or float64, scalar tensor).

    ``loss = kd_weight * kd + fa_weight * fa + label_weight * label``; ``fa`` sums the layers.
    """

    loss: torch.Tensor
    kd: torch.Tensor
    fa: torch.Tensor
    label: torch.Tensor


def _check_weight(name, value):
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value >= 0:
        raise ValueError(f"{name} must be a non-negative number, got {value!r}")
    return float(value)


def _dist_rank() -> int:
    dist = torch.distributed
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def rank_generator(cache: dict, device, seed: int, *, seed_per_rank: bool) -> torch.Generator:
    """The FFA generator on ``device`` from ``cache`` (created and seeded on first use; with
    ``seed_per_rank`` the DDP rank is mixed into the seed, so ranks draw independent probes)."""
    device = torch.device(device)
    if device.type != "cpu" and device.index is None:
        index = torch.get_device_module(device.type).current_device()
        device = torch.device(device.type, index)
    gen = cache.get(device)
    if gen is None:
        if seed_per_rank:
            seed = (seed + _dist_rank() * _RANK_STRIDE) % (1 << 63)
        gen = torch.Generator(device=device)
        gen.manual_seed(seed)
        cache[device] = gen
    return gen


def affinity_loss(cfg, fs: torch.Tensor, ft: torch.Tensor) -> torch.Tensor:
    """The FA loss of one feature pair as ``cfg`` configures it: its ``affinity`` ("exact" or
    "fast"), ``p``, ``k``, ``reduction``, ``eps``, and ``generator(device)`` for FFA's probes."""
    if cfg.affinity == "exact":
        return feature_affinity_loss(fs, ft, p=cfg.p, reduction=cfg.reduction, eps=cfg.eps)
    return fast_feature_affinity_loss(
        fs,
        ft,
        k=cfg.k,
        p=cfg.p,
        reduction=cfg.reduction,
        eps=cfg.eps,
        generator=cfg.generator(fs.device),
    )


class FAQDLoss(nn.Module):
    r"""The FAQD objective: KD on logits + feature affinity on features (+ labels when given).

    .. math::
        \mathcal{L} = w_{kd}\,\mathrm{KD}(z_S, z_T) + w_{fa}\sum_l \mathrm{FA}(a_l(F^S_l), F^T_l)
                      + w_{label}\,\mathrm{CE}(z_S, y)

    - ``kd="mse"`` (the paper's default): mean squared error between the logits, averaged over
      all B x classes entries (``nn.MSELoss``); ``temperature`` is not used.
    - ``kd="kl"``: :math:`T^2\,\mathrm{KL}(\mathrm{softmax}(z_T/T)\,\|\,\mathrm{softmax}(z_S/T))`,
      averaged over the batch (the released code sums over the batch instead).
    - ``affinity="exact"``: :func:`ffa.feature_affinity_loss` (p=1 is the paper's FA loss);
      ``"fast"``: :func:`ffa.fast_feature_affinity_loss` with ``k`` Gaussian probes, a fresh Z
      per layer and per call. FFA p=1 estimates sqrt(2/pi) sum_i ||D_i|| / N^2, about sqrt(N)
      below FA p=1: the same FA influence needs a larger ``fa_weight``.
    - ``reduction`` of the FA terms over the batch: ``"mean"`` (default) or ``"sum"``. The
      paper's code sums over the batch (its ``fa_coef`` 0.1 at batch size B is
      ``fa_weight=0.1 * B`` here). "mean" keeps the loss independent of the batch size and makes
      a DDP step equal to one step on the whole batch (DDP averages gradients over ranks).
    - ``adapters``: None, or one entry per feature layer: a student channel count (FAQDLoss then
      owns a trainable 1x1 conv (with bias) + ReLU for that layer, applied to the student
      feature, as the paper's code does) or None (no adapter). The adapters are in
      ``self.parameters()``: give them to the optimizer. Under DDP wrap this module in DDP too,
      so that their gradients are averaged.
    - ``label_weight`` > 0 needs ``target``. Teacher logits and features are detached.
    - A part whose weight is 0 is computed without gradient when its inputs are given (so it can
      be logged) and is 0 when they are not; only parts with a positive weight need inputs.
    - FFA randomness: this module owns one ``torch.Generator`` per device, seeded once from
      ``seed`` (random when None). When torch.distributed is initialized at the first FFA call,
      the rank is mixed into the seed, so each DDP rank draws independent Z
      (``seed_per_rank=False`` gives every rank the same Z). The global RNG is never touched.

    Logits: [B, classes]; features: sequences of [B, C, H, W], one per layer (student and teacher
    channels and sizes may differ: the teacher is resized to the student's size). Low-precision
    inputs (autocast) are computed in float32; the outputs are float32 (float64 for float64).
    """

    def __init__(
        self,
        *,
        kd="mse",
        temperature=1.0,
        kd_weight=1.0,
        fa_weight=0.1,
        label_weight=0.0,
        affinity="exact",
        k=15,
        p=1,
        adapters=None,
        reduction="mean",
        eps=1e-5,
        seed=None,
        seed_per_rank=True,
    ):
        super().__init__()
        if kd not in _KDS:
            raise ValueError(f"kd must be one of {_KDS}, got {kd!r}")
        if affinity not in _AFFINITIES:
            raise ValueError(f"affinity must be one of {_AFFINITIES}, got {affinity!r}")
        if reduction not in ("mean", "sum"):
            raise ValueError(f"reduction must be 'mean' or 'sum', got {reduction!r}")
        _check_options(p, reduction, eps)
        if (
            isinstance(temperature, bool)
            or not isinstance(temperature, (int, float))
            or not (temperature > 0)
        ):
            raise ValueError(f"temperature must be a positive number, got {temperature!r}")
        if isinstance(k, bool) or not isinstance(k, int) or k < 1:
            raise ValueError(f"k must be a positive int, got {k!r}")
        if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int) or seed < 0):
            raise ValueError(f"seed must be a non-negative int or None, got {seed!r}")
        self.kd, self.affinity, self.reduction = kd, affinity, reduction
        self.temperature = float(temperature)
        self.kd_weight = _check_weight("kd_weight", kd_weight)
        self.fa_weight = _check_weight("fa_weight", fa_weight)
        self.label_weight = _check_weight("label_weight", label_weight)
        self.k, self.p, self.eps = k, p, eps
        self.seed = secrets.randbits(63) if seed is None else seed
        self.seed_per_rank = bool(seed_per_rank)
        self._generators: dict[torch.device, torch.Generator] = {}
        if adapters is None:
            self.adapters = None
        else:
            if isinstance(adapters, (str, bytes)) or not isinstance(adapters, Sequence):
                raise TypeError(
                    f"adapters must be None or a list of student channel counts, got {adapters!r}"
                )
            layers = []
            for i, c in enumerate(adapters):
                if c is None:
                    layers.append(nn.Identity())
                elif isinstance(c, bool) or not isinstance(c, int) or c < 1:
                    raise ValueError(
                        f"adapters[{i}] must be a positive channel count or None, got {c!r}"
                    )
                else:
                    layers.append(nn.Sequential(nn.Conv2d(c, c, 1, bias=True), nn.ReLU()))
            self.adapters = nn.ModuleList(layers)

    # ---- FFA randomness -------------------------------------------------------------------------
    def generator(self, device) -> torch.Generator:
        """This module's FFA generator on ``device`` (created and seeded on first use)."""
        return rank_generator(self._generators, device, self.seed, seed_per_rank=self.seed_per_rank)

    # ---- parts ----------------------------------------------------------------------------------
    def _kd(self, student_logits, teacher_logits):
        dtype = torch.float64 if student_logits.dtype == torch.float64 else torch.float32
        s, t = student_logits.to(dtype), teacher_logits.detach().to(dtype)
        if s.shape != t.shape:
            raise ValueError(
                f"student_logits and teacher_logits must have the same shape, got "
                f"{tuple(s.shape)} and {tuple(t.shape)}"
            )
        if self.kd == "mse":
            return F.mse_loss(s, t)
        temp = self.temperature
        log_ps = F.log_softmax(s / temp, dim=1)
        log_pt = F.log_softmax(t / temp, dim=1)
        return F.kl_div(log_ps, log_pt, reduction="batchmean", log_target=True) * (temp * temp)

    def _fa(self, student_feats, teacher_feats):
        if isinstance(student_feats, torch.Tensor) or isinstance(teacher_feats, torch.Tensor):
            raise TypeError("student_feats and teacher_feats must be lists of tensors (per layer)")
        student_feats, teacher_feats = list(student_feats), list(teacher_feats)
        if len(student_feats) != len(teacher_feats):
            raise ValueError(
                f"student_feats and teacher_feats must have the same number of layers, got "
                f"{len(student_feats)} and {len(teacher_feats)}"
            )
        if self.adapters is not None and len(self.adapters) != len(student_feats):
            raise ValueError(
                f"FAQDLoss has {len(self.adapters)} adapters but got {len(student_feats)} layers"
            )
        if not student_feats:
            raise ValueError("student_feats is empty: give at least one layer or set fa_weight=0")
        total = None
        for i, (fs, ft) in enumerate(zip(student_feats, teacher_feats, strict=True)):
            if self.adapters is not None:
                fs = self.adapters[i](fs)
            part = affinity_loss(self, fs, ft.detach())
            total = part if total is None else total + part
        return total

    def forward(
        self, student_logits, teacher_logits, student_feats=None, teacher_feats=None, target=None
    ) -> FAQDOutput:
        """Returns :class:`FAQDOutput` (loss, kd, fa, label).

        Args:
            student_logits: [B, classes].
            teacher_logits: [B, classes] or None when ``kd_weight == 0``.
            student_feats, teacher_feats: sequences of [B, C, H, W], one per layer, or None when
                ``fa_weight == 0``.
            target: [B] class indices, or None when ``label_weight == 0``.
        """
        if not isinstance(student_logits, torch.Tensor):
            raise TypeError(
                f"student_logits must be a torch.Tensor, got {type(student_logits).__name__}"
            )
        if self.kd_weight > 0 and teacher_logits is None:
            raise ValueError("teacher_logits is None but kd_weight > 0")
        if self.fa_weight > 0 and (student_feats is None or teacher_feats is None):
            raise ValueError("student_feats/teacher_feats are None but fa_weight > 0")
        if self.label_weight > 0 and target is None:
            raise ValueError(
                f"label_weight={self.label_weight} > 0 needs target (class indices), got None"
            )
        dtype = torch.float64 if student_logits.dtype == torch.float64 else torch.float32
        zero = student_logits.new_zeros((), dtype=dtype)
        parts = []
        for weight, wanted, fn in (
            (
                self.kd_weight,
                teacher_logits is not None,
                lambda: self._kd(student_logits, teacher_logits),
            ),
            (
                self.fa_weight,
                student_feats is not None and teacher_feats is not None,
                lambda: self._fa(student_feats, teacher_feats),
            ),
            (
                self.label_weight,
                target is not None,
                lambda: F.cross_entropy(student_logits.to(dtype), target),
            ),
        ):
            if weight > 0:
                parts.append((weight, fn().to(dtype)))
            elif wanted:
                with torch.no_grad():
                    parts.append((0.0, fn().to(dtype)))
            else:
                parts.append((0.0, zero))
        loss = zero
        for weight, value in parts:
            if weight > 0:
                loss = loss + weight * value
        return FAQDOutput(loss, parts[0][1], parts[1][1], parts[2][1])

    def extra_repr(self):
        return (
            f"kd={self.kd!r}, temperature={self.temperature}, kd_weight={self.kd_weight}, "
            f"fa_weight={self.fa_weight}, label_weight={self.label_weight}, "
            f"affinity={self.affinity!r}, k={self.k}, p={self.p}, reduction={self.reduction!r}"
        )


class FeatureHooks:
    """Captures the outputs of named submodules on every forward.

    ``FeatureHooks(model, ["layer1", "layer2"])`` registers one forward hook per name (names as
    in ``model.named_modules()``); after a forward, ``hooks.features`` is the list of the latest
    outputs in the order of ``names`` (``hooks[name]`` gives one). Used as a context manager it
    removes its hooks on exit; ``remove()`` does the same. Outputs are kept as they are (with
    their autograd graph) until the next forward or ``clear()``: run the teacher under
    ``torch.no_grad()``. For a DDP-wrapped model pass ``ddp.module`` (or prefix the names with
    ``"module."``).
    """

    def __init__(self, model: nn.Module, names):
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        if isinstance(names, str):
            names = [names]
        names = list(names)
        if not names:
            raise ValueError("names must list at least one module name")
        modules = dict(model.named_modules())
        for name in names:
            if not isinstance(name, str):
                raise TypeError(f"module names must be strings, got {name!r}")
            if name not in modules:
                available = [n for n in modules if n]
                shown = ", ".join(repr(n) for n in available[:20])
                more = f", ... ({len(available)} in all)" if len(available) > 20 else ""
                raise ValueError(f"model has no submodule named {name!r}; available: {shown}{more}")
        if len(set(names)) != len(names):
            raise ValueError(f"names must be distinct, got {names}")
        self.names = names
        self._outputs: dict[str, object] = {}
        self._handles = [
            modules[name].register_forward_hook(self._make_hook(name)) for name in names
        ]

    def _make_hook(self, name):
        def hook(module, args, output):
            self._outputs[name] = output

        return hook

    @property
    def features(self) -> list:
        """The latest outputs, in the order of ``names``."""
        missing = [n for n in self.names if n not in self._outputs]
        if missing:
            raise RuntimeError(
                f"no output captured yet for {missing}: run a forward pass first (hooks "
                f"{'removed' if not self._handles else 'active'})"
            )
        return [self._outputs[n] for n in self.names]

    def __getitem__(self, name):
        if name not in self.names:
            raise KeyError(f"{name!r} is not hooked; hooked: {self.names}")
        if name not in self._outputs:
            raise RuntimeError(f"no output captured yet for {name!r}: run a forward pass first")
        return self._outputs[name]

    def clear(self):
        """Drops the captured outputs (and the graphs they hold)."""
        self._outputs.clear()

    def remove(self):
        """Removes the hooks (idempotent). Captured outputs stay readable until ``clear()``."""
        for handle in self._handles:
            handle.remove()
        self._handles = []

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.remove()
        return False

    def __repr__(self):
        state = "active" if self._handles else "removed"
        return f"FeatureHooks({self.names}, {state})"
