r"""Low-bit fake quantizers: the FAQD paper's weight quantizers and quantized ReLU, and an affine
``fake_quantize`` matching torch's ops.

Weight quantizers (Li, Yang, Yin, Qi, Xin, arXiv 2302.10899, as its released code computes them),
with :math:`a = |w|`, means and maxima over the tensor (or over each output channel, dim 0):

- ``bits=1``: :math:`\mathrm{mean}(a)\,\mathrm{sign}(w)`.
- ``bits=2`` (ternary): :math:`\delta = \min(0.7\,\mathrm{mean}(a), 100)`,
  mask :math:`m = [a \ge \delta]`, scale :math:`s = \mathrm{mean}(a\,m)` over *all* entries
  (as the released code does, unlike TWN); result :math:`s\,m\,\mathrm{sign}(w)`.
- ``bits=b >= 3``: :math:`Q = 2^{b-1}-1`, :math:`\delta = \min(\max(a) / (2^b-1), 10)`; level
  :math:`q = 0` for :math:`a \le \delta`, :math:`q` for :math:`(2q-1)\delta < a \le (2q+1)\delta`
  (:math:`q = 1..Q-1`), :math:`Q` for :math:`a > (2Q-1)\delta`; least-squares scale
  :math:`s = \sum a q / \sum q^2` (0 when every level is 0); result :math:`s\,q\,\mathrm{sign}(w)`.
  ``bits=4`` is the released code's 4-bit quantizer (levels 0..7, thresholds at odd multiples of
  max/15, capped at 10), ``bits=8`` its 8-bit one; 3, 5, 6, 7 follow the same rule. Thresholds
  :math:`k\delta` are rounded in the compute dtype exactly as the released code rounds them, so
  ties land on the same side.

float16/bfloat16 inputs are computed in float32 and rounded back; float32 and float64 in their own
dtype (sums accumulate in float64, so a scale can differ by 1 ulp from the released float32 sums:
enough to change a w4a4 trajectory, not the method). An all-zero tensor (or channel) gives zeros,
never NaN. A NaN weight makes the statistics of its tensor (per channel: its channel) NaN, and so
every output there, at every width and on every device (``ffa.reference.quantize_weight`` states
the same rule).
"""

from __future__ import annotations

import math
import numbers

import torch

from ._ops import check_device, ops

__all__ = ["quantize_weight", "quant_relu", "fake_quantize", "DEFAULT_ALPHA", "STE", "ALPHA_GRAD"]

SUPPORTED_BITS = (1, 2, 3, 4, 5, 6, 7, 8)
#: Initial quantized-ReLU steps of the released code, per activation bit width.
DEFAULT_ALPHA = {1: 1.2221, 2: 0.6511, 4: 0.1946}
STE = ("inplt", "idnty", "relu")
ALPHA_GRAD = ("mean", "ae", "pact", "min")


def _is_int(v) -> bool:
    return isinstance(v, numbers.Integral) and not isinstance(v, bool)


def _is_real(v) -> bool:
    return isinstance(v, numbers.Real) and not isinstance(v, bool)


def _is_finite(v) -> bool:
    # Not math.isfinite: under torch.compile(dynamic=True) a float argument is a SymFloat, which
    # comparisons accept and math.isfinite does not. NaN fails both comparisons.
    return _is_real(v) and -math.inf < v < math.inf


def check_bits(bits, name: str = "bits") -> int:
    if not _is_int(bits) or int(bits) not in SUPPORTED_BITS:
        raise ValueError(f"{name} must be one of 1, 2, ..., 8, got {bits!r}")
    return int(bits)


def _check_floating(x, name: str) -> None:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if not x.is_floating_point():
        raise TypeError(f"{name} must have a floating-point dtype, got {x.dtype}")


def check_relu_options(ste, alpha_grad, rate) -> None:
    if ste not in STE:
        raise ValueError(f"ste must be one of {STE}, got {ste!r}")
    if alpha_grad not in ALPHA_GRAD:
        raise ValueError(f"alpha_grad must be one of {ALPHA_GRAD}, got {alpha_grad!r}")
    if not _is_finite(rate):
        raise ValueError(f"rate must be a finite number, got {rate!r}")


def check_alpha_value(alpha) -> float:
    if not _is_finite(alpha) or not alpha > 0:
        raise ValueError(f"alpha must be a positive number, got {alpha!r}")
    return float(alpha)


