"""HumanEval-Rust in MultiPL-E's format, scored with the sandbox.

A problem has `name`, `prompt` (doc comment and signature), `tests` (closes the function and adds
a `main` of asserts) and `stop_tokens`. As MultiPL-E does, a completion is cut at the first stop
token and the program is `prompt + completion + "\\n" + tests`; it passes when it compiles and
exits 0. Problems load from any local JSON/JSONL file in that format, from the Hugging Face
dataset `nuprl/MultiPL-E` (config `humaneval-rs`, with the `hf` extra), or from the small set
shipped with ternchat (`ternchat/verify/problems/rust_basics.jsonl`, with reference solutions).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Callable, Sequence

from ternchat.verify.sandbox import Limits, Outcome, run_many

SHIPPED = "rust_basics"


@dataclass(frozen=True)
class Problem:
    name: str
    prompt: str
    tests: str
    stop_tokens: tuple[str, ...]
    reference: str | None = None  # a known-good completion, where the source has one


def _problem(row: dict) -> Problem:
    missing = [k for k in ("name", "prompt", "tests") if k not in row]
    if missing:
        raise ValueError(f"problem {row.get('name', '?')} lacks {', '.join(missing)}")
    return Problem(row["name"], row["prompt"], row["tests"], tuple(row.get("stop_tokens") or ["\n}"]),
                   row.get("canonical_solution"))


def load_problems(source: str | Path = SHIPPED) -> list[Problem]:
    """Problems from `source`: 'rust_basics' (shipped), 'hf' (MultiPL-E on the Hub) or a JSON/JSONL path."""
    if source == SHIPPED:
        text = resources.files("ternchat.verify").joinpath("problems/rust_basics.jsonl").read_text(encoding="utf-8")
        return [_problem(json.loads(line)) for line in text.splitlines() if line.strip()]
    if source == "hf":
        try:
            import datasets
        except ImportError:
            raise RuntimeError("--problems hf needs the 'hf' extra: pip install 'ternchat[hf]'") from None
        return [_problem(dict(row)) for row in datasets.load_dataset("nuprl/MultiPL-E", "humaneval-rs", split="test")]
    path = Path(source)
    text = path.read_text(encoding="utf-8")
    rows = json.loads(text) if text.lstrip().startswith("[") else [json.loads(r) for r in text.splitlines() if r.strip()]
    return [_problem(row) for row in rows]


def stop_at_stop_tokens(completion: str, stop_tokens: Sequence[str]) -> str:
    """Cut `completion` at the earliest occurrence of any stop token."""
    cut = len(completion)
    for token in stop_tokens:
        index = completion.find(token)
        if index != -1:
            cut = min(cut, index)
    return completion[:cut]


def build_program(problem: Problem, completion: str) -> str:
    return problem.prompt + stop_at_stop_tokens(completion, problem.stop_tokens) + "\n" + problem.tests


def score(problems: Sequence[Problem], completions: dict[str, list[str]], *, workers: int = 0,
          limits: Limits = Limits(), progress: Callable[[int], None] | None = None) -> dict[str, list[Outcome]]:
    """Run every completion of every problem; outcomes per problem name, in completion order."""
    by_name = {p.name: p for p in problems}
    unknown = sorted(set(completions) - set(by_name))
    if unknown:
        raise ValueError(f"completions for unknown problems: {', '.join(unknown[:5])}")
    jobs = [(name, build_program(by_name[name], c)) for name, cs in completions.items() for c in cs]
    outcomes = run_many([program for _, program in jobs], workers=workers, limits=limits, progress=progress)
    results: dict[str, list[Outcome]] = {name: [] for name in completions}
    for (name, _), outcome in zip(jobs, outcomes):
        results[name].append(outcome)
    return results
