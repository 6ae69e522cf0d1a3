"""How FA's O(N^2) cost grows with feature-map resolution, against ffa's kernels and FFA.

Run ``python benchmarks/resolution_sweep.py`` (no arguments): device cuda when available, else cpu.
For every resolution and method it times the loss (forward+backward by default) after a warm-up,
records median and 20th/80th percentiles, the peak memory above the inputs, and the accuracy of the
value against a float64 truth; cases predicted not to fit in free memory are recorded as "oom"
without being run, cases predicted to blow the time budget as "skipped" (with the reason).

Methods (``--help`` lists them): the materialized reference ffa.reference (the tests' oracle, the
paper's formulation) and torch.compile of it, ffa's exact FA and FFA kernels, and pykeops when it
imports; at p=1 (the paper's) and p=2 (see --help for which run which by default).

Outputs (benchmarks/results/<device-tag>/ unless --out): resolution_sweep.csv, .json, .png,
ffa_error_vs_k.csv, ffa_error_vs_k.png. ``--config targets`` runs the headline target cases with
their numbers to reach instead (targets.csv, targets.json). Plots are drawn from the CSV files, so
``python benchmarks/plot.py DIR`` redraws them.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import textwrap
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import harness
from fa_methods import (
    COMPILE_PRIOR_S,
    KEOPS_COMPILE_PRIOR_S,
    METHODS,
    ORDER,
    RATE,
    keops_available,
    predict_bytes,
    predict_run_s,
    run_case,
    run_k_sweep,
    run_truth,
    worker_available_bytes,
    worker_machine_info,
)

HERE = Path(__file__).resolve().parent

COLUMNS = [
    "device",
    "method",
    "height",
    "width",
    "channels",
    "batch",
    "k",
    "p",
    "fwd_bwd_ms_median",
    "fwd_bwd_ms_p20",
    "fwd_bwd_ms_p80",
    "peak_mem_mb",
    "status",
    "rel_err",
]
K_COLUMNS = [
    "device",
    "height",
    "width",
    "channels",
    "batch",
    "k",
    "p",
    "seed",
    "value",
    "target",
    "rel_err",
]

COLUMN_DOC = {
    "fwd_bwd_ms_*": "median, 20th and 80th percentile of the timed runs in ms, for the JSON's mode "
    "(fwd_bwd by default; fwd or bwd with --mode)",
    "peak_mem_mb": "peak memory of one run above the inputs, MiB (see memory_method); for status "
    "oom the predicted MiB",
    "status": "ok | oom (predicted not to fit: not run; or a real out-of-memory) | skipped (time "
    "budget; reason in the JSON) | unavailable (optional dependency missing) | error | timeout",
    "rel_err": "exact FA rows: |L - FA_p| / FA_p against a float64 truth; FFA rows: mean over the "
    "JSON's seeds of |L_Z - target| / target, target = exact FA p=2 for p=2 (unbiased) and "
    "sqrt(2/pi) sum_i ||D_i||_2 / N^2 for p=1 (what FFA p=1 estimates; not FA p=1)",
}
MIB = float(1 << 20)


# ----------------------------------------------------------------------------------- configuration

DEFAULTS = {
    "cpu": dict(
        resolutions="16,32,64,128,256",
        batch=2,
        channels=64,
        k=15,
        warmup=1,
        repeats=5,
        seeds=8,
        k_res=64,
        ks="1,2,4,8,16,32,64",
        budget_s=240.0,
        max_case_s=40.0,
        compile="static",
    ),
    "cuda": dict(
        resolutions="16,32,64,128,256,512",
        batch=2,
        channels=64,
        k=15,
        warmup=3,
        repeats=20,
        seeds=16,
        k_res=128,
        ks="1,2,4,8,16,32,64",
        budget_s=900.0,
        max_case_s=60.0,
        compile="static",
    ),
    "quick": dict(
        resolutions="8,16",
        batch=1,
        channels=8,
        k=4,
        warmup=1,
        repeats=2,
        seeds=3,
        k_res=16,
        ks="1,2,4,8",
        budget_s=60.0,
        max_case_s=5.0,
        compile="static",
    ),
}
QUICK_METHODS = "ffa_ffa,ffa_fa,reference_ffa,reference_fa"


class BadInput(Exception):
    pass


def _resolution(tok: str) -> tuple[int, int]:
    parts = tok.lower().split("x")
    if len(parts) not in (1, 2):
        raise BadInput(f"resolution {tok!r} must be S or HxW")
    try:
        vals = [int(v) for v in parts]
    except ValueError:
        raise BadInput(f"resolution {tok!r} must be S or HxW with integers") from None
    if any(v <= 0 for v in vals):
        raise BadInput(f"resolutions must be positive, got {tok!r}")
    return (vals[0], vals[-1])


def _int_list(text: str, name: str, *, choices=None) -> list[int]:
    try:
        vals = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise BadInput(f"{name} must be a comma-separated list of integers, got {text!r}") from None
    if not vals or any(v <= 0 for v in vals):
        raise BadInput(f"{name} must be positive integers, got {text!r}")
    if choices and any(v not in choices for v in vals):
        raise BadInput(f"{name} must be from {sorted(choices)}, got {text!r}")
    return vals


METHOD_HELP = {
    "ffa_ffa": "ffa.fast_feature_affinity_loss with an explicit projection Z [N, k]",
    "ffa_fa": "ffa.feature_affinity_loss (tiled O(N^2 C) for p=1, channel Grams for p=2)",
    "reference_ffa": "ffa.reference.ffa_loss with the same Z",
    "reference_ffa_compiled": "torch.compile of it",
    "reference_fa": "ffa.reference.fa_loss: the paper's formulation, B x N x N matrices",
    "reference_fa_compiled": "torch.compile of it",
    "portable_ffa": "ffa_ffa on ffa's portable path (FFA_BACKEND=portable; only when named)",
    "portable_fa": "ffa_fa on ffa's portable path (row-blocked torch ops; only when named)",
    "keops_fa": "pykeops LazyTensor exact FA (when pykeops imports)",
}


def _epilog() -> str:
    cpu, gpu, q = DEFAULTS["cpu"], DEFAULTS["cuda"], DEFAULTS["quick"]
    paragraphs = [
        f"Defaults on CPU: resolutions {cpu['resolutions']}, B={cpu['batch']}, "
        f"C={cpu['channels']} (student and teacher), k={cpu['k']}, {cpu['repeats']} timed runs "
        f"after {cpu['warmup']} warm-up, {cpu['seeds']} projection seeds, budget "
        f"{cpu['budget_s']:g} s, at most {cpu['max_case_s']:g} s per case.",
        f"Defaults on CUDA: resolutions {gpu['resolutions']}, B={gpu['batch']}, "
        f"C={gpu['channels']}, k={gpu['k']}, {gpu['repeats']} runs after {gpu['warmup']} "
        f"warm-up, {gpu['seeds']} seeds, budget {gpu['budget_s']:g} s.",
        f"--quick: resolutions {q['resolutions']}, B={q['batch']}, C={q['channels']}, "
        f"k={q['k']}, methods {QUICK_METHODS}.",
        "Modes: fwd = forward without autograd (inference); bwd = backward only (the forward "
        "is run untimed before each run); fwd_bwd = forward + gradient w.r.t. the student "
        "(teacher frozen), as in distillation.",
        "Cases predicted to need more than the free memory are recorded as oom without "
        "running; cases predicted to take longer than --max-case-s per run, or to overrun "
        "--budget-s, as skipped (the reason is in the notes and the JSON).",
    ]
    text = "\n\n".join(textwrap.fill(p, 79) for p in paragraphs)
    methods = "\n".join(f"  {name:<24}{what}" for name, what in METHOD_HELP.items())
    return f"methods:\n{methods}\n\n{text}"


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        prog="resolution_sweep.py",
        description="Time and peak memory of exact FA (materialized reference, ffa), FA p=2 and "
        "FFA as feature-map resolution grows; FFA's error against exact FA; FFA error vs k.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=_epilog(),
    )
    ap.add_argument(
        "--config",
        choices=["sweep", *SUITES],
        default="sweep",
        help="sweep (default): the resolution sweep; targets: the headline cases with their "
        "numbers to reach (writes targets.csv/json); portable: the portable path against the "
        "native kernels and the references (writes portable.csv/json)",
    )
    ap.add_argument(
        "--device",
        choices=["cpu", "cuda"],
        default=None,
        help="default: cuda if available, else cpu",
    )
    ap.add_argument("--mode", choices=["fwd", "bwd", "fwd_bwd"], default="fwd_bwd")
    ap.add_argument(
        "--methods",
        default=None,
        help="comma-separated method names (below; default: all but the portable ones, keops_fa "
        "only when pykeops imports)",
    )
    ap.add_argument(
        "--p",
        default="1,2",
        help="p values (default 1,2); unless named in --methods, the compiled references, "
        "keops and the reference FFA run p=1 only (every compile costs seconds; FFA costs the "
        "same at either p)",
    )
    ap.add_argument("--resolutions", default=None, help="comma-separated S or HxW")
    ap.add_argument("--batch", type=int, default=None)
    ap.add_argument("--channels", type=int, default=None)
    ap.add_argument("-k", "--k", type=int, default=None, help="FFA probes (default 15)")
    ap.add_argument("--warmup", type=int, default=None)
    ap.add_argument("--repeats", type=int, default=None)
    ap.add_argument(
        "--seeds", type=int, default=None, help="projections per FFA case for the error statistics"
    )
    ap.add_argument(
        "--k-res",
        type=int,
        default=None,
        help="resolution (S for SxS) of the FFA error-vs-k figure",
    )
    ap.add_argument("--ks", default=None, help="k values of the error-vs-k figure")
    ap.add_argument(
        "--budget-s",
        type=float,
        default=None,
        help="wall-clock budget of the whole sweep; cases predicted to overrun it are skipped",
    )
    ap.add_argument(
        "--max-case-s",
        type=float,
        default=None,
        help="time one case may spend in its timed runs; a case whose single run is "
        "predicted longer is skipped, repeats are cut to fit",
    )
    ap.add_argument(
        "--compile",
        choices=["static", "dynamic"],
        default=None,
        help="torch.compile of the references: static (default) compiles for each "
        "shape, what a user at a fixed resolution gets; dynamic compiles once per "
        "method (cheaper to compile, but its CPU code measured ~250 ms per call at "
        "16x16 against 0.4 ms static, on a busy 2-core machine)",
    )
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument(
        "--out", default=None, help="output folder (default benchmarks/results/<device-tag>/)"
    )
    ap.add_argument(
        "--quick",
        action="store_true",
        help="a tiny configuration that finishes in seconds (smoke test)",
    )
    ap.add_argument("--no-plot", action="store_true", help="write CSV/JSON only")
    return ap


@dataclass
class Config:
    device: str
    mode: str
    methods: list[str]
    ps: list[int]
    method_ps: dict[str, list[int]]
    resolutions: list[tuple[int, int]]
    batch: int
    channels: int
    k: int
    warmup: int
    repeats: int
    seeds: int
    k_res: int
    ks: list[int]
    budget_s: float
    max_case_s: float
    compile: str
    seed: int
    out: str
    quick: bool
    plot: bool
    config: str
    unavailable: dict = field(default_factory=dict)


def _p1_only(method: str) -> bool:
    m = METHODS[method]
    return m.compiled or m.impl == "keops" or (m.impl == "reference" and m.family == "ffa")


def parse_args(argv=None) -> Config:
    ap = build_parser()
    a = ap.parse_args(argv)
    try:
        return _resolve(a)
    except BadInput as e:
        ap.error(str(e))  # exit code 2, usage + message, no traceback


def _resolve(a) -> Config:
    # Everything that needs no torch is checked first, so bad input fails fast.
    d = dict(DEFAULTS["quick" if a.quick else (a.device or "cpu")])
    for key in (
        "resolutions",
        "batch",
        "channels",
        "k",
        "warmup",
        "repeats",
        "seeds",
        "k_res",
        "ks",
        "budget_s",
        "max_case_s",
        "compile",
    ):
        v = getattr(a, key)
        if v is not None:
            d[key] = v
    for key in ("batch", "channels", "k", "repeats", "seeds", "k_res"):
        if d[key] <= 0:
            raise BadInput(f"--{key.replace('_', '-')} must be positive, got {d[key]}")
    if d["warmup"] < 0:
        raise BadInput(f"--warmup must be >= 0, got {d['warmup']}")
    if d["budget_s"] <= 0 or d["max_case_s"] <= 0:
        raise BadInput("--budget-s and --max-case-s must be positive")
    res = [_resolution(tok.strip()) for tok in str(d["resolutions"]).split(",") if tok.strip()]
    if not res:
        raise BadInput("--resolutions is empty")
    ps = _int_list(a.p, "--p", choices={1, 2})
    ks = _int_list(str(d["ks"]), "--ks")
    if a.methods is None:
        if a.quick:
            methods = QUICK_METHODS.split(",")
        elif a.config == "sweep":
            methods = [name for name, m in METHODS.items() if not m.opt_in]
        else:  # a named case list runs all of its cases
            methods = list(METHODS)
    else:
        methods = [m.strip() for m in a.methods.split(",") if m.strip()]
        unknown = [m for m in methods if m not in METHODS]
        if unknown or not methods:
            raise BadInput(
                f"unknown method(s) {unknown or a.methods!r}; choose from {', '.join(METHODS)}"
            )

    if a.device == "cpu":
        device = "cpu"  # the parent never needs torch then: the worker imports it
    else:
        import torch

        if a.device == "cuda" and not torch.cuda.is_available():
            raise BadInput(
                "--device cuda requested but no CUDA GPU is available (torch "
                f"{torch.__version__}, CUDA build: {torch.version.cuda})"
            )
        device = a.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if a.device is None and device == "cuda" and not a.quick:  # GPU defaults for what was not set
        gd = DEFAULTS["cuda"]
        for key in gd:
            if getattr(a, key) is None:
                d[key] = gd[key]
        res = [_resolution(tok.strip()) for tok in str(d["resolutions"]).split(",")]
        ks = _int_list(str(d["ks"]), "--ks")
    if a.config != "sweep":  # named case lists: fixed shapes, compiled as their user would
        for key, v in dict(compile="static", budget_s=3600.0, max_case_s=300.0, repeats=5).items():
            if getattr(a, key) is None:
                d[key] = v
    # Each static torch.compile costs seconds (tens when its cache is cold), pykeops compiles each
    # formula, and the reference FFA costs the same at either p: unless named in --methods, these
    # run the paper's p=1 only (ffa's FFA keeps p=2 for its error against exact FA p=2).
    method_ps = {
        m: ps if a.methods is not None or not _p1_only(m) else [p for p in ps if p == 1]
        for m in methods
    }
    return Config(
        device=device,
        mode=a.mode,
        methods=methods,
        ps=ps,
        method_ps=method_ps,
        resolutions=res,
        batch=d["batch"],
        channels=d["channels"],
        k=d["k"],
        warmup=d["warmup"],
        repeats=d["repeats"],
        seeds=d["seeds"],
        k_res=d["k_res"],
        ks=ks,
        budget_s=float(d["budget_s"]),
        max_case_s=float(d["max_case_s"]),
        compile=d["compile"],
        seed=a.seed,
        out=a.out or str(HERE / "results" / harness.device_tag(device)),
        quick=a.quick,
        plot=not a.no_plot,
        config=a.config,
    )


@dataclass
class History:
    """What one (method, p) measured so far: used to extrapolate to the next size."""

    n: int = 0
    run_s: float = 0.0
    peak_bytes: int | None = None
    overhead_s: float | None = None  # warm-up time beyond its runs (compile, first-call costs)


# --------------------------------------------------------------------------------------- the sweep


@dataclass(frozen=True)
class CaseSpec:
    """One measurement: a method at one shape (batch, channels, resolution, k)."""

    method: str
    p: int
    batch: int
    channels: int
    height: int
    width: int
    k: int
    name: str = ""
    warmup: int | None = None  # None: the config's
    repeats: int | None = None

    @property
    def n(self) -> int:
        return self.height * self.width

    @property
    def shape_key(self) -> tuple[int, int, int, int]:
        return (self.batch, self.channels, self.height, self.width)

    def label(self) -> str:
        return METHODS[self.method].label(self.p)


@dataclass
class Row:
    spec: CaseSpec
    status: str = "ok"
    median_ms: float | None = None
    p20_ms: float | None = None
    p80_ms: float | None = None
    peak_bytes: float | None = None
    rel_err: float | None = None
    reason: str = ""
    predicted_bytes: int | None = None
    predicted_run_s: float | None = None
    detail: dict = field(default_factory=dict)

    def csv_row(self, device: str) -> dict:
        s = self.spec
        peak = self.peak_bytes
        if self.status == "oom" and peak is None:
            peak = self.predicted_bytes  # the prediction that kept it from running
        return {
            "device": device,
            "method": s.method,
            "height": s.height,
            "width": s.width,
            "channels": s.channels,
            "batch": s.batch,
            "k": s.k if METHODS[s.method].family == "ffa" else "",
            "p": s.p,
            "fwd_bwd_ms_median": self.median_ms,
            "fwd_bwd_ms_p20": self.p20_ms,
            "fwd_bwd_ms_p80": self.p80_ms,
            "peak_mem_mb": None if peak is None else peak / MIB,
            "status": self.status,
            "rel_err": self.rel_err,
        }

    def as_dict(self) -> dict:
        d = asdict(self)
        d["label"] = self.spec.label()
        return d


class Runner:
    """Runs case lists in a harness.Worker with memory gating, time budget and float64 truth."""

    def __init__(self, cfg: Config, csv_name: str):
        self.cfg = cfg
        self.t0 = time.perf_counter()
        self.hist: dict[tuple, History] = {}
        self.truth: dict[tuple, dict] = {}
        self.rows: list[Row] = []
        self.events: list[str] = []
        self.out = Path(cfg.out)
        self.out.mkdir(parents=True, exist_ok=True)
        self.csv = harness.CsvLog(self.out / csv_name, COLUMNS)
        self.worker = harness.Worker(mem_limit_fraction=0.92 if cfg.device == "cpu" else None)
        self.machine: dict = {}
        self.failed: dict[tuple, tuple] = {}  # (method, p, B, C, k) -> (N, status, where)
        self.load_at_start = os.getloadavg() if hasattr(os, "getloadavg") else None

    def elapsed(self) -> float:
        return time.perf_counter() - self.t0

    def budget_left(self) -> float:
        return self.cfg.budget_s - self.elapsed()

    def _timeout(self, generous: float) -> float:
        """A job's kill time: generous against a wrong prediction, but never far past the budget
        (a killed job is recorded as "timeout" and the sweep goes on)."""
        return max(30.0, min(max(120.0, generous), self.budget_left() + 30.0))

    def free_bytes(self) -> int:
        if self.cfg.device == "cpu":
            return harness.available_bytes("cpu")
        r = self.worker.call(worker_available_bytes, timeout=120, device="cuda")
        return r.value if r.status == "ok" else 0

    def run(self, cases: list[CaseSpec], *, truth_shapes, k_sweep_shape=None) -> list[Row]:
        from tqdm import tqdm

        truth_shapes = sorted(set(truth_shapes), key=lambda s: (s[2] * s[3], s))
        total = len(truth_shapes) + (1 if k_sweep_shape else 0) + len(cases)
        with (
            self.worker,
            tqdm(
                total=total, desc=self.cfg.config, unit="job", file=sys.stderr, dynamic_ncols=True
            ) as bar,
        ):
            bar.set_postfix_str("starting the worker")
            r = self.worker.call(worker_machine_info, timeout=300, device=self.cfg.device)
            self.machine = r.value if r.status == "ok" else {"error": r.detail}
            self.machine["load_average_at_start"] = self.load_at_start
            if any(c.method == "keops_fa" for c in cases):
                r = self.worker.call(keops_available, timeout=300)
                ok, why = r.value if r.status == "ok" else (False, r.detail)
                if not ok:
                    self.cfg.unavailable["keops_fa"] = why
            for shape in truth_shapes:
                bar.set_postfix_str(f"float64 truth {shape[2]}x{shape[3]}")
                self._truth(shape)
                bar.update()
            if k_sweep_shape:
                bar.set_postfix_str(f"FFA error vs k at {k_sweep_shape[2]}x{k_sweep_shape[3]}")
                self._k_sweep(k_sweep_shape)
                bar.update()
            for spec in cases:
                bar.set_postfix_str(f"{spec.label()} {spec.height}x{spec.width}")
                row = self._case(spec)
                self.rows.append(row)
                self.csv.append(row.csv_row(self.cfg.device))
                bar.update()
        return self.rows

    # ---- float64 truth and the error-vs-k sweep
    def _truth(self, shape):
        cfg = self.cfg
        b, c, h, w = shape
        n = h * w
        h_prev = self.hist.get(("__truth__",))
        pred = 2 * 2 * b * n * n * c / (RATE[cfg.device] / 4)  # float64: a quarter of the prior
        if h_prev is not None:
            pred = h_prev.run_s * (b * n * n) / h_prev.n
        # the O(N^2) float64 pass only feeds rel_err: never worth more than a minute
        full = pred <= min(cfg.max_case_s, 0.1 * cfg.budget_s, 60.0) and pred < self.budget_left()
        r = self.worker.call(
            run_truth,
            timeout=self._timeout(4 * pred),
            batch=b,
            channels=c,
            height=h,
            width=w,
            seed=cfg.seed,
            device=cfg.device,
            full=full,
        )
        if r.status != "ok":
            self.events.append(f"float64 truth at {h}x{w}: {r.status} {r.detail[:200]}")
            self.truth[shape] = {}
            return
        t = r.value
        if not full:
            t["note"] = f"FA p=1 truth not computed (predicted {pred:.0f} s for the O(N^2) pass)"
        elif n >= 1024:  # large enough that the O(N^2) term dominates: extrapolate from it
            self.hist[("__truth__",)] = History(n=b * n * n, run_s=t["wall_s"])
        self.truth[shape] = t

    def _k_sweep(self, shape):
        cfg = self.cfg
        b, c, h, w = shape
        truth = self.truth.get(shape, {})
        klog = harness.CsvLog(self.out / "ffa_error_vs_k.csv", K_COLUMNS)
        r = self.worker.call(
            run_k_sweep,
            timeout=self._timeout(self.budget_left()),
            batch=b,
            channels=c,
            height=h,
            width=w,
            ks=cfg.ks,
            ps=cfg.ps,
            seeds=4 * cfg.seeds,  # forwards only, at one size: cheap, and the figure is a spread
            seed=cfg.seed,
            device=cfg.device,
        )
        if r.status != "ok":
            self.events.append(f"error-vs-k sweep: {r.status} {r.detail[:200]}")
            return
        for row in r.value:
            target = truth.get("fa_p2" if row["p"] == 2 else "ffa_p1_expectation")
            rel = abs(row["value"] - target) / target if target else None
            klog.append(
                {
                    "device": cfg.device,
                    "height": h,
                    "width": w,
                    "channels": c,
                    "batch": b,
                    "target": target,
                    "rel_err": rel,
                    **row,
                }
            )

    # ---- one case
    def _predict(self, spec: CaseSpec):
        cfg = self.cfg
        m = METHODS[spec.method]
        mem = predict_bytes(m, spec.p, spec.batch, spec.channels, spec.n, spec.k, cfg.mode)
        run_s = predict_run_s(m, spec.p, spec.batch, spec.channels, spec.n, spec.k, cfg.device)
        if m.compiled:
            overhead = COMPILE_PRIOR_S[cfg.device]
        elif m.impl == "keops":
            overhead = KEOPS_COMPILE_PRIOR_S
        else:
            overhead = 0.0
        h = self.hist.get((spec.method, spec.p, spec.batch, spec.channels, spec.k))
        if h is not None:
            scale = spec.n / h.n
            run_s = h.run_s * scale ** m.time_exponent(spec.p)
            if h.peak_bytes is not None:
                mem = int(h.peak_bytes * scale ** (2 if m.quadratic_memory() else 1))
            if h.overhead_s is not None:
                # static compiles again at every shape; a dynamic compile and keops' cached
                # formula do not, beyond guards and a possible recompile
                again = m.compiled and cfg.compile == "static"
                overhead = h.overhead_s if again else min(h.overhead_s, 5.0)
        return mem, run_s, overhead

    def _case(self, spec: CaseSpec) -> Row:
        cfg = self.cfg
        m = METHODS[spec.method]
        row = Row(spec)
        if spec.method in cfg.unavailable:
            row.status, row.reason = "unavailable", cfg.unavailable[spec.method]
            return row
        failed = self.failed.get((spec.method, spec.p, spec.batch, spec.channels, spec.k))
        if failed is not None and spec.n >= failed[0]:  # it will not get better at a larger N
            status, where = failed[1], failed[2]
            row.status = "oom" if status == "oom" else "skipped"
            row.reason = f"{status} at {where}, a smaller size: not run"
            return row
        mem, run_s, overhead = self._predict(spec)
        row.predicted_bytes, row.predicted_run_s = mem, run_s
        free = self.free_bytes()
        if mem > 0.9 * free:
            row.status = "oom"
            row.reason = (
                f"predicted {mem / 2**30:.2f} GiB > 90% of the {free / 2**30:.2f} GiB free: not run"
            )
            return row
        if run_s > cfg.max_case_s:
            row.status = "skipped"
            row.reason = f"predicted {run_s:.1f} s per run > --max-case-s {cfg.max_case_s:g}"
            return row
        warmup = cfg.warmup if spec.warmup is None else spec.warmup
        warmup += 1 if m.compiled else 0  # the first call compiles
        notes = []
        if run_s > 5.0 and not m.compiled and m.impl != "keops" and warmup > 0:
            warmup = 0  # nothing to amortize in a multi-second eager run: spend it measuring
            notes.append(f"no warm-up: predicted {run_s:.1f} s per run")
        repeats = cfg.repeats if spec.repeats is None else spec.repeats
        repeats = max(1, min(repeats, int(cfg.max_case_s // max(run_s, 1e-9))))
        cost = overhead + (warmup + repeats) * run_s
        if cost > self.budget_left() - 5.0:
            row.status = "skipped"
            row.reason = (
                f"predicted {cost:.0f} s would overrun --budget-s {cfg.budget_s:g} "
                f"({max(0.0, self.budget_left()):.0f} s left)"
            )
            return row
        r = self.worker.call(
            run_case,
            timeout=self._timeout(4 * cost + (180.0 if overhead else 0.0)),
            method=spec.method,
            p=spec.p,
            batch=spec.batch,
            channels=spec.channels,
            height=spec.height,
            width=spec.width,
            k=spec.k,
            mode=cfg.mode,
            seed=cfg.seed,
            seeds=cfg.seeds,
            device=cfg.device,
            warmup=warmup,
            repeats=repeats,
            max_s=cfg.max_case_s,
            compile_mode=cfg.compile,
        )
        row.detail["notes"] = notes
        if r.status != "ok":
            row.status = r.status
            row.reason = r.detail.splitlines()[0][:300] if r.detail else ""
            if r.status == "error":
                row.detail["error"] = r.detail
            key = (spec.method, spec.p, spec.batch, spec.channels, spec.k)
            self.failed[key] = (spec.n, r.status, f"{spec.height}x{spec.width}")
            return row
        v = r.value
        row.median_ms, row.p20_ms, row.p80_ms = v["median_ms"], v["p20_ms"], v["p80_ms"]
        row.peak_bytes = v["peak_bytes"]
        row.detail.update({k: v[k] for k in ("times_ms", "warmup_ms", "values", "case_wall_s")})
        notes.extend(v["notes"])
        warm_s = sum(v["warmup_ms"]) / 1e3 - len(v["warmup_ms"]) * v["median_ms"] / 1e3
        self.hist[(spec.method, spec.p, spec.batch, spec.channels, spec.k)] = History(
            n=spec.n,
            run_s=v["median_ms"] / 1e3,
            peak_bytes=v["peak_bytes"],
            overhead_s=max(0.0, warm_s) if (m.compiled or m.impl == "keops") else None,
        )
        row.rel_err, row.detail["accuracy"] = self._accuracy(spec, v["values"])
        return row

    def _accuracy(self, spec: CaseSpec, values):
        truth = self.truth.get(spec.shape_key, {})
        p = spec.p
        if METHODS[spec.method].family == "fa":
            target = truth.get("fa_p1" if p == 1 else "fa_p2")
            if not target:
                return None, {}
            return abs(values[0] - target) / target, {"truth": target}
        target = truth.get("ffa_p1_expectation" if p == 1 else "fa_p2")
        acc = {"values": values}
        if p == 1 and truth.get("fa_p1"):
            acc["ratio_to_fa_p1_mean"] = sum(values) / len(values) / truth["fa_p1"]
        if not target:
            return None, acc
        signed = [(v - target) / target for v in values]
        mean_signed = sum(signed) / len(signed)
        acc.update(
            {
                "target": target,
                "target_is": "exact FA p=2" if p == 2 else "sqrt(2/pi) sum_i ||D_i||_2 / N^2",
                "seeds": len(values),
                "rel_err_abs_mean": sum(abs(x) for x in signed) / len(signed),
                "rel_err_signed_mean": mean_signed,
                "rel_err_std": _std(signed),
                "ratio_to_target_mean": 1 + mean_signed,
            }
        )
        return acc["rel_err_abs_mean"], acc


def _std(xs):
    if len(xs) < 2:
        return 0.0
    mu = sum(xs) / len(xs)
    return math.sqrt(sum((x - mu) ** 2 for x in xs) / (len(xs) - 1))


# ----------------------------------------------------------------------------------------- summary


def _fmt_ms(ms):
    if ms is None:
        return "-"
    return f"{ms:.3g}" if ms < 1000 else f"{ms:,.0f}"


def _fmt_mb(b):
    if b is None:
        return "-"
    mb = b / MIB
    return f"{mb:.3g}" if mb < 1000 else f"{mb:,.0f}"


def _x(v):
    return f"{v:.3g}x" if v is not None else "n/a"


def summary_table(rows: list[Row], *, show_shape=False) -> str:
    shape_h = f"{'B':>3} {'C':>4} " if show_shape else ""
    head = (
        f"{'res':>9}  {shape_h}{'method':<30} {'time ms (p20-p80)':>26} {'peak MiB':>10}  "
        f"{'status':<11} {'rel_err':>8}"
    )
    lines = [head, "-" * len(head)]
    last = None
    for r in rows:
        s = r.spec
        res = f"{s.height}x{s.width}"
        if last is not None and res != last and not show_shape:
            lines.append("")
        last = res
        t = "-"
        if r.median_ms is not None:
            t = f"{_fmt_ms(r.median_ms)} ({_fmt_ms(r.p20_ms)}-{_fmt_ms(r.p80_ms)})"
        peak = _fmt_mb(r.peak_bytes)
        if r.status == "oom" and r.peak_bytes is None and r.predicted_bytes:
            peak = "~" + _fmt_mb(r.predicted_bytes)
        err = f"{r.rel_err:.1e}" if r.rel_err is not None else "-"
        shape = f"{s.batch:>3} {s.channels:>4} " if show_shape else ""
        lines.append(
            f"{res:>9}  {shape}{s.label():<30} {t:>26} {peak:>10}  {r.status:<11} {err:>8}"
        )
    return "\n".join(lines)


def _get(rows, method, p, res=None, status="ok"):
    for r in rows:
        s = r.spec
        if (
            s.method == method
            and s.p == p
            and (res is None or (s.height, s.width) == res)
            and (status is None or r.status == status)
        ):
            return r
    return None


def _ratio(fast: Row | None, slow: Row | None, attr: str):
    if fast is None or slow is None:
        return None
    a, b = getattr(fast, attr), getattr(slow, attr)
    if a is None or b is None or a <= 0:
        return None
    return b / a


def headlines(rows: list[Row], cfg: Config) -> list[str]:
    out = []

    def largest_common(m1, m2, p):
        res = [
            (r.spec.height, r.spec.width)
            for r in rows
            if r.status == "ok"
            and r.spec.method == m1
            and r.spec.p == p
            and _get(rows, m2, p, (r.spec.height, r.spec.width))
        ]
        return max(res, key=lambda x: x[0] * x[1]) if res else None

    for p in cfg.ps:
        res = largest_common("ffa_fa", "reference_fa", p)
        if res:
            f, ref = _get(rows, "ffa_fa", p, res), _get(rows, "reference_fa", p, res)
            what = "ffa exact FA p=1" if p == 1 else "ffa FA p=2"
            line = (
                f"at {res[0]}x{res[1]}: {what} {_x(_ratio(f, ref, 'median_ms'))} faster than "
                "the reference"
            )
            comp = _get(rows, "reference_fa_compiled", p, res)
            if comp:
                line += f" ({_x(_ratio(f, comp, 'median_ms'))} vs torch.compile)"
            mem = _ratio(f, ref, "peak_bytes")
            if mem:
                line += f", {_x(mem)} less memory"
            out.append(line)
    for p in cfg.ps:
        res = largest_common("ffa_ffa", "reference_ffa", p)
        if res:
            f, ref = _get(rows, "ffa_ffa", p, res), _get(rows, "reference_ffa", p, res)
            line = (
                f"at {res[0]}x{res[1]}: ffa FFA p={p} (k={cfg.k}) "
                f"{_x(_ratio(f, ref, 'median_ms'))} faster than the reference FFA"
            )
            comp = _get(rows, "reference_ffa_compiled", p, res)
            if comp:
                line += f" ({_x(_ratio(f, comp, 'median_ms'))} vs torch.compile)"
            mem = _ratio(f, ref, "peak_bytes")
            if mem:
                line += f", {_x(mem)} less memory"
            out.append(line)
    for p in cfg.ps:  # accuracy at the largest resolution that has it
        cands = [
            r
            for r in rows
            if r.status == "ok"
            and r.spec.method == "ffa_ffa"
            and r.spec.p == p
            and r.detail.get("accuracy", {}).get("target")
        ]
        if not cands:
            continue
        r = max(cands, key=lambda r: r.spec.n)
        a, s = r.detail["accuracy"], r.spec
        if p == 2:
            out.append(
                f"at {s.height}x{s.width}: FFA p=2 (k={s.k}) relative error to exact FA "
                f"p=2: mean |err| {a['rel_err_abs_mean']:.3g}, bias "
                f"{a['rel_err_signed_mean']:+.3g}, std {a['rel_err_std']:.3g} over "
                f"{a['seeds']} projections"
            )
        else:
            vs_fa = ""
            if "ratio_to_fa_p1_mean" in a:
                vs_fa = f"{a['ratio_to_fa_p1_mean']:.3g}x exact FA p=1 (not an estimate of it), "
            out.append(
                f"at {s.height}x{s.width}: FFA p=1 (k={s.k}) = {vs_fa}"
                f"{a['ratio_to_target_mean']:.3g}x its expectation sqrt(2/pi) "
                f"sum_i ||D_i||/N^2 (std {a['rel_err_std']:.3g} over {a['seeds']} "
                "projections)"
            )
    for p in cfg.ps:  # where the materialized reference stops and ffa goes on
        oom = [
            r
            for r in rows
            if r.spec.method == "reference_fa" and r.spec.p == p and r.status == "oom"
        ]
        if not oom:
            continue
        r = min(oom, key=lambda r: r.spec.n)
        s = r.spec
        f = _get(rows, "ffa_fa", p, (s.height, s.width))
        need = f" (predicted ~{r.predicted_bytes / 2**30:.0f} GiB)" if r.predicted_bytes else ""
        line = f"at {s.height}x{s.width}: the reference FA p={p} is out of memory{need}"
        if f:
            line += f"; ffa runs it in {_fmt_ms(f.median_ms)} ms with {_fmt_mb(f.peak_bytes)} MiB"
        out.append(line)
    return out


# ----------------------------------------------------------------------------------------- outputs


def write_json(path: Path, cfg: Config, runner: Runner, extra: dict):
    info = runner.machine
    doc = {
        "machine": info,
        "args": asdict(cfg),
        "argv": sys.argv[1:],
        "mode": cfg.mode,
        "memory_method": info.get("memory_method"),
        "columns": COLUMN_DOC,
        "inputs": "teacher ~ N(0,1), student = teacher + N(0,1), float32, contiguous, same "
        "resolution; gradient w.r.t. the student only (teacher frozen); every method sees the "
        "same inputs and projections at a given shape",
        "elapsed_s": runner.elapsed(),
        **extra,
        "truth": {"x".join(map(str, k)): v for k, v in runner.truth.items()},
        "events": runner.events,
        "cases": [r.as_dict() for r in runner.rows],
    }
    path.write_text(json.dumps(doc, indent=1, default=str) + "\n")


def _print_report(
    runner: Runner, cfg: Config, lines: list[str], written, *, show_shape=False, title="headline"
):
    rows = runner.rows if show_shape else _display_order(runner.rows)
    print()
    print(summary_table(rows, show_shape=show_shape))
    notes, unavailable = [], set()
    for r in rows:
        if r.status == "unavailable":  # once per method, not once per size
            if r.spec.label() not in unavailable:
                unavailable.add(r.spec.label())
                notes.append(f"{r.spec.label()}: unavailable: {r.reason}")
        elif r.reason:
            notes.append(f"{r.spec.height}x{r.spec.width} {r.spec.label()}: {r.status}: {r.reason}")
    notes += [
        f"{r.spec.height}x{r.spec.width} {r.spec.label()}: {n}"
        for r in rows
        for n in r.detail.get("notes", [])
    ]
    if notes or runner.events:
        print("\nnotes:")
        for line in notes + runner.events:
            print("  " + line)
    load = runner.load_at_start
    if cfg.device == "cpu" and load and load[0] > 0.5 * (os.cpu_count() or 1):
        print(
            f"\nwarning: the machine was busy at the start (load average {load[0]:.1f} on "
            f"{os.cpu_count()} cores): CPU timings are noisy; rerun on an idle machine"
        )
    mem = (
        "GPU max_memory_allocated" if cfg.device == "cuda" else "CPU peak RSS of the worker process"
    )
    print(
        f"\ntime: {cfg.mode} median (p20-p80) of the timed runs, ms; memory: {mem} above the "
        "inputs (JSON: memory_method); oom peak '~' = predicted; rel_err: JSON columns.rel_err"
    )
    print(f"\nwrote {', '.join(written)} to {cfg.out} in {runner.elapsed():.0f} s")
    if lines:  # last, so the headline is what the terminal shows
        print(f"\n{title}:")
        for line in lines:
            print("  " + line)


def plan_sweep(cfg: Config) -> list[CaseSpec]:
    """The sweep's cases in the order the time budget is spent on them.

    First everything whose run time grows linearly with N, and everything at small N (up to 64x64):
    the whole picture at low cost. Then the O(N^2) methods at the larger sizes, smallest size first
    (ffa first within a size), then pykeops. When the budget runs short it is the most expensive
    points that are skipped, each with its reason in the JSON and the notes.
    """
    cases = [
        CaseSpec(name, p, cfg.batch, cfg.channels, h, w, cfg.k)
        for h, w in cfg.resolutions
        for name in ORDER
        if name in cfg.methods
        for p in cfg.method_ps[name]
    ]

    def phase(c: CaseSpec) -> int:
        m = METHODS[c.method]
        if m.impl == "keops":  # ~50x slower than the eager reference and slow to compile
            return 2
        if m.time_exponent(c.p) == 1 or c.n <= 64 * 64:
            return 0
        return 1

    # p=1 (the paper's loss) before p=2 within a size, then the table's method order
    return sorted(cases, key=lambda c: (phase(c), c.n, c.p, ORDER.index(c.method)))


def _ffa_p1_vs_exact(rows: list[Row]) -> None:
    """FFA p=1 against exact FA p=1 where the float64 truth was too costly: ffa's own value."""
    for r in rows:
        acc = r.detail.get("accuracy")
        if r.status != "ok" or r.spec.p != 1 or acc is None or "ratio_to_fa_p1_mean" in acc:
            continue
        if METHODS[r.spec.method].family != "ffa":
            continue
        exact = next(
            (
                x
                for x in rows
                if x.status == "ok"
                and x.spec.method == "ffa_fa"
                and x.spec.p == 1
                and x.spec.shape_key == r.spec.shape_key
            ),
            None,
        )
        if exact is not None and exact.detail.get("values"):
            fa1 = exact.detail["values"][0]
            acc["ratio_to_fa_p1_mean"] = sum(acc["values"]) / len(acc["values"]) / fa1
            acc["fa_p1_source"] = "ffa exact FA p=1 (float32) at this shape"


