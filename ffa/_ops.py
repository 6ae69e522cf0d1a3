"""Loads the native ops and registers their fake (meta) kernels and autograd with torch.library.

The flow is one-way: ffa.functional -> torch.ops.ffa.* (dispatcher) -> CPU/CUDA kernel.
"""

from __future__ import annotations

import importlib.util
import pathlib
import warnings

import torch

from ._autograd import no_double_backward, no_jvp, registers_autograd


def _load_error(package: pathlib.Path) -> str:
    if (package.parent / "pyproject.toml").exists() and not any(package.glob("_C*")):
        return (
            f"ffa was imported from its source checkout ({package}), which has no built extension "
            "and shadows the installed ffa (the current directory comes first on sys.path, e.g. "
            "with `python -m pytest`). Run from another directory, run `pytest` instead of "
            "`python -m pytest`, or install the checkout editable: "
            "`pip install --no-build-isolation -e .`"
        )
    return (
        "ffa's native extension ffa._C failed to load. Build it against the installed torch with "
        "`pip install --no-build-isolation .` (see README)."
    )


# The native modules use the LibTorch stable ABI at the API level of torch 2.10: one build serves
# every torch from there on, and no older one (its C shim lacks functions they call).
MIN_TORCH = (2, 10)


def _torch_version() -> tuple[int, int]:
    major, minor = torch.__version__.split("+")[0].split(".")[:2]
    return int(major), int("".join(ch for ch in minor if ch.isdigit()) or 0)


if _torch_version() < MIN_TORCH:
    raise ImportError(
        f"ffa needs torch >= {MIN_TORCH[0]}.{MIN_TORCH[1]} (its native kernels use the LibTorch "
        f"stable ABI of torch {MIN_TORCH[0]}.{MIN_TORCH[1]}), found torch {torch.__version__}. "
        f"Upgrade torch: pip install 'torch>={MIN_TORCH[0]}.{MIN_TORCH[1]}'"
    )

try:
    from . import _C  # noqa: F401  (importing it runs STABLE_TORCH_LIBRARY(ffa, ...))
except ImportError as e:  # pragma: no cover - only on a broken install
    raise ImportError(_load_error(pathlib.Path(__file__).resolve().parent)) from e


def _load_cuda() -> bool:
    """Imports ffa._C_cuda (CUDA impls of _C's ops) when torch has CUDA and it was built."""
    if torch.version.cuda is None:
        return False
    if importlib.util.find_spec(f"{__package__}._C_cuda") is None:
        return False  # a build without CUDA kernels (FFA_CUDA=OFF, or no nvcc at build time)
    try:
        from . import _C_cuda  # noqa: F401  (runs STABLE_TORCH_LIBRARY_IMPL(ffa, CUDA, ...))
    except ImportError as e:  # e.g. built for another CUDA major version than this torch's
        warnings.warn(
            f"ffa's CUDA kernels (ffa._C_cuda) failed to load under torch {torch.__version__} "
            f"(CUDA {torch.version.cuda}): {e}. CPU ops work; CUDA tensors have no ffa kernel.",
            RuntimeWarning,
            stacklevel=2,
        )
        return False
    return True


HAS_CUDA_KERNELS = _load_cuda()

ops = torch.ops.ffa

# philox_probes' Z is a constant of the estimator: autograd falls through to the backend kernel
# (the stable ABI has no C++ fallthrough registration).
_autograd_lib = torch.library.Library("ffa", "IMPL")
_autograd_lib.impl("philox_probes", torch.library.fallthrough_kernel, "Autograd")


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """float64 stays float64; float32/float16/bfloat16 accumulate and return in float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def wide_dtype(device: torch.device) -> torch.dtype:
    """The portable kernels' accumulation dtype: float64, except on MPS, which has none."""
    return torch.float32 if device.type == "mps" else torch.float64


def _maybe_empty(like: torch.Tensor, wanted: bool) -> torch.Tensor:
    return (
        torch.empty_like(like, memory_format=torch.contiguous_format)
        if wanted
        else like.new_empty(0)
    )


