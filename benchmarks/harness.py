"""The one small harness every ffa benchmark script uses.

- ``measure``: warm-up, then repeated timed runs (CUDA events on GPU, perf_counter on CPU), median
  with 20th/80th percentiles, and the peak memory one run needs above what was held before it.
- ``PeakMemory``: GPU: ``torch.cuda.max_memory_allocated`` after ``reset_peak_memory_stats``.
  CPU: the process's peak resident set (VmHWM) above its resident set at the start of the measured
  run; the peak is reset through ``/proc/self/clear_refs`` after ``gc`` and ``malloc_trim`` return
  every freed page to the OS, so it counts every byte the runs touched (tensors, kernel workspaces,
  thread stacks), not only tensors. Linux only; elsewhere CPU peak memory is reported as unknown.
- ``Worker``: a spawned subprocess that runs benchmark jobs, so the sweep survives a crash in the
  measuring process: a job that raises an out-of-memory error, or a worker killed by the kernel's
  OOM killer, comes back as status "oom"; on CPU the worker's data segment is capped near the free
  memory so an allocation that cannot fit fails inside torch instead of invoking the OOM killer.
- ``CsvLog``: rows appended (and flushed) one by one with a fixed column list, so a sweep cut short
  still leaves its finished rows; ``machine_info`` is the JSON written beside it (machine, versions,
  git commit, date).
"""

from __future__ import annotations

import csv
import ctypes
import datetime
import gc
import math
import multiprocessing as mp
import os
import platform
import re
import resource
import signal
import subprocess
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path

CPU_MEMORY_METHOD = (
    "CPU: peak resident set (VmHWM) of the benchmark worker process during one full run (the last "
    "warm-up run) minus its resident set just before it; before that run the worker runs gc and "
    "malloc_trim and resets VmHWM via /proc/self/clear_refs, so every page the run touches counts "
    "(tensors, kernel workspaces, thread stacks), and the inputs, allocated before, do not. "
    "One-time costs of a process's first call (thread pools, library initialisation, a few MiB) "
    "are excluded: this is the steady-state memory of a training step"
)
CUDA_MEMORY_METHOD = (
    "CUDA: torch.cuda.max_memory_allocated during one full run (the last warm-up run) minus "
    "torch.cuda.memory_allocated just before it (after empty_cache and reset_peak_memory_stats); "
    "the inputs are not counted"
)

# ------------------------------------------------------------------------------------------- stats


def percentile(values, q: float) -> float:
    """Linear-interpolation percentile (numpy's default), q in [0, 100]."""
    xs = sorted(values)
    if not xs:
        return math.nan
    pos = (len(xs) - 1) * q / 100.0
    lo = math.floor(pos)
    hi = min(lo + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)


@dataclass
class Measurement:
    times_ms: list[float]
    warmup_ms: list[float]
    peak_bytes: int | None
    notes: list[str] = field(default_factory=list)

    @property
    def median_ms(self) -> float:
        return percentile(self.times_ms, 50)

    @property
    def p20_ms(self) -> float:
        return percentile(self.times_ms, 20)

    @property
    def p80_ms(self) -> float:
        return percentile(self.times_ms, 80)

    def as_dict(self) -> dict:
        return {
            "median_ms": self.median_ms,
            "p20_ms": self.p20_ms,
            "p80_ms": self.p80_ms,
            "times_ms": self.times_ms,
            "warmup_ms": self.warmup_ms,
            "peak_bytes": self.peak_bytes,
            "notes": self.notes,
        }


# ------------------------------------------------------------------------------------------ memory


def _read_status_kb(key: str) -> int | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


_libc = None


def _malloc_trim() -> None:
    global _libc
    try:
        if _libc is None:
            _libc = ctypes.CDLL("libc.so.6")
        _libc.malloc_trim(0)
    except (OSError, AttributeError):
        pass


def _reset_rss_peak() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # Linux >= 4.0: reset VmHWM to the current RSS
        return True
    except OSError:
        return False


def release_memory(device: str) -> None:
    """Returns freed memory to the OS / driver so the next measurement starts clean."""
    gc.collect()
    gc.freeze()  # survivors are long-lived (modules, compiled code): later collections skip them
    if device == "cuda":
        import torch

        torch.cuda.synchronize()
        torch.cuda.empty_cache()
    else:
        _malloc_trim()


