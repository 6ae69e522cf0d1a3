"""Builds and runs ffa's CUDA kernels on the CPU under tools/cuda_emu/cuda_emu.h (no GPU needed).

The .cu sources are rewritten for g++: `extern __shared__ ... smem_raw[]` becomes the emulator's
dynamic shared memory, `__shared__` becomes `static` (blocks run one at a time), and each
`kernel<<<grid, block, smem, stream>>>(args);` becomes `ffa_emu_launch(grid, block, smem, stream,
[&] { kernel(args); });`. Then emu_main.cpp compares every launcher with float64 references.
Usage: python tools/cuda_emu/run.py [--quick] [--only TEXT] [--cuda-include DIR]
(--only runs just the checks whose name contains TEXT.)
Needs g++ with C++20 and the CUDA toolkit headers (cuda_runtime.h, cuda_fp16.h, cuda_bf16.h).
"""

from __future__ import annotations

import argparse
import pathlib
import re
import subprocess
import sys
import tempfile

ROOT = pathlib.Path(__file__).resolve().parents[2]
HERE = pathlib.Path(__file__).resolve().parent
CALLEE = re.compile(r"([A-Za-z_][\w:]*(?:<[^<>;]*>)?)\s*<<<")


def split_top(text: str) -> list[str]:
    parts, depth, cur = [], 0, ""
    for ch in text:
        if ch in "(<[{":
            depth += 1
        elif ch in ")>]}":
            depth -= 1
        if ch == "," and depth == 0:
            parts.append(cur.strip())
            cur = ""
        else:
            cur += ch
    parts.append(cur.strip())
    return parts


def rewrite_launches(src: str) -> str:
    out, pos = [], 0
    while (m := CALLEE.search(src, pos)) is not None:
        cfg_end = src.index(">>>", m.end())
        cfg = split_top(src[m.end() : cfg_end])
        cfg += ["0", "nullptr"][len(cfg) - 2 :]
        i = src.index("(", cfg_end)
        depth, j = 0, i
        while True:
            depth += {"(": 1, ")": -1}.get(src[j], 0)
            if depth == 0:
                break
            j += 1
        args = src[i + 1 : j]
        assert src[j + 1 :].lstrip().startswith(";"), "launch must end with ;"
        out.append(src[pos : m.start()])
        body = f"[&]() {{ {m.group(1)}({args}); }}"
        out.append(f"ffa_emu_launch({cfg[0]}, {cfg[1]}, {cfg[2]}, {cfg[3]}, {body})")
        pos = j + 1
    out.append(src[pos:])
    return "".join(out)


def rewrite(src: str) -> str:
    src = re.sub(
        r"extern __shared__ __align__\(16\) unsigned char smem_raw\[\];",
        "unsigned char* smem_raw = ffa_emu_dynamic_smem();",
        src,
    )
    src = src.replace("__shared__", "static")
    return rewrite_launches(src)


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--only", default="")
    ap.add_argument("--cuda-include", default="/usr/local/cuda/include")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = pathlib.Path(tmp)
        sources = []
        for name in ("fa_kernels.cu", "ffa_kernels.cu"):
            dst = tmp / name.replace(".cu", ".cpp")
            dst.write_text(rewrite((ROOT / "csrc" / "cuda" / name).read_text()))
            sources.append(str(dst))
        exe = tmp / "emu"
        cmd = [
            "g++", "-std=c++20", "-O1", "-pthread", "-DFFA_CUDA_EMULATION", "-w",
            f"-I{ROOT / 'csrc'}", f"-I{args.cuda_include}", "-include", str(HERE / "cuda_emu.h"),
            *sources, str(HERE / "emu_main.cpp"), "-o", str(exe),
        ]  # fmt: skip
        subprocess.run(cmd, check=True)
        flags = (["--quick"] if args.quick else []) + ([f"--only={args.only}"] if args.only else [])
        return subprocess.run([str(exe), *flags]).returncode


if __name__ == "__main__":
    sys.exit(main())