# ---- fake kernels: shapes and dtypes only --------------------------------------------------------
@torch.library.register_fake("ffa::fa_loss")
def _(student, teacher, p, eps, allow_tf32=False):
    return student.new_empty(student.shape[0], dtype=compute_dtype(student.dtype))


@torch.library.register_fake("ffa::fa_loss_backward")
def _(grad, student, teacher, p, eps, output_mask, allow_tf32=False):
    return _maybe_empty(student, output_mask[0]), _maybe_empty(teacher, output_mask[1])


def _ffa_outputs(student, teacher, k):
    """loss [B], Y [B,N,k], P_S [B,Cs,k], P_T [B,Ct,k] in the compute dtype."""
    b, cs, h, w = student.shape
    dt = compute_dtype(student.dtype)
    return (
        student.new_empty(b, dtype=dt),
        student.new_empty(b, h * w, k, dtype=dt),
        student.new_empty(b, cs, k, dtype=dt),
        student.new_empty(b, teacher.shape[1], k, dtype=dt),
    )


@torch.library.register_fake("ffa::ffa_loss")
def _(student, teacher, projection, p, eps):
    return _ffa_outputs(student, teacher, projection.shape[2])


@torch.library.register_fake("ffa::ffa_loss_backward")
def _(grad, student, teacher, projection, y, p_s, p_t, p, eps, output_mask):
    return _maybe_empty(student, output_mask[0]), _maybe_empty(teacher, output_mask[1])


@torch.library.register_fake("ffa::ffa_loss_philox")
def _(student, teacher, k, p, eps, seed, offset):
    return _ffa_outputs(student, teacher, k)


@torch.library.register_fake("ffa::ffa_loss_philox_backward")
def _(grad, student, teacher, y, p_s, p_t, k, p, eps, seed, offset, output_mask):
    return _maybe_empty(student, output_mask[0]), _maybe_empty(teacher, output_mask[1])


@torch.library.register_fake("ffa::philox_probes")
def _(like, k, seed, offset):
    return like.new_empty(1, like.shape[2] * like.shape[3], k, dtype=compute_dtype(like.dtype))


# ---- autograd (ffa/_autograd.py): every mode either works or raises -----------------------------
# Reverse mode: the backward ops. Forward mode: each loss is one number per sample, so its tangent
# is <dL_b/ds_b, ts_b> + <dL_b/dt_b, tt_b>: the backward op at grad = 1 contracted with the
# tangents (exact, the cost of one backward). Double backward: FA p=2 and FFA differentiate their
# gradient in torch ops (ffa.portable); FA p=1's would need another tiled kernel and raises, and so
# does forward-over-reverse for every loss.
def _mask(ctx) -> list[bool]:
    return [bool(ctx.needs_input_grad[0]), bool(ctx.needs_input_grad[1])]


def _contract(grads, tangents, dtype) -> torch.Tensor:
    """Per-sample sum_i g_i t_i over the pairs whose tangent is not None."""
    terms = [
        (g.to(dtype) * t.to(dtype)).flatten(1).sum(1)
        for g, t in zip(grads, tangents, strict=True)
        if t is not None
    ]
    return terms[0] if len(terms) == 1 else terms[0] + terms[1]


def _loss_jvp(backward_op, args, loss_dtype, ts, tt, extra=()) -> torch.Tensor:
    """The tangent of a per-sample loss: ``backward_op`` at grad = 1, contracted with (ts, tt).
    ``extra``: the backward op's arguments after the output mask."""
    student = args[0]
    ones = torch.ones(student.shape[0], dtype=loss_dtype, device=student.device)
    grads = backward_op(ones, *args, [ts is not None, tt is not None], *extra)
    return _contract(grads, (ts, tt), loss_dtype)


