"""The methods the resolution sweep measures, and the jobs its worker process runs.

A method is one way to compute the loss: the materialized reference (ffa.reference, the tests'
oracle), torch.compile of it, ffa's kernels, or pykeops. The ``run_*`` functions run inside the
harness.Worker subprocess (module-level, so they pickle by reference); the ``predict_*`` functions
are the priors the sweep uses before a method has a measurement of its own.
"""

from __future__ import annotations

import contextlib
import io
import math
import os
import time
from dataclasses import dataclass

import harness

# ----------------------------------------------------------------------------------------- methods


@dataclass(frozen=True)
class Method:
    name: str
    family: str  # "fa" (exact) or "ffa" (randomized)
    impl: str  # "reference", "ffa", "portable" (ffa with FFA_BACKEND=portable), "keops"
    compiled: bool = False
    opt_in: bool = False  # measured only when named in --methods

    def label(self, p: int) -> str:
        base = {
            ("reference", "fa"): "reference FA",
            ("ffa", "fa"): "ffa exact FA",
            ("keops", "fa"): "pykeops FA",
            ("reference", "ffa"): "reference FFA",
            ("ffa", "ffa"): "ffa FFA",
            ("portable", "fa"): "ffa portable FA",
            ("portable", "ffa"): "ffa portable FFA",
        }[(self.impl, self.family)]
        if self.compiled:
            base = "compiled " + base
        return f"{base} p={p}"

    def time_exponent(self, p: int) -> int:
        """How a run's time grows with N."""
        if self.family == "ffa" or (self.impl in ("ffa", "portable") and p == 2):
            return 1
        return 2

    def quadratic_memory(self) -> bool:
        return self.impl == "reference" and self.family == "fa"


METHODS = {
    m.name: m
    for m in [
        Method("ffa_ffa", "ffa", "ffa"),
        Method("ffa_fa", "fa", "ffa"),
        Method("reference_ffa", "ffa", "reference"),
        Method("reference_ffa_compiled", "ffa", "reference", compiled=True),
        Method("reference_fa", "fa", "reference"),
        Method("reference_fa_compiled", "fa", "reference", compiled=True),
        Method("portable_ffa", "ffa", "portable", opt_in=True),
        Method("portable_fa", "fa", "portable", opt_in=True),
        Method("keops_fa", "fa", "keops"),
    ]
}
ORDER = list(METHODS)  # within a resolution: ffa first, then the references, keops last


def keops_available() -> tuple[bool, str]:
    """Run in the worker (it imports torch): whether pykeops imports, and why not."""
    try:
        with contextlib.redirect_stdout(io.StringIO()):  # its import banner is noise here
            import pykeops  # noqa: F401
            from pykeops.torch import LazyTensor  # noqa: F401
    except Exception as e:  # noqa: BLE001 - any import failure means "not available"
        return False, f"pykeops not importable ({type(e).__name__}: {str(e)[:120]})"
    return True, ""


# --------------------------------------------------------------------------- worker-side functions
# Run inside the harness.Worker subprocess; module-level so they pickle by reference.

_COMPILED: dict = {}


def _inputs(batch, channels, height, width, seed, device, requires_grad):
    """Teacher ~ N(0,1), student = teacher + N(0,1) noise: a partly distilled student."""
    import torch

    g = torch.Generator(device=device).manual_seed(seed)
    shape = (batch, channels, height, width)
    t = torch.randn(shape, generator=g, device=device)
    s = t + torch.randn(shape, generator=g, device=device)
    return s.requires_grad_(requires_grad), t


def _projection(n, k, seed, j, device):
    import torch

    g = torch.Generator(device=device).manual_seed(seed * 7919 + 1 + j)
    return torch.randn((n, k), generator=g, device=device)


def _keops_fa(s, t, p):
    from pykeops.torch import LazyTensor

    from ffa import reference

    us = reference.unit_pixels(s).transpose(1, 2).contiguous()  # [B, N, C]
    ut = reference.unit_pixels(t).transpose(1, 2).contiguous()
    d = (LazyTensor(us[:, :, None, :]) | LazyTensor(us[:, None, :, :])) - (
        LazyTensor(ut[:, :, None, :]) | LazyTensor(ut[:, None, :, :])
    )
    f = d.abs() if p == 1 else d.square()
    n = us.shape[1]
    per = f.sum(dim=2).reshape(us.shape[0], n).sum(dim=1) / (n * n)  # reduce over j, then i
    return per.mean()


