#!/usr/bin/env bash
# The one-call GPU check of ffa: build, every CUDA test, compute-sanitizer, benchmarks.
#
# On a GPU machine (CUDA torch, nvcc, compute-sanitizer, pytest with pytest-xdist and pytest-timeout;
# no network needed), from the repository root:
#     bash tools/gpu_check.sh OUTDIR
# With the project's device tool (timeout_s 600; the run keeps to GPU_CHECK_BUDGET_S = 470 s):
#     bash tools/gpu_check.sh "$OUT"
# Exit status: 0 when every step passed, 1 when one failed, 3 when no GPU is visible (the dry run is
# done instead). Read OUTDIR/summary.md first.
#
# Steps, each timed and under `timeout`, its status in summary.md; a step that no longer fits the
# budget is skipped with a note:
#   env       nvidia-smi, driver, torch, CUDA, nvcc, compute-sanitizer, CMake, pytest versions
#   build     pip install --no-build-isolation --no-deps --no-index --target WORK/site with
#             FFA_CUDA=ON and CMAKE_CUDA_ARCHITECTURES = this GPU's arch only, on all cores; the
#             system packages are untouched. A failure stops the run (log tail in summary.md).
#             Then the import check and `python -m ffa.info` (in setup.log), from an empty folder.
#   tests     every CUDA case (tests/test_cuda_*.py and the CUDA cases of every other file, chosen
#             by tools/pytest_cuda_only.py) with pytest-xdist and a per-test timeout; run from an
#             empty folder, so the source tree's ffa/ cannot shadow the built one
#   sanitize  tools/gpu_sanitize.py (every kernel path forward + backward on small inputs) plain,
#             listing the ffa kernels launched, and under compute-sanitizer memcheck, racecheck,
#             synccheck and initcheck: the five runs at once, alongside the tests
#   bench     benchmarks/cuda_bench.py --quick (CUDA events; it has the GPU to itself)
#   sweep     benchmarks/resolution_sweep.py --device cuda, 16x16 .. 512x512, within what is left
# OUTDIR gets at most 8 files, each under 16 MiB (logs keep their tails): summary.md, setup.log
# (versions + build log), tests.log, sanitizer.log, bench.log, cuda_bench.json,
# resolution_sweep.csv, resolution_sweep.png.
#
# Knobs (environment): GPU_CHECK_BUDGET_S (470), GPU_CHECK_STEPS (env,build,tests,sanitize,bench,
# sweep; e.g. env,build,sanitize for a partial rerun), GPU_CHECK_ARCH (default: the GPU's, e.g.
# 90), GPU_CHECK_JOBS (pytest workers, 12 on 16 cores), GPU_CHECK_TEST_TIMEOUT (per test, 120 s),
# GPU_CHECK_TESTS (test paths, tests), GPU_CHECK_SWEEP_METHODS, PYTHON (python3),
# GPU_CHECK_KEEP_WORK=1 (keep the work folder). To rehearse the GPU path's plumbing on a CPU
# machine: GPU_CHECK_MODE=gpu (skip the GPU detection) and GPU_CHECK_CUDA=OFF (build without CUDA);
# the steps that need a GPU then fail, and say so.
#
# Dry run (no GPU needed; tests/test_gpu_check.py runs it):
#     bash tools/gpu_check.sh --dry-run OUTDIR
# does what needs no GPU: the versions; the build as GPU_CHECK_DRY_BUILD says: kernels (default:
# nvcc compiles every csrc/cuda/*.cu with the flags CMake uses, for GPU_CHECK_ARCH, default 90),
# full (the real pip --target build, CPU only, and the import check from an empty folder) or plan
# (the command only); the collection of the CUDA cases; the sanitizer plan and the same calls on
# the CPU kernels (GPU_CHECK_DRY_CPU_CALLS=0 leaves them out); the bench and sweep command lines;
# the summary.
set -uo pipefail
exec 3>&1 # progress lines, also from the background step whose output goes to a log

DRY=0
if [[ ${1:-} == --dry-run ]]; then
  DRY=1
  shift