class PeakMemory:
    """Context manager: ``.peak_bytes`` = peak memory above the level at entry (None: unknown)."""

    def __init__(self, device: str):
        self.device = device
        self.peak_bytes: int | None = None

    def __enter__(self):
        release_memory(self.device)
        if self.device == "cuda":
            import torch

            torch.cuda.reset_peak_memory_stats()
            self._base = torch.cuda.memory_allocated()
        else:
            self._ok = _reset_rss_peak()
            self._base = _read_status_kb("VmRSS")
        return self

    def __exit__(self, *exc):
        if self.device == "cuda":
            import torch

            torch.cuda.synchronize()
            self.peak_bytes = max(0, torch.cuda.max_memory_allocated() - self._base)
        else:
            hwm = _read_status_kb("VmHWM")
            if self._ok and hwm is not None and self._base is not None:
                self.peak_bytes = max(0, hwm - self._base)
        return False


def available_bytes(device: str) -> int:
    """Memory a case may use: MemAvailable on CPU; free device memory plus torch's cache on GPU."""
    if device == "cuda":
        import torch

        free, _ = torch.cuda.mem_get_info()
        return free + torch.cuda.memory_reserved() - torch.cuda.memory_allocated()
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES")


def is_oom(exc: BaseException) -> bool:
    if isinstance(exc, MemoryError):
        return True
    try:
        import torch

        if isinstance(exc, torch.OutOfMemoryError):
            return True
    except (ImportError, AttributeError):
        pass
    msg = str(exc)
    needles = ("out of memory", "can't allocate memory", "Cannot allocate memory", "not enough mem")
    return any(s in msg for s in needles)


# ------------------------------------------------------------------------------------------ timing


def _sync(device: str) -> None:
    if device == "cuda":
        import torch

        torch.cuda.synchronize()


def _run_timed(run, device: str, pre=None) -> float:
    """One run of ``run`` in milliseconds; ``pre`` (untimed) feeds its result to ``run``."""
    arg = pre() if pre is not None else None
    if device == "cuda":
        import torch

        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        out = run(arg) if pre is not None else run()
        end.record()
        end.synchronize()
        del out, arg
        return start.elapsed_time(end)
    t0 = time.perf_counter()
    out = run(arg) if pre is not None else run()
    dt = (time.perf_counter() - t0) * 1e3
    del out, arg
    return dt


def measure(
    run,
    *,
    device: str,
    warmup: int = 1,
    repeats: int = 5,
    max_s: float | None = None,
    pre=None,
) -> Measurement:
    """Times ``run()`` (or ``run(pre())`` with ``pre`` untimed) after ``warmup`` calls.

    Peak memory is taken over the last warm-up call (over the first timed call when there is no
    warm-up): every call allocates the same, the earlier warm-up calls absorb one-time costs
    (torch.compile, thread pools) that are not the loss's memory, and the timed calls are not
    slowed by the page faults that returning memory to the OS before a measurement causes.
    Repeats stop early once ``max_s`` seconds of timed runs are spent (at least one timed run).
    """
    warm: list[float] = []
    times: list[float] = []
    for _ in range(max(warmup - 1, 0)):
        warm.append(_run_timed(run, device, pre))
    with PeakMemory(device) as mem:
        first = _run_timed(run, device, pre)
    (warm if warmup > 0 else times).append(first)
    _sync(device)
    notes = []
    t_start = time.perf_counter() - (first / 1e3 if warmup == 0 else 0.0)
    while len(times) < repeats:
        times.append(_run_timed(run, device, pre))
        spent = time.perf_counter() - t_start
        if max_s is not None and len(times) < repeats and spent + times[-1] / 1e3 > max_s:
            notes.append(f"{len(times)} of {repeats} repeats: the case's {max_s:g} s were spent")
            break
    return Measurement(times, warm, mem.peak_bytes, notes)


# ----------------------------------------------------------------------------------------- machine


def git_commit(cwd: str | Path | None = None) -> str:
    cwd = cwd or Path(__file__).resolve().parent
    try:
        sha = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=cwd, capture_output=True, text=True, timeout=10
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=cwd,
            capture_output=True,
            text=True,
            timeout=10,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    if not sha:
        return "unknown"
    return sha + ("-dirty" if dirty else "")


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _slug(text: str) -> str:
    text = re.sub(r"\((r|tm|R|TM)\)", "", text)
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")


def device_tag(device: str) -> str:
    """Folder name for results: cpu-<model>-<cores>c, or cuda-<gpu name>."""
    if device == "cuda":
        import torch

        return "cuda-" + _slug(torch.cuda.get_device_name())
    return f"cpu-{_slug(cpu_model())}-{os.cpu_count()}c"


