#!/usr/bin/env python3
"""Proof that ffa's native modules use the LibTorch stable ABI (one wheel, every torch >= 2.10).

Two modes:

``python tools/check_abi.py [MODULE.so ...]``
    Symbol audit. Lists the undefined dynamic symbols of the modules (``nm -D --undefined-only``,
    demangled) and fails on any C++ symbol of torch's namespaces (``at::``, ``c10::``, ``torch::``,
    ``caffe2::``): those are what break a module under another torch (e.g. ``undefined symbol:
    _ZNK2at10TensorBase14const_data_ptrIaEEPKT_v``). Allowed from torch: the stable C shim
    (``aoti_torch_*``, ``torch_*`` C functions). Also checks the abi3 file name (Python's limited
    API). Without arguments it audits the modules of the installed ``ffa`` (``ffa/_C*.so``).
    tests/test_abi.py runs the same audit in the test suite (so in CI).

``python tools/check_abi.py --cross 2.11.0 2.14.1 [--wheel ffa-...whl] [--venvs DIR]``
    Cross-version check: builds the wheel once against the installed torch (unless ``--wheel``),
    then for each torch version makes (or reuses) a venv ``DIR/abi-t<version>`` with that torch
    from the package registry, installs the same wheel there with ``--no-deps`` plus the test
    dependencies, and runs the whole test suite from outside the repository (so the installed
    wheel is what runs).
    Prints one line of pass/skip/fail counts per version; exits non-zero if any version fails.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# A C++ symbol (mangled: _Z...) whose demangled name mentions one of torch's C++ namespaces.
_TORCH_CXX = re.compile(r"(?<![\w:])(at|c10|torch|caffe2)::")
# Test dependencies of the cross-version venvs (pyproject's [test] extra).
_TEST_DEPS = ["pytest>=7", "numpy", "expecttest", "ruff", "matplotlib", "tqdm", "scikit-learn"]


def undefined_symbols(path: str | os.PathLike) -> list[tuple[str, str]]:
    """(mangled, demangled) undefined dynamic symbols of a shared object."""
    nm = shutil.which("nm")
    if nm is None:
        raise RuntimeError("nm (binutils) is not installed")
    raw = subprocess.run(
        [nm, "-D", "--undefined-only", str(path)], capture_output=True, text=True, check=True
    ).stdout.split()
    names = [w.split("@")[0] for w in raw if w not in ("U", "w", "v")]
    cxxfilt = shutil.which("c++filt")
    if cxxfilt is None:
        return [(n, n) for n in names]
    demangled = subprocess.run(
        [cxxfilt], input="\n".join(names), capture_output=True, text=True, check=True
    ).stdout.splitlines()
    return list(zip(names, demangled, strict=True))


def torch_cxx_symbols(path: str | os.PathLike) -> list[str]:
    """The undefined C++ symbols of torch's namespaces (demangled): must be empty."""
    return [d for m, d in undefined_symbols(path) if m.startswith("_Z") and _TORCH_CXX.search(d)]


def shim_symbols(path: str | os.PathLike) -> list[str]:
    """The stable C shim functions the module calls (for the report)."""
    return sorted(m for m, _ in undefined_symbols(path) if m.startswith(("aoti_torch_", "torch_")))


def installed_modules() -> list[Path]:
    """ffa's native modules as installed for this interpreter (without importing ffa)."""
    import importlib.util

    spec = importlib.util.find_spec("ffa")
    if spec is None or not spec.submodule_search_locations:
        return []
    found: list[Path] = []
    for d in spec.submodule_search_locations:
        found += sorted(Path(d).glob("_C*.so"))
    return found


def audit(paths: list[Path]) -> int:
    bad = 0
    for p in paths:
        violations = torch_cxx_symbols(p)
        abi3 = p.name.endswith(".abi3.so")
        print(
            f"{p}: {len(shim_symbols(p))} stable C shim functions, "
            f"{len(violations)} torch C++ symbols, {'abi3' if abi3 else 'NOT abi3'}"
        )
        for v in violations:
            print(f"  undefined torch C++ symbol: {v}")
        bad += len(violations) + (not abi3)
    return 1 if bad else 0


def _run(cmd: list[str], **kw) -> subprocess.CompletedProcess:
    print("+", " ".join(cmd), flush=True)
    return subprocess.run(cmd, check=True, **kw)


def build_wheel(out: Path) -> Path:
    out.mkdir(parents=True, exist_ok=True)
    _run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--no-build-isolation",
            "--no-deps",
            "-w",
            str(out),
            str(ROOT),
        ]
    )
    wheels = sorted(out.glob("ffa-*.whl"), key=os.path.getmtime)
    return wheels[-1]


def _summary(text: str) -> str:
    lines = [ln for ln in text.splitlines() if re.search(r"\d+ (passed|failed|error)", ln)]
    return lines[-1].strip("= ") if lines else "(no pytest summary)"


def cross(versions: list[str], wheel: Path | None, venvs: Path) -> int:
    wheel = wheel or build_wheel(Path(tempfile.mkdtemp(prefix="ffa-wheel-")))
    print(f"wheel: {wheel} ({wheel.stat().st_size / 1e6:.2f} MB)")
    failed = 0
    results = []
    for v in versions:
        env_dir = venvs / f"abi-t{v.replace('.', '')}"
        py = env_dir / "bin" / "python"
        if not py.exists():
            _run([sys.executable, "-m", "venv", str(env_dir)])
        have = subprocess.run(
            [str(py), "-c", "import torch; print(torch.__version__)"],
            capture_output=True,
            text=True,
        )
        if have.returncode != 0 or have.stdout.split("+")[0].strip() != v:
            _run([str(py), "-m", "pip", "install", "-q", f"torch=={v}", *_TEST_DEPS])
        _run([str(py), "-m", "pip", "install", "-q", "--no-deps", "--force-reinstall", str(wheel)])
        # From outside the repository: the source ffa/ must not shadow the installed wheel.
        with tempfile.TemporaryDirectory() as cwd:
            proc = subprocess.run(
                [str(py), "-m", "pytest", "-q", "-p", "no:cacheprovider", str(ROOT / "tests")],
                cwd=cwd,
                capture_output=True,
                text=True,
            )
        log = venvs / f"abi-t{v.replace('.', '')}.log"
        log.write_text(proc.stdout + proc.stderr)
        line = _summary(proc.stdout)
        results.append(f"torch {v}: {line} (exit {proc.returncode}; log {log})")
        failed += proc.returncode != 0
    print("\n".join(results))
    return 1 if failed else 0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("modules", nargs="*", type=Path, help="shared objects to audit")
    ap.add_argument(
        "--cross",
        nargs="+",
        metavar="TORCH_VERSION",
        help="run the suite with the one wheel under these torch versions",
    )
    ap.add_argument("--wheel", type=Path, help="the wheel for --cross (default: build one)")
    ap.add_argument(
        "--venvs",
        type=Path,
        default=Path("/work/venvs"),
        help="where --cross keeps its venvs (default /work/venvs)",
    )
    args = ap.parse_args(argv)
    if args.cross:
        return cross(args.cross, args.wheel, args.venvs)
    paths = args.modules or installed_modules()
    if not paths:
        print("no ffa native module found (build ffa first)", file=sys.stderr)
        return 2
    return audit([Path(p) for p in paths])


if __name__ == "__main__":
    sys.exit(main())