def _display_order(rows: list[Row]) -> list[Row]:
    return sorted(rows, key=lambda r: (r.spec.n, ORDER.index(r.spec.method), r.spec.p))


def run_sweep(cfg: Config) -> int:
    runner = Runner(cfg, "resolution_sweep.csv")
    shape = (cfg.batch, cfg.channels)
    print(
        f"resolution sweep on {cfg.device} ({harness.device_tag(cfg.device)}): mode {cfg.mode}, "
        f"B={cfg.batch}, C={cfg.channels}, k={cfg.k}, resolutions "
        f"{', '.join(f'{h}x{w}' for h, w in cfg.resolutions)}, budget {cfg.budget_s:g} s",
        flush=True,
    )
    cases = plan_sweep(cfg)
    truth = [(*shape, h, w) for h, w in cfg.resolutions]
    ksh = (*shape, cfg.k_res, cfg.k_res)
    runner.run(cases, truth_shapes=truth + [ksh], k_sweep_shape=ksh)
    _ffa_p1_vs_exact(runner.rows)
    lines = headlines(runner.rows, cfg)
    write_json(runner.out / "resolution_sweep.json", cfg, runner, {"headline": lines})
    plots = []
    if cfg.plot:
        try:
            import plot

            plots = plot.plot_dir(cfg.out)
        except ImportError as e:
            runner.events.append(f"no plots: {e} (pip install matplotlib)")
    names = ["resolution_sweep.csv", "resolution_sweep.json", "ffa_error_vs_k.csv"]
    _print_report(runner, cfg, lines, names + [Path(p).name for p in plots])
    return 0


