"""Writes OUTDIR/summary.md for tools/gpu_check.sh from what its steps left in the work folder.

    python tools/gpu_summary.py --work WORK --out OUTDIR

Standard library only (no torch), cheap: the check script calls it after every step, so the summary
is current even if the run is cut short. Every input is optional; what is missing is said so.

Inputs in WORK: meta.env and env.txt (key=value lines), steps.tsv (step, status, seconds, note),
build.log, junit.xml (pytest), collect.txt (the dry run's collected CUDA cases),
sanitize/<tool>.log and sanitize/<tool>.rc ("rc seconds"), sweep/resolution_sweep.json; in OUTDIR:
cuda_bench.json. Output: OUTDIR/summary.md (written atomically).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import xml.etree.ElementTree as ET
from pathlib import Path

SANITIZER_TOOLS = ("memcheck", "racecheck", "synccheck", "initcheck")
MAX_FILES, MAX_BYTES = 8, 16 << 20


def read_kv(path: Path) -> dict[str, str]:
    out = {}
    if path.exists():
        for line in path.read_text(errors="replace").splitlines():
            key, sep, value = line.partition("=")
            if sep:
                out[key.strip()] = value.strip()
    return out


def read_steps(path: Path) -> list[dict]:
    rows = []
    if path.exists():
        for line in path.read_text(errors="replace").splitlines():
            parts = line.split("\t")
            if len(parts) >= 3:
                rows.append(
                    {
                        "step": parts[0],
                        "status": parts[1],
                        "seconds": parts[2],
                        "note": parts[3] if len(parts) > 3 else "",
                    }
                )
    return rows


def _md(text: str) -> str:
    """One table cell: no pipes or newlines."""
    return str(text).replace("|", "\\|").replace("\n", " ").strip()


def log_tail(path: Path, n: int, start: str | None = None) -> list[str]:
    """The last n non-empty lines of a log (of its part from the last line starting with
    ``start`` up to the next '=====' header), as a fenced block; [] when there is nothing."""
    if not path.exists():
        return []
    lines = path.read_text(errors="replace").splitlines()
    if start is not None:
        begin = max((i for i, x in enumerate(lines) if x.startswith(start)), default=None)
        if begin is None:
            return []
        end = next((i for i in range(begin + 1, len(lines)) if lines[i].startswith("=====")), None)
        lines = lines[begin + 1 : end]
    lines = [x for x in lines if x.strip()][-n:]
    return ["", "```", *lines, "```"] if lines else []


# ---------------------------------------------------------------------------------------- tests
def junit_results(path: Path) -> dict | None:
    """Counts and failures from pytest's junit XML (None when absent or unreadable)."""
    if not path.exists():
        return None
    try:
        root = ET.parse(path).getroot()
    except ET.ParseError as e:
        return {"error": f"unreadable junit XML: {e}"}
    counts = {"tests": 0, "failures": 0, "errors": 0, "skipped": 0, "time": 0.0}
    suites = [root] if root.tag == "testsuite" else root.findall("testsuite")
    for s in suites:
        for key in ("tests", "failures", "errors", "skipped"):
            counts[key] += int(s.get(key, 0))
        counts["time"] += float(s.get("time", 0.0))
    failed, skip_reasons = [], {}
    for case in root.iter("testcase"):
        node = f"{case.get('classname', '')}::{case.get('name', '')}"
        for kind in ("failure", "error"):
            el = case.find(kind)
            if el is not None:
                msg = (el.get("message") or el.text or "").strip().splitlines()
                failed.append((kind, node, msg[0][:240] if msg else ""))
        el = case.find("skipped")
        if el is not None:
            reason = re.sub(r"^Skipped: ", "", el.get("message") or "")[:120]
            skip_reasons[reason] = skip_reasons.get(reason, 0) + 1
    counts["passed"] = counts["tests"] - counts["failures"] - counts["errors"] - counts["skipped"]
    return {**counts, "failed": failed, "skip_reasons": skip_reasons}


