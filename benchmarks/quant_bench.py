"""Benchmark of ffa.quant against the plain references and torch's fake-quantize ops (one run).

Cases (forward + backward unless noted), each timed for ffa and its baseline in the same run:
  - quantize_weight, 512x512x3x3, bits 1/2/4/8 (per tensor) and bits 4 per channel, vs
    ffa.reference.quantize_weight (the released code's loops). Forward only: the gradient is
    straight-through, which the released code implements as a weight swap.
  - fake_quantize learnable per tensor (LSQ) on a [32,256,56,56] activation vs
    torch._fake_quantize_learnable_per_tensor_affine; non-learnable per tensor and per channel
    (axis 1) vs torch.fake_quantize_per_{tensor,channel}_affine.
  - QuantReLU (4 bits, "mean" step gradient) vs ffa.reference.quant_relu(+_backward).
Each timing: warm-up, then the median (and 20th/80th percentiles) of --repeat runs; GPU times
with CUDA events. Bytes moved by ffa's kernels are divided by the time and by a measured copy rate
(y.copy_(x) on the same tensor) to give a fraction of the copy bandwidth.
Writes benchmarks/results/<device-tag>/quant_bench.{csv,json} (machine, versions, git commit).

    python benchmarks/quant_bench.py [--device cpu|cuda] [--repeat 7] [--threads N] [--small]
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import platform
import re
import statistics
import subprocess
import time
from pathlib import Path

import torch

from ffa import reference as R
from ffa.quant import fake_quantize, quant_relu, quantize_weight


def device_tag(device: torch.device) -> str:
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
    else:
        name = f"cpu-{platform.machine()}-{os.cpu_count()}c"
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")


def machine_info(device: torch.device) -> dict:
    info = {
        "device": str(device),
        "device_tag": device_tag(device),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "cpu_count": os.cpu_count(),
    }
    try:
        with open("/proc/cpuinfo") as f:
            model = next(
                (ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")), ""
            )
        info["cpu_model"] = model
    except OSError:
        pass
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
        info["cuda"] = torch.version.cuda
    try:
        root = Path(__file__).resolve().parent.parent
        commit = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, check=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=root,
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
        info["git_commit"] = commit + ("-dirty" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        info["git_commit"] = "unknown"
    return info


def _once(fn, device):
    if device.type == "cuda":
        start, stop = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        stop.record()
        torch.cuda.synchronize(device)
        return start.elapsed_time(stop)
    t0 = time.perf_counter()
    fn()
    return (time.perf_counter() - t0) * 1e3


def _stats(times):
    times = sorted(times)
    q = statistics.quantiles(times, n=5) if len(times) >= 2 else [times[0]] * 4
    return statistics.median(times), q[0], q[3]


def timeit(fn, device, warmup=2, repeat=7):
    """Milliseconds: (median, p20, p80) of `repeat` runs after `warmup` runs."""
    for _ in range(warmup):
        fn()
    return _stats([_once(fn, device) for _ in range(repeat)])


def timepair(baseline, candidate, device, warmup=2, repeat=7):
    """Both timed in alternation (run i of each sees the same machine load); two stat triples."""
    for _ in range(warmup):
        baseline()
        candidate()
    tb, tc = [], []
    for _ in range(repeat):
        tb.append(_once(baseline, device))
        tc.append(_once(candidate, device))
    return _stats(tb), _stats(tc)


def copy_rate(x, device, repeat):
    """Bytes per millisecond of y.copy_(x) (read + write) on x's device."""
    y = torch.empty_like(x)
    ms, _, _ = timeit(lambda: y.copy_(x), device, repeat=repeat)
    return 2 * x.numel() * x.element_size() / ms


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--repeat", type=int, default=7)
    ap.add_argument("--small", action="store_true", help="tiny shapes (a smoke test)")
    ap.add_argument(
        "--threads", type=int, default=None, help="torch CPU threads (files get a _t<N> suffix)"
    )
    ap.add_argument("--out", default=None, help="results folder (default results/<device-tag>)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    gen = torch.Generator(device="cpu").manual_seed(0)
    act_shape = (2, 16, 14, 14) if args.small else (32, 256, 56, 56)
    w_shape = (32, 32, 3, 3) if args.small else (512, 512, 3, 3)
    rows = []
    load_start = os.getloadavg() if hasattr(os, "getloadavg") else None

    def record(case, impl, shape, dtype, times, baseline_ms=None, bytes_moved=None, copy=None):
        ms, p20, p80 = times
        row = {
            "case": case,
            "impl": impl,
            "shape": "x".join(map(str, shape)),
            "dtype": str(dtype).replace("torch.", ""),
            "median_ms": round(ms, 4),
            "p20_ms": round(p20, 4),
            "p80_ms": round(p80, 4),
            "speedup_vs_baseline": round(baseline_ms / ms, 3) if baseline_ms else "",
            "gb_per_s": round(bytes_moved / ms / 1e6, 2) if bytes_moved else "",
            "fraction_of_copy": round(bytes_moved / ms / copy, 3) if bytes_moved and copy else "",
        }
        rows.append(row)
        print(
            f"{case:<34} {impl:<10} {row['median_ms']:>10.3f} ms"
            + (f"  x{row['speedup_vs_baseline']}" if baseline_ms else "")
            + (f"  {row['fraction_of_copy']} of copy" if row["fraction_of_copy"] != "" else "")
        )

    # ---- quantize_weight vs the reference (forward) ----
    w = torch.randn(w_shape, generator=gen).to(device)
    for bits, pc in ((1, False), (2, False), (4, False), (8, False), (4, True)):
        case = f"quantize_weight b{bits}{' per-ch' if pc else ''}"
        t_ref, t_ffa = timepair(
            lambda b=bits, p=pc: R.quantize_weight(w, b, p),
            lambda b=bits, p=pc: quantize_weight(w, b, per_channel=p),
            device,
            repeat=args.repeat,
        )
        record(case, "reference", w_shape, w.dtype, t_ref)
        record(case, "ffa", w_shape, w.dtype, t_ffa, baseline_ms=t_ref[0])

    # ---- activations ----
    x0 = torch.randn(act_shape, generator=gen).to(device)
    g = torch.randn(act_shape, generator=gen).to(device)
    nbytes = x0.numel() * x0.element_size()
    copy = copy_rate(x0, device, args.repeat)
    rows.append(
        {
            "case": "copy",
            "impl": "y.copy_(x)",
            "shape": "x".join(map(str, act_shape)),
            "dtype": "float32",
            "gb_per_s": round(copy / 1e6, 2),
        }
    )
    print(f"{'copy (read+write)':<34} {copy / 1e6:>10.2f} GB/s")
    # The same pass into a freshly allocated output (what every op pays: on CPU, first-touch page
    # faults of the new tensor can cost more than the pass itself).
    t_alloc = timeit(lambda: x0.mul(2.0), device, repeat=args.repeat)
    record(
        "alloc floor: x.mul(2) (fresh output)",
        "torch",
        act_shape,
        x0.dtype,
        t_alloc,
        bytes_moved=2 * nbytes,
        copy=copy,
    )
    x = x0.clone().requires_grad_()

    def fq_lsq(fn):
        s = torch.tensor([0.02], device=device, requires_grad=True)
        z = torch.tensor([3.0], device=device, requires_grad=True)

        def run():
            y = fn(x, s, z)
            return torch.autograd.grad(y, (x, s, z), g)

        return run

    ffa_lsq = fq_lsq(lambda x, s, z: fake_quantize(x, s, z, -128, 127, learnable=True))
    torch_lsq = fq_lsq(
        lambda x, s, z: torch._fake_quantize_learnable_per_tensor_affine(x, s, z, -128, 127, 1.0)
    )
    case = "fake_quantize LSQ per-tensor fwd+bwd"
    t_t, t_f = timepair(torch_lsq, ffa_lsq, device, repeat=args.repeat)
    record(case, "torch", act_shape, x.dtype, t_t)
    record(case, "ffa", act_shape, x.dtype, t_f, t_t[0], bytes_moved=5 * nbytes, copy=copy)

    def fwd_bwd(fn):
        def run():
            return torch.autograd.grad(fn(x), (x,), g)

        return run

    case = "fake_quantize per-tensor fwd+bwd"
    t_t, t_f = timepair(
        fwd_bwd(lambda x: torch.fake_quantize_per_tensor_affine(x, 0.02, 3, -128, 127)),
        fwd_bwd(lambda x: fake_quantize(x, 0.02, 3, -128, 127)),
        device,
        repeat=args.repeat,
    )
    record(case, "torch", act_shape, x.dtype, t_t)
    record(case, "ffa", act_shape, x.dtype, t_f, t_t[0], bytes_moved=5 * nbytes, copy=copy)

    c = act_shape[1]
    sc = (torch.rand(c, generator=gen) * 0.02 + 0.01).to(device)
    zc = torch.randint(-5, 5, (c,), generator=gen, dtype=torch.int32).to(device)
    case = "fake_quantize per-channel fwd+bwd"
    t_t, t_f = timepair(
        fwd_bwd(lambda x: torch.fake_quantize_per_channel_affine(x, sc, zc, 1, -128, 127)),
        fwd_bwd(lambda x: fake_quantize(x, sc, zc, -128, 127, axis=1)),
        device,
        repeat=args.repeat,
    )
    record(case, "torch", act_shape, x.dtype, t_t)
    record(case, "ffa", act_shape, x.dtype, t_f, t_t[0], bytes_moved=5 * nbytes, copy=copy)

    case = "fake_quantize per-tensor fwd"
    with torch.no_grad():
        t_t, t_f = timepair(
            lambda: torch.fake_quantize_per_tensor_affine(x0, 0.02, 3, -128, 127),
            lambda: fake_quantize(x0, 0.02, 3, -128, 127),
            device,
            repeat=args.repeat,
        )
    record(case, "torch", act_shape, x.dtype, t_t)
    record(case, "ffa", act_shape, x.dtype, t_f, t_t[0], bytes_moved=2 * nbytes, copy=copy)

    alpha = torch.tensor([0.1946], device=device, requires_grad=True)

    def relu_ref():
        y = R.quant_relu(x0, alpha, 4)
        return y, R.quant_relu_backward(g, x0, alpha, 4, "inplt", "mean", 0.01)

    def relu_ffa():
        y = quant_relu(x, alpha, 4)
        return torch.autograd.grad(y, (x, alpha), g)

    case = "QuantReLU b4 fwd+bwd"
    t_r, t_f = timepair(relu_ref, relu_ffa, device, repeat=args.repeat)
    record(case, "reference", act_shape, x.dtype, t_r)
    record(case, "ffa", act_shape, x.dtype, t_f, t_r[0], bytes_moved=5 * nbytes, copy=copy)
    with torch.no_grad():
        t_f = timeit(lambda: quant_relu(x0, alpha, 4), device, repeat=args.repeat)
    record("QuantReLU b4 fwd", "ffa", act_shape, x.dtype, t_f, bytes_moved=2 * nbytes, copy=copy)

    info = machine_info(device)
    info["loadavg_at_start"] = load_start
    info["loadavg_at_end"] = os.getloadavg() if hasattr(os, "getloadavg") else None
    info["timing"] = "baseline and ffa alternate run by run; median of --repeat after 2 warm-ups"
    info["repeat"] = args.repeat
    info["small"] = args.small
    out = Path(args.out) if args.out else Path(__file__).parent / "results" / info["device_tag"]
    out.mkdir(parents=True, exist_ok=True)
    fields = [
        "case",
        "impl",
        "shape",
        "dtype",
        "median_ms",
        "p20_ms",
        "p80_ms",
        "speedup_vs_baseline",
        "gb_per_s",
        "fraction_of_copy",
    ]
    stem = "quant_bench" + (f"_t{args.threads}" if args.threads else "")
    with open(out / f"{stem}.csv", "w", newline="") as f:
        wr = csv.DictWriter(f, fieldnames=fields)
        wr.writeheader()
        for r in rows:
            wr.writerow({k: r.get(k, "") for k in fields})
    with open(out / f"{stem}.json", "w") as f:
        json.dump({"machine": info, "rows": rows}, f, indent=1)
    print(f"wrote {out / stem}.csv and .json")


if __name__ == "__main__":
    main()
