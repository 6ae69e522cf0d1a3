"""The torchdistill-facing pieces of ffa, written without importing torchdistill.

:mod:`ffa.integrations.torchdistill` registers these classes with torchdistill's registries. They
live here, free of torchdistill, so that their behaviour is tested where torchdistill is not
installed (CI). torchdistill's conventions that they follow:

- A *mid-level* loss is called as ``loss(student_io_dict, teacher_io_dict, targets)``. An io_dict
  maps a module path (as listed under ``forward_hook`` in the config, ``"."`` for the model itself)
  to ``{"input": ..., "output": ...}``.
- An *auxiliary model wrapper* wraps the student; torchdistill calls its
  ``secondary_forward(io_dict)`` after the student's forward, and puts the wrapper (hence its
  parameters) in the optimizer.
"""

from __future__ import annotations

import math
import secrets
from collections.abc import Mapping

import torch
from torch import nn

from ..distill import affinity_loss, rank_generator
from ..functional import _check_options

__all__ = [
    "ADAPTER_PREFIX",
    "AffinityLoss",
    "FAAdapters",
    "FALoss",
    "channel_affinity_loss",
]

_AFFINITIES = ("exact", "fast")
# io_dict key of adapter ``name``'s output: the adapter's module path inside FAAdapters.
ADAPTER_PREFIX = "adapter_dict."


def _check_seed(seed):
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int) or seed < 0):
        raise ValueError(f"seed must be a non-negative int or None, got {seed!r}")
    if seed is not None and seed >= 2**63:
        raise ValueError(f"seed must be below 2**63, got {seed!r}")


def _io_ref(owner, where, cfg):
    """Validates a ``{path, io}`` mapping; returns ``(path, io)`` (io defaults to "output")."""
    if not isinstance(cfg, Mapping):
        raise ValueError(f"{owner}: {where} must be a mapping with 'path' (and 'io'), got {cfg!r}")
    unknown = sorted(set(cfg) - {"path", "io"})
    if unknown:
        raise ValueError(f"{owner}: {where} has unknown keys {unknown}; expected 'path' and 'io'")
    path, io = cfg.get("path"), cfg.get("io", "output")
    if not isinstance(path, str) or not path:
        raise ValueError(f"{owner}: {where}['path'] must be a module path string, got {path!r}")
    if not isinstance(io, str) or not io:
        raise ValueError(f"{owner}: {where}['io'] must be 'output' or 'input', got {io!r}")
    return path, io


def _lookup(owner, io_dict, path, io, side, where):
    """``io_dict[path][io]`` with an error that says which hook is missing."""
    if not isinstance(io_dict, Mapping):
        raise TypeError(f"{owner}: the {side} io_dict must be a dict, got {type(io_dict).__name__}")
    module_io = io_dict.get(path)
    if module_io is None:
        known = sorted(str(k) for k in io_dict)
        raise ValueError(
            f"{owner}: {where}: the {side} io_dict has no module path {path!r} (it has {known}); "
            f"list {path!r} under train.{side}.forward_hook.{io} in the torchdistill config"
        )
    if io not in module_io:
        raise ValueError(
            f"{owner}: {where}: the {side} io_dict has no {io!r} for {path!r} (it has "
            f"{sorted(module_io)}); list {path!r} under train.{side}.forward_hook.{io}"
        )
    value = module_io[io]
    if not isinstance(value, torch.Tensor):
        raise TypeError(
            f"{owner}: {where}: {side} io_dict[{path!r}][{io!r}] must be a tensor, got "
            f"{type(value).__name__}"
        )
    return value


