"""Calls every CUDA kernel path of ffa once, forward and backward, on small inputs: the program that
tools/gpu_check.sh runs under compute-sanitizer (memcheck, racecheck, synccheck, initcheck).

    python tools/gpu_sanitize.py --plan           # list the planned calls (no torch, no GPU)
    python tools/gpu_sanitize.py                  # run them on CUDA, one line per call
    python tools/gpu_sanitize.py --device cpu     # the same calls on the CPU kernels (dry run)
    python tools/gpu_sanitize.py --kernels        # also list the ffa kernels launched (profiler;
                                                  # not under compute-sanitizer)

Coverage (the kernel paths are chosen in csrc/cuda/*.cu; the sizes below are picked to reach each
one on an H100/H200, whose opt-in shared memory is 227 KiB):
- exact FA p=1 (fa_l1_plan): tensor cores with mt=2 and mt=1 (bf16, fp16, TF32), the SIMT path
  (float32 with TF32 off, float64, and K = Cs + Ct too large for the resident tiles), odd N over
  several 128-row blocks, channels_last and strided inputs, student-only gradients;
- exact FA p=2: float64 packing + cuBLAS Grams + the chain-rule kernel, every dtype, TF32 on/off;
- FFA with a projection: p=1/2, every dtype, k = 1, 15 (fused gradient), 17 (k > 16: G workspace),
  40 (two projection windows), a per-sample projection, the non-resident projection (C large);
- FFA with Philox probes (the CUDA eager path of fast_feature_affinity_loss): the fast (k <= 16)
  and slow (projection k > 32, gradient k > 16) generators, once through the public API;
- quantize_weight (bits 1, 2, 3, 4, 8; per tensor and per channel), quant_relu (every STE and
  step-gradient rule, step on the device and on the host), fake_quantize (per tensor, per channel
  with the channel axis outer or innermost, integer and float zero points, learnable LSQ), every
  dtype, plus one large tensor per op (multi-block reductions, grid-stride loops).

Each call runs in try/except and synchronizes, so an asynchronous fault is charged to its call. The
last line is ``gpu_sanitize: N calls, F failed, S not run`` (tools/gpu_summary.py reads it); the
exit status is 1 when a call failed.
"""

from __future__ import annotations

import argparse
import re
import sys
import time
from dataclasses import dataclass, field

DTYPES = {"fp32": "float32", "fp64": "float64", "bf16": "bfloat16", "fp16": "float16"}
EPS = 1e-5
LARGE = 1 << 25  # elements of the large quantization inputs (128 MiB in float32)


@dataclass(frozen=True)
class Call:
    """One kernel call: ``kind`` selects the runner, ``opts`` its shapes and options."""

    name: str
    kind: str
    dtype: str  # fp32, fp64, bf16, fp16
    path: str  # the kernel path this call is meant to take (for the report)
    tf32: bool = False
    opts: dict = field(default_factory=dict, hash=False, compare=False)


# Shapes (B, Cs, Ct, H, W). N = 10 * 13 = 130 spans two 128-row blocks (and two FFA pixel blocks)
# and is ragged. fa_l1_plan on 227 KiB of shared memory (H100/H200): bf16/fp16 tensor cores with
# mt=2 up to K = CsP + CtP = 444, mt=1 up to 592; TF32 mt=2 up to 208, mt=1 up to 288; beyond, and
# for float32 without TF32 and float64, the SIMT path. The FFA projection keeps the block tile
# resident up to 96 KiB: C <= 160 in float32, C <= 32 in float64.
BASE = (2, 8, 12, 10, 13)
QSHAPE = (2, 8, 33, 17)  # quant_relu / fake_quantize: several reduction blocks, odd sizes
WSHAPE = (64, 32, 3, 3)  # quantize_weight: several reduction blocks
WIDE = (2, 192, 8, 9, 15)  # FFA: the student's projection tile is not resident in float32

