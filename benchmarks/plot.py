"""Draws the resolution-sweep figures from the CSV files (not from a sweep's memory), so anyone can
redraw them: ``python benchmarks/plot.py benchmarks/results/<device-tag>/``.

resolution_sweep.png: time and peak memory vs N = H*W on log-log axes, one line per method and p;
cases that did not fit in memory are marked x (at their predicted memory). ffa_error_vs_k.png: FFA's
relative error vs k, mean over projections with the 20th-80th percentile band.
"""

from __future__ import annotations

import json
import math
import sys
from collections import defaultdict
from pathlib import Path

from harness import percentile, read_csv

STYLE = {  # method -> (colour, label)
    "ffa_fa": ("tab:blue", "ffa exact FA"),
    "ffa_ffa": ("tab:green", "ffa FFA"),
    "reference_fa": ("tab:red", "reference FA"),
    "reference_fa_compiled": ("tab:orange", "compiled reference FA"),
    "reference_ffa": ("tab:purple", "reference FFA"),
    "reference_ffa_compiled": ("tab:pink", "compiled reference FFA"),
    "portable_fa": ("tab:cyan", "ffa portable FA"),
    "portable_ffa": ("tab:olive", "ffa portable FFA"),
    "keops_fa": ("tab:brown", "pykeops FA"),
}
LINESTYLE = {1: "-", 2: "--"}


def _float(v):
    try:
        x = float(v)
    except (TypeError, ValueError):
        return None
    return None if math.isnan(x) else x


def _n(row) -> int:
    return int(row["height"]) * int(row["width"])


def _meta(folder: Path, stem: str) -> dict:
    try:
        return json.loads((folder / f"{stem}.json").read_text())
    except (OSError, ValueError):
        return {}


