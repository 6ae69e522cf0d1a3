"""Compiles every CUDA kernel file (csrc/cuda/*.cu) with nvcc for sm_80 and sm_90 and prints the
ptxas resource report per kernel (registers, shared memory, stack frame, spills): CI has no GPU,
so this is how it keeps the kernels building and their register pressure visible.
Fails on any compiler warning or spill store/load. Usage: python tools/check_kernels.py [--arch 90]
"""

from __future__ import annotations

import argparse
import pathlib
import re
import subprocess
import sys
import tempfile

ROOT = pathlib.Path(__file__).resolve().parents[1]
ENTRY = re.compile(r"Compiling entry function '(\S+)' for '(sm_\d+)'")
USED = re.compile(r"Used (\d+) registers.*?(?:(\d+) bytes smem)?(?:,|$)")
FRAME = re.compile(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads")


def demangle(names: list[str]) -> list[str]:
    try:
        out = subprocess.run(["c++filt"], input="\n".join(names), capture_output=True, text=True)
        return out.stdout.splitlines()
    except OSError:
        return names


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--arch", action="append", help="compute capability, e.g. 90 (repeatable)")
    args = ap.parse_args()
    archs = args.arch or ["80", "90"]
    bad = 0
    for cu in sorted((ROOT / "csrc" / "cuda").glob("*.cu")):
        for arch in archs:
            with tempfile.TemporaryDirectory() as tmp:
                cmd = ["nvcc", "-std=c++17", "-O3", f"-arch=sm_{arch}", "-Xptxas", "-v",
                       f"-I{ROOT / 'csrc'}", "-c", str(cu), "-o", f"{tmp}/k.o"]  # fmt: skip
                run = subprocess.run(cmd, capture_output=True, text=True)
            log = run.stdout + run.stderr
            warnings = [ln for ln in log.splitlines() if "warning" in ln.lower()]
            rows, name, frame = [], None, (0, 0, 0)
            for line in log.splitlines():
                if m := ENTRY.search(line):
                    name = m.group(1)
                elif m := FRAME.search(line):
                    frame = tuple(int(x) for x in m.groups())
                elif (m := USED.search(line)) and name:
                    smem = re.search(r"(\d+) bytes smem", line)
                    rows.append((name, int(m.group(1)), int(smem.group(1)) if smem else 0, frame))
                    name, frame = None, (0, 0, 0)
            print(f"== {cu.relative_to(ROOT)} sm_{arch}: rc {run.returncode}, "
                  f"{len(warnings)} warning(s), {len(rows)} kernels")  # fmt: skip
            for (_, regs, smem, (stack, st, ld)), pretty in zip(
                rows, demangle([r[0] for r in rows]), strict=True
            ):
                flag = "  SPILL" if st or ld else ""
                print(f"  {regs:4d} regs {smem:6d} B smem {stack:4d} B stack{flag}  {pretty[:110]}")
                bad += bool(st or ld)
            for w in warnings:
                print("  " + w)
            bad += bool(warnings) + (run.returncode != 0)
            if run.returncode != 0:
                print(log[-4000:])
    print("kernel check:", "FAILED" if bad else "ok")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