# Calls beyond the dtype grids: (kind, dtype, tf32, kernel path, label, options).
SPECIAL = [
    ("fa", "bf16", 0, "tensor cores mt=1", "p=1 K=512", dict(p=1, shape=(1, 256, 256, 5, 7))),
    ("fa", "fp16", 0, "SIMT: K > smem", "p=1 K=608", dict(p=1, shape=(1, 300, 300, 5, 7))),
    ("fa", "fp32", 1, "TF32 mt=1", "p=1 K=256", dict(p=1, shape=(1, 128, 128, 5, 7))),
    ("fa", "fp32", 1, "SIMT: K > smem", "p=1 K=320", dict(p=1, shape=(1, 160, 160, 5, 7))),
    ("fa", "fp32", 1, "Cs != Ct, one pixel", "p=1 3+17x1x1", dict(p=1, shape=(2, 3, 17, 1, 1))),
    ("fa", "fp64", 0, "Cs != Ct, one row", "p=1 5+3x1x37", dict(p=1, shape=(1, 5, 3, 1, 37))),
    ("ffa", "fp32", 0, "G workspace (k > 16)", "p=1 k=17", dict(p=1, k=17)),
    ("ffa", "bf16", 0, "two projection windows (k > 32)", "p=2 k=40", dict(p=2, k=40)),
    ("ffa", "fp32", 0, "k = 1", "p=1 k=1", dict(p=1, k=1)),
    ("ffa", "fp32", 0, "per-sample projection", "p=2 k=15 Bz=B", dict(p=2, k=15, per_sample=1)),
    ("ffa", "fp32", 0, "non-resident projection", "p=1 C=192", dict(p=1, k=15, shape=WIDE)),
    ("ffa", "fp64", 0, "non-resident projection", "p=2 k=17 C=64",
     dict(p=2, k=17, shape=(1, 64, 40, 9, 15))),
    ("ffa", "fp16", 0, "channels_last, student grad only", "p=1 k=15 channels_last",
     dict(p=1, k=15, layout="channels_last", grad_t=False)),
    ("philox", "fp32", 0, "slow Philox (k > 32)", "p=1 k=40", dict(p=1, k=40, offset=8)),
    ("philox", "bf16", 0, "slow Philox gradient (k > 16)", "p=2 k=17", dict(p=2, k=17)),
    ("philox", "fp32", 0, "non-resident projection", "p=2 C=192", dict(p=2, k=15, shape=WIDE)),
    ("philox_api", "fp32", 0, "the public API, default generator", "p=1 k=15", dict(p=1, k=15)),
    ("quantize_weight", "fp32", 0, "odd shape", "bits=4 per-channel 7x5x3",
     dict(shape=(7, 5, 3), bits=4, per_channel=True)),
    ("quantize_weight", "bf16", 0, "channels_last weight", "bits=2 per-channel channels_last",
     dict(shape=(16, 8, 3, 3), bits=2, per_channel=True, layout="channels_last")),
    ("quantize_weight", "fp32", 0, "large, grid-stride", "bits=4 large",
     dict(shape=(LARGE + 4097,), bits=4, per_channel=False, large=True)),
    ("quantize_weight", "fp32", 0, "large per channel", "bits=8 per-channel large",
     dict(shape=(256, LARGE // 256 + 29), bits=8, per_channel=True, large=True)),
    ("quant_relu", "fp32", 0, "step on the host", "bits=4 host step",
     dict(bits=4, ste="inplt", alpha_grad="mean", host_alpha=True)),
    ("quant_relu", "fp16", 0, "channels_last", "bits=2 channels_last",
     dict(bits=2, ste="inplt", alpha_grad="ae", layout="channels_last")),
    ("quant_relu", "fp32", 0, "large, grid-stride", "bits=4 large",
     dict(shape=(LARGE + 333,), bits=4, ste="inplt", alpha_grad="mean", large=True)),
    ("fake_quantize", "fp32", 0, "per tensor, qparams on the device", "per-tensor device",
     dict(device_qparams=True)),
    ("fake_quantize", "fp32", 0, "per tensor, float zero point", "per-tensor float-zp",
     dict(device_qparams=True, float_zp=True)),
    ("fake_quantize", "fp64", 0, "per channel, float zero point", "per-channel float-zp",
     dict(axis=1, float_zp=True)),
    ("fake_quantize", "fp32", 0, "per channel, axis innermost", "per-channel channels_last",
     dict(axis=1, layout="channels_last")),
    ("fake_quantize", "bf16", 0, "per channel, last axis", "per-channel axis=-1", dict(axis=-1)),
    ("fake_quantize", "fp32", 0, "per channel, axis 0", "per-channel axis=0", dict(axis=0)),
    ("fake_quantize", "fp16", 0, "learnable, axis innermost", "learnable per-channel channels_last",
     dict(learnable=True, axis=1, layout="channels_last")),
    ("fake_quantize", "fp32", 0, "learnable, scale grad only", "learnable scale-only",
     dict(learnable=True, zp_grad=False)),
    ("fake_quantize", "fp32", 0, "learnable per tensor, large", "learnable per-tensor large",
     dict(learnable=True, shape=(LARGE + 77,), large=True)),
    ("fake_quantize", "fp32", 0, "learnable per channel, large", "learnable per-channel large",
     dict(learnable=True, axis=1, shape=(4, 64, 361, 365), large=True)),
]  # fmt: skip


def plan() -> list[Call]:
    """Every planned call, in run order. Pure Python: no torch import."""
    calls: list[Call] = []

    def add(kind, dtype, tf32, path, label, opts):
        default = BASE if kind in ("fa", "ffa", "philox", "philox_api") else QSHAPE
        opts = {"shape": WSHAPE if kind == "quantize_weight" else default, **opts}
        name = f"{kind} {dtype}{'+tf32' if tf32 else ''} {label}"
        calls.append(Call(name, kind, dtype, path, bool(tf32), opts))

    for p in (1, 2):  # exact FA: every precision, then layouts
        for dtype, tf32 in (("fp32", 0), ("fp32", 1), ("fp64", 0), ("bf16", 0), ("fp16", 0)):
            simt = dtype == "fp64" or (dtype == "fp32" and not tf32)
            path = "tensor cores mt=2" if p == 1 and not simt else "SIMT" if p == 1 else "Grams"
            add("fa", dtype, tf32, path, f"p={p}", dict(p=p))
        opts = dict(p=p, layout="channels_last", grad_t=False)
        add("fa", "bf16", 0, "channels_last, student grad only", f"p={p} channels_last", opts)
        add("fa", "fp16", 0, "strided view", f"p={p} strided", dict(p=p, layout="strided"))
    for kind, path in (("ffa", "projection"), ("philox", "fast Philox (k <= 16)")):
        for p in (1, 2):
            for dtype in DTYPES:
                add(kind, dtype, 0, path, f"p={p} k=15", dict(p=p, k=15))
    for dtype in DTYPES:
        for bits in (1, 2, 3, 4, 8):
            for pc in (False, True):
                label = f"bits={bits}" + (" per-channel" if pc else "")
                path = "per channel" if pc else "per tensor"
                add("quantize_weight", dtype, 0, path, label, dict(bits=bits, per_channel=pc))
        for ste, alpha_grad, bits in (
            ("inplt", "mean", 4),
            ("idnty", "ae", 2),
            ("relu", "pact", 1),
            ("inplt", "min", 8),
        ):
            opts = dict(bits=bits, ste=ste, alpha_grad=alpha_grad)
            add(
                "quant_relu",
                dtype,
                0,
                "step on the device",
                f"bits={bits} {ste}/{alpha_grad}",
                opts,
            )
        add("fake_quantize", dtype, 0, "per tensor, qparams on the host", "per-tensor host", {})
        add("fake_quantize", dtype, 0, "per channel, axis 1", "per-channel axis=1", dict(axis=1))
        add("fake_quantize", dtype, 0, "learnable per tensor", "learnable per-tensor",
            dict(learnable=True))  # fmt: skip
        add("fake_quantize", dtype, 0, "learnable per channel", "learnable per-channel axis=1",
            dict(learnable=True, axis=1))  # fmt: skip
    for row in SPECIAL:
        add(*row)
    order = ("fa", "ffa", "philox", "philox_api", "quantize_weight", "quant_relu", "fake_quantize")
    calls.sort(key=lambda c: order.index(c.kind))  # stable: grids first within a kind
    names = [c.name for c in calls]
    dup = {n for n in names if names.count(n) > 1}
    assert not dup, f"duplicate call names: {sorted(dup)}"
    return calls


# ------------------------------------------------------------------------------------------ runners
# Everything below imports torch (inside the functions, so --plan stays torch-free).


def _gen(seed):
    import torch

    return torch.Generator().manual_seed(seed)


def _tensor(shape, dtype, device, *, seed, layout="contiguous", scale=1.0):
    """N(0, scale^2) values drawn on the CPU, then laid out and moved (strides kept)."""
    import torch

    dt = getattr(torch, DTYPES[dtype])
    if layout == "strided":  # a non-dense view: every other column of a wider tensor
        wide = (*shape[:-1], 2 * shape[-1] + 1)
        x = (torch.randn(wide, generator=_gen(seed)) * scale).to(device=device, dtype=dt)
        return x[..., 1::2].detach()
    x = (torch.randn(shape, generator=_gen(seed)) * scale).to(dtype=dt)
    if layout == "channels_last":
        x = x.to(memory_format=torch.channels_last)
    return x.to(device)


def _pair(call, device):
    b, cs, ct, h, w = call.opts["shape"]
    layout = call.opts.get("layout", "contiguous")
    s = _tensor((b, cs, h, w), call.dtype, device, seed=1, layout=layout).requires_grad_()
    t = _tensor((b, ct, h, w), call.dtype, device, seed=2, layout=layout)
    return s, t.requires_grad_(call.opts.get("grad_t", True))


def _leaves(*xs):
    return [x for x in xs if x is not None and x.requires_grad]


def run_fa(call, device):
    import ffa

    s, t = _pair(call, device)
    loss = ffa.feature_affinity_loss(s, t, p=call.opts["p"], reduction="sum")
    return loss, _leaves(s, t)


def run_ffa(call, device):
    import torch

    import ffa

    s, t = _pair(call, device)
    b, _, _, h, w = call.opts["shape"]
    bz = b if call.opts.get("per_sample") else 1
    cdt = torch.float64 if call.dtype == "fp64" else torch.float32
    z = torch.randn(bz, h * w, call.opts["k"], generator=_gen(3), dtype=cdt).to(device)
    loss = ffa.fast_feature_affinity_loss(s, t, p=call.opts["p"], projection=z, reduction="sum")
    return loss, _leaves(s, t)


def run_philox(call, device):
    import ffa

    s, t = _pair(call, device)
    o = call.opts
    loss = ffa.ops.ffa_loss_philox(s, t, o["k"], o["p"], EPS, 1234, o.get("offset", 0))[0]
    return loss.sum(), _leaves(s, t)


def run_philox_api(call, device):
    import ffa

    s, t = _pair(call, device)
    loss = ffa.fast_feature_affinity_loss(s, t, p=call.opts["p"], k=call.opts["k"])
    return loss, _leaves(s, t)


def run_quantize_weight(call, device):
    from ffa.quant import quantize_weight

    o = call.opts
    w = _tensor(
        o["shape"], call.dtype, device, seed=4, layout=o.get("layout", "contiguous"), scale=0.1
    ).requires_grad_()
    y = quantize_weight(w, o["bits"], per_channel=o["per_channel"])
    return (y.float() * _weights(y)).sum(), [w]


def _weights(y):
    """Fixed non-uniform cotangents, so every element's gradient is distinct."""
    import torch

    return torch.linspace(-1.0, 1.0, y.numel(), device=y.device).view(y.shape)


def run_quant_relu(call, device):
    import torch

    from ffa.quant import quant_relu

    o = call.opts
    x = _tensor(o["shape"], call.dtype, device, seed=5, layout=o.get("layout", "contiguous"))
    x.requires_grad_()
    if o.get("host_alpha"):
        alpha, leaves = 0.3, [x]
    else:
        alpha = torch.tensor([0.3], device=device, requires_grad=True)
        leaves = [x, alpha]
    y = quant_relu(x, alpha, o["bits"], ste=o["ste"], alpha_grad=o["alpha_grad"])
    return (y.float() * _weights(y)).sum(), leaves


def run_fake_quantize(call, device):
    import torch

    from ffa.quant import fake_quantize

    o = call.opts
    x = _tensor(o["shape"], call.dtype, device, seed=6, layout=o.get("layout", "contiguous"))
    x.requires_grad_()
    axis, learnable = o.get("axis"), o.get("learnable", False)
    qmin, qmax = 0, 255
    leaves = [x]
    if axis is None and not learnable and not o.get("device_qparams"):
        scale, zp = 0.02, 100  # numbers: read on the host
    else:
        count = () if axis is None else (x.shape[axis],)
        scale = torch.full(count, 0.02, device=device) + (
            torch.arange(count[0], device=device) * 1e-3 if count else 0.0
        )
        zp_float = learnable or o.get("float_zp", False)
        zp = torch.full(
            count,
            100.4 if zp_float else 100,
            device=device,
            dtype=torch.float32 if zp_float else torch.int32,
        )
        if learnable:
            scale.requires_grad_()
            zp.requires_grad_(o.get("zp_grad", True))
            leaves += _leaves(scale, zp)
    y = fake_quantize(x, scale, zp, qmin, qmax, axis=axis, learnable=learnable, grad_factor=0.5)
    return (y.float() * _weights(y)).sum(), leaves


RUNNERS = {
    "fa": run_fa,
    "ffa": run_ffa,
    "philox": run_philox,
    "philox_api": run_philox_api,
    "quantize_weight": run_quantize_weight,
    "quant_relu": run_quant_relu,
    "fake_quantize": run_fake_quantize,
}


def run_call(call: Call, device: str) -> str:
    """Forward + backward of one call; '' when fine, else what was wrong (non-finite values)."""
    import torch

    old = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = call.tf32
    try:
        out, leaves = RUNNERS[call.kind](call, device)
        grads = torch.autograd.grad(out, leaves)
        if device == "cuda":
            torch.cuda.synchronize()
    finally:
        torch.backends.cuda.matmul.allow_tf32 = old
    bad = [] if torch.isfinite(out).all() else ["output"]
    bad += [f"grad {i}" for i, g in enumerate(grads) if not torch.isfinite(g).all()]
    return f"non-finite {', '.join(bad)}" if bad else ""


def _context_broken() -> bool:
    import torch

    try:
        torch.cuda.synchronize()
        torch.zeros(1, device="cuda").add_(1).item()
        return False
    except RuntimeError:
        return True


def run_all(calls: list[Call], device: str, out=sys.stdout) -> int:
    """Runs the calls; prints one line each and the summary line; returns the failure count."""
    t0 = time.perf_counter()
    failed = not_run = 0
    broken_by = None
    for call in calls:
        if broken_by is not None:
            not_run += 1
            print(
                f"CALL skip {call.name}: not run, the CUDA context broke at {broken_by}", file=out
            )
            continue
        t = time.perf_counter()
        try:
            problem = run_call(call, device)
        except Exception as e:  # noqa: BLE001 - every failure is reported, the run goes on
            problem = f"{type(e).__name__}: {str(e).strip().splitlines()[0] if str(e) else ''}"
            if device == "cuda" and _context_broken():
                broken_by = call.name
        ms = 1e3 * (time.perf_counter() - t)
        if problem:
            failed += 1
            print(f"CALL FAIL {call.name} [{call.path}]: {problem}", file=out, flush=True)
        else:
            print(f"CALL ok   {call.name} [{call.path}] {ms:.1f} ms", file=out, flush=True)
    print(
        f"gpu_sanitize: {len(calls)} calls, {failed} failed, {not_run} not run "
        f"(device {device}, {time.perf_counter() - t0:.1f} s)",
        file=out,
        flush=True,
    )
    return failed + not_run


def list_kernels(calls: list[Call]) -> int:
    """Runs the calls under torch.profiler and prints the distinct ffa kernels launched."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        bad = run_all(calls, "cuda")
    names = sorted(
        {e.name for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA}
    )
    ours = [n for n in names if "ffa" in n]
    print(f"kernels: {len(ours)} distinct ffa kernels launched ({len(names)} kernels in all)")
    for n in ours:
        print("  " + re.sub(r"\(.*", "", n)[:160])
    return bad


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--plan", action="store_true", help="print the planned calls and exit")
    ap.add_argument("--device", choices=["cuda", "cpu"], default="cuda")
    ap.add_argument("--only", default=None, help="regex: run the calls whose name matches")
    ap.add_argument("--skip-large", action="store_true", help="leave out the large inputs")
    ap.add_argument("--kernels", action="store_true", help="list the ffa kernels launched")
    args = ap.parse_args(argv)
    calls = [
        c
        for c in plan()
        if (args.only is None or re.search(args.only, c.name))
        and not (args.skip_large and c.opts.get("large"))
    ]
    if args.plan:
        for c in calls:
            print(f"PLAN {c.name} [{c.path}]")
        kinds = sorted({c.kind for c in calls})
        print(f"gpu_sanitize plan: {len(calls)} calls ({', '.join(kinds)})")
        return 0
    import torch

    if args.device == "cuda" and not torch.cuda.is_available():
        print("gpu_sanitize: no CUDA device (use --plan or --device cpu)", file=sys.stderr)
        return 2
    import ffa

    print(
        f"gpu_sanitize: torch {torch.__version__} (CUDA {torch.version.cuda}), ffa from "
        f"{ffa.__file__}, device {args.device}"
        + (f" ({torch.cuda.get_device_name()})" if args.device == "cuda" else ""),
        flush=True,
    )
    bad = list_kernels(calls) if args.kernels else run_all(calls, args.device)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
