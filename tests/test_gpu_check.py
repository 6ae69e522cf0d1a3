"""The GPU check (tools/gpu_check.sh and its helpers) on a CPU machine: the dry run, the sanitizer
driver's plan and its calls on the CPU kernels, the CUDA test selection, and the summary writer on
synthetic results. The GPU run itself needs a GPU; these keep its plumbing working in CI."""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
TOOLS = ROOT / "tools"
OUT_FILES = {
    "summary.md",
    "setup.log",
    "tests.log",
    "sanitizer.log",
    "bench.log",
    "cuda_bench.json",
    "resolution_sweep.csv",
    "resolution_sweep.png",
}
needs_bash = pytest.mark.skipif(shutil.which("bash") is None, reason="needs bash")


def _load(name):
    """tools/<name>.py as a module (tools/ is no package)."""
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, TOOLS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


def _check_script(tmp_path, *args, **env):
    out = tmp_path / "out"
    run = subprocess.run(
        ["bash", str(TOOLS / "gpu_check.sh"), *args, str(out)],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "PYTHON": sys.executable, "TMPDIR": str(tmp_path), **env},
    )
    return run, out


def _out_files_ok(out: Path):
    files = [p for p in out.iterdir()]
    assert all(p.is_file() for p in files)
    assert {p.name for p in files} <= OUT_FILES, [p.name for p in files]
    assert len(files) <= 8
    assert all(p.stat().st_size < 16 << 20 for p in files)


def test_script_parses():
    if shutil.which("bash") is None:
        pytest.skip("needs bash")
    subprocess.run(["bash", "-n", str(TOOLS / "gpu_check.sh")], check=True)


@needs_bash
def test_dry_run(tmp_path):
    run, out = _check_script(
        tmp_path,
        "--dry-run",
        GPU_CHECK_DRY_BUILD="plan",  # nvcc takes minutes: the kernels are CI's own step
        GPU_CHECK_DRY_CPU_CALLS="0",  # test_sanitize_calls_run_on_cpu runs them in-process
        GPU_CHECK_TESTS="tests/test_losses_errors.py",
    )
    assert run.returncode == 0, run.stdout + run.stderr
    _out_files_ok(out)
    summary = (out / "summary.md").read_text()
    assert "**DRY RUN OK**" in summary
    for step in ("env", "build", "tests", "sanitize", "bench", "sweep"):
        assert f"| {step} | " in summary
    assert "CUDA cases selected" in summary
    assert "Planned: " in summary
    # The GPU build command: this GPU's arch only, CUDA forced on, into a temporary target.
    setup = (out / "setup.log").read_text()
    assert "--no-build-isolation" in setup and "--target" in setup
    assert "cmake.define.FFA_CUDA=ON" in setup
    assert "cmake.define.CMAKE_CUDA_ARCHITECTURES=90" in setup
    # CUDA cases are kept whatever their ids, CPU-only ones dropped.
    tests = (out / "tests.log").read_text()
    assert "test_different_devices" in tests and "test_projection_on_other_device" in tests
    assert "[cpu]" not in tests
    sanitizer = (out / "sanitizer.log").read_text()
    for tool in ("memcheck", "racecheck", "synccheck", "initcheck"):
        assert f"--tool {tool}" in sanitizer
    bench = (out / "bench.log").read_text()
    assert "cuda_bench.py --quick" in bench and "resolution_sweep.py --device cuda" in bench
    assert not list(tmp_path.glob("ffa-gpu-check.*")), "the work folder was left behind"


@needs_bash
def test_without_a_gpu_says_so(tmp_path):
    if shutil.which("nvidia-smi"):
        pytest.skip("this machine may have a GPU")
    run, out = _check_script(tmp_path, GPU_CHECK_STEPS="none")
    assert run.returncode == 3, run.stdout + run.stderr
    assert "NO GPU" in (out / "summary.md").read_text()
    _out_files_ok(out)


@needs_bash
def test_spent_budget_skips_steps_with_a_note(tmp_path):
    # A GPU run (forced here) whose budget is spent before the build checks nothing: it says so
    # and fails, rather than passing with nothing run.
    run, out = _check_script(
        tmp_path,
        GPU_CHECK_MODE="gpu",
        GPU_CHECK_BUDGET_S="30",
        GPU_CHECK_STEPS="build,tests,sanitize,bench,sweep",
    )
    assert run.returncode == 1, run.stdout + run.stderr
    summary = (out / "summary.md").read_text()
    assert "**INCOMPLETE**" in summary
    assert "| build | skipped | 0 | budget spent |" in summary
    assert "| sweep | skipped | 0 | no build (failed or not run) |" in summary
    _out_files_ok(out)