def tests_section(work: Path, out_dir: Path) -> list[str]:
    out = ["## CUDA tests", ""]
    res = junit_results(work / "junit.xml")
    collect = work / "collect.txt"
    if res is None and collect.exists():
        text = collect.read_text(errors="replace")
        m = re.search(r"(\d+)(?:/\d+)? tests? collected(?: \((\d+) deselected\))?", text)
        if m:
            out.append(
                f"Dry run: {m.group(1)} CUDA cases selected for the GPU run "
                f"({m.group(2) or 0} CPU-only cases deselected; tests/test_ffa_philox.py adds its "
                "CUDA cases only where a GPU exists)."
            )
        else:
            out.append("Dry run: the collection printed no count (see tests.log).")
        return out + [""]
    if res is None:
        out.append("No test results (the step did not run or wrote no junit XML).")
        return out + log_tail(out_dir / "tests.log", 15) + [""]
    if "error" in res:
        return out + [res["error"], ""]
    out.append(
        f"**{res['passed']} passed, {res['failures']} failed, {res['errors']} errors, "
        f"{res['skipped']} skipped** of {res['tests']} selected CUDA cases "
        f"({res['time']:.0f} s of test time)."
    )
    log = out_dir / "tests.log"
    if log.exists() and "KeyboardInterrupt" in log.read_text(errors="replace"):
        out.append("pytest was interrupted at its time limit: the counts cover the cases that ran.")
    if res["failed"]:
        out += ["", f"Failures and errors ({len(res['failed'])}; first 40):", ""]
        out += [f"- {kind}: `{node}`: {_md(msg)}" for kind, node, msg in res["failed"][:40]]
    if res["skip_reasons"]:
        out += ["", "Skip reasons:"]
        out += [f"- {n} x {_md(r) or '(none)'}" for r, n in sorted(res["skip_reasons"].items())]
    return out + [""]


# ------------------------------------------------------------------------------------ sanitizer
def sanitizer_result(log: Path, rc_file: Path) -> dict:
    """Error counts of one compute-sanitizer run (or of the plain run) and its driver's verdict."""
    text = log.read_text(errors="replace") if log.exists() else ""
    rc, secs = None, None
    if rc_file.exists():
        parts = rc_file.read_text().split()
        rc = int(parts[0]) if parts else None
        secs = parts[1] if len(parts) > 1 else None
    r = {"rc": rc, "seconds": secs, "errors": None, "warnings": 0, "driver": None, "samples": []}
    if m := re.search(r"ERROR SUMMARY: (\d+) error", text):
        r["errors"] = int(m.group(1))
    if m := re.search(
        r"RACECHECK SUMMARY: \d+ hazards? displayed \((\d+) errors?, (\d+) warn", text
    ):
        r["errors"] = (r["errors"] or 0) + int(m.group(1))
        r["warnings"] = int(m.group(2))
    if m := re.search(r"gpu_sanitize: (\d+) calls, (\d+) failed, (\d+) not run", text):
        r["driver"] = tuple(int(x) for x in m.groups())
    r["failed_calls"] = re.findall(r"^CALL (?:FAIL|skip) (.*)$", text, re.MULTILINE)
    r["kernels"] = re.search(r"^kernels: .*$", text, re.MULTILINE)
    r["kernels"] = r["kernels"].group(0) if r["kernels"] else None
    r["samples"] = [
        line.strip("= ").strip()
        for line in text.splitlines()
        if re.match(r"=+ +(Invalid|Error|Warning|Barrier|Uninitialized|Race|Program hit)", line)
    ][:6]
    fatal = re.search(r"(Device not supported|Target application terminated.*|Error: .*)", text)
    r["tool_error"] = fatal.group(1)[:200] if fatal and r["errors"] is None else None
    # A run that stopped early: its last lines say why (an import error, no device, ...).
    r["tail"] = [x for x in text.splitlines() if x.strip()][-4:] if r["driver"] is None else []
    ok_driver = r["driver"] is not None and r["driver"][1] == 0 and r["driver"][2] == 0
    if rc is None:
        r["status"] = "not run"
    elif rc in (124, 137):
        r["status"] = "TIMEOUT"
    elif rc == 0 and ok_driver and not r["errors"]:
        r["status"] = "pass"
    else:
        r["status"] = "FAIL"
    return r