def _loss_fn(method: str, p: int, compile_mode: str):
    """(student, teacher, projection) -> scalar loss, for one method."""
    import torch

    import ffa
    from ffa import reference

    m = METHODS[method]
    if m.impl in ("ffa", "portable"):
        if m.impl == "portable":  # read by ffa at every call; the worker runs one case at a time
            os.environ["FFA_BACKEND"] = "portable"
        else:
            os.environ.pop("FFA_BACKEND", None)
        if m.family == "fa":
            return lambda s, t, z: ffa.feature_affinity_loss(s, t, p=p)
        return lambda s, t, z: ffa.fast_feature_affinity_loss(s, t, p=p, projection=z)
    if m.impl == "keops":
        return lambda s, t, z: _keops_fa(s, t, p)
    if m.family == "fa":

        def fn(s, t, z):
            return reference.fa_loss(s, t, p=p)
    else:

        def fn(s, t, z):
            return reference.ffa_loss(s, t, z, p=p)

    if not m.compiled:
        return fn
    if compile_mode == "dynamic":  # one compile serves every resolution of this worker
        key = (method, p)
        if key not in _COMPILED:
            _COMPILED[key] = torch.compile(fn, dynamic=True)
        return _COMPILED[key]
    torch._dynamo.reset()  # static: a fresh compile specialized to this case's shapes
    return torch.compile(fn, dynamic=False)


def worker_available_bytes(device):
    return harness.available_bytes(device)


def worker_machine_info(device):
    return harness.machine_info(device)


def run_case(
    *,
    method,
    p,
    batch,
    channels,
    height,
    width,
    k,
    mode,
    seed,
    seeds,
    device,
    warmup,
    repeats,
    max_s,
    compile_mode,
):
    """Times one case; returns the measurement, the loss with projection 0 and the seed values."""
    import torch

    m = METHODS[method]
    n = height * width
    s, t = _inputs(batch, channels, height, width, seed, device, requires_grad=mode != "fwd")
    z = _projection(n, k, seed, 0, device) if m.family == "ffa" else None
    t_build = time.perf_counter()
    fn = _loss_fn(method, p, compile_mode)
    last = {}

    if mode == "fwd":

        def run():
            with torch.no_grad():
                loss = fn(s, t, z)
            last["loss"] = loss
            return loss

        pre = None
    elif mode == "fwd_bwd":

        def run():
            loss = fn(s, t, z)
            (g,) = torch.autograd.grad(loss, s)
            last["loss"] = loss.detach()
            return g

        pre = None
    else:

        def pre():
            loss = fn(s, t, z)
            last["loss"] = loss.detach()
            return loss

        def run(loss):
            return torch.autograd.grad(loss, s)

    meas = harness.measure(run, device=device, warmup=warmup, repeats=repeats, max_s=max_s, pre=pre)
    values = [float(last["loss"])]
    if m.family == "ffa":  # the same estimator with further projections, for its error spread
        for j in range(1, seeds):
            zj = _projection(n, k, seed, j, device)
            with torch.set_grad_enabled(mode != "fwd"):
                values.append(float(fn(s, t, zj).detach()))
    out = meas.as_dict()
    out["values"] = values
    out["case_wall_s"] = time.perf_counter() - t_build
    return out