def quantize_weight(w: torch.Tensor, bits: int, *, per_channel: bool = False) -> torch.Tensor:
    """Fake-quantized copy of ``w`` with the paper's rule for ``bits`` (see the module docstring).

    The gradient to ``w`` is straight-through (identity), so training updates the float latent
    weight, as the released code's weight swap does.

    Args:
        w: floating tensor (any shape; any layout, the output keeps it).
        bits: 1, 2, ..., 8.
        per_channel: one delta and scale per output channel (dim 0); needs ``w.dim() >= 2``.

    Returns:
        A tensor like ``w``.
    """
    _check_floating(w, "w")
    bits = check_bits(bits)
    if not isinstance(per_channel, bool):
        raise TypeError(f"per_channel must be a bool, got {type(per_channel).__name__}")
    if per_channel and w.dim() < 2:
        raise ValueError(
            "per_channel=True needs w with at least 2 dims (one scale per output channel, dim 0), "
            f"got shape {tuple(w.shape)}"
        )
    return ops.quantize_weight(w, bits, per_channel)


def quant_relu(
    x: torch.Tensor,
    alpha,
    bits: int,
    *,
    ste: str = "inplt",
    alpha_grad: str = "mean",
    rate: float = 0.01,
) -> torch.Tensor:
    r"""The released code's quantized ReLU with step :math:`\alpha` and :math:`L = 2^{bits} - 1`.

    :math:`\alpha` is clamped to [1e-3, 5] on the device (no host sync). Forward: 0 for
    :math:`x \le 0`, :math:`\lceil x/\alpha \rceil \alpha` for :math:`0 < x \le \alpha(L-1)`,
    :math:`L\alpha` above. Backward to ``x`` (straight-through): ``ste="inplt"`` passes the gradient
    where :math:`0 < x \le L\alpha`, ``"idnty"`` everywhere, ``"relu"`` where :math:`x > 0`.
    Backward to ``alpha``: :math:`\mathrm{clamp}(rate \sum g\,g_0, -1, 1)`, where :math:`g_0 = L`
    above the top threshold and, inside: ``"mean"``: :math:`2^{bits-1}` on :math:`(0, L\alpha]`;
    ``"ae"``: :math:`\lceil x/\alpha \rceil` on :math:`(0, (L-1)\alpha]` (L above
    :math:`(L-1)\alpha`); ``"pact"``: 0; ``"min"``: 1 on :math:`(0, L\alpha]`.

    A NaN ``x`` stays NaN (its gradient passes as for an in-range ``x``, and it adds nothing to
    the step's gradient); +Inf gives :math:`L\alpha`, -Inf gives 0.

    Args:
        x: floating tensor; float16/bfloat16 are computed in float32.
        alpha: a one-element floating tensor (it gets the gradient) on ``x``'s device (or a CPU
            tensor), or a positive number.
        bits: 1, 2, ..., 8.
    """
    _check_floating(x, "x")
    bits = check_bits(bits)
    check_relu_options(ste, alpha_grad, rate)
    if isinstance(alpha, torch.Tensor):
        _check_floating(alpha, "alpha")
        if alpha.numel() != 1:
            raise ValueError(f"alpha must have one element, got shape {tuple(alpha.shape)}")
        check_device(alpha, "alpha", x, cpu_scalar_ok=True)
    else:
        alpha = torch.tensor([check_alpha_value(alpha)], dtype=torch.float32, device=x.device)
    return ops.quant_relu(x, alpha, bits, ste, alpha_grad, float(rate))


def _qparam(value, *, integral: bool, count: int | None, device) -> torch.Tensor:
    """A Python number as a qparam tensor (0-d, or [count] per channel)."""
    dtype = torch.int64 if integral else torch.float32
    if count is None:
        return torch.tensor(value, dtype=dtype)
    return torch.full((count,), value, dtype=dtype, device=device)