# -------------------------------------------------------------------------------- named case lists


@dataclass(frozen=True)
class Target:
    """fast must beat slow by at_least (time or peak memory ratio); aim is the stretch goal."""

    text: str
    metric: str  # "time" | "memory"
    fast: str
    slow: str
    at_least: float | None = None
    aim: float | None = None


def _cases_targets():
    c = 64
    return [
        CaseSpec("ffa_fa", 1, 4, c, 64, 64, 15, name="fa1_64_ffa"),
        CaseSpec("reference_fa_compiled", 1, 4, c, 64, 64, 15, name="fa1_64_compiled"),
        CaseSpec("reference_fa", 1, 4, c, 64, 64, 15, name="fa1_64_reference"),
        CaseSpec("ffa_fa", 1, 2, c, 128, 128, 15, name="fa1_128_ffa", repeats=1),
        CaseSpec(
            "reference_fa", 1, 2, c, 128, 128, 15, name="fa1_128_reference", warmup=0, repeats=1
        ),
        CaseSpec("ffa_fa", 2, 2, c, 128, 128, 15, name="fa2_128_ffa"),
        CaseSpec("reference_fa", 2, 2, c, 128, 128, 15, name="fa2_128_reference"),
        CaseSpec("ffa_ffa", 1, 8, c, 128, 128, 15, name="ffa_128_ffa"),
        CaseSpec("reference_ffa_compiled", 1, 8, c, 128, 128, 15, name="ffa_128_compiled"),
        CaseSpec("reference_ffa", 1, 8, c, 128, 128, 15, name="ffa_128_reference"),
    ]