class FALoss(nn.Module):
    r"""Feature-affinity distillation over pairs of hooked feature maps: a mid-level loss.

    .. math::
        \mathcal{L} = \sum_{\text{pairs } q} w_q \, \mathrm{FA}(F^S_q, F^T_q)

    with FA the exact loss (:func:`ffa.feature_affinity_loss`, ``affinity="exact"``) or the fast
    randomized estimator (:func:`ffa.fast_feature_affinity_loss`, ``affinity="fast"``, ``k``
    Gaussian probes). Per sample, with unit pixels u_i = f_i / (||f_i||_2 + eps) over channels,
    A = U^T U (N x N, N = H W) and D = A_S - A_T: exact p=1 is mean_ij |D_ij| (the paper's), p=2
    mean_ij D_ij^2; FFA p=1 is sum_i mean_k |(DZ)_ik| / N^2. ``reduction`` ("mean" or "sum") is
    over the batch. Nothing N x N is built.

    ``feature_pairs`` has the shape of torchdistill's own pair losses (``ATLoss``, ``ChSimLoss``)::

        feature_pairs:
          pair1:
            student: {path: 'adapter_dict.layer1', io: 'output'}
            teacher: {path: 'layer1', io: 'output'}
            weight: 1.0

    Student features are [B, Cs, H, W], teacher features [B, Ct, H', W']: Cs may differ from Ct,
    and a teacher map of another size is resized to (H, W) bilinearly (``align_corners=True``).
    The teacher features are detached (``detach_teacher=True``) as in :class:`ffa.FAQDLoss`.

    FFA randomness: one ``torch.Generator`` per device, seeded once from ``seed`` (random when
    None); a fresh Z per pair and per call. When torch.distributed is initialized at the first FFA
    call, the rank is mixed into the seed (``seed_per_rank=True``), so each DDP rank draws its own
    Z, exactly as :class:`ffa.FAQDLoss` does. The global RNG is never touched.

    This loss has no parameters: trainable adapters belong in the student's auxiliary model wrapper
    (:class:`FAAdapters`), which torchdistill optimizes.
    """

    def __init__(
        self,
        feature_pairs,
        *,
        affinity="exact",
        p=1,
        k=15,
        reduction="mean",
        eps=1e-5,
        seed=None,
        seed_per_rank=True,
        detach_teacher=True,
    ):
        super().__init__()
        if affinity not in _AFFINITIES:
            raise ValueError(f"affinity must be one of {_AFFINITIES}, got {affinity!r}")
        if reduction not in ("mean", "sum"):
            raise ValueError(f"reduction must be 'mean' or 'sum', got {reduction!r}")
        _check_options(p, reduction, eps)
        if isinstance(k, bool) or not isinstance(k, int) or k < 1:
            raise ValueError(f"k must be a positive int, got {k!r}")
        _check_seed(seed)
        if not isinstance(feature_pairs, Mapping) or not feature_pairs:
            raise ValueError(
                "feature_pairs must be a non-empty mapping {name: {student: {path, io}, teacher: "
                f"{{path, io}}, weight}}, got {feature_pairs!r}"
            )
        pairs = []
        for name, cfg in feature_pairs.items():
            where = f"feature_pairs[{name!r}]"
            if not isinstance(cfg, Mapping):
                raise ValueError(f"FALoss: {where} must be a mapping, got {cfg!r}")
            unknown = sorted(set(cfg) - {"student", "teacher", "weight"})
            if unknown:
                raise ValueError(
                    f"FALoss: {where} has unknown keys {unknown}; expected 'student', 'teacher', "
                    "'weight'"
                )
            for side in ("student", "teacher"):
                if side not in cfg:
                    raise ValueError(f"FALoss: {where} needs a '{side}' entry {{path, io}}")
            weight = cfg.get("weight", 1.0)
            if (
                isinstance(weight, bool)
                or not isinstance(weight, (int, float))
                or not 0 <= weight < math.inf
            ):
                raise ValueError(
                    f"FALoss: {where}['weight'] must be a non-negative finite number, got "
                    f"{weight!r}"
                )
            s_ref = _io_ref("FALoss", f"{where}['student']", cfg["student"])
            t_ref = _io_ref("FALoss", f"{where}['teacher']", cfg["teacher"])
            pairs.append((str(name), s_ref, t_ref, float(weight)))
        self.pairs = pairs
        self.affinity, self.p, self.k, self.reduction, self.eps = affinity, p, k, reduction, eps
        self.seed = secrets.randbits(63) if seed is None else seed
        self.seed_per_rank = bool(seed_per_rank)
        self.detach_teacher = bool(detach_teacher)
        self._generators: dict[torch.device, torch.Generator] = {}

    def generator(self, device) -> torch.Generator:
        """The FFA generator on ``device`` (created on first use; the DDP rank mixed in)."""
        return rank_generator(self._generators, device, self.seed, seed_per_rank=self.seed_per_rank)

    def pair_losses(self, student_io_dict, teacher_io_dict) -> dict[str, torch.Tensor]:
        """The unweighted loss of each pair, by pair name."""
        out = {}
        for name, (s_path, s_io), (t_path, t_io), _ in self.pairs:
            where = f"feature_pairs[{name!r}]"
            fs = _lookup("FALoss", student_io_dict, s_path, s_io, "student", where)
            ft = _lookup("FALoss", teacher_io_dict, t_path, t_io, "teacher", where)
            if self.detach_teacher:
                ft = ft.detach()
            out[name] = affinity_loss(self, fs, ft)
        return out

    def forward(self, student_io_dict, teacher_io_dict, *args, **kwargs):
        """``(student_io_dict, teacher_io_dict, targets)`` -> scalar; ``targets`` is unused."""
        parts = self.pair_losses(student_io_dict, teacher_io_dict)
        total = None
        for name, _, _, weight in self.pairs:
            term = weight * parts[name]
            total = term if total is None else total + term
        return total

    def extra_repr(self):
        pairs = ", ".join(f"{n}: {s[0]} <- {t[0]} (w={w:g})" for n, s, t, w in self.pairs)
        return (
            f"affinity={self.affinity!r}, p={self.p}, k={self.k}, reduction={self.reduction!r}, "
            f"pairs=[{pairs}]"
        )