def machine_info(device: str) -> dict:
    import torch

    info = {
        "device": device,
        "device_tag": device_tag(device),
        "cpu_model": cpu_model(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "memory_total_bytes": os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "git_commit": git_commit(),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "memory_method": CUDA_MEMORY_METHOD if device == "cuda" else CPU_MEMORY_METHOD,
    }
    try:
        import ffa

        info["ffa"] = getattr(ffa, "__version__", "unknown")
        info["ffa_path"] = str(Path(ffa.__file__).parent)
    except ImportError as e:  # the sweep can still time the reference
        info["ffa"] = f"not importable: {e}"
    if device == "cuda":
        props = torch.cuda.get_device_properties(0)
        info["gpu_name"] = props.name
        info["gpu_memory_bytes"] = props.total_memory
        info["gpu_capability"] = f"{props.major}.{props.minor}"
    return info


# --------------------------------------------------------------------------------------------- csv


class CsvLog:
    """Appends rows with a fixed column list; writes the header when the file is new or empty."""

    def __init__(self, path: str | Path, columns: list[str], *, fresh: bool = True):
        self.path = Path(path)
        self.columns = list(columns)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if fresh and self.path.exists():
            self.path.unlink()

    def append(self, row: dict) -> None:
        new = not self.path.exists() or self.path.stat().st_size == 0
        with open(self.path, "a", newline="") as f:
            w = csv.DictWriter(f, fieldnames=self.columns, extrasaction="raise")
            if new:
                w.writeheader()
            w.writerow({c: _fmt(row.get(c)) for c in self.columns})


def _fmt(v):
    if v is None:
        return ""
    if isinstance(v, float):
        if math.isnan(v):
            return ""
        return f"{v:.6g}"
    return v


def read_csv(path: str | Path) -> list[dict]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


# ------------------------------------------------------------------------------------------ worker


def _serve(conn, mem_limit: int | None) -> None:
    if mem_limit:
        try:  # an allocation past this fails inside torch (caught as OOM) instead of swapping
            resource.setrlimit(resource.RLIMIT_DATA, (mem_limit, mem_limit))
        except (ValueError, OSError):
            pass
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent handles Ctrl-C and stops us
    while True:
        try:
            msg = conn.recv()
        except EOFError:
            return
        if msg is None:
            return
        fn, kwargs = msg
        try:
            reply = ("ok", fn(**kwargs))
        except BaseException as e:  # noqa: BLE001 - every failure is a result, not a crash
            status = "oom" if is_oom(e) else "error"
            detail = f"{type(e).__name__}: {e}".strip()
            if status == "error":
                detail += "\n" + traceback.format_exc(limit=6)
            reply = (status, detail[:4000])
        conn.send(reply)


@dataclass
class JobResult:
    status: str  # ok | oom | error | timeout
    value: object = None
    detail: str = ""
    wall_s: float = 0.0


class Worker:
    """A spawned process that runs ``fn(**kwargs)`` jobs; respawned after it dies.

    ``fn`` must be a module-level function (it is pickled by reference). A killed worker (SIGKILL:
    the kernel's OOM killer) reports "oom", any other death "error", a job over ``timeout`` is
    killed and reports "timeout".
    """

    def __init__(self, *, mem_limit_fraction: float | None = 0.92):
        self._ctx = mp.get_context("spawn")
        self._proc = None
        self._conn = None
        self.mem_limit_fraction = mem_limit_fraction

    def _start(self) -> None:
        limit = None
        if self.mem_limit_fraction:
            limit = int(available_bytes("cpu") * self.mem_limit_fraction) + (1 << 30)
        parent, child = self._ctx.Pipe()
        self._proc = self._ctx.Process(target=_serve, args=(child, limit), daemon=True)
        self._proc.start()
        child.close()
        self._conn = parent

    def call(self, fn, *, timeout: float | None = None, **kwargs) -> JobResult:
        if self._proc is None or not self._proc.is_alive():
            self._start()
        t0 = time.perf_counter()
        self._conn.send((fn, kwargs))
        try:
            if not self._conn.poll(timeout):
                self.kill()
                return JobResult("timeout", detail=f"killed after {timeout:.0f} s", wall_s=timeout)
            status, value = self._conn.recv()
        except (EOFError, ConnectionError, OSError):
            self._proc.join(5)
            code = self._proc.exitcode
            self._proc = None
            wall = time.perf_counter() - t0
            if code == -signal.SIGKILL:
                return JobResult(
                    "oom", detail="worker killed (SIGKILL, likely the OOM killer)", wall_s=wall
                )
            return JobResult("error", detail=f"worker died with exit code {code}", wall_s=wall)
        wall = time.perf_counter() - t0
        if status == "ok":
            return JobResult("ok", value=value, wall_s=wall)
        return JobResult(status, detail=value, wall_s=wall)

    def kill(self) -> None:
        if self._proc is not None:
            self._proc.kill()
            self._proc.join(5)
        self._proc = None

    def close(self) -> None:
        if self._proc is not None and self._proc.is_alive():
            try:
                self._conn.send(None)
                self._proc.join(10)
            except (OSError, ValueError):
                pass
            if self._proc.is_alive():
                self._proc.kill()
                self._proc.join(5)
        self._proc = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
        return False
