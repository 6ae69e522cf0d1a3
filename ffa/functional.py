"""Functional feature-affinity losses: exact FA and the fast randomized FFA estimator.

Definitions (Li, Yang, Yin, Qi, Xin, arXiv 2302.10899). Student S [B,Cs,H,W], teacher
T [B,Ct,H',W']; Cs may differ from Ct. A teacher of another resolution is resized to (H,W)
bilinearly with align_corners=True. N = H*W. Unit pixels u_i = s_i / (||s_i||_2 + eps) over
channels (an all-zero pixel gives a zero vector), A = U^T U (N x N), D = A_S - A_T.
"""

from __future__ import annotations

import torch

from ._ops import compute_dtype, ops, philox_seed_offset
from .reference import reduce, resize_teacher

__all__ = ["feature_affinity_loss", "fast_feature_affinity_loss"]

_REDUCTIONS = ("mean", "sum", "none")


def _check_options(p, reduction, eps):
    if isinstance(p, bool) or not isinstance(p, int) or p not in (1, 2):
        raise ValueError(f"p must be 1 or 2, got {p!r}")
    if reduction not in _REDUCTIONS:
        raise ValueError(f"reduction must be one of {_REDUCTIONS}, got {reduction!r}")
    # Any finite eps > 0 works (norms are formed in float64, scale-safe); inf would zero every
    # unit pixel and make the loss identically 0.
    if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not 0 < eps < float("inf"):
        raise ValueError(f"eps must be a positive finite number, got {eps!r}")


def _prepare(student, teacher):
    """Validates the pair, resizes the teacher, promotes both to one dtype."""
    for name, x in (("student", student), ("teacher", teacher)):
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
        if x.dim() != 4:
            raise ValueError(
                f"{name} must be a 4-D tensor [B, C, H, W], got shape {tuple(x.shape)}"
            )
        if not x.is_floating_point():
            raise TypeError(f"{name} must have a floating-point dtype, got {x.dtype}")
        if x.shape[1] == 0 or x.shape[2] == 0 or x.shape[3] == 0:
            raise ValueError(f"{name} must have C, H, W > 0, got shape {tuple(x.shape)}")
    if student.shape[0] != teacher.shape[0]:
        raise ValueError(
            f"student and teacher batch sizes differ: {student.shape[0]} vs {teacher.shape[0]}"
        )
    if student.device != teacher.device:
        raise ValueError(
            f"student and teacher must be on the same device, got {student.device} and "
            f"{teacher.device}"
        )
    dtype = torch.promote_types(student.dtype, teacher.dtype)
    teacher = resize_teacher(teacher.to(dtype), student.shape[-2:])
    return student.to(dtype), teacher


def _default_cuda_generator(device: torch.device) -> torch.Generator:
    index = device.index if device.index is not None else torch.cuda.current_device()
    return torch.cuda.default_generators[index]


def feature_affinity_loss(student, teacher, *, p=1, reduction="mean", eps=1e-5):
    r"""Exact feature-affinity loss, computed without the N x N matrices.

    Per sample: ``p=1`` gives :math:`\frac{1}{N^2}\sum_{ij}|D_{ij}|` (the paper's FA loss), ``p=2``
    gives :math:`\frac{1}{N^2}\sum_{ij}D_{ij}^2`. ``reduction`` is ``"mean"`` over the batch
    (default), ``"sum"`` (p=1 "sum" is the value of the paper's released code) or ``"none"``
    (shape [B]).

    p=1 runs a tiled O(N^2 C) kernel with O(N C) memory (symmetric: upper-triangle tiles only).
    p=2 takes the cheaper of two exact forms: when N >= Cs + Ct, the identity ||D||_F^2 =
    ||U_S U_S^T||^2 + ||U_T U_T^T||^2 - 2 ||U_S U_T^T||^2 on channel Gram matrices accumulated in
    float64 (O(N C^2), clamped at 0 against rounding); otherwise the tiled kernel of p=1
    (O(N^2 C)). Neither builds N x N. Student and teacher equal give exactly 0 (value and
    gradient).

    Args:
        student: [B, Cs, H, W] floating tensor (any layout: contiguous, channels_last, strided).
        teacher: [B, Ct, H', W'], same batch and device; resized to (H, W) if needed.
        p: 1 or 2.
        reduction: "mean", "sum" or "none".
        eps: added to each pixel norm; > 0.

    Returns:
        float32 (float64 for float64 inputs) scalar, or [B] with ``reduction="none"``. float16 and
        bfloat16 inputs are accumulated in float32. An empty batch gives ``sum`` 0, ``none`` an
        empty tensor, and ``mean`` NaN, as ``torch.mean`` of an empty tensor does.
    """
    _check_options(p, reduction, eps)
    student, teacher = _prepare(student, teacher)
    # The CUDA p=1 kernel follows torch's TF32 switch for matmuls (read here: the native code
    # cannot reach torch's global context through the stable ABI).
    tf32 = student.is_cuda and torch.backends.cuda.matmul.allow_tf32
    return reduce(ops.fa_loss(student, teacher, p, float(eps), tf32), reduction)


