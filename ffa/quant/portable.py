"""The portable kernels of the quantization ops: torch tensor ops only, for any device.

One function per native op of ``ffa.quant`` (schemas in csrc/ops.cpp), with the op's exact
signature and output contract: the same shapes, dtypes, devices and layouts as the native kernels
(ffa/quant/_ops.py's fake kernels), empty ``[0]`` tensors for the gradients ``output_mask`` does
not ask for, the same argument errors, and the native CPU kernels' values
(csrc/cpu/quant_cpu.cpp, cpu/quant_cpu_loops.h):

- the same arithmetic in the same dtype, step for step: float16/bfloat16 computed in float32 and
  rounded back once, float64 in float64; rint (ties to even); the native comparisons and selects,
  so NaN and +-Inf take the native branches (``max_``/``min_``: a NaN maps to the bound);
- the fused multiply-adds the native kernels use where torch's kernels fuse (fake_quantize's
  float-zero-point level, the LSQ level and scale term) are emulated exactly: in float32 by the
  exact float64 product plus a round-to-odd float64 sum (one rounding to float32), in float64 by
  Dekker's exact product and Boldo-Melquiond's round-to-odd addition;
- reductions (quantize_weight's statistics, quant_relu's step gradient, the LSQ qparam gradients)
  accumulate in float64, as the native kernels do, but in torch's summation order: float64 results
  can differ from the native ones in the last bits (float32 values are almost always identical).

So fake_quantize's values and x-gradients, quant_relu's values and x-gradient and quantize_weight's
zero pattern equal the native ops bit for bit; the scale of quantize_weight and the step / qparam
gradients are equal to float64 rounding. torch's own fake-quantize ops are not used: they want
float32 scales and int32 zero points, read the LSQ qparams on the host (a sync on GPUs), keep the
LSQ backward in float32 only, and give +-Inf and NaN hardware-dependent levels (x86's int64
conversion: +Inf -> quant_min in the per-channel kernel; 0 on ARM), where ffa has one rule.

No host syncs and no Python control flow on tensor values, except where the native kernels read a
qparam on the host too: qparams that live on the CPU (a one-element CPU scale, zero point or step
with an x on another device is moved to x's device, as the CUDA kernels take it by value) are
validated there (scale > 0, zero point in range), and a gradient of such a qparam is returned on
the CPU, like the qparam (that copy waits for the device, as the native CUDA op's does).
Devices without float64 (MPS) accumulate in float32 and skip the exact fused-multiply-add
emulation (a float zero point's level can then differ at exact ties).

The emulations need every torch op rounded on its own (no contraction across ops): true for these
kernels, which the dispatcher runs eagerly (a custom op's kernel is opaque to torch.compile).

Memory: elementwise temporaries only, O(numel): a few tensors the size of x, up to about fifteen
float64 ones in the emulated float64 fused multiply-add (learnable float64 x); no blocking needed.
"""

from __future__ import annotations

import struct

import torch

from .._ops import wide_dtype as _wide
from ._ops import check_device

__all__ = [
    "quantize_weight",
    "quant_relu",
    "quant_relu_backward",
    "fake_quantize",
    "fake_quantize_backward",
]

_INF = float("inf")
_RELU_STE = ("inplt", "idnty", "relu")
_RELU_ALPHA_GRAD = ("mean", "ae", "pact", "min")


# ---- helpers -------------------------------------------------------------------------------------
def _has_f64(device: torch.device) -> bool:
    return _wide(device) == torch.float64


def _compute(x: torch.Tensor) -> torch.Tensor:
    """x in the compute dtype: float64 and float32 as they are, float16/bfloat16 in float32."""
    return x if x.dtype in (torch.float32, torch.float64) else x.float()


def _const(value: float, like: torch.Tensor) -> torch.Tensor:
    """A 0-d tensor of like's dtype on like's device (a device tensor, never a CPU scalar, so a
    division by it is a true division on every device)."""
    return torch.full((), value, dtype=like.dtype, device=like.device)


def _gt_or(v: torch.Tensor, lo) -> torch.Tensor:
    """max_(lo, v) of the native loops: lo < v ? v : lo (a NaN v gives lo)."""
    return torch.where(v > lo, v, lo)


