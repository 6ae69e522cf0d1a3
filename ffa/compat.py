"""Drop-in names for users of the paper's released FAQD scripts.

The released code (Li, Yang, Yin, Qi, Xin, arXiv 2302.10899) defines ``fa_loss``, ``fast_fa_loss``,
``quantize_bw``, ``quantize_tnn`` and ``quantize_fbit`` in each training script. Replacing those
definitions by ``from ffa.compat import fa_loss, fast_fa_loss, quantize_bw, quantize_tnn,
quantize_fbit`` keeps the names, the signatures and the values, computed by ffa's fused kernels
(never an N x N matrix).

Deliberate differences from the released code:

- ``fast_fa_loss`` does not call ``torch.manual_seed(1)``: the released code reseeds the global RNG
  on every call, which fixes Z forever and resets the user's random stream. Here a fresh Z is drawn
  on every call from ``generator`` (default: the device's default generator), or ``projection`` is
  used as given. Values therefore match the released code only for the same Z.
- ``fast_fa_loss`` adds eps=1e-5 to the pixel norms, as ``fa_loss`` already does: the released
  estimator divides by the bare norm, so an all-zero pixel (common after a ReLU) gives NaN. The
  value differs from the released one by a relative O(eps / pixel norm).
- Any device and dtype (the released code hard-codes ``.cuda()``); float16/bfloat16 accumulate in
  float32.
- The quantizers return a fake-quantized copy whose gradient to the input is the identity
  (straight-through); the released code applies them to ``.data`` outside autograd, where this
  makes no difference.
- ``order=2`` (both losses) keeps the released square root of the batch sum. Where that sum is
  exactly 0 (student affinity equal to the teacher's) the value and the gradient are 0, as the
  released ``fa_loss``'s ``.norm()`` gives; the released ``fast_fa_loss``'s bare ``torch.sqrt``
  gives a NaN gradient there. ffa's own ``p=2`` is different: the mean of squares, no root.

Reproducing released runs (the README's "Reproducing the released code" has the details):

- The released Z: on the CPU, ``fast_fa_loss(..., generator=torch.Generator().manual_seed(1))``
  (a fresh generator per call, as the released ``torch.manual_seed(1)``) draws the released Z bit
  for bit for float32 features; on CUDA ffa draws Z in its kernels, so pass the released Z as
  ``projection=torch.randn(h * w, dim, generator=torch.Generator().manual_seed(1)).cuda()``.
- The released ``QuantReLU`` runs every backward with the settings of the last forward's
  ``QuantReLU`` (class attributes), so released runs may not learn their steps at all:
  ``ffa.quant.QuantReLU(bits, learn_alpha=False)`` reproduces such runs.
- The quantizer scales are summed in float64 here, in float32 there: they can differ by 1 ulp,
  enough to change a w4a4 trajectory. Released float32 FA values differ from ffa's by ~1e-3
  relative at 32x32 (B=8, C=64): ffa's are the accurate ones (float64 accumulation).
"""

from __future__ import annotations

import torch

from .functional import fast_feature_affinity_loss, feature_affinity_loss
from .quant import quantize_weight

__all__ = ["fa_loss", "fast_fa_loss", "quantize_bw", "quantize_tnn", "quantize_fbit"]


def _sqrt(x):
    """sqrt(x) with gradient 0 rather than inf * 0 = NaN where x = 0 (the subgradient that
    ``torch.norm`` takes at 0); NaN stays NaN."""
    zero = x == 0
    return torch.where(
        zero, torch.zeros_like(x), torch.sqrt(torch.where(zero, torch.ones_like(x), x))
    )


def _check_order(order):
    if isinstance(order, bool) or order not in (1, 2):
        raise ValueError(f"order must be 1 or 2, got {order!r}")


def fa_loss(feat, ref_feat, order=1):
    """The released ``fa_loss``: exact FA summed over the batch.

    ``order=1``: sum_b mean_ij |D_ij| (``(A_S - A_T).norm(p=1) / (h*w)^2`` in the released code).
    ``order=2``: sqrt(sum_b sum_ij D_ij^2) / (h*w) (``norm(p=2) / (h*w)``). The teacher
    ``ref_feat`` is resized to the student's (h, w) bilinearly with align_corners=True; pixels are
    normalized with eps=1e-5, as released.
    """
    _check_order(order)
    if order == 1:
        return feature_affinity_loss(feat, ref_feat, p=1, reduction="sum")
    # sum_b sum_ij D^2 / N^2 = sum_b FA_p2_b, so norm(D) / N = sqrt(sum_b FA_p2_b).
    return _sqrt(feature_affinity_loss(feat, ref_feat, p=2, reduction="sum"))


def fast_fa_loss(feat, ref_feat, dim=15, order=1, *, generator=None, projection=None):
    """The released ``fast_fa_loss``: the FFA estimator with ``dim`` probes, summed over the batch.

    With Z [N, dim] i.i.d. N(0, 1) shared by the batch and Y = D Z: ``order=1`` gives
    sum_b sum_i mean_k |Y_ik| / N^2 (ffa's FFA p=1 with reduction "sum"); ``order=2`` gives
    sqrt(sum_b sum_i mean_k Y_ik^2) / N, as released.

    ``generator``: the ``torch.Generator`` Z is drawn from (fresh Z on every call; never reseeded).
    ``projection``: an explicit Z ([N, dim] or [B, N, dim]) used instead (``dim`` is then ignored).
    See the module docstring for the differences from the released code (no global reseed, eps).
    """
    _check_order(order)
    if order == 1:
        return fast_feature_affinity_loss(
            feat, ref_feat, k=dim, p=1, reduction="sum", generator=generator, projection=projection
        )
    # sum_b sum_i mean_k Y^2 = N^2 * sum_b FFA_p2_b, so sqrt(...) / N = sqrt(sum_b FFA_p2_b).
    return _sqrt(
        fast_feature_affinity_loss(
            feat, ref_feat, k=dim, p=2, reduction="sum", generator=generator, projection=projection
        )
    )


def quantize_bw(kernel):
    """The released 1-bit (binary) projection: mean(|w|) * sign(w) (ffa.quant, bits=1)."""
    return quantize_weight(kernel, 1)


def quantize_tnn(kernel):
    """The released ternary projection (ffa.quant, bits=2).

    delta = min(0.7 mean|w|, 100); mask = |w| >= delta; scale = mean(|w| * mask) over all
    entries; result scale * mask * sign(w).
    """
    return quantize_weight(kernel, 2)


def quantize_fbit(kernel):
    """The released 4-bit projection (ffa.quant, bits=4).

    delta = min(max|w| / 15, 10); level q = 0 for |w| <= delta, q for (2q-1) delta < |w| <=
    (2q+1) delta (q = 1..6), 7 above 13 delta; least-squares scale sum(|w| q) / sum(q^2); result
    scale * q * sign(w).
    """
    return quantize_weight(kernel, 4)
