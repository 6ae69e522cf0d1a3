"""Runs the real CUDA kernel sources on the CPU under tools/cuda_emu (a thread-level emulator of
blocks, barriers, shuffles, ldmatrix and mma.sync) against float64 references: a check of the
kernels' logic on machines without a GPU. It takes minutes on 2 cores, so it is opt-in:
FFA_CUDA_EMU=1 pytest tests/test_cuda_emulated.py (needs g++ >= 12 and the CUDA headers)."""

from __future__ import annotations

import os
import pathlib
import shutil
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
CUDA_INCLUDE = os.environ.get("CUDA_INCLUDE", "/usr/local/cuda/include")


@pytest.mark.skipif(os.environ.get("FFA_CUDA_EMU") != "1", reason="opt-in: set FFA_CUDA_EMU=1")
@pytest.mark.skipif(
    shutil.which("g++") is None or not pathlib.Path(CUDA_INCLUDE, "cuda_bf16.h").exists(),
    reason="needs g++ and the CUDA toolkit headers",
)
def test_kernels_under_cpu_emulation():
    run = subprocess.run(
        [sys.executable, str(ROOT / "tools/cuda_emu/run.py"), "--cuda-include", CUDA_INCLUDE],
        capture_output=True,
        text=True,
    )
    assert run.returncode == 0, run.stdout[-4000:] + run.stderr[-4000:]