def test_sanitize_plan_is_torch_free_and_covers_every_path():
    code = (
        "import sys; sys.path.insert(0, sys.argv[1]); import gpu_sanitize as g; "
        "assert g.main(['--plan']) == 0; assert 'torch' not in sys.modules"
    )
    run = subprocess.run(
        [sys.executable, "-c", code, str(TOOLS)], capture_output=True, text=True, timeout=60
    )
    assert run.returncode == 0, run.stderr
    assert "gpu_sanitize plan:" in run.stdout

    calls = _load("gpu_sanitize").plan()
    dtypes = {"fp32", "fp64", "bf16", "fp16"}
    by_kind = {}
    for c in calls:
        by_kind.setdefault(c.kind, []).append(c)
    for kind in ("fa", "ffa", "philox", "quantize_weight", "quant_relu", "fake_quantize"):
        assert {c.dtype for c in by_kind[kind]} == dtypes, kind
    for p in (1, 2):  # FA: every precision path, TF32 on and off
        fa = {(c.dtype, c.tf32) for c in by_kind["fa"] if c.opts["p"] == p}
        assert fa >= {("fp32", False), ("fp32", True), ("fp64", False), ("bf16", False)}
        assert {c.dtype for c in by_kind["ffa"] + by_kind["philox"] if c.opts["p"] == p} == dtypes
    paths = " ".join(c.path for c in calls)
    for path in ("tensor cores mt=2", "tensor cores mt=1", "TF32 mt=1", "SIMT: K > smem"):
        assert path in paths
    assert {c.opts["k"] for c in by_kind["philox"]} >= {15, 17, 40}  # fast and slow Philox
    assert {c.opts["bits"] for c in by_kind["quantize_weight"]} >= {1, 2, 4, 8}
    assert {c.opts["per_channel"] for c in by_kind["quantize_weight"]} == {False, True}
    fq = by_kind["fake_quantize"]
    assert {(c.opts.get("axis") is None, c.opts.get("learnable", False)) for c in fq} == {
        (True, False),
        (True, True),
        (False, False),
        (False, True),
    }
    assert any(c.opts.get("layout") == "channels_last" for c in fq)
    assert len({c.name for c in calls}) == len(calls)


def test_sanitize_calls_run_on_cpu(capsys):
    # Every planned call (large inputs aside) is well formed: the CPU kernels accept it and give
    # finite values and gradients.
    g = _load("gpu_sanitize")
    calls = [c for c in g.plan() if not c.opts.get("large")]
    assert g.run_all(calls, "cpu") == 0, capsys.readouterr().out


def test_gpu_case_selection():
    sel = _load("pytest_cuda_only")

    class Mark:
        def __init__(self, reason):
            self.kwargs = {"reason": reason}

    class Item:
        def __init__(self, nodeid, reasons=()):
            self.nodeid, self.reasons = nodeid, reasons

        def iter_markers(self, name):
            return [Mark(r) for r in self.reasons] if name == "skipif" else []

    assert sel.is_cuda_case(Item("tests/test_cuda_losses.py::test_opcheck[fp32]"))
    assert sel.is_cuda_case(Item("tests/test_quant.py::test_x[cuda-float16]"))
    assert sel.is_cuda_case(Item("tests/t.py::test_devices[fa]", ["needs a CUDA device"]))
    assert sel.is_cuda_case(Item("tests/t.py::test_two[fa]", ["needs 2 GPUs"]))
    assert not sel.is_cuda_case(Item("tests/t.py::test_values[cpu-fa]", ["needs bash"]))