def sanitizer_section(work: Path) -> list[str]:
    out = [
        "## compute-sanitizer (tools/gpu_sanitize.py: every kernel path, forward + backward)",
        "",
    ]
    sdir = work / "sanitize"
    plan = sdir / "plan.txt"
    if plan.exists() and (m := re.search(r"plan: (\d+) calls \((.*)\)", plan.read_text())):
        out.append(f"Planned: {m.group(1)} calls ({m.group(2)}).")
    cpu = sdir / "cpu.log"
    if cpu.exists() and (
        m := re.search(r"gpu_sanitize: \d+ calls.*", cpu.read_text(errors="replace"))
    ):
        out.append(f"Dry run of the calls on the CPU kernels: `{m.group(0)}`.")
    runs = [t for t in ("plain", *SANITIZER_TOOLS) if (sdir / f"{t}.rc").exists()]
    if not runs:
        return out + ["", "No sanitizer run on a GPU (the step did not run here).", ""]
    out += [
        "",
        "| run | status | errors | warnings | driver calls (total / failed / not run) | seconds |",
        "|---|---|---|---|---|---|",
    ]
    details = []
    for tool in runs:
        r = sanitizer_result(sdir / f"{tool}.log", sdir / f"{tool}.rc")
        errors = "n/a" if tool == "plain" else ("?" if r["errors"] is None else r["errors"])
        driver = " / ".join(map(str, r["driver"])) if r["driver"] else "no summary line"
        out.append(
            f"| {tool} | {r['status']} | {errors} | {r['warnings']} | {driver} | "
            f"{r['seconds'] or '?'} |"
        )
        if r["kernels"]:
            details.append(f"- {tool}: {r['kernels']}")
        if r["tool_error"]:
            details.append(f"- {tool}: the tool failed: {_md(r['tool_error'])}")
        for line in r["samples"]:
            details.append(f"- {tool}: `{_md(line)[:200]}`")
        for call in r["failed_calls"][:10]:
            details.append(f"- {tool}: call failed: {_md(call)[:240]}")
        if r["tail"]:
            details.append(f"- {tool}: stopped early; its last lines:")
            details += ["  ```", *[f"  {x[:200]}" for x in r["tail"]], "  ```"]
    return out + ([""] + details if details else []) + [""]


# ------------------------------------------------------------------------------------ benchmarks
def _num(v, fmt="{:.3g}"):
    return fmt.format(v) if isinstance(v, (int, float)) else str(v if v is not None else "")


def bench_section(out_dir: Path, work: Path) -> list[str]:
    out = ["## Benchmarks", ""]
    path = out_dir / "cuda_bench.json"
    if path.exists():
        try:
            doc = json.loads(path.read_text())
        except json.JSONDecodeError as e:
            doc = None
            out.append(f"cuda_bench.json unreadable: {e}")
        if doc:
            meta = doc.get("meta", {})
            out.append(
                f"cuda_bench (`benchmarks/cuda_bench.py --quick`): measured bf16 matmul "
                f"{_num(meta.get('bf16_matmul_tflops'))} TFLOP/s, copy "
                f"{_num(meta.get('d2d_copy_gbps'))} GB/s."
            )
            out += [
                "",
                "| case | median ms | % of ceiling | vs reference | vs compiled | other |",
                "|---|---|---|---|---|---|",
            ]
            for r in doc.get("results", []):
                pct = r.get("pct_of_bf16_matmul", r.get("pct_of_copy_bw"))
                other = (
                    f"{_num(r['ratio_vs_two_grams'])}x two fp32 Grams"
                    if "ratio_vs_two_grams" in r
                    else (f"{_num(r['tflops'])} TFLOP/s" if "tflops" in r else "")
                )
                out.append(
                    f"| {r.get('case')} | {_num(r.get('median_ms'))} | {_num(pct)} | "
                    f"{_num(r.get('speedup_vs_reference'))} | "
                    f"{_num(r.get('speedup_vs_compiled'))} | {other} |"
                )
    else:
        out.append("No cuda_bench results.")
        out += log_tail(out_dir / "bench.log", 8, start="===== cuda_bench")
    out.append("")
    sweep = work / "sweep" / "resolution_sweep.json"
    if sweep.exists():
        try:
            doc = json.loads(sweep.read_text())
        except json.JSONDecodeError as e:
            return out + [f"resolution_sweep.json unreadable: {e}", ""]
        statuses: dict[str, dict[str, int]] = {}
        for case in doc.get("cases", []):
            spec = case.get("spec", {})
            key = f"{spec.get('method')} p={spec.get('p')}"
            st = statuses.setdefault(key, {})
            st[case.get("status")] = st.get(case.get("status"), 0) + 1
        out.append(
            f"Resolution sweep on CUDA (`benchmarks/resolution_sweep.py`, "
            f"{_num(doc.get('elapsed_s'), '{:.0f}')} s):"
        )
        out += [f"- {line}" for line in doc.get("headline", [])]
        if statuses:
            out.append(
                "- cases: "
                + "; ".join(
                    f"{k}: " + ", ".join(f"{n} {s}" for s, n in sorted(v.items()))
                    for k, v in sorted(statuses.items())
                )
            )
        out += [f"- event: {_md(e)}" for e in doc.get("events", [])[:5]]
    else:
        out.append("No resolution sweep results.")
        out += log_tail(out_dir / "bench.log", 8, start="===== resolution sweep")
    return out + [""]


