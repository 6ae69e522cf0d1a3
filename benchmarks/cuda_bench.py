"""GPU numbers of the CUDA loss kernels, as fractions of ceilings measured in this run.

- FA p=1, bf16, B=8, C=64 (student and teacher), 128x128: fwd+bwd time; FLOPs actually needed
  (the symmetric half: forward N^2 K, backward N^2 K + 2 N^2 Kg, K = Cs + Ct, Kg = Cs) over the
  measured bf16 dense matmul rate; speedup over ffa.reference and torch.compile(reference).
  256x256 too (the reference would need B N^2 bf16 per affinity matrix: reported, not run).
- FFA p=1, float32, B=8, C=64, 256x256, k=15 (projection given): fwd+bwd time; minimal bytes
  (forward reads S and T twice and writes Y; backward reads S twice and Y twice and writes dS)
  over the measured device-to-device copy bandwidth; speedup over the reference and
  torch.compile(reference).
- FA p=2 at 256x256 (float32, B=8, C=64): forward time vs two cuBLAS Gram products S S^T, T T^T.

Times: CUDA events, median (and 20th/80th percentiles) of repeats after warm-up; out of memory is
a result. Writes benchmarks/results/<harness.device_tag>/cuda_bench.{csv,json} (GPU, versions,
commit; the JSON adds harness.machine_info).
Run: python benchmarks/cuda_bench.py [--quick]
"""

from __future__ import annotations

import argparse
import csv
import json
import pathlib

import harness
import torch

import ffa
from ffa import reference as ref

EPS = 1e-5


def timed(fn, warmup=3, reps=10):
    """Median / p20 / p80 milliseconds of fn() (harness.measure: CUDA events), or 'oom'."""
    try:
        m = harness.measure(fn, device="cuda", warmup=warmup, repeats=reps)
    except torch.OutOfMemoryError:
        torch.cuda.empty_cache()
        return {"median_ms": "oom", "p20_ms": "oom", "p80_ms": "oom"}
    return {"median_ms": m.median_ms, "p20_ms": m.p20_ms, "p80_ms": m.p80_ms}


def ceilings():
    """Measured bf16 dense matmul rate (FLOP/s) and device-to-device copy bandwidth (bytes/s)."""
    n = 8192
    a = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    mm = timed(lambda: a @ b, warmup=5, reps=20)["median_ms"]
    src = torch.randn(256 << 20, device="cuda")  # 1 GiB
    dst = torch.empty_like(src)
    cp = timed(lambda: dst.copy_(src), warmup=5, reps=20)["median_ms"]
    return 2 * n**3 / (mm * 1e-3), 2 * src.numel() * 4 / (cp * 1e-3)


def fwd_bwd(loss_fn, s, t):
    s = s.detach().requires_grad_()

    def run():
        s.grad = None
        loss_fn(s, t).sum().backward()

    return run


def features(b, c, h, w, dtype, seed=0):
    g = torch.Generator(device="cuda").manual_seed(seed)
    s = torch.randn(b, c, h, w, device="cuda", dtype=dtype, generator=g)
    t = torch.randn(b, c, h, w, device="cuda", dtype=dtype, generator=g)
    return s, t


def bench_fa_p1(res, peak_flops, size, run_reference):
    b, c = 8, 64
    s, t = features(b, c, size, size, torch.bfloat16)
    n, k, kg = size * size, 2 * c, c
    flops = b * (n * n * k + n * n * k + 2 * n * n * kg)
    row = {"case": f"fa_p1_bf16_B{b}_C{c}_{size}x{size}", "flops": flops}
    row.update(timed(fwd_bwd(lambda a, t_: ffa.ops.fa_loss(a, t_, 1, EPS), s, t)))
    if row["median_ms"] != "oom":
        row["tflops"] = flops / (row["median_ms"] * 1e-3) / 1e12
        row["pct_of_bf16_matmul"] = 100 * flops / (row["median_ms"] * 1e-3) / peak_flops
    row["reference_bytes_per_affinity"] = b * n * n * 2
    if run_reference:

        def reference(a, t_):
            return ref.fa_loss(a, t_, p=1, reduction="none")

        eager = timed(fwd_bwd(reference, s, t), warmup=1, reps=3)["median_ms"]
        compiled = timed(fwd_bwd(torch.compile(reference), s, t), warmup=2, reps=3)["median_ms"]
        row["reference_ms"], row["compiled_reference_ms"] = eager, compiled
        for key, base in (("speedup_vs_reference", eager), ("speedup_vs_compiled", compiled)):
            if base != "oom" and row["median_ms"] != "oom":
                row[key] = base / row["median_ms"]
    res.append(row)