def _cases_portable():
    c = 64
    return [
        CaseSpec("portable_fa", 1, 4, c, 64, 64, 15, name="fa1_64_portable"),
        CaseSpec("ffa_fa", 1, 4, c, 64, 64, 15, name="fa1_64_ffa"),
        CaseSpec("reference_fa_compiled", 1, 4, c, 64, 64, 15, name="fa1_64_compiled"),
        CaseSpec("portable_fa", 1, 2, c, 256, 256, 15, name="fa1_256_portable", repeats=1),
        CaseSpec("ffa_fa", 1, 2, c, 256, 256, 15, name="fa1_256_ffa", repeats=1),
        CaseSpec("reference_fa", 1, 2, c, 256, 256, 15, name="fa1_256_reference", repeats=1),
        CaseSpec("portable_ffa", 1, 8, c, 128, 128, 15, name="ffa_128_portable"),
        CaseSpec("ffa_ffa", 1, 8, c, 128, 128, 15, name="ffa_128_ffa"),
        CaseSpec("reference_ffa_compiled", 1, 8, c, 128, 128, 15, name="ffa_128_compiled"),
    ]


def _portable_targets():
    pairs = [
        ("exact FA p=1, B=4, C=64, 64x64", "fa1_64"),
        ("exact FA p=1, B=2, C=64, 256x256", "fa1_256"),
        ("FFA p=1, B=8, C=64, 128x128, k=15", "ffa_128"),
    ]
    out = []
    for text, case in pairs:
        out.append(Target(f"{text}: native vs portable", "time", f"{case}_ffa", f"{case}_portable"))
        other = "reference" if case == "fa1_256" else "compiled"
        label = "the reference" if case == "fa1_256" else "torch.compile(reference)"
        for metric in ("time", "memory"):
            out.append(
                Target(
                    f"{text}: portable vs {label} ({metric})",
                    metric,
                    f"{case}_portable",
                    f"{case}_{other}",
                )
            )
    return out