class _SmoothGradient:
    """The backward op's math, (grad, s, t) -> grad_b * dL_b/d(s, t), in differentiable torch ops.

    ``loss_fn(s, t)`` is the per-sample loss [B] (ffa.portable). torch.func differentiates it once
    more for the backward ops' double backward (a vjp): right under torch.func transforms too, and
    differentiable again (third order) when asked to.
    """

    def __init__(self, loss_fn, grad, student, teacher):
        self.loss_fn, self.primals = loss_fn, (grad, student, teacher)

    def __call__(self, grad, student, teacher):
        def weighted(s, t):
            loss = self.loss_fn(s, t)
            return (loss * grad.to(loss.dtype)).sum()

        return torch.func.grad(weighted, argnums=(0, 1))(student, teacher)

    def vjp(self, ggs, ggt, needs):
        pairs = ((ggs, self.primals[1]), (ggt, self.primals[2]))
        cotangents = tuple(torch.zeros_like(x) if g is None else g for g, x in pairs)
        grads = torch.func.vjp(self, *self.primals)[1](cotangents)
        return tuple(g if need else None for g, need in zip(grads, needs, strict=True))


def _forward_over_reverse(op: str):
    # The jvp of a gradient would need a transform nested inside a jvp rule, which functorch and
    # forward-mode AD do not support (internal assert / "nested forward mode AD").
    def jvp(ctx, *tangents):
        raise no_jvp(
            op,
            "(forward-over-reverse, e.g. torch.func.hessian or jacfwd(jacrev(f))); use "
            "reverse-over-reverse: torch.func.jacrev(torch.func.jacrev(f)) or "
            "torch.autograd.functional.hessian",
        )

    return staticmethod(jvp)


@registers_autograd("fa_loss")
class FaLoss(torch.autograd.Function):
    @staticmethod
    def setup_context(ctx, inputs, output):
        student, teacher, p, eps = inputs[:4]
        ctx.save_for_backward(student, teacher)
        ctx.save_for_forward(student, teacher)
        ctx.p, ctx.eps, ctx.loss_dtype = p, eps, output.dtype
        # allow_tf32 (schema default False) may or may not be among the inputs.
        ctx.tf32, ctx.n_inputs = tuple(inputs[4:5]), len(inputs)

    @staticmethod
    def backward(ctx, grad):
        mask = _mask(ctx)
        gs, gt = ops.fa_loss_backward(grad, *ctx.saved_tensors, ctx.p, ctx.eps, mask, *ctx.tf32)
        return (gs if mask[0] else None), (gt if mask[1] else None), *[None] * (ctx.n_inputs - 2)

    @staticmethod
    def jvp(ctx, ts, tt, *_):
        args = (*ctx.saved_tensors, ctx.p, ctx.eps)
        return _loss_jvp(ops.fa_loss_backward, args, ctx.loss_dtype, ts, tt, ctx.tf32)


@registers_autograd("fa_loss_backward")
class FaLossBackward(torch.autograd.Function):
    @staticmethod
    def setup_context(ctx, inputs, output):
        grad, student, teacher, p, eps = inputs[:5]
        ctx.save_for_backward(grad, student, teacher)
        ctx.p, ctx.eps, ctx.n_inputs = p, eps, len(inputs)

    @staticmethod
    def backward(ctx, ggs, ggt):
        if ctx.p == 1:
            raise no_double_backward("fa_loss_backward", "for p=1 (second derivatives of FA p=1)")
        grads = _fa_gradient(ctx).vjp(ggs, ggt, ctx.needs_input_grad[:3])
        return *grads, *[None] * (ctx.n_inputs - 3)

    jvp = _forward_over_reverse("fa_loss_backward")


def _fa_gradient(ctx) -> _SmoothGradient:
    from . import portable

    return _SmoothGradient(lambda s, t: portable.fa_loss(s, t, 2, ctx.eps), *ctx.saved_tensors)


@registers_autograd("ffa_loss")
class FfaLoss(torch.autograd.Function):
    @staticmethod
    def setup_context(ctx, inputs, output):
        student, teacher, projection, p, eps = inputs
        loss, y, p_s, p_t = output
        ctx.mark_non_differentiable(y, p_s, p_t)
        ctx.save_for_backward(student, teacher, projection, y, p_s, p_t)
        ctx.save_for_forward(student, teacher, projection, y, p_s, p_t)
        ctx.p, ctx.eps, ctx.loss_dtype = p, eps, loss.dtype

    @staticmethod
    def backward(ctx, grad, _gy, _gps, _gpt):
        mask = _mask(ctx)
        gs, gt = ops.ffa_loss_backward(grad, *ctx.saved_tensors, ctx.p, ctx.eps, mask)
        return (gs if mask[0] else None), (gt if mask[1] else None), None, None, None

    @staticmethod
    def jvp(ctx, ts, tt, tz, _p, _eps):
        if tz is not None:
            raise no_jvp("ffa_loss", "w.r.t. the projection (a constant of the estimator)")
        args = (*ctx.saved_tensors, ctx.p, ctx.eps)
        return _loss_jvp(ops.ffa_loss_backward, args, ctx.loss_dtype, ts, tt), None, None, None


