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

from ternchat.verify.humaneval import is_placeholder
from ternchat.verify.sandbox import OUTCOMES, Outcome


def pass_at_k(n: int, c: int, k: int) -> float:
    if k > n:
        raise ValueError(f"pass@{k} needs at least {k} samples per problem, got {n}")
    if n - c < k:
        return 1.0
    return float(1.0 - np.prod(1.0 - k / np.arange(n - c + 1, n + 1)))


def common_errors(results: dict[str, list[Outcome]], most: int = 10) -> list[dict]:
    """The most frequent rustc error codes, each with its count and one example: the problem, the sample
    and rustc's text of that error (with its source span)."""
    counts = Counter(code for outcomes in results.values() for o in outcomes for code in o.error_codes)
    rows = []
    for code, count in counts.most_common(most):
        name, i, o = next((name, i, o) for name, outcomes in results.items() for i, o in enumerate(outcomes)
                          if code in o.error_codes)
        message = o.rendered.get(code) or next((m for m in o.messages if code in m), "\n".join(o.messages))
        rows.append({"code": code, "count": count, "example": {"name": name, "sample": i, "message": message}})
    return rows


def summarize(results: dict[str, list[Outcome]], ks: list[int], skipped: dict[str, str] | None = None,
              bodies: dict[str, list[str]] | None = None, settings: dict | None = None) -> dict:
    """The benchmark's figures; `skipped` (problem -> why) are the problems left out as unscorable. With the
    completions' `bodies` (as cut), the share that is only a placeholder (`is_placeholder`) and the compile
    rate of the others; `settings` (how the completions were made) is kept in the summary."""
    samples = [o for outcomes in results.values() for o in outcomes]
    compiled = [o for o in samples if o.phase == "run"]
    passed = [o for o in compiled if o.outcome == "ok"]
    n_min = min(len(v) for v in results.values())
    summary = {
        "problems": len(results),
        "samples": len(samples),
        "settings": dict(settings or {}),
        "pass@k": {f"pass@{k}": float(np.mean([pass_at_k(len(v), sum(o.outcome == "ok" for o in v), k)
                                               for v in results.values()])) for k in ks if k <= n_min},
        "compile_rate": len(compiled) / max(len(samples), 1),
        "semantic_correctness": len(passed) / max(len(compiled), 1),
        "outcomes": {name: sum(o.outcome == name for o in samples) for name in OUTCOMES},
        "error_codes": dict(Counter(code for o in samples for code in o.error_codes).most_common()),
        "common_errors": common_errors(results),
        "skipped": dict(skipped or {}),
    }
    if bodies is not None:
        flags = [is_placeholder(body) for name in results for body in bodies[name]]
        others = [o for o, flag in zip(samples, flags) if not flag]
        summary["placeholder_share"] = sum(flags) / max(len(flags), 1)
        summary["compile_rate_without_placeholders"] = sum(o.phase == "run" for o in others) / max(len(others), 1)
    return summary


def write_reports(results: dict[str, list[Outcome]], summary: dict, out_dir: Path, title: str,
                  bodies: dict[str, list[str]] | None = None, programs: dict[str, list[str]] | None = None) -> None:
    """outcomes.jsonl (a row per sample: its outcome, and with them the completion as cut and the program
    as compiled), summary.json and summary.md."""
    out_dir.mkdir(parents=True, exist_ok=True)
    with open(out_dir / "outcomes.jsonl", "w", encoding="utf-8") as f:
        for name, outcomes in results.items():
            for i, o in enumerate(outcomes):
                row = {"name": name, "sample": i, **o.to_dict()}
                if bodies is not None:
                    row["completion"] = bodies[name][i]
                if programs is not None:
                    row["program"] = programs[name][i]
                f.write(json.dumps(row) + "\n")
    (out_dir / "summary.json").write_text(json.dumps(summary, indent=1))
    skipped = summary.get("skipped", {})
    lines = [f"# {title}", "", f"{summary['problems']} problems, {summary['samples']} samples"
             + (f"; {len(skipped)} problem(s) skipped as unscorable (listed below)" if skipped else "") + "."]
    if summary.get("settings"):
        lines += ["", "Completions: " + ", ".join(f"{k} {v}" for k, v in summary["settings"].items()) + "."]
    lines += ["", "| metric | value |", "|---|---|"]
    lines += [f"| {k} | {v:.3f} |" for k, v in summary["pass@k"].items()]
    if "placeholder_share" in summary:
        lines += [f"| placeholder bodies (todo!(), Default::default(), ...) | {summary['placeholder_share']:.3f} |",
                  f"| compile rate without them | {summary['compile_rate_without_placeholders']:.3f} |"]
    lines += [f"| compile rate | {summary['compile_rate']:.3f} |",
              f"| semantic correctness (passed / compiled) | {summary['semantic_correctness']:.3f} |", "",
              "| outcome | samples |", "|---|---|"]
    lines += [f"| {k} | {v} |" for k, v in summary["outcomes"].items()]
    if summary["error_codes"]:
        lines += ["", "| rustc error code | count |", "|---|---|"]
        lines += [f"| {k} | {v} |" for k, v in summary["error_codes"].items()]
    if summary.get("common_errors"):
        lines += ["", "## The most common errors, one example each", ""]
        for e in summary["common_errors"]:
            x = e["example"]
            lines += [f"**{e['code']}** ({e['count']}x), {x['name']} sample {x['sample']}:", "```",
                      x["message"].strip()[:1200], "```", ""]
    if skipped:
        lines += ["", "| skipped problem | why |", "|---|---|"]
        lines += [f"| {where} | {why} |" for where, why in skipped.items()]
    (out_dir / "summary.md").write_text("\n".join(lines) + "\n")
