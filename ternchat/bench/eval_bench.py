"""`ternchat bench eval`: evaluations per second of the sandboxed HumanEval-Rust harness.

Every problem gets a trivial completion (`todo!()`, which compiles and panics), and the harness
compiles and runs all of them as it scores them (`checked_program`: tests that cannot be shadowed,
with the end-of-tests proof) in its sandbox pool over the cores. The baseline, in the same run,
is what MultiPL-E's Rust runner does: plain `rustc` then the binary of MultiPL-E's own program
layout, one program at a time, with no sandbox. Both report evaluations per second; the ratio is
the sandboxed pool over the baseline.
"""

from __future__ import annotations

import os
import subprocess
import tempfile
import time
from pathlib import Path

from ternchat.verify.humaneval import build_program, checked_program, load_problems
from ternchat.verify.sandbox import Limits, checked_isolation, run_many

TRIVIAL = "    todo!()"


def _plain_run(program: str, rustc: str) -> str:
    with tempfile.TemporaryDirectory(prefix="ternchat-bench-") as tmp:
        src = Path(tmp) / "main.rs"
        src.write_text(program)
        built = subprocess.run([rustc, "--edition", "2021", "-o", str(Path(tmp) / "prog"), str(src)],
                               capture_output=True, timeout=60)
        if built.returncode != 0:
            return "compile_error"
        ran = subprocess.run([str(Path(tmp) / "prog")], capture_output=True, timeout=30)
        return "ok" if ran.returncode == 0 else "runtime_error"


def bench_eval(problems_source: str, workers: int, baseline_problems: int, allow_unisolated: bool = False,
               log=print) -> dict:
    problems = load_problems(problems_source)
    programs = [checked_program(p, TRIVIAL) for p in problems]
    limits = Limits(allow_unisolated=allow_unisolated)
    iso = checked_isolation(limits)
    log(f"sandbox: {iso.describe()}")
    start = time.perf_counter()
    outcomes = run_many(programs, workers=workers, limits=limits)
    sandboxed_s = time.perf_counter() - start
    subset = problems[:baseline_problems] if baseline_problems else problems
    start = time.perf_counter()
    plain = [_plain_run(build_program(p, TRIVIAL), iso.rustc) for p in subset]
    plain_s = time.perf_counter() - start
    counts: dict[str, int] = {}
    for o in outcomes:
        counts[o.outcome] = counts.get(o.outcome, 0) + 1
    return {"problems": len(programs), "workers": workers or os.cpu_count(), "sandboxed_seconds": sandboxed_s,
            "sandboxed_evals_per_s": len(programs) / sandboxed_s, "outcomes": counts,
            "baseline_programs": len(subset), "baseline_seconds": plain_s,
            "baseline_evals_per_s": len(subset) / plain_s,
            "baseline_outcomes": {k: plain.count(k) for k in sorted(set(plain))}}


def format_result(r: dict) -> str:
    return "\n".join([
        "| runner | programs | seconds | evaluations/s |", "|---|---|---|---|",
        f"| ternchat sandbox pool, {r['workers']} workers | {r['problems']} | {r['sandboxed_seconds']:.1f} | "
        f"{r['sandboxed_evals_per_s']:.2f} |",
        f"| baseline: plain rustc + run, 1 at a time, no sandbox | {r['baseline_programs']} | "
        f"{r['baseline_seconds']:.1f} | {r['baseline_evals_per_s']:.2f} |", "",
        f"ratio {r['sandboxed_evals_per_s'] / r['baseline_evals_per_s']:.2f}x; sandboxed outcomes {r['outcomes']}; "
        f"baseline outcomes {r['baseline_outcomes']}"])
