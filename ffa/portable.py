"""The portable kernels of the loss ops: PyTorch tensor ops only, for any device.

They have the native ops' exact signatures and contracts (schemas in csrc/ops.cpp): the dispatcher
runs them for a device that has no native ffa kernel (they are the ops' CompositeExplicitAutograd
kernels, registered by ffa/_backend.py), and ``FFA_BACKEND=portable`` runs them on every device.
Same definitions, argument checks and accumulation dtypes as the native kernels: unit pixels
scale-safe in the compute dtype (float32 for float16/bfloat16, float64 for float64); loss sums,
cross-block and cross-chunk sums, per-pixel dot products and the FA p=2 Gram form in float64
(float32 on MPS, which has no float64).

Memory: exact FA (p=1, and p=2 when N < Cs + Ct) walks D in row blocks, D[I, J] for J >= I (D is
symmetric), formed from A_S and A_T blocks computed separately (equal pixels give exact zeros);
the block temporaries stay within :data:`BLOCK_BYTES` whatever N is (one row per block at the
least), and the backward recomputes them. Otherwise O(N (Cs + Ct)) for FA, O(N (C + k)) for FFA.

:func:`unit_pixels`, :func:`fa_loss` and :func:`ffa_loss` (per-sample losses in differentiable
torch ops) also serve ffa's autograd for the derivatives the native kernels do not provide (the
double backward of FA p=2 and FFA).
"""

from __future__ import annotations

import math

import torch

from ._ops import compute_dtype, ops
from ._ops import wide_dtype as _wide

__all__ = [
    "BLOCK_BYTES",
    "unit_pixels",
    "fa_loss",
    "ffa_loss",
    "fa_loss_kernel",
    "fa_loss_backward_kernel",
    "ffa_loss_kernel",
    "ffa_loss_backward_kernel",
    "ffa_loss_philox_kernel",
    "ffa_loss_philox_backward_kernel",
]

BLOCK_BYTES = 64 << 20
"""The bound on exact FA's block temporaries (A_S, A_T, D and f(D) of one row block)."""
PIXEL_CHUNK = 512
"""FFA's products over pixels sum chunks of this many pixels in float64."""


# ---- argument checks: the native wrappers' (csrc/common.h), same exception types and messages ---
def _check_pair(student: torch.Tensor, teacher: torch.Tensor, p: int, eps: float) -> None:
    for name, x in (("student", student), ("teacher", teacher)):
        if x.dim() != 4:
            raise RuntimeError(f"{name} must be 4-D [B,C,H,W], got {x.dim()}-D")
    if student.shape[0] != teacher.shape[0]:
        raise RuntimeError(
            f"student and teacher batch sizes differ: {student.shape[0]} vs {teacher.shape[0]}"
        )
    if student.shape[2:] != teacher.shape[2:]:
        raise RuntimeError(
            "student and teacher must share H,W at the op level, got "
            f"{list(student.shape)} and {list(teacher.shape)}"
        )
    if not student.is_floating_point():
        raise RuntimeError(f"student must be a floating tensor, got {student.dtype}")
    if student.dtype != teacher.dtype:
        raise RuntimeError(
            f"student and teacher must have the same dtype, got {student.dtype} and {teacher.dtype}"
        )
    if student.device != teacher.device:
        raise RuntimeError("student and teacher must be on the same device")
    if student.shape[1] == 0 or teacher.shape[1] == 0:
        raise RuntimeError("channels must be positive")
    if p not in (1, 2):
        raise RuntimeError(f"p must be 1 or 2, got {p}")
    if not (eps > 0 and math.isfinite(eps)):
        raise RuntimeError(f"eps must be positive and finite, got {eps}")


def _check_grad(grad: torch.Tensor, batch: int) -> None:
    if grad.dim() != 1 or grad.shape[0] != batch:
        raise RuntimeError(f"grad must have shape [{batch}], got {list(grad.shape)}")