def fast_feature_affinity_loss(
    student,
    teacher,
    *,
    k=15,
    p=1,
    reduction="mean",
    eps=1e-5,
    generator=None,
    projection=None,
):
    r"""Fast feature-affinity loss (FFA): a randomized estimator with k Gaussian probes.

    With Z [N, k] i.i.d. N(0, 1), per sample: ``p=1`` gives :math:`\frac{1}{N^2}\sum_i
    \mathrm{mean}_k|(DZ)_{ik}|` (the paper's estimator), ``p=2`` gives
    :math:`\frac{1}{N^2}\sum_i \mathrm{mean}_k (DZ)_{ik}^2`, with DZ = U_S^T(U_S Z) - U_T^T(U_T Z):
    O(N k C) work, never N x N.

    What it estimates: ``p=2`` is unbiased for exact FA p=2. ``p=1`` is *not* an estimate of exact
    FA p=1: E|(DZ)_ik| = sqrt(2/pi) ||D_i||_2, so its expectation is
    sqrt(2/pi) * sum_i ||D_i||_2 / N^2, roughly a factor sqrt(N) below FA p=1
    (:func:`ffa.reference.ffa_p1_expectation` computes it).

    Args:
        student, teacher, p, reduction, eps: as in :func:`feature_affinity_loss`.
        k: number of probes (>= 1); ignored when ``projection`` is given.
        generator: the ``torch.Generator`` a fresh Z is drawn from on every call (default: the
            device's default generator). ffa never reseeds any generator. On CUDA (eager), Z is
            generated inside the kernels from the generator's Philox seed and offset (advanced
            the way torch's CUDA random ops do) and never stored.
        projection: an explicit Z, [N, k] (shared by the batch) or [B, N, k], used as given (a
            constant: no gradient flows to it); k is taken from it.
    """
    _check_options(p, reduction, eps)
    student, teacher = _prepare(student, teacher)
    b, _, h, w = student.shape
    n = h * w
    cdtype = compute_dtype(student.dtype)
    if projection is None:
        if isinstance(k, bool) or not isinstance(k, int) or k < 1:
            raise ValueError(f"k must be a positive int, got {k!r}")
        if student.is_cuda and not torch.compiler.is_compiling():
            # Z is generated inside the CUDA kernels from the generator's Philox (seed, offset) and
            # never stored. Under torch.compile the traceable torch.randn path below is used.
            gen = generator if generator is not None else _default_cuda_generator(student.device)
            seed, offset = philox_seed_offset(gen, n * k)
            loss = ops.ffa_loss_philox(student, teacher, k, p, float(eps), seed, offset)[0]
            return reduce(loss, reduction)
        # generator=None is left out: randn's generator overload needs concrete sizes, so passing
        # it breaks torch.compile with dynamic shapes.
        extra = {} if generator is None else {"generator": generator}
        z = torch.randn((1, n, k), device=student.device, dtype=cdtype, **extra)
    else:
        if not isinstance(projection, torch.Tensor):
            raise TypeError(f"projection must be a torch.Tensor, got {type(projection).__name__}")
        if not projection.is_floating_point():
            raise TypeError(f"projection must have a floating-point dtype, got {projection.dtype}")
        if projection.device != student.device:
            raise ValueError(f"projection must be on {student.device}, got {projection.device}")
        z = projection.detach()
        if z.dim() == 2:
            z = z.unsqueeze(0)
        if z.dim() != 3 or z.shape[1] != n or z.shape[0] not in (1, b) or z.shape[2] < 1:
            raise ValueError(
                f"projection must have shape [N, k] or [B, N, k] with N={n}, B={b}, k>=1; got "
                f"{tuple(projection.shape)}"
            )
        z = z.to(cdtype)
    loss = ops.ffa_loss(student, teacher, z, p, float(eps))[0]
    return reduce(loss, reduction)
