"""pass@k (the unbiased estimator of Chen et al. 2021), compile rate, semantic correctness, error codes.

pass@k for one problem with n samples of which c pass is 1 - C(n-c, k) / C(n, k), computed as a
stable product; the benchmark's pass@k is its mean over problems. Compile rate is the share of
samples that compiled; semantic correctness the share of compiled samples that also passed.
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import numpy as np

from ternchat.verify.sandbox import OUTCOMES, Outcome


def pass_at_k(n: int, c: int, k: int) -> float:
    if k > n:
        raise ValueError(f"pass@{k} needs at least {k} samples per problem, got {n}")
    if n - c < k:
        return 1.0
    return float(1.0 - np.prod(1.0 - k / np.arange(n - c + 1, n + 1)))


def summarize(results: dict[str, list[Outcome]], ks: list[int], skipped: dict[str, str] | None = None) -> dict:
    """The benchmark's figures; `skipped` (problem -> why) are the problems left out as unscorable."""
    samples = [o for outcomes in results.values() for o in outcomes]
    compiled = [o for o in samples if o.phase == "run"]
    passed = [o for o in compiled if o.outcome == "ok"]
    n_min = min(len(v) for v in results.values())
    summary = {
        "problems": len(results),
        "samples": len(samples),
        "pass@k": {f"pass@{k}": float(np.mean([pass_at_k(len(v), sum(o.outcome == "ok" for o in v), k)
                                               for v in results.values()])) for k in ks if k <= n_min},
        "compile_rate": len(compiled) / max(len(samples), 1),
        "semantic_correctness": len(passed) / max(len(compiled), 1),
        "outcomes": {name: sum(o.outcome == name for o in samples) for name in OUTCOMES},
        "error_codes": dict(Counter(code for o in samples for code in o.error_codes).most_common()),
        "skipped": dict(skipped or {}),
    }
    return summary


def write_reports(results: dict[str, list[Outcome]], summary: dict, out_dir: Path, title: str) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    with open(out_dir / "outcomes.jsonl", "w", encoding="utf-8") as f:
        for name, outcomes in results.items():
            for i, o in enumerate(outcomes):
                f.write(json.dumps({"name": name, "sample": i, **o.to_dict()}) + "\n")
    (out_dir / "summary.json").write_text(json.dumps(summary, indent=1))
    skipped = summary.get("skipped", {})
    lines = [f"# {title}", "", f"{summary['problems']} problems, {summary['samples']} samples"
             + (f"; {len(skipped)} problem(s) skipped as unscorable (listed below)" if skipped else "") + ".", "",
             "| metric | value |", "|---|---|"]
    lines += [f"| {k} | {v:.3f} |" for k, v in summary["pass@k"].items()]
    lines += [f"| compile rate | {summary['compile_rate']:.3f} |",
              f"| semantic correctness (passed / compiled) | {summary['semantic_correctness']:.3f} |", "",
              "| outcome | samples |", "|---|---|"]
    lines += [f"| {k} | {v} |" for k, v in summary["outcomes"].items()]
    if summary["error_codes"]:
        lines += ["", "| rustc error code | count |", "|---|---|"]
        lines += [f"| {k} | {v} |" for k, v in summary["error_codes"].items()]
    if skipped:
        lines += ["", "| skipped problem | why |", "|---|---|"]
        lines += [f"| {where} | {why} |" for where, why in skipped.items()]
    (out_dir / "summary.md").write_text("\n".join(lines) + "\n")
