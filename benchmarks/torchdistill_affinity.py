"""torchdistill's AffinityLoss against ffa's drop-in (``ffa.AffinityLoss``): time and peak memory.

torchdistill's ``AffinityLoss`` (mid_level.py) forms a [B, N, N] outer-product difference per
channel (N = H W) and keeps it for backward; ``ffa.integrations.torchdistill.AffinityLoss`` computes
the same value from a closed form in O(B C N). Each case (forward + backward through the student
map, teacher detached) runs in a worker subprocess (``harness.Worker``); an out-of-memory case is
recorded as "oom". Each loss is compared with the float64 value of the same float32 inputs
(torchdistill's float32 sum over N^2 entries drifts as N grows; the drop-in computes in float64).
Writes benchmarks/results/<device-tag>/torchdistill_affinity.{csv,json}.

Needs torchdistill (torch >= 2.12, torchvision >= 0.27):

    python benchmarks/torchdistill_affinity.py [--batch 2] [--channels 10] [--sizes 16 32 64 128]
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import harness
import torch


def run_case(method, batch, channels, size, repeat, threads):
    torch.set_num_threads(threads)
    from torchdistill.losses.mid_level import AffinityLoss as TDAffinityLoss

    from ffa.integrations.torchdistill import AffinityLoss, channel_affinity_loss

    cls = TDAffinityLoss if method == "torchdistill" else AffinityLoss
    loss_fn = cls(student_module_path="s", teacher_module_path="t")
    gen = torch.Generator().manual_seed(size)
    fs = torch.randn(batch, channels, size, size, generator=gen, requires_grad=True)
    ft = torch.randn(batch, channels, size, size, generator=gen)
    value = {}

    def run():
        fs.grad = None
        loss = loss_fn({"s": {"output": fs}}, {"t": {"output": ft}})
        loss.backward()
        value["loss"] = loss.item()

    m = harness.measure(run, device="cpu", warmup=2, repeats=repeat, max_s=60)
    # The truth: the closed form on the float64 inputs (equal to torchdistill's formula evaluated
    # in float64 to 1e-12, tests/test_torchdistill_e2e.py).
    truth = channel_affinity_loss(fs.detach().double(), ft.double()).item()
    return {
        **m.as_dict(),
        "loss": value["loss"],
        "rel_err_vs_float64": abs(value["loss"] - truth) / truth,
    }


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--channels", type=int, default=10)
    ap.add_argument("--sizes", type=int, nargs="+", default=[16, 32, 48, 64, 128, 256])
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--threads", type=int, default=torch.get_num_threads())
    ap.add_argument(
        "--max-torchdistill-gib",
        type=float,
        default=4.0,
        help="skip torchdistill cases whose retained [B, N, N] products exceed this",
    )
    args = ap.parse_args()

    info = harness.machine_info("cpu")
    import torchdistill

    info["torchdistill"] = getattr(torchdistill, "__version__", "unknown")
    info["args"] = vars(args)
    out = Path(__file__).resolve().parent / "results" / info["device_tag"]
    columns = [
        "method",
        "batch",
        "channels",
        "size",
        "status",
        "median_ms",
        "p20_ms",
        "p80_ms",
        "peak_mib",
        "loss",
        "rel_err_vs_float64",
        "rel_diff_vs_torchdistill",
        "detail",
    ]
    log = harness.CsvLog(out / "torchdistill_affinity.csv", columns)
    rows = []
    with harness.Worker() as worker:
        for size in args.sizes:
            n = size * size
            retained_gib = args.batch * args.channels * n * n * 4 / 2**30
            losses = {}
            for method in ("torchdistill", "ffa"):
                row = {
                    "method": method,
                    "batch": args.batch,
                    "channels": args.channels,
                    "size": size,
                }
                if method == "torchdistill" and retained_gib > args.max_torchdistill_gib:
                    row.update(
                        status="skipped",
                        detail=f"retains ~{retained_gib:.1f} GiB of [B, N, N] products",
                    )
                else:
                    res = worker.call(
                        run_case,
                        timeout=600,
                        method=method,
                        batch=args.batch,
                        channels=args.channels,
                        size=size,
                        repeat=args.repeat,
                        threads=args.threads,
                    )
                    if res.status == "ok":
                        v = res.value
                        peak = v.get("peak_bytes")
                        row.update(
                            status="ok",
                            median_ms=v["median_ms"],
                            p20_ms=v["p20_ms"],
                            p80_ms=v["p80_ms"],
                            loss=v["loss"],
                            rel_err_vs_float64=v["rel_err_vs_float64"],
                            peak_mib=None if peak is None else peak / 2**20,
                        )
                        losses[method] = v["loss"]
                    else:
                        row.update(status=res.status, detail=res.detail[:200])
                if method == "ffa" and len(losses) == 2:
                    ref = losses["torchdistill"]
                    row["rel_diff_vs_torchdistill"] = abs(losses["ffa"] - ref) / abs(ref)
                log.append(row)
                rows.append(row)
                print(
                    {
                        k: row.get(k)
                        for k in (
                            "method",
                            "size",
                            "status",
                            "median_ms",
                            "peak_mib",
                            "rel_err_vs_float64",
                        )
                    },
                    flush=True,
                )
    (out / "torchdistill_affinity.json").write_text(
        json.dumps({"machine": info, "rows": rows}, indent=1, default=str)
    )
    ok = [r for r in rows if r["status"] == "ok" and r["method"] == "ffa"]
    assert all(math.isfinite(r["loss"]) for r in ok)


if __name__ == "__main__":
    main()