fi
if [[ $# -ne 1 ]]; then
  echo "usage: bash tools/gpu_check.sh [--dry-run] OUTDIR" >&2
  exit 2
fi
REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
mkdir -p "$1" && OUT=$(cd "$1" && pwd) || exit 2
PY=${PYTHON:-python3}
BUDGET=${GPU_CHECK_BUDGET_S:-470}
STEPS=${GPU_CHECK_STEPS:-env,build,tests,sanitize,bench,sweep}
TEST_TIMEOUT=${GPU_CHECK_TEST_TIMEOUT:-120}
TESTS=${GPU_CHECK_TESTS:-tests}
SWEEP_METHODS=${GPU_CHECK_SWEEP_METHODS:-ffa_fa,ffa_ffa,reference_fa,reference_ffa}
DRY_BUILD=${GPU_CHECK_DRY_BUILD:-kernels}
FFA_CUDA=${GPU_CHECK_CUDA:-ON}
T0=$(date +%s)
WORK=$(mktemp -d "${TMPDIR:-/tmp}/ffa-gpu-check.XXXXXX")
SITE=$WORK/site # the build's install target, first on PYTHONPATH
RUN=$WORK/run   # an empty working folder for everything that imports ffa
mkdir -p "$SITE" "$RUN" "$WORK/sanitize"
NCPU=$(nproc 2>/dev/null || echo 4)
JOBS=${GPU_CHECK_JOBS:-$((NCPU >= 16 ? 12 : (NCPU * 3 + 3) / 4))} # pytest workers: 12 of 16 cores
for f in summary.md setup.log tests.log sanitizer.log bench.log cuda_bench.json \
  resolution_sweep.csv resolution_sweep.png; do
  rm -f "$OUT/$f"
done
EXTRA=$(find "$OUT" -mindepth 1 -maxdepth 1 | wc -l)
BG_PIDS=()
BUILD_OK=0
SITE_PATH="" # PYTHONPATH entry of the built ffa ("" in dry runs: the environment's own ffa)
MODE=starting

now() { date +%s; }
left() { echo $((BUDGET - ($(now) - T0))); }
want() { [[ ",$STEPS," == *",$1,"* ]]; }
summary() { "$PY" "$REPO/tools/gpu_summary.py" --work "$WORK" --out "$OUT" "$@" || true; }
# record STEP STATUS SECONDS NOTE: one row of the summary's step table (also from the background).
record() {
  printf '%s\t%s\t%s\t%s\n' "$1" "$2" "$3" "$4" >>"$WORK/steps.tsv"
  echo "gpu_check: [$(($(now) - T0)) s] $1: $2 ($3 s) $4" >&3
  summary
}
status_of() { # exit status -> pass | TIMEOUT | FAIL
  case $1 in
    0) echo pass ;;
    124 | 137) echo TIMEOUT ;;
    *) echo FAIL ;;
  esac
}
# step_limit MAX: the seconds a step may take now: MAX, or what the budget leaves.
step_limit() {
  local l=$(($(left) - 10))
  if ((l < $1)); then echo "$l"; else echo "$1"; fi
}
# keep_tail FILE MAX_BYTES: a log keeps its last MAX_BYTES, with a note on what was cut.
keep_tail() {
  local f=$1 max=$2 size
  [[ -f $f ]] || return 0
  size=$(stat -c %s "$f")
  if ((size > max)); then
    {
      echo "[... the first $((size - max)) bytes are cut: the log keeps its last $max bytes ...]"
      tail -c "$max" "$f"
    } >"$f.cut" && mv "$f.cut" "$f"
  fi
}
# kill_tree PID: a background step and everything it started, by process id.
kill_tree() {
  local child
  for child in $(ps -o pid= --ppid "$1" 2>/dev/null); do kill_tree "$child"; done
  kill "$1" 2>/dev/null
}