def _check_projection(z: torch.Tensor, student: torch.Tensor) -> None:
    b, n = student.shape[0], student.shape[2] * student.shape[3]
    if z.dim() != 3:
        raise RuntimeError(f"projection must be 3-D [Bz,N,k], got {z.dim()}-D")
    if z.shape[0] not in (1, b):
        raise RuntimeError(f"projection batch must be 1 or {b}, got {z.shape[0]}")
    if z.shape[1] != n:
        raise RuntimeError(f"projection must have N={n} rows, got {z.shape[1]}")
    if z.shape[2] < 1:
        raise RuntimeError("projection must have k >= 1 columns")
    half = student.element_size() < 4
    if not (z.dtype == student.dtype or (z.dtype == torch.float32 and half)):
        raise RuntimeError(
            f"projection dtype {z.dtype} does not match the features' {student.dtype}"
        )
    if z.device != student.device:
        raise RuntimeError("projection must be on the features' device")


def _check_saved(y, p_s, p_t, b, n, k, cs, ct, dtype) -> None:
    for name, t, shape in (
        ("y", y, (b, n, k)),
        ("p_s", p_s, (b, cs, k)),
        ("p_t", p_t, (b, ct, k)),
    ):
        if tuple(t.shape) != shape or t.dtype != dtype:
            dims = {"y": "[B,N,k]", "p_s": "[B,Cs,k]", "p_t": "[B,Ct,k]"}[name]
            raise RuntimeError(f"{name} must be {dims}")


# ---- unit pixels ---------------------------------------------------------------------------------
def _scaled_pixels(x: torch.Tensor, eps: float):
    """(x / m, ||x / m||, eps / m) per pixel, x as [B,C,N] in the compute dtype, with
    m = max(max_c |x_i|, eps): no square overflows or underflows at any input scale."""
    # contiguous whatever x's layout: the products of equal student and teacher pixels then round
    # identically (exact zeros in D)
    u = x.flatten(2).to(compute_dtype(x.dtype)).contiguous()
    m = u.detach().abs().amax(dim=1, keepdim=True).clamp_min(eps)
    m = torch.where(m > 0, m, torch.ones_like(m))  # an eps below the dtype's range rounds to 0
    u = u / m
    # a tensor numerator: `eps / m` would be evaluated as eps * (1 / m), which overflows
    return u, torch.linalg.vector_norm(u, dim=1, keepdim=True), m.new_tensor(eps) / m, m


def unit_pixels(x: torch.Tensor, eps: float) -> torch.Tensor:
    """[B,C,H,W] -> U [B,C,N] in the compute dtype: x_i / (||x_i|| + eps), scale-safe.

    Evaluated as (x_i / m_i) / (||x_i / m_i|| + eps / m_i) with m_i = max(max_c |x_i|, eps), a
    constant to autograd (the value does not depend on it); an all-zero pixel gives 0.
    """
    u, norm, eps_m, _ = _scaled_pixels(x, eps)
    return u / (norm + eps_m)


def _unit_pixels_and_backward(x: torch.Tensor, eps: float):
    """(U [B,C,N], backward): backward(dL/dU) is dL/dx [B,C,H,W] in x's dtype, contiguous.

    u = x / (n + eps) gives dL/dx = g / (n + eps) - v (v . g) n / (n + eps)^2, v = x / n the
    pixel's direction (0 for an all-zero pixel: the norm's subgradient there is 0, as torch's).
    The two terms nearly cancel when g is almost radial (always for one channel), so the form
    evaluated is the cancellation-free (g - v s) / (n + eps) + v s eps / (n + eps)^2 with
    s = v . g summed in float64, in the scaled quantities n = m n', eps = m eps'.
    """
    xs, norm, eps_m, m = _scaled_pixels(x, eps)
    d = norm + eps_m

    def backward(grad_u: torch.Tensor) -> torch.Tensor:
        g = grad_u.to(xs.dtype)
        v = xs / torch.where(norm > 0, norm, 1)
        s = (v * g).sum(dim=1, keepdim=True, dtype=_wide(x.device)).to(xs.dtype)
        gx = ((g - v * s) / d + v * (s * eps_m / d.square())) / m
        return gx.reshape(x.shape).to(x.dtype).contiguous()

    return xs / d, backward