# ----------------------------------------------------------------------------------------- main
def machine_section(work: Path) -> list[str]:
    env = read_kv(work / "env.txt")
    if not env:
        return ["## Machine", "", "Not recorded (the env step did not run).", ""]
    keys = [
        ("GPU", "gpu"),
        ("driver", "driver"),
        ("compute capability", "compute_cap"),
        ("GPU memory", "gpu_memory"),
        ("torch", "torch"),
        ("torch CUDA", "torch_cuda"),
        ("torch device", "torch_device"),
        ("nvcc", "nvcc"),
        ("compute-sanitizer", "sanitizer"),
        ("CMake", "cmake"),
        ("Python", "python"),
        ("pytest", "pytest"),
        ("build tools", "build_tools"),
        ("CPU cores", "cores"),
    ]
    out = ["## Machine", "", "| | |", "|---|---|"]
    out += [f"| {label} | {_md(env.get(key, '?'))} |" for label, key in keys]
    return out + [""]


def files_section(out_dir: Path) -> list[str]:
    files = sorted(p for p in out_dir.iterdir() if p.is_file()) if out_dir.exists() else []
    names = {p.name for p in files} | {"summary.md"}
    lines = ["## Files in OUTDIR", ""]
    for p in files:
        if p.name != "summary.md":
            size = p.stat().st_size
            flag = "  **over 16 MiB**" if size >= MAX_BYTES else ""
            lines.append(f"- {p.name}: {size / 1024:.1f} KiB{flag}")
    lines.append("- summary.md: this file")
    if len(names) > MAX_FILES:
        lines.append(f"**{len(names)} files: more than {MAX_FILES}**")
    return lines + [""]


def build_failure(work: Path, steps: list[dict]) -> list[str]:
    if not any(s["step"] == "build" and s["status"] in ("FAIL", "TIMEOUT") for s in steps):
        return []
    log = work / "build.log"
    tail = log.read_text(errors="replace").splitlines()[-60:] if log.exists() else []
    return ["## Build failure (last 60 lines of the build log)", "", "```", *tail, "```", ""]


def overall(meta: dict, steps: list[dict], final: bool) -> tuple[str, str]:
    """RUNNING, NO GPU, FAIL (a step failed), INCOMPLETE (a step was skipped for want of time or a
    build), DRY RUN OK or PASS."""
    bad = [s["step"] for s in steps if s["status"] in ("FAIL", "TIMEOUT")]
    cut = [
        s["step"]
        for s in steps
        if s["status"] == "skipped" and "not in GPU_CHECK_STEPS" not in s["note"]
    ]
    if not final:
        state = "RUNNING"
    elif meta.get("mode") == "no-gpu":
        state = "NO GPU (dry run only)"
    elif bad:
        state = "FAIL"
    elif cut:
        state = "INCOMPLETE"
    elif meta.get("mode") == "dry-run":
        state = "DRY RUN OK"
    else:
        state = "PASS"
    details = [f"failed: {', '.join(bad)}"] if bad else []
    details += [f"skipped: {', '.join(cut)}"] if cut else []
    return state, f"**{state}**" + (f" ({'; '.join(details)})" if details else "")


def render(work: Path, out_dir: Path, final: bool) -> tuple[str, str]:
    """(the overall state, the text of summary.md)."""
    meta = read_kv(work / "meta.env")
    steps = read_steps(work / "steps.tsv")
    state, verdict = overall(meta, steps, final)
    lines = [
        "# ffa GPU check",
        "",
        f"{verdict} - mode {meta.get('mode', '?')}, commit "
        f"{meta.get('commit', '?')}, started {meta.get('started', '?')}, budget "
        f"{meta.get('budget_s', '?')} s"
        + (f", wall {meta['wall_s']} s" if meta.get("wall_s") else ""),
        "",
    ]
    if meta.get("note"):
        lines += [meta["note"], ""]
    lines += ["## Steps", "", "| step | status | seconds | note |", "|---|---|---|---|"]
    lines += [f"| {s['step']} | {s['status']} | {s['seconds']} | {_md(s['note'])} |" for s in steps]
    lines.append("")
    lines += build_failure(work, steps)
    lines += machine_section(work)
    lines += tests_section(work, out_dir)
    lines += sanitizer_section(work)
    lines += bench_section(out_dir, work)
    lines += files_section(out_dir)
    return state, "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--work", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument(
        "--final", action="store_true", help="the run is over: print 'state: <verdict>'"
    )
    args = ap.parse_args(argv)
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    state, text = render(Path(args.work), out_dir, args.final)
    tmp = out_dir / f".summary.md.{os.getpid()}.tmp"
    tmp.write_text(text)
    os.replace(tmp, out_dir / "summary.md")
    if args.final:
        print(f"state: {state}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