finish() {
  local rc=$?
  trap - EXIT INT TERM
  trap '' PIPE # a reader that went away must not stop the clean-up
  for pid in "${BG_PIDS[@]}"; do kill_tree "$pid"; done
  keep_tail "$OUT/setup.log" $((4 << 20))
  keep_tail "$OUT/tests.log" $((8 << 20))
  keep_tail "$OUT/sanitizer.log" $((8 << 20))
  keep_tail "$OUT/bench.log" $((4 << 20))
  echo "wall_s=$(($(now) - T0))" >>"$WORK/meta.env"
  # The verdict comes from the recorded steps (the background step records its own).
  case $(summary --final) in
    "state: PASS" | "state: DRY RUN OK") ;;
    "state: NO GPU"*) ((rc == 0)) && rc=3 ;;
    *) ((rc == 0)) && rc=1 ;;
  esac
  echo
  cat "$OUT/summary.md" 2>/dev/null
  echo
  echo "gpu_check: exit status $rc after $(($(now) - T0)) s; summary: $OUT/summary.md"
  if [[ ${GPU_CHECK_KEEP_WORK:-0} == 1 ]]; then echo "work folder kept: $WORK"; else rm -rf "$WORK"; fi
  exit "$rc"
}
trap finish EXIT
trap 'exit 130' INT TERM

# ---- mode: a GPU run, or the dry run -----------------------------------------------------------
HAS_GPU=0
if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1 &&
  "$PY" -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)' 2>/dev/null; then
  HAS_GPU=1
fi
if ((DRY)); then
  MODE=dry-run
  NOTE="Dry run: the steps that need no GPU (see tools/gpu_check.sh)."
elif ((HAS_GPU)) || [[ ${GPU_CHECK_MODE:-} == gpu ]]; then
  MODE=gpu
  NOTE=""
  ((HAS_GPU)) || NOTE="Rehearsal: GPU_CHECK_MODE=gpu on a machine without a GPU."
else
  MODE=no-gpu
  DRY=1
  NOTE="No GPU visible (nvidia-smi or torch.cuda): only the dry run was done."
  echo "gpu_check: $NOTE" >&2
fi
((EXTRA > 0)) && NOTE+=" OUTDIR already held $EXTRA other file(s)."
{
  echo "mode=$MODE"
  echo "commit=$(git -C "$REPO" rev-parse --short HEAD 2>/dev/null || echo unknown)$(
    git -C "$REPO" diff --quiet HEAD 2>/dev/null || echo ' (+ local changes)')"
  echo "started=$(date -u +%Y-%m-%dT%H:%M:%SZ)"
  echo "budget_s=$BUDGET"
  echo "note=$NOTE"
} >"$WORK/meta.env"
summary
echo "gpu_check: mode $MODE, budget $BUDGET s, steps $STEPS, work folder $WORK"

# ---- env ---------------------------------------------------------------------------------------
find_tool() { # NAME: on PATH, else in the usual CUDA folders
  command -v "$1" 2>/dev/null ||
    ls /usr/local/cuda/bin/"$1" /usr/local/cuda/compute-sanitizer/"$1" 2>/dev/null | head -1
}
NVCC=$(find_tool nvcc)
SANITIZER=$(find_tool compute-sanitizer)
[[ -n $NVCC ]] && export CUDACXX=${CUDACXX:-$NVCC}
ENV_PY='
import importlib.metadata as md, os, platform, sys, sysconfig
import torch
def v(name):
    try:
        return md.version(name)
    except md.PackageNotFoundError:
        return "missing"
inc = sysconfig.get_paths()["include"]
headers = "Python.h in " + inc if os.path.exists(os.path.join(inc, "Python.h")) else "NO Python.h"
print(f"python={platform.python_version()} ({sys.executable}; {headers})")
print(f"torch={torch.__version__}")
print(f"torch_cuda={torch.version.cuda} (available: {torch.cuda.is_available()})")
if torch.cuda.is_available():
    p = torch.cuda.get_device_properties(0)
    print(f"torch_device={p.name}, sm_{p.major}{p.minor}, {p.multi_processor_count} SMs, "
          f"{p.total_memory / 2**30:.0f} GiB")