def plot_sweep(csv_path: Path, png_path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.lines import Line2D
    from matplotlib.ticker import NullLocator

    rows = read_csv(csv_path)
    meta = _meta(csv_path.parent, csv_path.stem)
    series = defaultdict(list)
    for r in rows:
        series[(r["method"], int(r["p"]))].append(r)
    fig, (ax_t, ax_m) = plt.subplots(1, 2, figsize=(13, 5.8))
    handles = []
    oom_seen = False
    for (method, p), rs in sorted(series.items(), key=lambda kv: (kv[0][1], kv[0][0])):
        colour, name = STYLE.get(method, ("black", method))
        style = LINESTYLE.get(p, ":")
        rs = sorted(rs, key=lambda r: _n(r))
        if any(r["status"] in ("ok", "oom") for r in rs):  # all skipped: nothing to draw
            handles.append(
                Line2D([], [], color=colour, ls=style, marker="o", ms=4, label=f"{name} p={p}")
            )
        ok = [r for r in rs if r["status"] == "ok"]
        n_ok = [_n(r) for r in ok]
        t = [_float(r["fwd_bwd_ms_median"]) for r in ok]
        lo = [_float(r["fwd_bwd_ms_p20"]) for r in ok]
        hi = [_float(r["fwd_bwd_ms_p80"]) for r in ok]
        if ok:
            ax_t.plot(n_ok, t, style, color=colour, marker="o", ms=4)
            if all(v is not None for v in lo + hi):
                ax_t.fill_between(n_ok, lo, hi, color=colour, alpha=0.15, lw=0)
            mem = [(n, _float(r["peak_mem_mb"])) for n, r in zip(n_ok, ok, strict=True)]
            mem = [(n, m) for n, m in mem if m is not None and m > 0]
            if mem:
                xs, ys = zip(*mem, strict=True)
                ax_m.plot(xs, ys, style, color=colour, marker="o", ms=4)
        for r in rs:
            if r["status"] != "oom":
                continue
            oom_seen = True
            m = _float(r["peak_mem_mb"])
            if m:
                ax_m.plot([_n(r)], [m], "x", color=colour, ms=9, mew=2)
            top = ax_t.get_xaxis_transform()
            ax_t.plot([_n(r)], [0.96], "x", color=colour, ms=9, mew=2, transform=top, clip_on=False)
    if oom_seen:
        handles.append(
            Line2D(
                [],
                [],
                ls="",
                marker="x",
                color="black",
                ms=8,
                mew=2,
                label="out of memory (at its predicted memory; not run)",
            )
        )
    machine = meta.get("machine", {})
    total = machine.get("gpu_memory_bytes") or machine.get("memory_total_bytes")
    if total:
        ax_m.axhline(total / 2**20, color="grey", lw=1, ls=":")
        ax_m.text(
            0.98,
            total / 2**20,
            f"device memory {total / 2**30:.0f} GiB",
            color="grey",
            ha="right",
            va="bottom",
            fontsize=8,
            transform=ax_m.get_yaxis_transform(),
        )
    mode = meta.get("mode", "fwd_bwd")
    sizes = sorted({(_n(r), f"{r['height']}x{r['width']}") for r in rows})
    for ax, ylabel in (
        (ax_t, f"{mode} time, ms (median, p20-p80 band)"),
        (ax_m, "peak memory above the inputs, MiB"),
    ):
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xticks([n for n, _ in sizes], [label for _, label in sizes])
        ax.xaxis.set_minor_locator(NullLocator())
        ax.set_xlabel("resolution H x W (log N)")
        ax.set_ylabel(ylabel)
        ax.grid(True, which="major", alpha=0.3)
    fig.legend(handles=handles, loc="lower center", ncol=4, fontsize=8, frameon=False)
    b = rows[0]["batch"] if rows else "?"
    c = rows[0]["channels"] if rows else "?"
    ks = sorted({r["k"] for r in rows if r["k"]})
    dev = machine.get("gpu_name") or machine.get("cpu_model", "")
    fig.suptitle(
        f"FA vs FFA as resolution grows: B={b}, C={c}, k={','.join(ks) or '-'}, {mode}"
        f"  [{rows[0]['device'] if rows else ''}: {dev}]",
        fontsize=10,
    )
    fig.tight_layout(rect=(0, 0.03 + 0.035 * math.ceil(len(handles) / 4), 1, 1))
    fig.savefig(png_path, dpi=120)
    plt.close(fig)
    return png_path


def plot_error_vs_k(csv_path: Path, png_path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import NullLocator

    rows = [r for r in read_csv(csv_path) if _float(r["rel_err"]) is not None]
    fig, ax = plt.subplots(figsize=(6.5, 4.6))
    by = defaultdict(lambda: defaultdict(list))
    for r in rows:
        by[int(r["p"])][int(r["k"])].append(float(r["rel_err"]))
    what = {2: "p=2 vs exact FA p=2", 1: "p=1 vs its expectation sqrt(2/pi) sum ||D_i|| / N^2"}
    colours = {1: "tab:green", 2: "tab:blue"}
    for p, per_k in sorted(by.items()):
        ks = sorted(per_k)
        mean = [sum(per_k[k]) / len(per_k[k]) for k in ks]
        lo = [percentile(per_k[k], 20) for k in ks]
        hi = [percentile(per_k[k], 80) for k in ks]
        ax.plot(ks, mean, "-o", color=colours.get(p), ms=4, label=f"FFA {what.get(p, p)}")
        ax.fill_between(ks, lo, hi, color=colours.get(p), alpha=0.2, lw=0)
        ax.plot(ks, [mean[0] / math.sqrt(k / ks[0]) for k in ks], ":", color=colours.get(p), lw=1)
    ax.plot([], [], ":", color="grey", label="1/sqrt(k)")
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    all_k = sorted({int(r["k"]) for r in rows})
    ax.set_xticks(all_k, [str(k) for k in all_k])
    ax.xaxis.set_minor_locator(NullLocator())
    ax.set_xlabel("k (Gaussian probes)")
    ax.set_ylabel("relative error |L_k - target| / target")
    ax.grid(True, which="major", alpha=0.3)
    ax.legend(fontsize=8)
    if rows:
        r = rows[0]
        seeds = len({x["seed"] for x in rows})
        ax.set_title(
            f"FFA error vs k at {r['height']}x{r['width']}, B={r['batch']}, "
            f"C={r['channels']} ({seeds} projections each; band p20-p80)",
            fontsize=9,
        )
    fig.tight_layout()
    fig.savefig(png_path, dpi=120)
    plt.close(fig)
    return png_path


def plot_dir(folder) -> list[str]:
    """Redraws every figure whose CSV is in ``folder``; returns the PNG paths written."""
    folder = Path(folder)
    out = []
    if (folder / "resolution_sweep.csv").exists():
        out.append(
            str(plot_sweep(folder / "resolution_sweep.csv", folder / "resolution_sweep.png"))
        )
    if (folder / "ffa_error_vs_k.csv").exists():
        out.append(
            str(plot_error_vs_k(folder / "ffa_error_vs_k.csv", folder / "ffa_error_vs_k.png"))
        )
    return out


if __name__ == "__main__":
    if len(sys.argv) != 2 or not Path(sys.argv[1]).is_dir():
        print("usage: python benchmarks/plot.py RESULTS_DIR", file=sys.stderr)
        sys.exit(2)
    for path in plot_dir(sys.argv[1]):
        print(path)