def bench_ffa(res, copy_bw):
    b, c, size, k = 8, 64, 256, 15
    s, t = features(b, c, size, size, torch.float32)
    n = size * size
    z = torch.randn(1, n, k, device="cuda")
    feat, ybytes = b * c * n * 4, b * n * k * 4
    min_bytes = (4 * feat + ybytes) + (2 * feat + 2 * ybytes + feat)
    row = {"case": f"ffa_p1_fp32_B{b}_C{c}_{size}x{size}_k{k}", "min_bytes": min_bytes}
    row.update(timed(fwd_bwd(lambda a, t_: ffa.ops.ffa_loss(a, t_, z, 1, EPS)[0], s, t)))
    if row["median_ms"] != "oom":
        row["pct_of_copy_bw"] = 100 * min_bytes / (row["median_ms"] * 1e-3) / copy_bw

    def reference(a, t_):
        return ref.ffa_loss(a, t_, z, p=1, reduction="none")

    eager = timed(fwd_bwd(reference, s, t))["median_ms"]
    compiled = timed(fwd_bwd(torch.compile(reference), s, t))["median_ms"]
    row["reference_ms"], row["compiled_reference_ms"] = eager, compiled
    for key, base in (("speedup_vs_reference", eager), ("speedup_vs_compiled", compiled)):
        if base != "oom" and row["median_ms"] != "oom":
            row[key] = base / row["median_ms"]
    res.append(row)


def bench_fa_p2(res):
    b, c, size = 8, 64, 256
    s, t = features(b, c, size, size, torch.float32)
    row = {"case": f"fa_p2_fp32_B{b}_C{c}_{size}x{size}_forward"}
    row.update(timed(lambda: ffa.ops.fa_loss(s, t, 2, EPS)))
    s3, t3 = s.flatten(2), t.flatten(2)
    old = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    gram = timed(lambda: (torch.bmm(s3, s3.transpose(1, 2)), torch.bmm(t3, t3.transpose(1, 2))))
    torch.backends.cuda.matmul.allow_tf32 = old
    row["two_gram_ms"] = gram["median_ms"]
    if row["median_ms"] != "oom":
        row["ratio_vs_two_grams"] = row["median_ms"] / gram["median_ms"]
    res.append(row)


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true", help="skip the 256x256 FA p=1 case")
    args = parser.parse_args()
    assert torch.cuda.is_available(), "needs a CUDA GPU"
    info = harness.machine_info("cuda")
    # Stamped on every CSV row: keep these four keys; the full machine record goes to the JSON.
    meta = {
        "gpu": info["gpu_name"],
        "torch": info["torch"],
        "cuda": info["cuda"],
        "commit": info["git_commit"],
    }
    peak, bw = ceilings()
    meta.update({"bf16_matmul_tflops": peak / 1e12, "d2d_copy_gbps": bw / 1e9})
    res = []
    bench_fa_p1(res, peak, 128, run_reference=True)
    if not args.quick:
        bench_fa_p1(res, peak, 256, run_reference=False)
    bench_ffa(res, bw)
    bench_fa_p2(res)
    out = pathlib.Path(__file__).parent / "results" / info["device_tag"]
    out.mkdir(parents=True, exist_ok=True)
    record = {"meta": meta, "machine": info, "results": res}
    (out / "cuda_bench.json").write_text(json.dumps(record, indent=2))
    keys = sorted({k for r in res for k in r})
    with open(out / "cuda_bench.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(meta) + keys)
        w.writeheader()
        for r in res:
            w.writerow({**meta, **r})
    print(json.dumps(meta))
    for r in res:
        print({k: (round(v, 3) if isinstance(v, float) else v) for k, v in r.items()})


if __name__ == "__main__":
    main()