pt, xd, to = v("pytest"), v("pytest-xdist"), v("pytest-timeout")
print(f"pytest={pt} (xdist {xd}, timeout {to})")
sk, nj, cm = v("scikit-build-core"), v("ninja"), v("cmake")
print(f"build_tools=scikit-build-core {sk}, ninja {nj}, cmake (pip) {cm}")
'
step_env() {
  local t0 rc q g d c m
  t0=$(now)
  {
    echo "===== env ($(date -u +%FT%TZ)) ====="
    if command -v nvidia-smi >/dev/null 2>&1; then
      timeout 20 nvidia-smi
      q=$(timeout 10 nvidia-smi --query-gpu=name,driver_version,compute_cap,memory.total \
        --format=csv,noheader 2>/dev/null | head -1)
      IFS=, read -r g d c m <<<"$q"
      printf 'gpu=%s\ndriver=%s\ncompute_cap=%s\ngpu_memory=%s\n' "$g" "${d# }" "${c# }" "${m# }"
    else
      echo "gpu=none (nvidia-smi not found)"
    fi | tee -a "$WORK/env.txt"
    {
      if [[ -n $NVCC ]]; then
        echo "nvcc=$("$NVCC" --version | grep -o 'release .*' | head -1) ($NVCC)"
      else
        echo "nvcc=not found"
      fi
      if [[ -n $SANITIZER ]]; then
        echo "sanitizer=$("$SANITIZER" --version 2>/dev/null | grep -i version | head -1) ($SANITIZER)"
      else
        echo "sanitizer=not found"
      fi
      echo "cmake=$(cmake --version 2>/dev/null | head -1)"
      echo "cores=$NCPU"
    } | tee -a "$WORK/env.txt"
    timeout 60 "$PY" -c "$ENV_PY" | tee -a "$WORK/env.txt"
    rc=$?
  } >>"$OUT/setup.log" 2>&1
  record env "$(status_of $rc)" $(($(now) - t0)) ""
}
if want env; then step_env; else record env skipped 0 "not in GPU_CHECK_STEPS"; fi