def channel_affinity_loss(student, teacher, *, reduction="mean"):
    r"""torchdistill's ``AffinityLoss`` (He et al., CVPR 2019; KTAAD) in O(B C HW), exactly.

    For student and teacher maps of the same shape [B, C, *spatial] (flattened to [B, C, N]), each
    channel is normalized over its N positions, a = s_bc / ||s_bc||_2 and t = t_bc / ||t_bc||_2, and

    .. math::
        L_b = \sum_c \frac{1}{N} \| a a^\top - t t^\top \|_F .

    torchdistill builds each N x N outer product (and keeps them for backward: B N^2 per channel).
    The closed form needs none of them:

    .. math::
        \| a a^\top - t t^\top \|_F^2 = (\|a\|^2 - \|t\|^2)^2
            + 2\,\|a\|^2 \, \| t - \tfrac{a\cdot t}{\|a\|^2} a \|^2 ,

    the second term being ||a||^2 ||t||^2 - (a.t)^2 written through the part of t orthogonal to a,
    which does not cancel when the student is close to the teacher (||a||^2 ||t||^2 - (a.t)^2 would
    lose half the digits there). Everything is computed in float64 from the inputs: O(B C N) time
    and memory.

    Args:
        student, teacher: floating tensors of the same shape [B, C, *spatial] (at least 3-D).
        reduction: "mean" over the batch (torchdistill's default) or "sum".

    Returns:
        A scalar of the inputs' dtype (float32 for float16/bfloat16). Where torchdistill's value is
        finite this is the same value. An all-zero channel, which makes torchdistill's NaN (0/0),
        counts here as the zero vector (and gets a finite gradient). The gradient where the two
        outer products are equal is 0, as torchdistill's norm gives.
    """
    if reduction not in ("mean", "sum"):
        raise ValueError(
            f"reduction must be 'mean' or 'sum', got {reduction!r} (torchdistill's AffinityLoss "
            "treats every value other than 'mean' as 'sum')"
        )
    for name, x in (("student", student), ("teacher", teacher)):
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
        if not x.is_floating_point():
            raise TypeError(f"{name} must have a floating-point dtype, got {x.dtype}")
        if x.dim() < 3:
            raise ValueError(
                f"{name} must be at least 3-D [B, C, *spatial], got shape {tuple(x.shape)}"
            )
    if student.shape != teacher.shape:
        raise ValueError(
            "student and teacher must have the same shape [B, C, *spatial] (channel c of the "
            f"student is paired with channel c of the teacher), got {tuple(student.shape)} and "
            f"{tuple(teacher.shape)}"
        )
    if student.device != teacher.device:
        raise ValueError(
            f"student and teacher must be on the same device, got {student.device} and "
            f"{teacher.device}"
        )
    out_dtype = torch.promote_types(
        torch.promote_types(student.dtype, teacher.dtype), torch.float32
    )
    n = math.prod(student.shape[2:])

    def unit(x):
        x = x.flatten(2).to(torch.float64)
        norm = torch.linalg.vector_norm(x, dim=2, keepdim=True)
        return x / torch.where(norm > 0, norm, torch.ones_like(norm))

    a, t = unit(student), unit(teacher)
    na, nt = (a * a).sum(2), (t * t).sum(2)  # 1 up to rounding (0 for an all-zero channel)
    dot = (a * t).sum(2)
    coef = torch.where(na > 0, dot / torch.where(na > 0, na, torch.ones_like(na)), 0.0)
    perp = t - coef.unsqueeze(2) * a
    q = (na - nt).square() + 2.0 * na * perp.square().sum(2)  # ||a a^T - t t^T||_F^2, [B, C]
    pos = q > 0
    # sqrt with a zero (not NaN) gradient at q = 0.
    frob = torch.where(pos, torch.sqrt(torch.where(pos, q, torch.ones_like(q))), 0.0)
    per_sample = frob.sum(1) / n
    loss = per_sample.mean() if reduction == "mean" else per_sample.sum()
    return loss.to(out_dtype)