@registers_autograd("ffa_loss_backward")
class FfaLossBackward(torch.autograd.Function):
    @staticmethod
    def setup_context(ctx, inputs, output):
        grad, student, teacher, projection, _y, _p_s, _p_t, p, eps, _ = inputs
        ctx.save_for_backward(grad, student, teacher, projection)
        ctx.p, ctx.eps = p, eps

    @staticmethod
    def backward(ctx, ggs, ggt):
        grad, s, t, z = ctx.saved_tensors
        gradient = _ffa_gradient(grad, s, t, z, ctx.p, ctx.eps)
        return *gradient.vjp(ggs, ggt, ctx.needs_input_grad[:3]), *[None] * 7

    jvp = _forward_over_reverse("ffa_loss_backward")


def _ffa_gradient(grad, student, teacher, z, p, eps) -> _SmoothGradient:
    from . import portable

    return _SmoothGradient(lambda s, t: portable.ffa_loss(s, t, z, p, eps), grad, student, teacher)


@registers_autograd("ffa_loss_philox")
class FfaLossPhilox(torch.autograd.Function):
    @staticmethod
    def setup_context(ctx, inputs, output):
        student, teacher, k, p, eps, seed, offset = inputs
        loss, y, p_s, p_t = output
        ctx.mark_non_differentiable(y, p_s, p_t)
        ctx.save_for_backward(student, teacher, y, p_s, p_t)
        ctx.save_for_forward(student, teacher, y, p_s, p_t)
        ctx.cfg, ctx.loss_dtype = (k, p, eps, seed, offset), loss.dtype

    @staticmethod
    def backward(ctx, grad, _gy, _gps, _gpt):
        mask = _mask(ctx)
        gs, gt = ops.ffa_loss_philox_backward(grad, *ctx.saved_tensors, *ctx.cfg, mask)
        return (gs if mask[0] else None), (gt if mask[1] else None), *[None] * 5

    @staticmethod
    def jvp(ctx, ts, tt, *_):
        args = (*ctx.saved_tensors, *ctx.cfg)
        tangent = _loss_jvp(ops.ffa_loss_philox_backward, args, ctx.loss_dtype, ts, tt)
        return tangent, None, None, None


@registers_autograd("ffa_loss_philox_backward")
class FfaLossPhiloxBackward(torch.autograd.Function):
    @staticmethod
    def setup_context(ctx, inputs, output):
        grad, student, teacher, _y, _p_s, _p_t, k, p, eps, seed, offset, _ = inputs
        ctx.save_for_backward(grad, student, teacher)
        ctx.cfg = (k, p, eps, seed, offset)

    @staticmethod
    def backward(ctx, ggs, ggt):
        return *_philox_gradient(ctx).vjp(ggs, ggt, ctx.needs_input_grad[:3]), *[None] * 9

    jvp = _forward_over_reverse("ffa_loss_philox_backward")


def _philox_gradient(ctx) -> _SmoothGradient:
    grad, student, teacher = ctx.saved_tensors
    k, p, eps, seed, offset = ctx.cfg
    z = philox_probes(student, k, seed, offset)
    return _ffa_gradient(grad, student, teacher, z, p, eps)


def philox_probes(student: torch.Tensor, k: int, seed: int, offset: int) -> torch.Tensor:
    """The Z [1, N, k] that ffa_loss_philox(student, ..., k, seed, offset) draws, on its device.

    Generated by the CPU op (the stream the CUDA kernels draw on the fly) and moved: only paths
    that need Z as a tensor (double backward) call it.
    """
    like = torch.empty((1, 1, *student.shape[2:]), dtype=student.dtype)
    return ops.philox_probes(like, k, seed, offset).to(student.device)