# ---- build -------------------------------------------------------------------------------------
# set_build_cmd ARCH CUDA(ON|OFF): the pip command line of the build, in BUILD_CMD.
set_build_cmd() {
  BUILD_CMD=("$PY" -m pip install --no-build-isolation --no-deps --no-index
    --disable-pip-version-check -v --target "$SITE" --config-settings=cmake.define.FFA_CUDA="$2")
  [[ $2 == ON ]] && BUILD_CMD+=(--config-settings=cmake.define.CMAKE_CUDA_ARCHITECTURES="$1")
  BUILD_CMD+=(--config-settings=build-dir="$WORK/build" "$REPO")
}
gpu_arch() { # e.g. 90: nvidia-smi's compute capability (9.0), else torch's
  local cap
  cap=$(nvidia-smi --query-gpu=compute_cap --format=csv,noheader 2>/dev/null | head -1 | tr -d ' .')
  [[ -z $cap ]] && cap=$("$PY" -c 'import torch; print("%d%d" % torch.cuda.get_device_capability())' 2>/dev/null)
  echo "$cap"
}
IMPORT_CHECK_PY='
import sys
import torch
import ffa
site, need_cuda = sys.argv[1], sys.argv[2] == "1"
print(f"import check: ffa from {ffa.__file__}")
assert ffa.__file__.startswith(site), f"ffa imported from {ffa.__file__}, not from {site}"
ops = ("fa_loss", "ffa_loss", "ffa_loss_philox", "quantize_weight", "quant_relu", "fake_quantize")
has = {op: torch._C._dispatch_has_kernel_for_dispatch_key(f"ffa::{op}", "CUDA") for op in ops}
print(f"import check: CUDA kernels registered: {has}")
assert not need_cuda or all(has.values()), "the CUDA kernels are not registered"
'
import_check() { # NEED_CUDA(0|1): the built ffa imports from SITE (not the source tree)
  (cd "$RUN" && PYTHONPATH="$SITE" "$PY" -c "$IMPORT_CHECK_PY" "$SITE" "$1") || return
  # What the built ffa runs, for the record (python -m ffa.info exits 0 whatever it finds).
  (cd "$RUN" && PYTHONPATH="$SITE" "$PY" -m ffa.info) || true
}
# compile_kernels ARCH LIMIT: every csrc/cuda/*.cu with the flags CMake passes for
# CMAKE_CUDA_ARCHITECTURES=ARCH (Release -O3 -DNDEBUG, the target's -O3 -lineinfo), in parallel.
compile_kernels() {
  local arch=$1 limit=$2 rc=0 pids=() f pid
  local flags=(-O3 -DNDEBUG -std=c++17 "--generate-code=arch=compute_$arch,code=[compute_$arch,sm_$arch]"
    -Xcompiler=-fPIC -lineinfo -DFFA_WITH_CUDA -I"$REPO/csrc")
  echo "nvcc ${flags[*]} -c <file>.cu"
  mkdir -p "$WORK/kernels"
  for f in "$REPO"/csrc/cuda/*.cu; do
    timeout -k 10 "$limit" "$NVCC" "${flags[@]}" -c "$f" -o "$WORK/kernels/$(basename "$f").o" \
      >"$WORK/kernels/$(basename "$f").log" 2>&1 &
    pids+=($!)
  done
  for pid in "${pids[@]}"; do wait "$pid" || rc=$?; done
  for f in "$WORK"/kernels/*.log; do
    echo "--- $(basename "$f" .log): $(grep -ci warning "$f") warning(s)"
    cat "$f"
  done
  return "$rc"
}
step_build() {
  local t0 rc=0 arch limit note st
  t0=$(now)
  limit=$(step_limit 240)
  if ((DRY)); then
    arch=${GPU_CHECK_ARCH:-90}
    set_build_cmd "$arch" ON
    echo "GPU build command: CMAKE_BUILD_PARALLEL_LEVEL=<cores> ${BUILD_CMD[*]}" >>"$WORK/build.log"
    case $DRY_BUILD in
      plan) note="dry run: command only (GPU_CHECK_DRY_BUILD=plan)" ;;
      full)
        set_build_cmd "" OFF
        echo "dry run, the same build without CUDA: ${BUILD_CMD[*]}" >>"$WORK/build.log"
        CMAKE_BUILD_PARALLEL_LEVEL=$NCPU timeout -k 10 "$limit" "${BUILD_CMD[@]}" >>"$WORK/build.log" 2>&1 &&
          import_check 0 >>"$WORK/build.log" 2>&1
        rc=$?
        ((rc == 0)) && SITE_PATH=$SITE
        note="dry run: CPU-only pip --target build, import check from an empty folder"
        ;;
      *)
        if [[ -z $NVCC ]]; then
          note="dry run: nvcc not found, kernels not compiled"
        else
          compile_kernels "$arch" "$limit" >>"$WORK/build.log" 2>&1
          rc=$?
          note="dry run: nvcc compiled $(find "$WORK/kernels" -name '*.o' | wc -l) of"
          note+=" $(find "$REPO/csrc/cuda" -name '*.cu' | wc -l) kernel files for sm_$arch with CMake's flags"
        fi
        ;;
    esac
  else
    arch=${GPU_CHECK_ARCH:-$(gpu_arch)}
    if [[ -z $arch ]]; then
      echo "could not read the GPU's compute capability" >>"$WORK/build.log"
      rc=1
    else
      set_build_cmd "$arch" "$FFA_CUDA"
      echo "build: CMAKE_BUILD_PARALLEL_LEVEL=$NCPU ${BUILD_CMD[*]}" >>"$WORK/build.log"
      CMAKE_BUILD_PARALLEL_LEVEL=$NCPU timeout -k 10 "$limit" "${BUILD_CMD[@]}" >>"$WORK/build.log" 2>&1 &&
        import_check "$([[ $FFA_CUDA == ON ]] && echo 1 || echo 0)" >>"$WORK/build.log" 2>&1
      rc=$?
      ((rc == 0)) && SITE_PATH=$SITE
    fi
    note="sm_$arch, FFA_CUDA=$FFA_CUDA, $NCPU cores, limit $limit s"
  fi
  {
    echo "===== build (rc $rc, $(($(now) - t0)) s): the last 400 lines of its log ====="
    tail -n 400 "$WORK/build.log"
  } >>"$OUT/setup.log"
  st=$(status_of $rc)
  if ((rc == 0)); then
    BUILD_OK=1
    ((DRY)) && st=dry
  fi
  record build "$st" $(($(now) - t0)) "$note"
}
if ! want build; then
  record build skipped 0 "not in GPU_CHECK_STEPS"
elif (($(left) < 60)); then
  record build skipped 0 "budget spent"
else
  step_build
fi
if ((!BUILD_OK && !DRY)); then # nothing to check without a build: the run has failed
  for s in tests sanitize bench sweep; do record "$s" skipped 0 "no build (failed or not run)"; done
  exit 1
fi
# What every later step imports: the built ffa first, tools/ for the pytest plugin.
PYPATH="${SITE_PATH:+$SITE_PATH:}$REPO/tools${PYTHONPATH:+:$PYTHONPATH}"

# ---- sanitize (in the background, alongside the tests) -----------------------------------------
SAN_TOOLS=(memcheck racecheck synccheck initcheck)
# set_sanitizer_cmd TOOL: SAN_CMD (the compute-sanitizer prefix) and SAN_ENV of one tool. memcheck
# checks every kernel (torch's too) with torch's caching allocator off, so an access past a
# tensor's end leaves its allocation; the other tools check ffa's kernels only (name substring).
set_sanitizer_cmd() {
  SAN_CMD=("${SANITIZER:-compute-sanitizer}" --tool "$1" --error-exitcode 99 --print-limit 20
    --report-api-errors no)
  SAN_ENV=(PYTHONPATH="$PYPATH" PYTHONUNBUFFERED=1)
  [[ $1 != memcheck ]] && SAN_CMD+=(--kernel-name kns=ffa)
  [[ $1 == memcheck || $1 == initcheck ]] && SAN_ENV+=(PYTORCH_NO_CUDA_MEMORY_CACHING=1)
}
sanitize_run() { # TOOL LIMIT: the driver plain (TOOL = plain) or under compute-sanitizer
  local tool=$1 limit=$2 t0 rc cmd
  t0=$(now)
  if [[ $tool == plain ]]; then
    SAN_ENV=(PYTHONPATH="$PYPATH" PYTHONUNBUFFERED=1)
    cmd=("$PY" "$REPO/tools/gpu_sanitize.py" --kernels)
  else
    set_sanitizer_cmd "$tool"
    cmd=("${SAN_CMD[@]}" "$PY" "$REPO/tools/gpu_sanitize.py")
  fi
  echo "\$ ${SAN_ENV[*]} ${cmd[*]}" >"$WORK/sanitize/$tool.log"
  (cd "$RUN" && env "${SAN_ENV[@]}" timeout -k 10 "$limit" "${cmd[@]}") >>"$WORK/sanitize/$tool.log" 2>&1
  rc=$?
  echo "$rc $(($(now) - t0))" >"$WORK/sanitize/$tool.rc"
}
step_sanitize() {
  local t0 rc=0 limit runs=(plain) tool pid pids=() note st trc tsec
  t0=$(now)
  limit=$(step_limit 200)
  (cd "$RUN" && PYTHONPATH="$PYPATH" "$PY" "$REPO/tools/gpu_sanitize.py" --plan) \
    >"$WORK/sanitize/plan.txt" 2>&1 || rc=$?
  if ((DRY)); then
    for tool in "${SAN_TOOLS[@]}"; do
      set_sanitizer_cmd "$tool"
      echo "planned: (cd <empty folder> && ${SAN_ENV[*]} ${SAN_CMD[*]} $PY tools/gpu_sanitize.py)"
    done >>"$WORK/sanitize/plan.txt"
    note="dry run: $(grep -c '^PLAN' "$WORK/sanitize/plan.txt") calls planned"
    if [[ ${GPU_CHECK_DRY_CPU_CALLS:-1} == 1 ]]; then
      (cd "$RUN" && PYTHONPATH="$PYPATH" timeout -k 10 "$limit" "$PY" "$REPO/tools/gpu_sanitize.py" \
        --device cpu --skip-large) >"$WORK/sanitize/cpu.log" 2>&1 || rc=$?
      note+=", run on the CPU kernels (large inputs left out)"
    fi
    cat "$WORK/sanitize/plan.txt" "$WORK/sanitize/cpu.log" >>"$OUT/sanitizer.log" 2>/dev/null
    st=dry
    ((rc != 0)) && st=$(status_of $rc)
    record sanitize "$st" $(($(now) - t0)) "$note"
    return
  fi
  if [[ -n $SANITIZER ]]; then
    runs+=("${SAN_TOOLS[@]}")
    note="${#runs[@]} runs at once, limit $limit s each"
  else
    note="compute-sanitizer not found: the plain run only"
    rc=1
  fi
  for tool in "${runs[@]}"; do
    sanitize_run "$tool" "$limit" &
    pids+=($!)
  done
  for pid in "${pids[@]}"; do wait "$pid"; done
  {
    cat "$WORK/sanitize/plan.txt"
    for tool in "${runs[@]}"; do
      read -r trc tsec <"$WORK/sanitize/$tool.rc"
      echo
      echo "===== $tool: exit status $trc, $tsec s ====="
      keep_tail "$WORK/sanitize/$tool.log" $((1 << 20))
      cat "$WORK/sanitize/$tool.log"
      ((trc == 0)) || rc=$trc
    done
  } >>"$OUT/sanitizer.log"
  record sanitize "$(status_of $rc)" $(($(now) - t0)) "$note"
}

# ---- tests -------------------------------------------------------------------------------------
step_tests() {
  local t0 rc limit paths=() p st
  t0=$(now)
  limit=$(step_limit 210)
  for p in $TESTS; do paths+=("$REPO/$p"); done
  local args=(-m pytest "${paths[@]}" -p pytest_cuda_only -p no:cacheprovider --rootdir "$REPO"
    -c "$REPO/pyproject.toml")
  if ((DRY)); then
    (cd "$RUN" && PYTHONPATH="$PYPATH" timeout -k 10 "$limit" "$PY" "${args[@]}" --collect-only -q) \
      >"$WORK/collect.txt" 2>&1
    rc=$?
    cat "$WORK/collect.txt" >>"$OUT/tests.log"
    st=dry
    ((rc != 0)) && st=$(status_of $rc)
    record tests "$st" $(($(now) - t0)) "dry run: collection only ($(grep -Eo '[0-9]+(/[0-9]+)? tests? collected' "$WORK/collect.txt" | head -1))"
    return
  fi
  local note="limit $limit s"
  if "$PY" -c 'import xdist' 2>/dev/null; then
    args+=(-n "$JOBS") note+=", pytest -n $JOBS"
  else
    note+=", no pytest-xdist: one process"
  fi
  if "$PY" -c 'import pytest_timeout' 2>/dev/null; then
    args+=(--timeout "$TEST_TIMEOUT") note+=", --timeout $TEST_TIMEOUT s per test"
  else
    note+=", no pytest-timeout: no per-test timeout"
  fi
  # One intra-op thread and one inductor compile thread per worker: the workers share the cores.
  # At the limit pytest gets SIGINT first: it stops and still writes its summary and junit XML.
  (cd "$RUN" && PYTHONPATH="$PYPATH" OMP_NUM_THREADS=1 TORCHINDUCTOR_COMPILE_THREADS=1 \
    timeout -s INT -k 20 "$limit" "$PY" "${args[@]}" -q --tb=short --junitxml "$WORK/junit.xml") 2>&1 |
    tee -a "$OUT/tests.log" >/dev/null
  rc=$?
  record tests "$(status_of $rc)" $(($(now) - t0)) "$note"
}

if ! want tests && ! want sanitize; then
  record tests skipped 0 "not in GPU_CHECK_STEPS"
  record sanitize skipped 0 "not in GPU_CHECK_STEPS"
elif ((!DRY)) && (($(left) < 60)); then
  want tests && record tests skipped 0 "budget spent"
  want sanitize && record sanitize skipped 0 "budget spent"
else
  if want sanitize; then
    step_sanitize >>"$WORK/sanitize/step.log" 2>&1 &
    BG_PIDS+=($!)
  fi
  if want tests; then step_tests; else record tests skipped 0 "not in GPU_CHECK_STEPS"; fi
  if want sanitize; then
    wait "${BG_PIDS[0]}"
    BG_PIDS=()
  else
    record sanitize skipped 0 "not in GPU_CHECK_STEPS"
  fi
fi

# ---- bench -------------------------------------------------------------------------------------
step_bench() {
  local t0 rc limit tag cmd=("$PY" benchmarks/cuda_bench.py --quick)
  t0=$(now)
  if ((DRY)); then
    echo "planned: (cd REPO && PYTHONPATH=SITE ${cmd[*]}), then copy benchmarks/results/cuda-<gpu>/cuda_bench.json" >>"$OUT/bench.log"
    record bench dry 0 "dry run: command only (needs a GPU)"
    return
  fi
  limit=$(step_limit 120)
  touch "$WORK/bench.start" # results older than this are not this run's
  echo "===== cuda_bench: ${cmd[*]} (limit $limit s) =====" >>"$OUT/bench.log"
  (cd "$REPO" && PYTHONPATH="$PYPATH" PYTHONUNBUFFERED=1 timeout -k 10 "$limit" "${cmd[@]}") 2>&1 |
    tee -a "$OUT/bench.log" >/dev/null
  rc=$?
  tag=$(cd "$REPO/benchmarks" && "$PY" -c 'import harness; print(harness.device_tag("cuda"))' 2>/dev/null)
  local json="$REPO/benchmarks/results/$tag/cuda_bench.json"
  if [[ $json -nt $WORK/bench.start ]]; then
    cp "$json" "$OUT/cuda_bench.json"
  else
    echo "no new benchmarks/results/$tag/cuda_bench.json" >>"$OUT/bench.log"
    ((rc == 0)) && rc=1
  fi
  record bench "$(status_of $rc)" $(($(now) - t0)) "limit $limit s"
}

# ---- sweep -------------------------------------------------------------------------------------
step_sweep() {
  local t0 rc limit budget
  t0=$(now)
  limit=$(step_limit 150)
  budget=$((limit - 40)) # the sweep's own budget; it may overrun it by a job's start-up
  local cmd=("$PY" benchmarks/resolution_sweep.py --device cuda --out "$WORK/sweep"
    --methods "$SWEEP_METHODS" --resolutions 16,32,64,128,256,512 --batch 2 --channels 64 -k 15
    --warmup 2 --repeats 5 --seeds 4 --k-res 64 --ks 1,4,16,64 --max-case-s 10 --budget-s "$budget")
  if ((DRY)); then
    echo "planned: (cd REPO && PYTHONPATH=SITE TQDM_DISABLE=1 ${cmd[*]:0:${#cmd[@]}-1} <seconds left - 50>)" >>"$OUT/bench.log"
    record sweep dry 0 "dry run: command only (needs a GPU)"
    return
  fi
  if ((budget < 30)); then
    record sweep skipped 0 "budget spent ($(left) s left)"
    return
  fi
  echo "===== resolution sweep: ${cmd[*]} (limit $limit s) =====" >>"$OUT/bench.log"
  (cd "$REPO" && PYTHONPATH="$PYPATH" PYTHONUNBUFFERED=1 TQDM_DISABLE=1 timeout -k 10 "$limit" \
    "${cmd[@]}") 2>&1 | tee -a "$OUT/bench.log" >/dev/null
  rc=$?
  cp "$WORK/sweep/resolution_sweep.csv" "$WORK/sweep/resolution_sweep.png" "$OUT/" 2>/dev/null
  record sweep "$(status_of $rc)" $(($(now) - t0)) "sweep budget $budget s, limit $limit s"
}

for s in bench sweep; do
  if ! want $s; then
    record $s skipped 0 "not in GPU_CHECK_STEPS"
  elif ((!DRY)) && (($(left) < 45)); then
    record $s skipped 0 "budget spent ($(left) s left)"
  else
    "step_$s"
  fi
done
exit 0 # finish() writes the final summary and sets the exit status