def _lt_or(v: torch.Tensor, hi) -> torch.Tensor:
    """min_(hi, v) of the native loops: v < hi ? v : hi (a NaN v gives hi)."""
    return torch.where(v < hi, v, hi)


def _into(like: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
    """value in a fresh tensor laid out as the native kernels' output (empty_like(like)) and of
    like's dtype (one rounding from the compute dtype)."""
    return torch.empty_like(like).copy_(value)


def _float32(v: float) -> float:
    """A Python float rounded to float32 (as the native kernels take grad_factor)."""
    return struct.unpack("f", struct.pack("f", v))[0]


def _two_sum_err(a: torch.Tensor, b: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    """a + b - s exactly, for s = fl(a + b) (Knuth's TwoSum)."""
    bb = s - a
    return (a - (s - bb)) + (b - bb)


def _round_to_odd(s: torch.Tensor, err: torch.Tensor) -> torch.Tensor:
    """The float64 sum s = fl(a + b) with error err, rounded to odd instead: when inexact and s has
    an even last bit, the neighbour toward the exact sum (whose last bit is odd)."""
    even = (s.view(torch.int64) & 1) == 0
    fix = even & ((err > 0) | (err < 0)) & torch.isfinite(err)
    return torch.where(fix, torch.nextafter(s, torch.where(err > 0, _INF, -_INF)), s)


def _fma_f32(a: torch.Tensor, b: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
    """fmaf(a, b, c) for float32 tensors: a * b is exact in float64, the float64 sum rounded to odd
    is then rounded once more to float32 without double rounding (Boldo-Melquiond)."""
    if not _has_f64(a.device):
        return a * b + c
    p, cd = a.double() * b.double(), c.double()
    s = p + cd
    return _round_to_odd(s, _two_sum_err(p, cd, s)).float()


def _split(a: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    t = a * 134217729.0  # 2^27 + 1: Veltkamp's split into two 26-bit halves
    hi = t - (t - a)
    return hi, a - hi


def _fma_f64(a: torch.Tensor, b: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
    """fma(a, b, c) for float64 tensors: Dekker's exact product p + e = a * b, TwoSum(c, p), the low
    parts added with rounding to odd, one final rounding (Boldo-Melquiond's emulated FMA). Where
    the split could overflow (|a| or |b| >= 2^995) or the result is not finite, a * b + c (the
    level saturates there anyway)."""
    p = a * b
    ah, al = _split(a)
    bh, bl = _split(b)
    e = ((ah * bh - p) + ah * bl + al * bh) + al * bl
    th = c + p
    tl = _two_sum_err(c, p, th)
    v = tl + e
    r = th + _round_to_odd(v, _two_sum_err(tl, e, v))
    ok = torch.isfinite(r) & (a.abs() < 2.0**995) & (b.abs() < 2.0**995)
    return torch.where(ok, r, p + c)


def _check_floating(t: torch.Tensor, name: str) -> None:
    if not t.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor, got {t.dtype}")


def _check_bits(bits: int) -> None:
    if not 1 <= bits <= 8:
        raise ValueError(f"bits must be one of 1, 2, ..., 8, got {bits}")


def _check_grad_like_x(grad: torch.Tensor, x: torch.Tensor) -> None:
    if grad.shape != x.shape:
        raise ValueError(f"grad must have x's shape {list(x.shape)}, got {list(grad.shape)}")
    if grad.dtype != x.dtype:
        raise TypeError(f"grad must have x's dtype {x.dtype}, got {grad.dtype}")
    if grad.device != x.device:
        raise ValueError(f"grad must be on x's device ({x.device}), got {grad.device}")


def _grad_like(g: torch.Tensor, param: torch.Tensor) -> torch.Tensor:
    """A qparam gradient (float64 sums, one per channel) rounded once to the qparam's dtype, with
    its shape and device."""
    return g.to(param.dtype).reshape(param.shape).to(param.device)


# ---- quantize_weight -----------------------------------------------------------------------------
def _weight_levels(a: torch.Tensor, delta: torch.Tensor, q_top: float) -> torch.Tensor:
    """wq_level: q = #{k odd: a > fl(k delta)}, capped at Q, from an estimate fixed by one exact
    comparison each way against the thresholds rounded as the released code rounds them."""
    zero, top = _const(0.0, a), _const(q_top, a)
    qe = _lt_or(_gt_or(torch.floor((a / delta + 1.0) * 0.5), zero), top)
    up = (a > (2.0 * qe + 1.0) * delta).to(a.dtype)
    dn = (a <= (2.0 * qe - 1.0) * delta).to(a.dtype)
    return _gt_or(_lt_or(qe + up, top) - dn, zero)


def quantize_weight(weight: torch.Tensor, bits: int, per_channel: bool) -> torch.Tensor:
    """ffa::quantize_weight: the paper's weight quantizer (ffa/quant/functional.py), per tensor or
    per output channel (dim 0). Statistics in float64 (sum |w|, sum |w| q, sum q^2), the scale and
    thresholds in the compute dtype; a NaN makes its tensor (channel) NaN."""
    _check_floating(weight, "weight")
    _check_bits(bits)
    if per_channel and weight.dim() < 2:
        raise ValueError(
            "per_channel=True needs a weight with at least 2 dims (one scale per output "
            f"channel, dim 0), got a {weight.dim()}-D tensor"
        )
    if weight.numel() == 0:
        return torch.empty_like(weight)
    w = _compute(weight)
    nc = weight.shape[0] if per_channel else 1
    flat = w.reshape(nc, -1)
    a = flat.abs()
    wide = _wide(w.device)
    total = a.to(wide).sum(1, keepdim=True)
    count = _const(float(flat.shape[1]), a)
    nan = total.isnan()
    q_top = float(2 ** (bits - 1) - 1)
    if bits == 1:
        scale = total.to(w.dtype) / count
        q = None
    elif bits == 2:
        d = _const(0.7, a) * (total.to(w.dtype) / count)
        delta = torch.where(d > 100.0, _const(100.0, a), d)
        q = (a >= delta).to(w.dtype)
        kept = torch.where(a >= delta, a, _const(0.0, a))
        scale = kept.to(wide).sum(1, keepdim=True).to(w.dtype) / count
    else:
        d = a.amax(1, keepdim=True) / _const(float(2**bits - 1), a)
        delta = torch.where(d > 10.0, _const(10.0, a), d)
        q = _weight_levels(a, delta, q_top)
        qw = q.to(wide)
        saq = (a.to(wide) * qw).sum(1, keepdim=True)
        sqq = (qw * qw).sum(1, keepdim=True)
        scale = torch.where(sqq > 0, saq.to(w.dtype) / sqq.to(w.dtype), _const(0.0, a))
    scale = torch.where(nan, _const(float("nan"), a), scale)
    sign = (flat > 0).to(w.dtype) - (flat < 0).to(w.dtype)  # sign_: 0 for +-0 and NaN
    out = sign * scale if q is None else sign * (scale * q)
    return _into(weight, out.reshape(weight.shape))


# ---- quant_relu ----------------------------------------------------------------------------------
def _check_relu_args(x, alpha, bits, ste, alpha_grad) -> None:
    _check_floating(x, "x")
    _check_floating(alpha, "alpha")
    if alpha.numel() != 1:
        raise ValueError(f"alpha must have exactly one element, got shape {list(alpha.shape)}")
    check_device(alpha, "alpha", x, cpu_scalar_ok=True)
    _check_bits(bits)
    if ste not in _RELU_STE:
        raise ValueError(f"ste must be 'inplt', 'idnty' or 'relu', got '{ste}'")
    if alpha_grad not in _RELU_ALPHA_GRAD:
        raise ValueError(f"alpha_grad must be 'mean', 'ae', 'pact' or 'min', got '{alpha_grad}'")


def _step(alpha: torch.Tensor, xc: torch.Tensor) -> torch.Tensor:
    """The step clamped to [1e-3, 5] in alpha's own dtype (NaN stays NaN), as a 0-d tensor of the
    compute dtype on x's device."""
    a = alpha.detach().reshape(())
    lo, hi = _const(1e-3, a), _const(5.0, a)
    a = torch.where(a < lo, lo, torch.where(hi < a, hi, a))
    return a.to(device=xc.device, dtype=xc.dtype)


def quant_relu(
    x: torch.Tensor, alpha: torch.Tensor, bits: int, ste: str, alpha_grad: str, rate: float
) -> torch.Tensor:
    """ffa::quant_relu: 0 for x <= 0, ceil(x/a) a for 0 < x <= a(L-1), L a above (NaN stays NaN),
    a = clamp(alpha, 1e-3, 5), L = 2^bits - 1."""
    _check_relu_args(x, alpha, bits, ste, alpha_grad)
    xc = _compute(x)
    a = _step(alpha, xc)
    levels = float(2**bits - 1)
    thr1, top = a * (levels - 1.0), a * levels
    stepped = torch.ceil(xc / a) * a
    r = torch.where(xc <= 0, _const(0.0, xc), xc)
    r = torch.where((xc > 0) & (xc <= thr1), stepped, r)
    return _into(x, torch.where(xc > thr1, top, r))


def quant_relu_backward(
    grad: torch.Tensor,
    x: torch.Tensor,
    alpha: torch.Tensor,
    bits: int,
    ste: str,
    alpha_grad: str,
    rate: float,
    output_mask: list[bool],
) -> tuple[torch.Tensor, torch.Tensor]:
    """ffa::quant_relu_backward: dx = grad where the STE passes it (zeroed elsewhere); the step's
    gradient clamp(rate * sum grad g0, -1, 1) summed in float64 (a NaN sum gives -1, as the native
    std::max does), in alpha's dtype, shape and device."""
    _check_relu_args(x, alpha, bits, ste, alpha_grad)
    _check_grad_like_x(grad, x)
    want_dx, want_ga = bool(output_mask[0]), bool(output_mask[1])
    dx = x.new_empty(0)
    ga = alpha.new_empty(0)
    if not (want_dx or want_ga):
        return dx, ga
    xc, d = _compute(x), _compute(grad)
    a = _step(alpha, xc)
    levels = float(2**bits - 1)
    thr2 = a * levels
    zero = _const(0.0, xc)
    if want_dx:
        cut = torch.zeros_like(xc, dtype=torch.bool)
        if ste != "idnty":
            cut = xc <= 0
        if ste == "inplt":
            cut = cut | (xc > thr2)
        dx = _into(x, torch.where(cut, zero, d))
    if want_ga:
        ae = alpha_grad == "ae"
        thr_in = a * (levels - 1.0) if ae else thr2
        if ae:
            g_in = torch.ceil(xc / a)
        else:
            g_in = {"mean": float(2 ** (bits - 1)), "min": 1.0, "pact": 0.0}[alpha_grad]
            g_in = _const(g_in, xc)
        r = torch.where((xc > 0) & (xc <= thr_in), g_in, zero)
        g0 = torch.where(xc > thr_in, _const(levels, xc), r)
        wide = _wide(x.device)
        s = (d.to(wide) * g0.to(wide)).sum() * rate
        s = torch.where(s > -1.0, s, _const(-1.0, s))
        s = torch.where(s < 1.0, s, _const(1.0, s))
        ga = _grad_like(s, alpha)
    return dx, ga


# ---- fake_quantize -------------------------------------------------------------------------------
class _Fq:
    """The qparams of fake_quantize(_backward) as the native kernels use them, float32 tensors on
    x's device shaped to broadcast against x: inv = 1/scale, scale, zp (integral values; the raw
    float zero point in float-zero-point mode; the LSQ backward's zero point in backward_lsq)."""

    def __init__(self, x, scale, zero_point, qmin, qmax, axis, learnable, backward_lsq):
        _check_floating(x, "x")
        _check_floating(scale, "scale")
        per_channel = axis is not None
        check_device(scale, "scale", x, cpu_scalar_ok=not per_channel)
        check_device(zero_point, "zero_point", x, cpu_scalar_ok=not per_channel)
        if not qmin < qmax:
            raise ValueError(
                f"quant_min must be less than quant_max, got quant_min={qmin} and quant_max={qmax}"
            )
        if abs(qmin) > 2**24 or abs(qmax) > 2**24:
            raise ValueError("quant_min and quant_max must lie in [-2^24, 2^24]")
        if zero_point.dtype == torch.bool or zero_point.is_complex():
            raise TypeError(
                f"zero_point must be an integer or floating tensor, got {zero_point.dtype}"
            )
        shape: tuple[int, ...] = ()
        if per_channel:
            if not (x.dim() >= 1 and -x.dim() <= axis < x.dim()):
                raise ValueError(
                    f"axis must be in [{-x.dim()}, {x.dim()}) for a {x.dim()}-D x, got {axis}"
                )
            axis = axis % x.dim()
            c = x.shape[axis]
            for t, name in ((scale, "scale"), (zero_point, "zero_point")):
                if t.dim() != 1 or t.numel() != c:
                    raise ValueError(
                        f"{name} must be 1-D with one entry per channel ({c}), got shape "
                        f"{list(t.shape)}"
                    )
            shape = (c,) + (1,) * (x.dim() - axis - 1)
        else:
            for t, name in ((scale, "scale"), (zero_point, "zero_point")):
                if t.numel() != 1:
                    raise ValueError(
                        f"{name} must have one element for per-tensor quantization, got shape "
                        f"{list(t.shape)}"
                    )
        self.axis, self.per_channel = axis, per_channel
        self.lo, self.hi = float(qmin), float(qmax)
        float_zp = zero_point.is_floating_point()
        self.float_zp = float_zp and per_channel and not learnable

        # The qparams' values as the native kernels read them: through float64, then float32.
        sv = scale.detach().reshape(-1).to(_wide(scale.device))
        sc = sv.float()
        if scale.device.type == "cpu":  # read on the host, as the native kernels do
            bad = ~(sc > 0)
            if bool(bad.any()):
                i = int(bad.nonzero()[0, 0])
                where = f" at channel {i}" if per_channel else ""
                raise ValueError(f"scale must be positive, got {float(sv[i])!r}{where}")
        inv = torch.ones_like(sc) / sc
        zv = zero_point.detach().reshape(-1).to(_wide(zero_point.device))
        z = zv.float()
        if learnable:
            if backward_lsq and not per_channel:  # torch's per-tensor LSQ backward zero point
                zp = torch.trunc((z + 0.5).clamp(self.lo, self.hi))
            else:
                zp = torch.round(z).clamp(self.lo, self.hi)
        elif self.float_zp:  # torch keeps float per-channel zero points unrounded
            zp = z
        else:
            zi = torch.trunc(zv)  # torch reads a per-tensor zero point with toInt()
            if zero_point.device.type == "cpu":
                bad = ~((zi >= qmin) & (zi <= qmax))
                if bool(bad.any()):
                    i = int(bad.nonzero()[0, 0])
                    where = f" at channel {i}" if per_channel else ""
                    raise ValueError(
                        f"zero_point must lie in [quant_min, quant_max] = [{qmin}, {qmax}], got "
                        f"{float(zv[i])!r}{where}"
                    )
            zp = zi.float()
        self.inv, self.scale, self.zp = (t.to(x.device).reshape(shape) for t in (inv, sc, zp))

    def level(self, xc: torch.Tensor) -> torch.Tensor:
        """The forward's (and non-learnable backward's) unclamped level, in the compute dtype."""
        if not self.float_zp:  # rint(x * inv) + zp
            inv, zp = self.inv.to(xc.dtype), self.zp.to(xc.dtype)
            return torch.round(xc * inv) + zp
        if xc.dtype == torch.float32:  # rint(fmaf(x, inv, zp))
            return torch.round(_fma_f32(xc, self.inv, self.zp))
        # float64 x, float zero point: rintf(float(fma(x, inv, zp)))
        fused = _fma_f64(xc, self.inv.double(), self.zp.double())
        return torch.round(fused.float()).double()

    def clamp(self, q: torch.Tensor) -> torch.Tensor:
        return _lt_or(_gt_or(q, _const(self.lo, q)), _const(self.hi, q))

    def output(self, qc: torch.Tensor) -> torch.Tensor:
        """(qc - zp) * scale with the native rounding: per tensor in float (a float64 difference
        rounded to float first), per channel in double for float64 x or float zero points."""
        if self.per_channel and (self.float_zp or qc.dtype == torch.float64):
            wide = _wide(qc.device)
            return ((qc.to(wide) - self.zp.to(wide)) * self.scale.to(wide)).to(qc.dtype)
        diff = (qc - self.zp.to(qc.dtype)).float()
        return (diff * self.scale).to(qc.dtype)


def fake_quantize(
    x: torch.Tensor,
    scale: torch.Tensor,
    zero_point: torch.Tensor,
    quant_min: int,
    quant_max: int,
    axis: int | None,
    learnable: bool,
    grad_factor: float,
) -> torch.Tensor:
    """ffa::fake_quantize: (clamp(rint(x / s) + zp) - zp) s with torch's rounding, per tensor or
    per channel; a NaN level is below quant_min, +-Inf saturate."""
    p = _Fq(x, scale, zero_point, quant_min, quant_max, axis, learnable, False)
    if x.numel() == 0:
        return torch.empty_like(x)
    xc = _compute(x)
    return _into(x, p.output(p.clamp(p.level(xc))))


def _channel_sum(t: torch.Tensor, p: _Fq) -> torch.Tensor:
    """The float64 sum of t over everything but the channel axis (all of it per tensor)."""
    t = t.to(_wide(t.device))
    if not p.per_channel:
        return t.sum()
    return t.sum(dim=[d for d in range(t.dim()) if d != p.axis])


def fake_quantize_backward(
    grad: torch.Tensor,
    x: torch.Tensor,
    scale: torch.Tensor,
    zero_point: torch.Tensor,
    quant_min: int,
    quant_max: int,
    axis: int | None,
    learnable: bool,
    grad_factor: float,
    output_mask: list[bool],
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """ffa::fake_quantize_backward: dx = grad * [quant_min <= level <= quant_max]; learnable:
    torch's LSQ formulas (its backward zero point, fused roundings), the scale / zero-point
    gradients summed in float64 and rounded once to the qparams' dtypes."""
    p = _Fq(x, scale, zero_point, quant_min, quant_max, axis, learnable, True)
    _check_grad_like_x(grad, x)
    want_dx, want_s, want_z = (bool(m) for m in output_mask)
    qgrads = learnable and (want_s or want_z)
    if learnable and want_z and not zero_point.is_floating_point():
        raise TypeError("a zero_point gradient needs a floating zero_point")
    dx = x.new_empty(0)
    gs, gz = scale.new_empty(0), zero_point.new_empty(0)
    if want_s and not qgrads:
        gs = torch.zeros_like(scale)
    if want_z and not qgrads:
        gz = torch.zeros_like(zero_point)
    if not (want_dx or qgrads):
        return dx, gs, gz
    xc, d = _compute(x), _compute(grad)
    lo, hi = _const(p.lo, xc), _const(p.hi, xc)
    if not learnable:
        q = p.level(xc)
        return _into(x, d * ((lo <= q) & (q <= hi)).to(xc.dtype)), gs, gz
    # LSQ, in the compute dtype T: q = rint(fma(x, inv, zp)) with the backward zero point.
    f64 = xc.dtype == torch.float64
    fma = _fma_f64 if f64 else _fma_f32
    inv, sc, zp = (t.to(xc.dtype) for t in (p.inv, p.scale, p.zp))
    q = torch.round(fma(xc, inv, zp))
    below, above = ~(q >= lo), q > hi
    inside = ~(below | above)
    if want_dx:
        dx = _into(x, d * inside.to(xc.dtype))
    if qgrads:
        g = _float32(float(grad_factor))
        qc = p.clamp(q)
        ds_in = d * fma(qc - zp, sc, -xc) * inv * g
        edge = torch.where(below, lo - zp, hi - zp)
        ds = torch.where(inside, ds_in, d * edge * g)
        if want_s:
            gs = _grad_like(_channel_sum(ds, p), scale)
        if want_z:
            dz = torch.where(inside, _const(0.0, xc), d * -1.0 * sc * g)
            gz = _grad_like(_channel_sum(dz, p), zero_point)
    return dx, gs, gz