class AffinityLoss(nn.Module):
    """Memory-free drop-in for torchdistill's ``AffinityLoss``: same arguments, same value.

    Reads ``student_io_dict[student_module_path][student_module_io]`` and the teacher's likewise and
    returns :func:`channel_affinity_loss` of them (see there for the math). torchdistill's
    implementation keeps a [B, N, N] product per channel for backward (N = H W: about 80 GiB at
    128 x 128, C = 10, B = 8); this one needs O(B C N).
    """

    def __init__(
        self,
        student_module_path,
        teacher_module_path,
        student_module_io="output",
        teacher_module_io="output",
        reduction="mean",
    ):
        super().__init__()
        self.student_ref = _io_ref(
            "AffinityLoss", "student", {"path": student_module_path, "io": student_module_io}
        )
        self.teacher_ref = _io_ref(
            "AffinityLoss", "teacher", {"path": teacher_module_path, "io": teacher_module_io}
        )
        if reduction not in ("mean", "sum"):
            raise ValueError(
                f"reduction must be 'mean' or 'sum', got {reduction!r} (torchdistill's "
                "AffinityLoss treats every value other than 'mean' as 'sum')"
            )
        self.reduction = reduction

    def forward(self, student_io_dict, teacher_io_dict, *args, **kwargs):
        s = _lookup("AffinityLoss", student_io_dict, *self.student_ref, "student", "input")
        t = _lookup("AffinityLoss", teacher_io_dict, *self.teacher_ref, "teacher", "input")
        return channel_affinity_loss(s, t, reduction=self.reduction)

    def extra_repr(self):
        return (
            f"student={self.student_ref}, teacher={self.teacher_ref}, reduction={self.reduction!r}"
        )


def _wrap_if_distributed(module, device, device_ids, distributed, find_unused_parameters=None):
    """torchdistill's ``wrap_if_distributed`` semantics (the registered class uses the original)."""
    if device is not None:
        module.to(device)
    if distributed and any(p.requires_grad for p in module.parameters()):
        if find_unused_parameters is None:
            find_unused_parameters = any(not p.requires_grad for p in module.parameters())
        return nn.parallel.DistributedDataParallel(
            module, device_ids=device_ids, find_unused_parameters=find_unused_parameters
        )
    return module


