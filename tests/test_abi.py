"""The built native modules use only the LibTorch stable ABI (tools/check_abi.py's symbol audit).

A C++ symbol of torch's namespaces (at::, c10::, torch::) in a module's undefined symbols ties it
to the exact torch it was built against; the stable C shim (aoti_torch_*, torch_*) does not. Runs
on whatever ffa is imported (the editable build, an installed wheel); skips when a module is not
a built file (e.g. a build without the CUDA module) or binutils' nm is missing.
"""

from __future__ import annotations

import importlib.util
import shutil
import sys
import warnings
from pathlib import Path

import pytest
import torch

import ffa  # noqa: F401  (loads ffa._C, and ffa._C_cuda where torch has CUDA)

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tools"))
import check_abi  # noqa: E402

pytestmark = pytest.mark.skipif(shutil.which("nm") is None, reason="binutils' nm is not installed")


def _module_file(name: str) -> Path:
    spec = importlib.util.find_spec(name)
    if spec is None or spec.origin is None or not spec.origin.endswith(".so"):
        pytest.skip(f"{name} is not built here")
    return Path(spec.origin)


@pytest.mark.parametrize("name", ["ffa._C", "ffa._C_cuda"])
def test_no_torch_cxx_symbols(name):
    path = _module_file(name)
    assert check_abi.torch_cxx_symbols(path) == [], f"{path} is tied to one torch's C++ ABI"
    # The stable C shim is what it uses instead (the ops' registration at least).
    assert "aoti_torch_library_impl" in " ".join(check_abi.shim_symbols(path)) or any(
        s.startswith("torch_library_impl") for s in check_abi.shim_symbols(path)
    )


@pytest.mark.parametrize("name", ["ffa._C", "ffa._C_cuda"])
def test_limited_python_api(name):
    """abi3: one build serves CPython 3.10 and newer."""
    assert _module_file(name).name.endswith(".abi3.so")


_AT_SYMBOL = "at::TensorBase::const_data_ptr<signed char>() const"


def test_audit_flags_torch_cxx_symbols():
    """The audit itself: a mangled at:: symbol is caught, the C shim and std:: are not."""
    flagged = [
        ("_ZNK2at10TensorBase14const_data_ptrIaEEPKT_v", _AT_SYMBOL),
        ("aoti_torch_get_sizes", "aoti_torch_get_sizes"),
        ("_ZNSt6localeD1Ev", "std::locale::~locale()"),
    ]
    caught = [d for m, d in flagged if m.startswith("_Z") and check_abi._TORCH_CXX.search(d)]
    assert caught == [_AT_SYMBOL]


def test_older_torch_is_refused_by_name(tmp_path):
    """Under a torch older than the stable-ABI target, `import ffa` names the version it needs."""
    import subprocess

    code = "import torch; torch.__version__ = '2.9.1+cu128'; import ffa"
    proc = subprocess.run(
        [sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=300
    )
    assert proc.returncode != 0
    assert "ImportError: ffa needs torch >= 2.10" in proc.stderr, proc.stderr[-2000:]
    assert "found torch 2.9.1+cu128" in proc.stderr


def test_build_without_cuda_kernels_loads_quietly(monkeypatch):
    """A CPU-only build under a CUDA torch: no _C_cuda, no warning at import (CUDA tensors then take
    the portable path, which says so once, with the reason)."""
    if importlib.util.find_spec("ffa._C_cuda") is not None:
        pytest.skip("this build has CUDA kernels")
    monkeypatch.setattr(torch.version, "cuda", "13.0")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert ffa._ops._load_cuda() is False