# --------------------------------------------------------------------------- the summary writer
def _synthetic_work(tmp_path: Path) -> tuple[Path, Path]:
    work, out = tmp_path / "work", tmp_path / "out"
    (work / "sanitize").mkdir(parents=True)
    (work / "sweep").mkdir()
    out.mkdir()
    (work / "meta.env").write_text("mode=gpu\ncommit=abc1234\nbudget_s=470\nwall_s=431\n")
    (work / "env.txt").write_text("gpu=NVIDIA H200\ndriver=580.1\ntorch=2.11.0+cu130\n")
    steps = [
        ("env", "pass", "3", ""),
        ("build", "pass", "71", "sm_90"),
        ("tests", "FAIL", "150", "pytest -n 12"),
        ("sanitize", "FAIL", "120", "5 runs"),
        ("bench", "pass", "80", ""),
        ("sweep", "skipped", "0", "budget spent (30 s left)"),
    ]
    (work / "steps.tsv").write_text("".join("\t".join(s) + "\n" for s in steps))
    (work / "junit.xml").write_text(
        '<?xml version="1.0"?><testsuites><testsuite name="pytest" tests="3" failures="1" '
        'errors="0" skipped="1" time="12.5">'
        '<testcase classname="tests.test_cuda_losses" name="test_fa_forward[bf16]" time="1"/>'
        '<testcase classname="tests.test_cuda_losses" name="test_opcheck[fp32]" time="1">'
        '<failure message="AssertionError: rel err 0.3 &gt; 0.01">trace</failure></testcase>'
        '<testcase classname="tests.test_cuda_losses" name="test_two_gpus" time="0">'
        '<skipped message="needs 2 GPUs"/></testcase></testsuite></testsuites>'
    )
    sdir = work / "sanitize"
    (sdir / "plan.txt").write_text("gpu_sanitize plan: 136 calls (fa, ffa)\n")
    (sdir / "plain.log").write_text(
        "CALL ok   fa fp32 p=1 [SIMT] 1.0 ms\ngpu_sanitize: 136 calls, 0 failed, 0 not run\n"
        "kernels: 31 distinct ffa kernels launched (60 kernels in all)\n"
    )
    (sdir / "plain.rc").write_text("0 20\n")
    (sdir / "memcheck.log").write_text(
        "========= Invalid __global__ read of size 4 bytes\n"
        "=========     at ffa::cuda::fa_l1_tc_forward_kernel+0x1a0\n"
        "CALL FAIL fa bf16 p=1 [tensor cores mt=2]: RuntimeError: CUDA error\n"
        "gpu_sanitize: 136 calls, 1 failed, 0 not run\n"
        "========= ERROR SUMMARY: 2 errors\n"
    )
    (sdir / "memcheck.rc").write_text("99 95\n")
    (sdir / "racecheck.log").write_text(
        "gpu_sanitize: 136 calls, 0 failed, 0 not run\n"
        "========= RACECHECK SUMMARY: 0 hazards displayed (0 errors, 0 warnings)\n"
    )
    (sdir / "racecheck.rc").write_text("0 110\n")
    bench = {
        "meta": {"bf16_matmul_tflops": 780.0, "d2d_copy_gbps": 4300.0},
        "results": [
            {"case": "fa_p1_bf16_B8_C64_128x128", "median_ms": 2.1, "pct_of_bf16_matmul": 41.0,
             "speedup_vs_reference": 30.0, "speedup_vs_compiled": 9.0, "tflops": 320.0},
            {"case": "fa_p2_fp32_B8_C64_256x256_forward", "median_ms": 0.6,
             "ratio_vs_two_grams": 2.5},
        ],
    }  # fmt: skip
    (out / "cuda_bench.json").write_text(json.dumps(bench))
    sweep = {
        "elapsed_s": 95.0,
        "headline": ["at 256x256: the reference FA p=1 is out of memory"],
        "cases": [
            {"spec": {"method": "ffa_fa", "p": 1}, "status": "ok"},
            {"spec": {"method": "reference_fa", "p": 1}, "status": "oom"},
        ],
        "events": [],
    }
    (work / "sweep" / "resolution_sweep.json").write_text(json.dumps(sweep))
    (out / "tests.log").write_text("...\n")
    return work, out


def test_summary_on_synthetic_results(tmp_path, capsys):
    work, out = _synthetic_work(tmp_path)
    assert _load("gpu_summary").main(["--work", str(work), "--out", str(out), "--final"]) == 0
    assert capsys.readouterr().out.strip() == "state: FAIL"
    text = (out / "summary.md").read_text()
    assert "**FAIL** (failed: tests, sanitize; skipped: sweep)" in text
    assert "| NVIDIA H200 |" in text
    assert "1 passed, 1 failed, 0 errors, 1 skipped** of 3" in text
    assert "tests.test_cuda_losses::test_opcheck[fp32]" in text and "rel err 0.3 > 0.01" in text
    assert "| memcheck | FAIL | 2 | 0 | 136 / 1 / 0 | 95 |" in text
    assert "| racecheck | pass | 0 | 0 | 136 / 0 / 0 | 110 |" in text
    assert "31 distinct ffa kernels" in text
    assert "Invalid __global__ read" in text and "call failed: fa bf16 p=1" in text
    assert "| fa_p1_bf16_B8_C64_128x128 | 2.1 | 41 | 30 | 9 |" in text
    assert "at 256x256: the reference FA p=1 is out of memory" in text
    assert "reference_fa p=1: 1 oom" in text
    assert "- tests.log:" in text
    assert [p.name for p in out.iterdir() if p.name.startswith(".")] == []


def test_summary_shows_a_build_failure(tmp_path, capsys):
    work, out = tmp_path / "work", tmp_path / "out"
    work.mkdir()
    (work / "meta.env").write_text("mode=gpu\n")
    (work / "steps.tsv").write_text(
        "env\tpass\t3\t\nbuild\tFAIL\t40\tsm_90\ntests\tskipped\t0\tno build (failed or not run)\n"
    )
    (work / "build.log").write_text("".join(f"line {i}\n" for i in range(100)) + "nvcc error\n")
    gpu_summary = _load("gpu_summary")
    assert gpu_summary.main(["--work", str(work), "--out", str(out), "--final"]) == 0
    assert capsys.readouterr().out.strip() == "state: FAIL"
    text = (out / "summary.md").read_text()
    assert "## Build failure" in text and "nvcc error" in text and "line 41\n" in text
    assert "line 40\n" not in text  # the last 60 lines only
    # While the run goes on, the summary says so.
    gpu_summary.main(["--work", str(work), "--out", str(out)])
    assert "**RUNNING**" in (out / "summary.md").read_text()