# ---- exact FA, row-blocked -----------------------------------------------------------------------
def _blocks(b: int, n: int, itemsize: int):
    """(batch slice, row start, row stop) covering [b] x [n] rows so that four [bc, rows, n]
    temporaries fit in BLOCK_BYTES (one sample and one row at the least)."""
    per_row = 4 * n * itemsize
    bc = max(1, min(b, BLOCK_BYTES // per_row))
    rows = max(1, min(n, BLOCK_BYTES // (bc * per_row)))
    for b0 in range(0, b, bc):
        for i0 in range(0, n, rows):
            yield slice(b0, b0 + bc), i0, min(i0 + rows, n)


def _d_block(us, ut, i0, i1):
    """D[I, J] for rows I = i0:i1 and columns J = i0:N (A_S and A_T by separate GEMMs: equal pixels
    give exactly 0; a GEMM accumulating into A_S, beta = 1, rounds differently)."""
    a = us[:, :, i0:i1].mT @ us[:, :, i0:]
    return a.sub_(ut[:, :, i0:i1].mT @ ut[:, :, i0:])


def _fa_tiled(us: torch.Tensor, ut: torch.Tensor, p: int) -> torch.Tensor:
    """sum_ij f(D_ij) per sample over the upper triangle of row blocks, the diagonal block once
    and the others twice: rows summed in the compute dtype, then rows and blocks in float64."""
    b, _, n = us.shape
    wide = _wide(us.device)
    total = torch.zeros(b, dtype=wide, device=us.device)
    for bs, i0, i1 in _blocks(b, n, us.element_size()):
        f = _d_block(us[bs], ut[bs], i0, i1)
        f = f.abs_() if p == 1 else f.square_()
        diag = f[:, :, : i1 - i0].sum(dim=2).sum(dim=1, dtype=wide)
        total[bs] += diag + 2 * f[:, :, i1 - i0 :].sum(dim=2).sum(dim=1, dtype=wide)
    return total


def _fa_tiled_backward(us, ut, p, scale, want_s, want_t):
    """(dL/dU_S, dL/dU_T) = (2 U_S G, -2 U_T G), G = f'(D) * scale (symmetric), accumulated in
    float64 over the blocks of the upper triangle: block (I, J>I) adds U[:, J] G_IJ^T to the
    columns I and U[:, I] G_IJ to the columns J. The factors 2 * scale (per sample) are applied
    once at the end. None where not wanted."""
    b, _, n = us.shape
    acc = [
        torch.zeros(u.shape, dtype=_wide(u.device), device=u.device) if want else None
        for u, want in ((us, want_s), (ut, want_t))
    ]
    for bs, i0, i1 in _blocks(b, n, us.element_size()):
        g = _d_block(us[bs], ut[bs], i0, i1)
        g = g.sign_() if p == 1 else g.mul_(2)
        for u, a in ((us[bs], acc[0]), (ut[bs], acc[1])):
            if a is not None:
                a[bs, :, i0:i1] += u[:, :, i0:] @ g.mT
                a[bs, :, i1:] += u[:, :, i0:i1] @ g[:, :, i1 - i0 :]
    factor = 2 * scale.to(acc[0].dtype if want_s else acc[1].dtype)[:, None, None]
    return [None if a is None else a * (s * factor) for a, s in zip(acc, (1, -1), strict=True)]


def _gram_sq(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return (a @ b.mT).square().sum(dim=(1, 2))


def _p2_takes_tiled_form(n: int, cs: int, ct: int) -> bool:
    return n < cs + ct


def fa_loss(student: torch.Tensor, teacher: torch.Tensor, p: int, eps: float) -> torch.Tensor:
    """Exact FA p=2 per sample ([B], the compute dtype) in differentiable torch ops: the cheaper
    exact form (N x N below Cs + Ct pixels, else the Gram identity in float64)."""
    if p != 2:
        raise NotImplementedError("ffa.portable.fa_loss: only p=2 (p=1 needs the blocked kernel)")
    us, ut = unit_pixels(student, eps), unit_pixels(teacher, eps)
    n = us.shape[-1]
    if _p2_takes_tiled_form(n, us.shape[1], ut.shape[1]):
        per = (us.mT @ us - ut.mT @ ut).square().sum(dim=(1, 2))
    else:  # ||D||_F^2 from channel Gram matrices, in float64 (it cancels when S ~ T)
        us, ut = us.double(), ut.double()
        per = (_gram_sq(us, us) + _gram_sq(ut, ut) - 2 * _gram_sq(us, ut)).clamp(min=0)
    return (per / (n * n)).to(compute_dtype(student.dtype))


def fa_loss_kernel(student, teacher, p, eps, allow_tf32=False):
    """ffa::fa_loss: exact FA per sample [B] in the compute dtype, never N x N. (``allow_tf32``
    only steers the native CUDA p=1 kernel.)"""
    _check_pair(student, teacher, p, eps)
    us, ut = unit_pixels(student, eps), unit_pixels(teacher, eps)
    n = us.shape[-1]
    if p == 1 or _p2_takes_tiled_form(n, us.shape[1], ut.shape[1]):
        per = _fa_tiled(us, ut, p)
    else:
        us, ut = us.to(_wide(us.device)), ut.to(_wide(us.device))
        per = (_gram_sq(us, us) + _gram_sq(ut, ut) - 2 * _gram_sq(us, ut)).clamp(min=0)
    return (per / (n * n)).to(compute_dtype(student.dtype))


def fa_loss_backward_kernel(grad, student, teacher, p, eps, output_mask, allow_tf32=False):
    """ffa::fa_loss_backward: (dL/dstudent, dL/dteacher), grad_b * dL_b/d(s, t) in the features'
    dtype; an output not in ``output_mask`` is an empty [0] tensor."""
    _check_pair(student, teacher, p, eps)
    _check_grad(grad, student.shape[0])
    want_s, want_t = bool(output_mask[0]), bool(output_mask[1])
    if not (want_s or want_t):
        return student.new_empty(0), teacher.new_empty(0)
    (us, back_s), (ut, back_t) = (_unit_pixels_and_backward(x, eps) for x in (student, teacher))
    n = us.shape[-1]
    wide = _wide(us.device)
    scale = grad.to(wide) / (n * n)
    if p == 1 or _p2_takes_tiled_form(n, us.shape[1], ut.shape[1]):
        gus, gut = _fa_tiled_backward(us, ut, p, scale, want_s, want_t)
    else:  # 4 U_S D and -4 U_T D, with U D from the channel Gram matrices (float64)
        us, ut = us.to(wide), ut.to(wide)
        c = 4 * scale[:, None, None]
        gus = c * ((us @ us.mT) @ us - (us @ ut.mT) @ ut) if want_s else None
        gut = -c * ((ut @ us.mT) @ us - (ut @ ut.mT) @ ut) if want_t else None
    return (
        back_s(gus) if want_s else student.new_empty(0),
        back_t(gut) if want_t else teacher.new_empty(0),
    )


def _pixel_matmul(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """a @ b for a [B, C, N], b [Bz, N, k]: partial products over chunks of PIXEL_CHUNK pixels,
    summed in float64 (as the native kernels sum their pixel blocks), in a's dtype: a float32
    sum over N ~ 1e5 terms would lose about three digits."""
    n, chunk = a.shape[-1], PIXEL_CHUNK
    if n <= chunk:
        return a @ b
    pad, wide = -n % chunk, _wide(a.device)
    if pad:
        a, b = torch.nn.functional.pad(a, (0, pad)), torch.nn.functional.pad(b, (0, 0, 0, pad))
    a, b = a.unflatten(-1, (-1, chunk)).transpose(1, 2), b.unflatten(1, (-1, chunk))
    return (a @ b).sum(dim=1, dtype=wide).to(a.dtype)


# ---- FFA -----------------------------------------------------------------------------------------
def _ffa_forward(student, teacher, z, p, eps):
    us, ut = unit_pixels(student, eps), unit_pixels(teacher, eps)
    n, k = us.shape[-1], z.shape[-1]
    z = z.to(us.dtype)
    p_s, p_t = _pixel_matmul(us, z), _pixel_matmul(ut, z)
    y = us.mT @ p_s - ut.mT @ p_t
    f = y.abs() if p == 1 else y.square()
    loss = f.sum(dim=(1, 2), dtype=_wide(y.device)) / (k * n * n)
    return loss.to(us.dtype), y, p_s, p_t


def ffa_loss(
    student: torch.Tensor, teacher: torch.Tensor, projection: torch.Tensor, p: int, eps: float
) -> torch.Tensor:
    """FFA per sample ([B]) with Z = ``projection`` ([Bz, N, k]): sum_i mean_k f((DZ)_ik) / N^2,
    in differentiable torch ops."""
    return _ffa_forward(student, teacher, projection, p, eps)[0]


def ffa_loss_kernel(student, teacher, projection, p, eps):
    """ffa::ffa_loss: (loss [B], Y = D Z [B,N,k], P_S = U_S Z, P_T = U_T Z), compute dtype."""
    _check_pair(student, teacher, p, eps)
    _check_projection(projection, student)
    return _ffa_forward(student, teacher, projection, p, eps)


def ffa_loss_backward_kernel(grad, student, teacher, projection, y, p_s, p_t, p, eps, output_mask):
    """ffa::ffa_loss_backward. With G = grad_b f'(Y) / (k N^2): dL/dU_S = P_S G^T + (U_S G) Z^T,
    dL/dU_T = -(P_T G^T + (U_T G) Z^T)."""
    _check_pair(student, teacher, p, eps)
    _check_projection(projection, student)
    b, cs, h, w = student.shape
    n, k, dtype = h * w, projection.shape[2], compute_dtype(student.dtype)
    _check_grad(grad, b)
    _check_saved(y, p_s, p_t, b, n, k, cs, teacher.shape[1], dtype)
    want_s, want_t = bool(output_mask[0]), bool(output_mask[1])
    if not (want_s or want_t):
        return student.new_empty(0), teacher.new_empty(0)
    z = projection.to(dtype)
    scale = (grad.to(_wide(grad.device)) / (k * n * n)).to(dtype)[:, None, None]
    g = (y.sign() if p == 1 else 2 * y) * scale

    def side(x, proj, sign):
        u, backward = _unit_pixels_and_backward(x, eps)
        return backward(sign * (proj @ g.mT + _pixel_matmul(u, g) @ z.mT))

    return (
        side(student, p_s, 1.0) if want_s else student.new_empty(0),
        side(teacher, p_t, -1.0) if want_t else teacher.new_empty(0),
    )


def _probes(student, k, seed, offset):
    """Z [1, N, k] of ffa_loss_philox: the same Philox stream as the native kernels, generated by
    the host op (ffa::philox_probes, CPU) and moved to the features' device."""
    like = torch.empty((1, 1, *student.shape[2:]), dtype=student.dtype)
    return ops.philox_probes(like, k, seed, offset).to(student.device)


def ffa_loss_philox_kernel(student, teacher, k, p, eps, seed, offset):
    """ffa::ffa_loss_philox: ffa_loss with the probes of (k, seed, offset)."""
    _check_pair(student, teacher, p, eps)
    return _ffa_forward(student, teacher, _probes(student, k, seed, offset), p, eps)


def ffa_loss_philox_backward_kernel(
    grad, student, teacher, y, p_s, p_t, k, p, eps, seed, offset, output_mask
):
    """ffa::ffa_loss_philox_backward: ffa_loss_backward with the probes of (k, seed, offset)."""
    _check_pair(student, teacher, p, eps)
    z = _probes(student, k, seed, offset)
    return ffa_loss_backward_kernel(grad, student, teacher, z, y, p_s, p_t, p, eps, output_mask)