def run_truth(*, batch, channels, height, width, seed, device, full, block_bytes=None):
    """Float64 truth on the sweep's inputs, in plain torch (independent of ffa's kernels).

    Always: exact FA p=2 from the channel-Gram identity (O(N C^2)). With ``full``: a row-blocked
    pass over D (O(N^2 C) work, O(block) memory) giving exact FA p=1, FA p=2 and the p=1 FFA
    expectation sqrt(2/pi) sum_i ||D_i||_2 / N^2. Means over the batch, like reduction="mean".
    """
    import torch

    from ffa import reference

    t0 = time.perf_counter()
    s, t = _inputs(batch, channels, height, width, seed, device, requires_grad=False)
    us = reference.unit_pixels(s.double())  # [B, C, N]
    ut = reference.unit_pixels(t.double())
    n = us.shape[-1]
    nn2 = float(n) * n

    def gram_sq(a, b):
        return (a @ b.transpose(1, 2)).square().sum(dim=(1, 2))

    fa2 = (gram_sq(us, us) + gram_sq(ut, ut) - 2 * gram_sq(us, ut)) / nn2
    out = {"fa_p2": fa2.mean().item(), "fa_p2_source": "float64 channel-Gram identity (torch)"}
    if full:
        if block_bytes is None:  # GPU: fewer, larger blocks (launches dominate small ones)
            block_bytes = 2 << 30 if device == "cuda" else 1 << 28
        b = us.shape[0]
        rows = max(1, min(n, block_bytes // (n * 8 * 3 * b)))
        l1 = torch.zeros(b, dtype=torch.float64, device=device)
        l2 = torch.zeros_like(l1)
        rn = torch.zeros_like(l1)
        for i0 in range(0, n, rows):
            i1 = min(n, i0 + rows)
            d = us[:, :, i0:i1].transpose(1, 2) @ us - ut[:, :, i0:i1].transpose(1, 2) @ ut
            l1 += d.abs().sum(dim=(1, 2))
            l2 += d.square().sum(dim=(1, 2))
            rn += torch.linalg.vector_norm(d, dim=2).sum(dim=1)
            del d
        out["fa_p1"] = (l1 / nn2).mean().item()
        out["fa_p2_blocked"] = (l2 / nn2).mean().item()
        out["ffa_p1_expectation"] = (math.sqrt(2 / math.pi) * rn / nn2).mean().item()
    out["wall_s"] = time.perf_counter() - t0
    return out


def run_k_sweep(*, batch, channels, height, width, ks, ps, seeds, seed, device):
    """FFA values (ffa.fast_feature_affinity_loss) for every k, p and projection seed."""
    import torch

    import ffa

    s, t = _inputs(batch, channels, height, width, seed, device, requires_grad=False)
    n = height * width
    rows = []
    with torch.no_grad():
        for k in ks:
            for j in range(seeds):
                z = _projection(n, k, seed + 104729 * k, j, device)
                for p in ps:
                    v = float(ffa.fast_feature_affinity_loss(s, t, p=p, projection=z))
                    rows.append({"k": k, "p": p, "seed": j, "value": v})
    return rows


# -------------------------------------------------------------------------------------- predictors

# Priors used only before a method has a measurement of its own (later sizes extrapolate from it).
RATE = {"cpu": 2e10, "cuda": 5e12}  # flop/s, deliberately low
COMPILE_PRIOR_S = {"cpu": 30.0, "cuda": 30.0}
KEOPS_COMPILE_PRIOR_S = 60.0


def predict_bytes(m: Method, p, batch, channels, n, k, mode, elem=4) -> int:
    """Working memory of one run above the inputs (conservative)."""
    lin = batch * channels * n * elem
    if m.quadratic_memory():
        # A_S, A_T and D live together in the forward; backward adds grad, sign/2D and a product.
        mats = 3 if mode == "fwd" else 4
        return mats * batch * n * n * elem + 6 * lin
    if m.family == "ffa":
        return 8 * lin + 8 * batch * n * k * elem
    if m.impl == "portable":  # float64 gradient sums, unit pixels, 64 MiB of row blocks
        return 16 * lin + (64 << 20)
    return 8 * lin + (64 << 20)  # ffa/keops exact FA: O(N C) plus per-thread tiles


def predict_run_s(m: Method, p, batch, channels, n, k, device) -> float:
    c = channels
    if m.family == "ffa":
        flops = 3 * 8 * batch * n * k * c
    elif m.time_exponent(p) == 1:
        flops = 3 * 4 * batch * n * c * c
    else:
        flops = 3 * 4 * batch * n * n * c
    return flops / RATE[device] * (50 if m.impl == "keops" else 1)