# ---- vmap: a vmapped dimension folds into the sample batch ---------------------------------------
# Each sample's loss depends on that sample alone, so the op vmapped over V is the op on V * B
# samples: one kernel call instead of torch's per-slice fallback (per-sample gradients, jacrev).
def _fold(x, dim, v, b):
    """[V * b, ...] from x: its vmapped dim (or V broadcast copies) times its per-sample dim 0 (of
    size b, or 1 to broadcast)."""
    x = x.movedim(dim, 0) if dim is not None else x.expand(v, *x.shape)
    return x.expand(v, b, *x.shape[2:]).reshape(v * b, *x.shape[2:])


def _unfold(x, v, b):
    """(x as [V, b, ...], 0); an empty [0] gradient that was not asked for stays unbatched."""
    if x.dim() == 1 and x.shape[0] == 0 and v * b != 0:
        return x, None
    return x.unflatten(0, (v, b)), 0


def _register_vmap(name: str, student: int, projection: int | None = None) -> None:
    """Fold rule for ``ffa::name``: every tensor argument is per sample (dim 0), except a
    ``projection`` [Bz, N, k] that, unbatched with Bz = 1, stays shared by all samples."""

    def rule(info, in_dims, *args):
        v = info.batch_size
        d = in_dims[student]
        b = args[student].shape[1 if d == 0 else 0] if d is not None else args[student].shape[0]
        folded = [
            a
            if not isinstance(a, torch.Tensor) or (i == projection and dim is None and len(a) == 1)
            else _fold(a, dim, v, b)
            for i, (a, dim) in enumerate(zip(args, in_dims, strict=True))
        ]
        out = getattr(ops, name)(*folded)
        if isinstance(out, torch.Tensor):
            return _unfold(out, v, b)
        pairs = [_unfold(o, v, b) for o in out]
        return tuple(o for o, _ in pairs), tuple(dim for _, dim in pairs)

    torch.library.register_vmap(f"ffa::{name}", rule)


_register_vmap("fa_loss", student=0)
_register_vmap("fa_loss_backward", student=1)
_register_vmap("ffa_loss", student=0, projection=2)
_register_vmap("ffa_loss_backward", student=1, projection=3)
_register_vmap("ffa_loss_philox", student=0)
_register_vmap("ffa_loss_philox_backward", student=1)


def philox_seed_offset(generator: torch.Generator, numel: int) -> tuple[int, int]:
    """(seed, offset) for one ffa_loss_philox call drawing ``numel`` = N * k probes.

    Takes them from ``generator`` the way torch's own CUDA random ops do: its seed, and its Philox
    offset, which is then advanced past the draws this call consumes (4 * ceil(numel / 4)), so
    successive calls and other random ops on the generator never reuse a counter. The seed is
    returned as the signed 64-bit integer with the same bits (the op schema's ``int``). A CPU
    generator (Mersenne Twister, no Philox offset) instead provides a fresh 63-bit seed per call,
    with offset 0. Host-side bookkeeping only: no device synchronization. Not CUDA-graph safe
    (a captured graph would replay the same seed and offset).
    """
    draws = 4 * ((numel + 3) // 4)
    if generator.device.type == "cuda":
        seed = generator.initial_seed()
        offset = generator.get_offset()
        generator.set_offset(offset + draws)
        return (seed - (1 << 64) if seed >= (1 << 63) else seed), offset
    seed = int(torch.randint(0, 2**63 - 1, (1,), generator=generator, dtype=torch.int64))
    return seed, 0


# ---- portable kernels (ffa/portable.py): devices without native kernels, FFA_BACKEND=portable ----
# philox_probes is a host op (the CPU kernel draws Z for every device): it needs none.
from . import portable  # noqa: E402  (it uses compute_dtype and ops, defined above)
from ._backend import register_portable  # noqa: E402

for _name in (
    "fa_loss",
    "fa_loss_backward",
    "ffa_loss",
    "ffa_loss_backward",
    "ffa_loss_philox",
    "ffa_loss_philox_backward",
):
    register_portable(_name, getattr(portable, f"{_name}_kernel"))