def fake_quantize(
    x: torch.Tensor,
    scale,
    zero_point,
    qmin: int,
    qmax: int,
    *,
    axis: int | None = None,
    learnable: bool = False,
    grad_factor: float = 1.0,
) -> torch.Tensor:
    r"""Affine fake quantization, value for value and gradient for gradient torch's ops.

    :math:`y = (\mathrm{clamp}(z + \mathrm{rint}(x \cdot (1/s)), q_{min}, q_{max}) - z)\, s`
    with torch's rounding (``1/s`` in float32, ties to even), per tensor (``axis=None``, as
    ``torch.fake_quantize_per_tensor_affine``) or per channel along ``axis`` (as
    ``torch.fake_quantize_per_channel_affine``; a floating ``zero_point`` tensor then uses torch's
    float-zero-point formula). The gradient to ``x`` passes where the unclamped level lies in
    :math:`[q_{min}, q_{max}]`.

    With ``learnable=True`` it is torch's LSQ op
    (``torch._fake_quantize_learnable_per_tensor_affine`` / ``_per_channel_affine``): the zero
    point is rounded and clamped to :math:`[q_{min}, q_{max}]` in the forward; ``scale`` and
    ``zero_point`` get LSQ gradients scaled by ``grad_factor``, with torch's backward zero point
    (per tensor :math:`\lfloor z + 0.5 \rfloor`, clamped). Unlike torch: no host sync,
    float16/bfloat16/float64 supported in the backward too, and the qparam gradients reduced inside
    the kernel (in float64, rounded once to the qparam dtype; torch sums in float32, so the last
    bits can differ) without full-size temporaries.

    Non-finite ``x``, on every device: a NaN ``x`` counts as a level below ``qmin``, as in torch
    (its int64 level of a NaN is INT64_MIN on x86-64 and NVIDIA GPUs): the output is
    :math:`(q_{min} - z) s`, the ``x`` gradient 0, and the LSQ gradients those of the clamped
    branch, so a NaN activation never makes a learned scale NaN. +-Inf and levels
    beyond int64 saturate to ``qmax`` / ``qmin`` (torch's per-tensor op does the same; its CPU
    per-channel and LSQ-backward kernels turn +Inf into ``qmin``, an artefact of the x86
    conversion that ffa does not reproduce).

    Args:
        x: floating tensor, any layout.
        scale: positive number, or a floating tensor with one element (per tensor) or ``[C]``.
            Tensor qparams live on ``x``'s device; per tensor, a one-element CPU tensor is also
            accepted for a CUDA ``x`` (read on the host).
        zero_point: integer in ``[qmin, qmax]``, or an integer/floating tensor like ``scale``
            (``learnable=True``: a floating tensor, to learn it).
        qmin, qmax: integers, ``qmin < qmax``.
        axis: channel axis for per-channel quantization (negative counts from the end).
        learnable: LSQ gradients for ``scale`` and ``zero_point``.
        grad_factor: multiplies the ``scale``/``zero_point`` gradients (learnable only).

    Tensor-valued ``scale``/``zero_point`` are validated (positive scale, zero point in range) on
    CPU; on CUDA they are not read back (that would be a host sync).
    """
    _check_floating(x, "x")
    if not _is_int(qmin) or not _is_int(qmax):
        raise TypeError(f"qmin and qmax must be integers, got {qmin!r} and {qmax!r}")
    if not qmin < qmax:
        raise ValueError(f"qmin must be less than qmax, got qmin={qmin} and qmax={qmax}")
    if axis is not None:
        if not _is_int(axis):
            raise TypeError(f"axis must be an integer or None, got {axis!r}")
        if not -x.dim() <= axis < x.dim():
            raise ValueError(
                f"axis must be in [{-x.dim()}, {x.dim()}) for x of shape "
                f"{tuple(x.shape)}, got {axis}"
            )
        axis = int(axis) % x.dim()
    if not isinstance(learnable, bool):
        raise TypeError(f"learnable must be a bool, got {type(learnable).__name__}")
    if not _is_finite(grad_factor):
        raise ValueError(f"grad_factor must be a finite number, got {grad_factor!r}")
    count = None if axis is None else x.shape[axis]

    if isinstance(scale, torch.Tensor):
        _check_floating(scale, "scale")
    elif _is_real(scale):
        if not (_is_finite(scale) and scale > 0):
            raise ValueError(f"scale must be a positive number, got {scale!r}")
        scale = _qparam(float(scale), integral=False, count=count, device=x.device)
    else:
        raise TypeError(f"scale must be a number or a tensor, got {type(scale).__name__}")

    if isinstance(zero_point, torch.Tensor):
        if zero_point.dtype == torch.bool or zero_point.is_complex():
            raise TypeError(
                f"zero_point must be an integer or floating tensor, got {zero_point.dtype}"
            )
    elif _is_real(zero_point):
        if not learnable and not float(zero_point).is_integer():
            raise ValueError(f"zero_point must be an integer, got {zero_point!r}")
        if not learnable and not qmin <= zero_point <= qmax:
            raise ValueError(
                f"zero_point must lie in [qmin, qmax] = [{qmin}, {qmax}], got {zero_point!r}"
            )
        zero_point = _qparam(
            int(zero_point) if not learnable else float(zero_point),
            integral=not learnable,
            count=count,
            device=x.device,
        )
    else:
        raise TypeError(f"zero_point must be a number or a tensor, got {type(zero_point).__name__}")

    check_device(scale, "scale", x, cpu_scalar_ok=axis is None)
    check_device(zero_point, "zero_point", x, cpu_scalar_ok=axis is None)
    return ops.fake_quantize(
        x, scale, zero_point, int(qmin), int(qmax), axis, learnable, float(grad_factor)
    )