SUITES = {
    "portable": dict(
        cases=_cases_portable,
        targets=_portable_targets(),
        note="ffa's portable path (FFA_BACKEND=portable) against its native kernels and the "
        "references: fwd+bwd, median of 5 runs (the 256x256 cases: 1 run), static torch.compile",
    ),
    "targets": dict(
        cases=_cases_targets,
        targets=[
            Target(
                "exact FA p=1, B=4, C=64, 64x64, vs torch.compile(reference)",
                "time",
                "fa1_64_ffa",
                "fa1_64_compiled",
                1.5,
                3.0,
            ),
            Target(
                "exact FA p=1, B=4, C=64, 64x64, vs the eager reference",
                "time",
                "fa1_64_ffa",
                "fa1_64_reference",
            ),
            Target(
                "exact FA p=1, B=2, C=64, 128x128, peak memory vs the reference",
                "memory",
                "fa1_128_ffa",
                "fa1_128_reference",
                20.0,
            ),
            Target(
                "exact FA p=2, B=2, C=64, 128x128, vs the reference",
                "time",
                "fa2_128_ffa",
                "fa2_128_reference",
                50.0,
            ),
            Target(
                "FFA p=1, B=8, C=64, 128x128, k=15, vs torch.compile(reference FFA)",
                "time",
                "ffa_128_ffa",
                "ffa_128_compiled",
                1.3,
                2.0,
            ),
            Target(
                "FFA p=1, B=8, C=64, 128x128, k=15, vs the eager reference FFA",
                "time",
                "ffa_128_ffa",
                "ffa_128_reference",
            ),
        ],
        note="the numbers to reach: fwd+bwd, median of >= 5 runs (the 128x128 "
        "p=1 memory cases: 1 run), static torch.compile per case",
    ),
}


