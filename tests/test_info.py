"""python -m ffa.info / ffa.show_config(): the diagnostics report."""

from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest
import torch

import ffa
import ffa.info
from ffa import _C

SECTIONS = ("ffa", "CPU kernels", "CUDA kernels", "GPUs (torch.cuda)", "Ops (")


def _run(args: list[str], tmp_path, **env) -> subprocess.CompletedProcess:
    # From an empty folder: a source tree's ffa/ in the current directory could shadow the installed
    # package (python -m puts the current directory first on sys.path).
    full_env = {k: v for k, v in os.environ.items() if k != "FFA_BACKEND"}
    full_env.update(env)
    return subprocess.run(
        [sys.executable, *args],
        cwd=tmp_path,
        env=full_env,
        capture_output=True,
        text=True,
        timeout=300,
    )


def _op_rows(text: str) -> dict[str, list[str]]:
    rows = [re.split(r"\s{2,}", line.strip()) for line in text.splitlines() if "  ffa::" in line]
    return {r[0]: r[1:] for r in rows}


def test_module_runs_and_matches_show_config(tmp_path):
    run = _run(["-m", "ffa.info"], tmp_path)
    assert run.returncode == 0, run.stderr
    for section in SECTIONS:
        assert any(line.startswith(section) for line in run.stdout.splitlines()), section
    assert "error:" not in run.stdout, run.stdout
    shown = _run(["-c", "import ffa; print(ffa.show_config())"], tmp_path)
    assert shown.returncode == 0, shown.stderr
    assert shown.stdout == run.stdout


def test_reports_a_native_module_that_does_not_load(tmp_path):
    # The case a bug report most needs: ffa._C fails to import (e.g. torch upgraded after the
    # build). `import ffa` still raises; `python -m ffa.info` reports the error and exits 0.
    (tmp_path / "sitecustomize.py").write_text("import sys\nsys.modules['ffa._C'] = None\n")
    pythonpath = os.pathsep.join([str(tmp_path), os.environ.get("PYTHONPATH", "")])
    run = _run(["-m", "ffa.info"], tmp_path, PYTHONPATH=pythonpath)
    assert run.returncode == 0, run.stderr
    lines = run.stdout.splitlines()
    native = next(line for line in lines if line.strip().startswith("native:"))
    assert "error: ModuleNotFoundError: import of ffa._C halted" in native
    assert "vector ISA: error: ImportError: ffa._C did not load (see 'native:' above)" in run.stdout
    assert any("torch:" in line and torch.__version__ in line for line in lines)
    for section in SECTIONS:
        assert any(line.startswith(section) for line in lines), section
    plain = _run(["-c", "import ffa"], tmp_path, PYTHONPATH=pythonpath)
    assert plain.returncode != 0 and "ImportError" in plain.stderr


def test_runtime_facts_from_the_native_module():
    assert _C.cpu_capability() in ("avx512", "avx2", "base")
    assert _C.blas().startswith(("MKL", "torch matmul"))
    text = ffa.show_config()
    assert f"vector ISA: {_C.cpu_capability()}" in text
    assert _C.blas() in text
    assert torch.__version__ in text
    assert ffa.__version__ in text


def test_build_config_is_installed():
    from ffa import _build_config as cfg

    assert cfg.torch_version  # configure_file filled it in
    assert isinstance(cfg.cuda, bool)
    assert cfg.cuda == any(
        torch._C._dispatch_has_kernel_for_dispatch_key(op, "CUDA") for op in ffa.info._op_names()
    )
    if not cfg.cuda:
        assert cfg.cuda_skipped_because in ffa.show_config()


def test_op_table_lists_every_op_native_on_cpu(monkeypatch):
    monkeypatch.delenv("FFA_BACKEND", raising=False)
    ops = sorted(n for n in torch._C._dispatch_get_all_op_names() if n.startswith("ffa::"))
    assert "ffa::fa_loss" in ops and "ffa::fake_quantize_backward" in ops
    text = ffa.show_config()
    header = next(line.split() for line in text.splitlines() if line.strip().startswith("op "))
    assert header[:3] == ["op", "cpu", "cuda"]
    rows = _op_rows(text)
    assert sorted(rows) == ops
    for op, cells in rows.items():
        assert cells[0] == "native", (op, cells)
    assert "FFA_BACKEND=unset" in text


def test_backend_portable_shows_as_forced(monkeypatch):
    monkeypatch.setenv("FFA_BACKEND", "portable")
    text = ffa.show_config()
    assert "FFA_BACKEND=portable: the portable path is forced" in text
    rows = _op_rows(text)
    for op, cells in rows.items():
        portable = torch._C._dispatch_has_kernel_for_dispatch_key(op, "CompositeExplicitAutograd")
        # Forced onto the portable kernel where one is registered; the native one runs otherwise.
        assert cells[0] == ("portable (forced)" if portable else "native"), (op, cells)


