"""Smoke test of the benchmark suite: `resolution_sweep.py --quick` end to end, its bad-input
handling, and the harness's memory measurement against a known allocation."""

from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SWEEP = ROOT / "benchmarks" / "resolution_sweep.py"
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


def _run(*args, timeout=240):
    # cwd away from the repo root: the plain ffa/ folder there must not shadow the installed package
    return subprocess.run(
        [sys.executable, str(SWEEP), *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=ROOT / "benchmarks",
    )


def test_quick_sweep_writes_csv_json_and_plots(tmp_path):
    pytest.importorskip("matplotlib")
    pytest.importorskip("tqdm")
    out = tmp_path / "res"
    r = _run("--quick", "--device", "cpu", "--out", str(out))
    assert r.returncode == 0, r.stdout + r.stderr
    with open(out / "resolution_sweep.csv", newline="") as f:
        reader = csv.DictReader(f)
        rows = list(reader)
    assert reader.fieldnames == COLUMNS
    assert {r["method"] for r in rows} == {"ffa_ffa", "ffa_fa", "reference_ffa", "reference_fa"}
    assert all(r["status"] == "ok" for r in rows), rows
    for row in rows:
        assert (
            float(row["fwd_bwd_ms_p20"])
            <= float(row["fwd_bwd_ms_median"])
            <= float(row["fwd_bwd_ms_p80"])
        )
        assert float(row["peak_mem_mb"]) >= 0
    exact = [r for r in rows if r["method"] in ("ffa_fa", "reference_fa")]
    assert all(float(r["rel_err"]) < 1e-4 for r in exact)  # float32 vs the float64 truth
    ffa_p2 = [r for r in rows if r["method"] == "ffa_ffa" and r["p"] == "2"]
    assert all(0 < float(r["rel_err"]) < 2 for r in ffa_p2)  # a random estimate, not exact
    for png in ("resolution_sweep.png", "ffa_error_vs_k.png"):
        data = (out / png).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 5000
    meta = json.loads((out / "resolution_sweep.json").read_text())
    assert meta["machine"]["torch"] and meta["machine"]["git_commit"]
    assert "VmHWM" in meta["memory_method"]
    assert meta["args"]["quick"] is True
    assert "headline:" in r.stdout and "faster than the reference" in r.stdout
    # the figures are redrawn from the CSV alone
    (out / "resolution_sweep.png").unlink()
    r2 = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "plot.py"), str(out)],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=ROOT / "benchmarks",
    )
    assert r2.returncode == 0, r2.stderr
    assert (out / "resolution_sweep.png").exists()


@pytest.mark.parametrize(
    "args, message",
    [
        (["--methods", "ffa_fa,magic"], "unknown method"),
        (["--resolutions", "16,0"], "must be positive"),
        (["--resolutions", "-8"], "must be positive"),
        (["--resolutions", "abc"], "integers"),
        (["--p", "3"], "--p must be from"),
        (["--batch", "0"], "--batch must be positive"),
    ],
)
def test_bad_input_exits_2_without_traceback(args, message):
    r = _run(*args, "--no-plot", timeout=120)
    assert r.returncode == 2, r.stdout + r.stderr
    assert message in r.stderr
    assert "Traceback" not in r.stderr


def _import_bench(name):
    bench = str(ROOT / "benchmarks")
    if bench not in sys.path:  # stays: spawned workers inherit sys.path to import the harness
        sys.path.append(bench)
    return __import__(name)


def test_cuda_without_gpu_exits_2(capsys):
    torch = pytest.importorskip("torch")
    if torch.cuda.is_available():
        pytest.skip("a GPU is present")
    sweep = _import_bench("resolution_sweep")  # in-process: this process has torch imported
    with pytest.raises(SystemExit) as e:
        sweep.parse_args(["--device", "cuda"])
    assert e.value.code == 2
    assert "no CUDA GPU" in capsys.readouterr().err


def test_peak_memory_counts_a_known_allocation():
    harness = _import_bench("harness")
    if not Path("/proc/self/clear_refs").exists():
        pytest.skip("needs Linux /proc")
    torch = pytest.importorskip("torch")
    size = 64 << 20
    with harness.PeakMemory("cpu") as mem:
        x = torch.ones(size // 4)  # touched: resident
        del x
    assert mem.peak_bytes is not None
    assert 0.9 * size <= mem.peak_bytes <= 1.25 * size, mem.peak_bytes
    with harness.PeakMemory("cpu") as mem2:
        y = torch.empty(size // 4)  # never touched: not resident, honestly not counted
        del y
    assert mem2.peak_bytes < 0.25 * size


def test_percentile_matches_linear_interpolation():
    harness = _import_bench("harness")
    xs = [5.0, 1.0, 3.0, 2.0, 4.0]
    assert harness.percentile(xs, 50) == 3.0
    assert harness.percentile(xs, 20) == pytest.approx(1.8)
    assert harness.percentile(xs, 80) == pytest.approx(4.2)
    assert harness.percentile([7.0], 20) == 7.0


# Jobs for the worker tests: module-level so the spawned worker can import them by reference.
def _job_alloc(nbytes):
    return len(bytearray(nbytes))


def _job_die():
    os.kill(os.getpid(), signal.SIGKILL)


def _job_sleep(seconds):
    time.sleep(seconds)


def _job_raise():
    raise ValueError("boom")


def test_worker_records_oom_crash_and_timeout_as_results():
    harness = _import_bench("harness")
    with harness.Worker(mem_limit_fraction=None) as w:
        assert w.call(_job_alloc, timeout=60, nbytes=1 << 20).value == 1 << 20
        big = 4 * harness.available_bytes("cpu") + (64 << 30)  # more than RAM + swap: refused
        r = w.call(_job_alloc, timeout=60, nbytes=big)
        assert r.status == "oom", r
        r = w.call(_job_raise, timeout=60)
        assert r.status == "error" and "boom" in r.detail
        r = w.call(_job_die, timeout=60)
        assert r.status == "oom" and "SIGKILL" in r.detail  # the OOM killer's signature
        r = w.call(_job_sleep, timeout=1, seconds=30)
        assert r.status == "timeout"
        assert w.call(_job_alloc, timeout=60, nbytes=10).value == 10  # a fresh worker took over


def test_case_that_cannot_fit_is_recorded_oom_without_running(tmp_path, monkeypatch):
    sweep = _import_bench("resolution_sweep")
    cfg = sweep.parse_args(["--device", "cpu", "--out", str(tmp_path), "--no-plot"])
    runner = sweep.Runner(cfg, "oom.csv")
    monkeypatch.setattr(runner, "free_bytes", lambda: 256 << 20)
    spec = sweep.CaseSpec("reference_fa", 1, 2, 64, 64, 64, 15)
    row = runner._case(spec)
    assert row.status == "oom" and "not run" in row.reason
    assert row.predicted_bytes >= 4 * 2 * (64 * 64) ** 2 * 4  # four B x N x N float32 matrices
    assert runner.worker._proc is None  # nothing was started, let alone run
    csv_row = row.csv_row("cpu")
    assert csv_row["status"] == "oom"
    assert csv_row["peak_mem_mb"] == row.predicted_bytes / 2**20
    slow = sweep.CaseSpec("ffa_fa", 1, 2, 64, 2048, 2048, 15)  # O(N^2): days per run
    monkeypatch.setattr(runner, "free_bytes", lambda: 64 << 30)
    row = runner._case(slow)
    assert row.status == "skipped" and "--max-case-s" in row.reason