def run_suite(cfg: Config, name: str) -> int:
    suite = SUITES[name]
    cases = [s for s in suite["cases"]() if s.method in cfg.methods]
    runner = Runner(cfg, f"{name}.csv")
    print(
        f"{name} cases on {cfg.device} ({harness.device_tag(cfg.device)}): mode {cfg.mode}; "
        f"{suite['note']}",
        flush=True,
    )
    runner.run(cases, truth_shapes=[s.shape_key for s in cases])
    by_name = {r.spec.name: r for r in runner.rows}
    results, lines = [], []
    for t in suite["targets"]:
        fast, slow = by_name.get(t.fast), by_name.get(t.slow)
        ok = fast is not None and slow is not None and fast.status == slow.status == "ok"
        attr = "median_ms" if t.metric == "time" else "peak_bytes"
        ratio = _ratio(fast, slow, attr) if ok else None
        verdict = "info"
        if t.at_least is not None:
            verdict = "n/a" if ratio is None else ("PASS" if ratio >= t.at_least else "FAIL")
        goal = ""
        if t.at_least is not None:
            goal = f" (target >= {t.at_least:g}x" + (f", aim {t.aim:g}x)" if t.aim else ")")
        word = "faster" if t.metric == "time" else "less memory"
        lines.append(f"{verdict:>4}  {t.text}: {_x(ratio)} {word}{goal}")
        results.append({**asdict(t), "ratio": ratio, "verdict": verdict})
    write_json(runner.out / f"{name}.json", cfg, runner, {"suite": name, "targets": results})
    written = [f"{name}.csv", f"{name}.json"]
    _print_report(runner, cfg, lines, written, show_shape=True, title="targets")
    return 0


# -------------------------------------------------------------------------------------------- main


def main(argv=None) -> int:
    cfg = parse_args(argv)
    if cfg.config == "sweep":
        return run_sweep(cfg)
    return run_suite(cfg, cfg.config)


if __name__ == "__main__":
    sys.exit(main())