def test_environment_settings_in_subprocess(tmp_path):
    # FFA_QUANT_ISA=base lowers the kernels' ISA; the report shows the choice the kernels made.
    run = _run(["-m", "ffa.info"], tmp_path, FFA_BACKEND="portable", FFA_QUANT_ISA="base")
    assert run.returncode == 0, run.stderr
    assert "FFA_BACKEND=portable: the portable path is forced on every device" in run.stdout
    assert "vector ISA: base (FFA_QUANT_ISA=base)" in run.stdout


@pytest.fixture(scope="module")
def scratch_ops():
    """Ops registered the way ffa's are: a native CPU kernel plus (or not) a portable default."""
    lib = torch.library.Library("ffa_info_test", "DEF")
    for name in ("both", "native_only", "portable_only"):
        lib.define(f"{name}(Tensor x) -> Tensor")
    lib.impl("both", lambda x: x, "CPU")
    lib.impl("both", lambda x: x, "CompositeExplicitAutograd")
    lib.impl("native_only", lambda x: x, "CPU")
    lib.impl("portable_only", lambda x: x, "CompositeExplicitAutograd")
    yield "ffa_info_test::"
    lib._destroy()


@pytest.mark.parametrize(
    ("op", "forced", "cpu", "cuda"),
    [
        ("both", False, "native", "portable"),
        ("both", True, "portable (forced)", "portable"),
        ("native_only", False, "native", "none"),
        ("native_only", True, "native", "none"),
        ("portable_only", False, "portable", "portable"),
        ("portable_only", True, "portable", "portable"),
    ],
)
def test_implementation_per_device(scratch_ops, op, forced, cpu, cuda):
    impl = ffa.info._implementation
    assert impl(scratch_ops + op, "cpu", forced) == cpu
    assert impl(scratch_ops + op, "cuda", forced) == cuda


def test_unknown_backend_value_is_named(monkeypatch):
    monkeypatch.setenv("FFA_BACKEND", "fastest")
    assert (
        "FFA_BACKEND must be one of ('native', 'auto', 'portable') or unset, got 'fastest'"
        in ffa.show_config()
    )


@pytest.mark.parametrize("probe", ["_cpu_capability", "_build_config", "_op_names", "_gpus"])
def test_a_broken_probe_prints_one_error_line_and_exits_0(monkeypatch, capsys, probe):
    def boom(*args, **kwargs):
        raise RuntimeError("probe exploded\nsecond line")

    monkeypatch.setattr(ffa.info, probe, boom)
    assert ffa.info.main() == 0
    out = capsys.readouterr().out
    errors = [line for line in out.splitlines() if "error: RuntimeError: probe exploded" in line]
    assert errors, out
    assert all("second line" in line for line in errors)  # the message is kept on one line
    for section in SECTIONS:  # every other section still prints
        assert any(line.startswith(section) for line in out.splitlines()), section


def test_main_survives_show_config_failing(monkeypatch, capsys):
    def boom():
        raise ValueError("everything failed")

    monkeypatch.setattr(ffa.info, "show_config", boom)
    assert ffa.info.main() == 0
    assert capsys.readouterr().out.strip() == "error: ValueError: everything failed"


def test_mismatched_builds_are_flagged(monkeypatch):
    from ffa import _build_config as real

    fake = type(sys)("fake_build_config")
    fake.__dict__.update({k: v for k, v in vars(real).items() if not k.startswith("__")})
    fake.torch_version, fake.version = "2.9.0", "0.0.1"
    monkeypatch.setattr(ffa.info, "_build_config", lambda: fake)
    text = ffa.show_config()
    assert "NOT the torch ffa was built against (2.9.0): rebuild ffa" in text
    assert "built from ffa 0.0.1: rebuild ffa" in text


def test_cuda_arch_matching():
    arch = ffa.info._arch_numbers
    assert arch("80;90") == [(80, "both"), (90, "both")]
    assert arch("90a-real;80-virtual") == [(90, "real"), (80, "virtual")]


@pytest.mark.parametrize(
    ("archs", "cc", "expected"),
    [
        ("80;90", (8, 6), "ffa kernels: yes"),
        ("80;90", (9, 0), "ffa kernels: yes"),
        ("80;90", (10, 0), "ffa kernels: PTX"),
        ("90-real", (10, 0), "ffa kernels: NO code for sm_100"),
        ("80;90", (7, 5), "ffa kernels: NO code for sm_75"),
    ],
)
def test_gpu_coverage_by_the_built_architectures(monkeypatch, archs, cc, expected):
    fake = type(sys)("fake_build_config")
    fake.cuda, fake.cuda_architectures = True, archs
    monkeypatch.setattr(ffa.info, "_build_config", lambda: fake)
    assert ffa.info._image_for(cc).startswith(expected)
