"""HumanEval-Rust problems in two layouts, scored with the sandbox.

MultiPL-E's layout: a problem has `name`, `prompt` (doc comment and signature), `tests` (closes the
function and adds a `main` of asserts) and `stop_tokens`. As MultiPL-E does, a completion is cut at
the first stop token and the program is `prompt + completion + "\\n" + tests`; it passes when it
compiles and exits 0.

The test-module layout common to other HumanEval-Rust sets: a row has `task_id`, `prompt` (ending
in the function's opening brace), `canonical_solution` (the body and the closing brace, sometimes
with helper functions), `test` (a `#[cfg(test)] mod tests { #[test] fn ... }` module),
`entry_point` and optionally `edition` (default 2021) and `stop_tokens`. The program
`prompt + completion + "\\n" + test` is compiled with `rustc --test` and the test binary run; it
passes when every test passes. A `test` without a `#[test]` function is refused, since its harness
would pass with nothing checked. A model completion is cut at its stop tokens (default: where it
starts a test module or a `main` of its own); a canonical solution is scored as it is.

Problems load from any local JSON/JSONL file in either layout, from the Hugging Face dataset
`nuprl/MultiPL-E` (config `humaneval-rs`, with the `hf` extra), or from the small set shipped with
ternchat (`ternchat/verify/problems/rust_basics.jsonl`, with reference solutions). Every row is
validated as it loads (`verify/inputs.py`): names unique, fields of the right types, stop tokens
a list of non-empty strings.
"""

from __future__ import annotations

from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Callable, Sequence

from ternchat.data.errors import DataError
from ternchat.verify.inputs import (InputError, edition_field, read_json_rows, text_field, text_list_field,
                                     unique_names)
from ternchat.verify.sandbox import Limits, Outcome, Program, run_many

SHIPPED = "rust_basics"
TEST_MODULE_STOP_TOKENS = ("\n#[cfg(test)]", "\nfn main(")


class ProblemError(DataError):
    """A problem file that cannot be scored as it is: missing fields, tests that check nothing."""


@dataclass(frozen=True)
class Problem:
    name: str
    prompt: str
    tests: str
    stop_tokens: tuple[str, ...]
    reference: str | None = None  # a known-good completion, where the source has one
    test_module: bool = False  # the tests are #[test] functions run by `rustc --test`'s harness
    edition: str = "2021"


def _problem(row: dict, where: str) -> Problem:
    if "test" in row and "tests" not in row:
        return _test_module_problem(row, where)
    stop_tokens = text_list_field(row, where, "stop_tokens", non_empty_items=True)
    return Problem(text_field(row, where, "name", non_empty=True), text_field(row, where, "prompt"),
                   text_field(row, where, "tests", non_empty=True), tuple(stop_tokens or ["\n}"]),
                   text_field(row, where, "canonical_solution", required=False), edition=edition_field(row, where))


def _test_module_problem(row: dict, where: str) -> Problem:
    name = text_field(row, where, "task_id" if "task_id" in row else "name", non_empty=True)
    test = text_field(row, where, "test", non_empty=True)
    if "#[test]" not in test:
        raise InputError(f"{where}: problem {name}: its test has no #[test] function, so `rustc --test` would pass "
                         "it with nothing checked")
    stop_tokens = text_list_field(row, where, "stop_tokens", non_empty_items=True)
    return Problem(name, text_field(row, where, "prompt"), test, tuple(stop_tokens or TEST_MODULE_STOP_TOKENS),
                   text_field(row, where, "canonical_solution", required=False), test_module=True,
                   edition=edition_field(row, where))


def _problems(rows: list[tuple[str, dict]]) -> list[Problem]:
    problems = [(where, _problem(row, where)) for where, row in rows]
    unique_names(((where, p.name) for where, p in problems), "problem")
    return [p for _, p in problems]


def load_problems(source: str | Path = SHIPPED) -> list[Problem]:
    """Problems from `source`: 'rust_basics' (shipped), 'hf' (MultiPL-E on the Hub) or a JSON/JSONL path;
    a malformed file raises `InputError` saying where and what was expected."""
    if source == SHIPPED:
        with resources.as_file(resources.files("ternchat.verify").joinpath("problems/rust_basics.jsonl")) as path:
            return _problems(read_json_rows(path))
    if source == "hf":
        try:
            import datasets
        except ImportError:
            raise ProblemError("--problems hf needs the 'hf' extra: pip install 'ternchat[hf]'") from None
        rows = datasets.load_dataset("nuprl/MultiPL-E", "humaneval-rs", split="test")
        return _problems([(f"nuprl/MultiPL-E humaneval-rs[{i}]", dict(row)) for i, row in enumerate(rows)])
    return _problems(read_json_rows(source))


def stop_at_stop_tokens(completion: str, stop_tokens: Sequence[str]) -> str:
    """Cut `completion` at the earliest occurrence of any stop token."""
    cut = len(completion)
    for token in stop_tokens:
        index = completion.find(token)
        if index != -1:
            cut = min(cut, index)
    return completion[:cut]


def build_program(problem: Problem, completion: str, cut: bool = True) -> str:
    """The program for one completion; `cut=False` keeps it whole (canonical solutions)."""
    body = stop_at_stop_tokens(completion, problem.stop_tokens) if cut else completion
    return problem.prompt + body + "\n" + problem.tests


def references(problems: Sequence[Problem]) -> dict[str, list[str]]:
    """The canonical solution of every problem, as completions; every problem must have one."""
    missing = [p.name for p in problems if p.reference is None]
    if missing:
        raise ProblemError(f"{len(missing)} problem(s) have no canonical_solution to score (first: {missing[0]}); "
                         "give --completions or --run")
    return {p.name: [p.reference] for p in problems}


def score(problems: Sequence[Problem], completions: dict[str, list[str]], *, workers: int = 0,
          limits: Limits = Limits(), progress: Callable[[int], None] | None = None,
          cut: bool = True) -> dict[str, list[Outcome]]:
    """Run every completion of every problem; outcomes per problem name, in completion order.
    `cut=False` scores completions whole, as canonical solutions are."""
    by_name = {p.name: p for p in problems}
    unknown = sorted(set(completions) - set(by_name))
    if unknown:
        raise ProblemError(f"completions for unknown problems: {', '.join(unknown[:5])}")
    jobs = [(name, Program(build_program(by_name[name], c, cut), by_name[name].edition, by_name[name].test_module))
            for name, cs in completions.items() for c in cs]
    outcomes = run_many([program for _, program in jobs], workers=workers, limits=limits, progress=progress)
    results: dict[str, list[Outcome]] = {name: [] for name in completions}
    for (name, _), outcome in zip(jobs, outcomes):
        results[name].append(outcome)
    return results