class FAAdapters(nn.Module):
    """Student wrapper that owns trainable 1x1 adapters applied to hooked student features.

    The paper's FAQD code passes each student feature map through a trainable 1x1 conv (+ ReLU)
    before the FA loss. torchdistill optimizes the models (student, and their auxiliary wrappers),
    never a criterion's parameters, so the adapters live here, as torchdistill's own connectors do
    (``Connector4DAB``). ``forward`` is the student's; after it torchdistill calls
    ``secondary_forward(io_dict)``, which applies adapter ``name`` to
    ``io_dict[path][io]`` and stores the result as ``io_dict["adapter_dict.<name>"]["output"]``
    (the adapter's own module path, so a ``forward_hook`` entry for it is optional).

    Config (``train.student.auxiliary_model_wrapper``)::

        key: 'ffa.FAAdapters'
        kwargs:
          adapters:
            layer1: {path: 'student_model.layer1', io: 'output', in_channels: 16}
            # optional: out_channels (default in_channels), relu (True), bias (True)

    Paths are io_dict keys, i.e. paths inside this wrapper (the student is ``student_model``): list
    the same paths under ``train.student.forward_hook.output``. Each adapter maps [B, Cin, H, W] to
    [B, Cout, H, W]: ``Conv2d(Cin, Cout, 1, bias=bias)`` then ``ReLU`` when ``relu``.
    """

    _wrap = staticmethod(_wrap_if_distributed)

    def __init__(
        self,
        student_model=None,
        adapters=None,
        device=None,
        device_ids=None,
        distributed=False,
        find_unused_parameters=None,
        teacher_model=None,
    ):
        super().__init__()
        if teacher_model is not None:
            raise ValueError(
                "FAAdapters wraps the student (train.student.auxiliary_model_wrapper); it was "
                "given a teacher_model"
            )
        if not isinstance(student_model, nn.Module):
            raise TypeError(
                f"student_model must be an nn.Module, got {type(student_model).__name__}"
            )
        if not isinstance(adapters, Mapping) or not adapters:
            raise ValueError(
                "adapters must be a non-empty mapping {name: {path, io, in_channels, "
                f"out_channels, relu, bias}}, got {adapters!r}"
            )
        self.student_model = self._wrap(
            student_model, device, device_ids, distributed, find_unused_parameters
        )
        self.adapter_dict = nn.ModuleDict()
        self.sources: dict[str, tuple[str, str]] = {}
        allowed = {"path", "io", "in_channels", "out_channels", "relu", "bias"}
        for name, cfg in adapters.items():
            where = f"adapters[{name!r}]"
            if not isinstance(name, str) or not name or "." in name:
                raise ValueError(
                    f"FAAdapters: adapter names must be strings without '.', got {name!r}"
                )
            if not isinstance(cfg, Mapping):
                raise ValueError(f"FAAdapters: {where} must be a mapping, got {cfg!r}")
            unknown = sorted(set(cfg) - allowed)
            if unknown:
                raise ValueError(
                    f"FAAdapters: {where} has unknown keys {unknown}; expected {sorted(allowed)}"
                )
            ref = _io_ref("FAAdapters", where, {k: cfg[k] for k in ("path", "io") if k in cfg})
            cin = cfg.get("in_channels")
            cout = cfg.get("out_channels", cin)
            for key, c in (("in_channels", cin), ("out_channels", cout)):
                if isinstance(c, bool) or not isinstance(c, int) or c < 1:
                    raise ValueError(
                        f"FAAdapters: {where}['{key}'] must be a positive int, got {c!r}"
                    )
            relu, bias = cfg.get("relu", True), cfg.get("bias", True)
            for key, v in (("relu", relu), ("bias", bias)):
                if not isinstance(v, bool):
                    raise ValueError(
                        f"FAAdapters: {where}['{key}'] must be true or false, got {v!r}"
                    )
            layers = [nn.Conv2d(cin, cout, 1, bias=bias)]
            if relu:
                layers.append(nn.ReLU())
            self.adapter_dict[name] = self._wrap(
                nn.Sequential(*layers), device, device_ids, distributed, find_unused_parameters
            )
            self.sources[name] = ref

    def forward(self, *args, **kwargs):
        return self.student_model(*args, **kwargs)

    def secondary_forward(self, io_dict):
        """Applies each adapter to its hooked feature; stores it under ``adapter_dict.<name>``."""
        for name, (path, io) in self.sources.items():
            x = _lookup("FAAdapters", io_dict, path, io, "student", f"adapters[{name!r}]")
            io_dict.setdefault(ADAPTER_PREFIX + name, {})["output"] = self.adapter_dict[name](x)

    def post_epoch_process(self, *args, **kwargs):
        pass
