"""Training tasks for post-training: small Rust functions with reference solutions and tests, kept
apart from the evaluation problems.

HumanEval-Rust and the shipped `rust_basics` stay evaluation only. SFT and RL train on tasks made
here, in the same MultiPL-E layout (`name`, `prompt` = doc comment and signature, `canonical_solution`
= the body, `tests` = closing brace and a `main` of asserts), so the sandbox scores them exactly as it
scores the evaluation problems.

Each family is one algorithmic task with constants (a divisor, a threshold, a character) that give
its variants. A Python implementation computes the expected outputs of the seeded test inputs, and
the Rust reference is checked against them in the sandbox. A task is kept only when:
- its reference passes its tests in the sandbox;
- a body that returns `Default::default()` fails them (the tests check something);
- it is no near-duplicate of an evaluation problem. Function names are split into words (snake_case
  and camelCase); a task is dropped when either name's words run inside the other's (`fib` in
  `fib_mod_7`). The descriptions' word-trigram Jaccard similarity must stay below `MAX_SIMILARITY`.

The families avoid the tasks HumanEval covers (Fibonacci variants, primes, palindromes, digit sums,
rotations, Caesar ciphers, squares). The dedup checks catch what this choice misses.
"""

from __future__ import annotations

import json
import random
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Sequence

from ternchat.verify.humaneval import Problem, load_problems, score
from ternchat.verify.sandbox import Limits, checked_isolation

MAX_SIMILARITY = 0.4
TESTS_PER_TASK = 6


@dataclass(frozen=True)
class Family:
    """One task with its variants: `make(constant)` gives (function name, description, parameters
    with Rust types, return type, Rust body, Python implementation, input generator)."""
    constants: tuple
    make: Callable[..., tuple]


def _ints(rng: random.Random, low: int = -20, high: int = 20, longest: int = 8) -> list[int]:
    return [rng.randint(low, high) for _ in range(rng.randint(0, longest))]


def _word(rng: random.Random, letters: str = "abcdeorstxz", longest: int = 7) -> str:
    return "".join(rng.choice(letters) for _ in range(rng.randint(1, longest)))


def _words(rng: random.Random) -> str:
    return " ".join(_word(rng) for _ in range(rng.randint(0, 5)))


VEC = "xs: Vec<i64>"

FAMILIES: dict[str, Family] = {
    "sum_multiples_of": Family((2, 3, 4, 5, 6, 7, 9), lambda k: (
        f"sum_multiples_of_{k}", f"Return the sum of the elements of `xs` that are divisible by {k}.", [VEC], "i64",
        f"    xs.iter().filter(|&&x| x % {k} == 0).sum()",
        lambda xs: sum(x for x in xs if x % k == 0), lambda r: (_ints(r),))),
    "count_greater_than": Family((-5, 0, 3, 10), lambda t: (
        f"count_greater_than_{'minus_' if t < 0 else ''}{abs(t)}",
        f"Count the elements of `xs` that are strictly greater than {t}.", [VEC], "i64",
        f"    xs.iter().filter(|&&x| x > {t}).count() as i64",
        lambda xs: sum(1 for x in xs if x > t), lambda r: (_ints(r),))),
    "scale_and_shift": Family(((2, 0), (3, 1), (-1, 5), (2, -3), (10, 7)), lambda ab: (
        f"scale_{'minus_' if ab[0] < 0 else ''}{abs(ab[0])}_shift_{'minus_' if ab[1] < 0 else ''}{abs(ab[1])}",
        f"Return a vector with each element `x` of `xs` replaced by `x * {ab[0]} + {ab[1]}`.", [VEC], "Vec<i64>",
        f"    xs.iter().map(|x| x * {ab[0]} + {ab[1]}).collect()",
        lambda xs: [x * ab[0] + ab[1] for x in xs], lambda r: (_ints(r),))),
    "product_mod": Family((7, 10, 13, 1000), lambda m: (
        f"product_mod_{m}", f"Return the product of the elements of `xs` modulo {m}, as a value in 0..{m} "
        "(the product of no elements is 1).", [VEC], "i64",
        f"    xs.iter().fold(1i64, |acc, x| (acc * x.rem_euclid({m})) % {m})",
        lambda xs: _product_mod(xs, m), lambda r: (_ints(r, -50, 50),))),
    "count_char": Family(("a", "e", "o", "s", "x", "z"), lambda c: (
        f"count_letter_{c}", f"Count how many times the letter '{c}' occurs in `s`.", ["s: String"], "i64",
        f"    s.chars().filter(|&ch| ch == '{c}').count() as i64",
        lambda s: s.count(c), lambda r: (_words(r),))),
    "repeat_each": Family((2, 3), lambda k: (
        f"repeat_each_char_{k}_times", f"Return `s` with every character repeated {k} times in place.",
        ["s: String"], "String",
        f"    s.chars().flat_map(|ch| std::iter::repeat(ch).take({k})).collect()",
        lambda s: "".join(ch * k for ch in s), lambda r: (_word(r),))),
    "every_kth": Family((2, 3, 4), lambda k: (
        f"every_{k}th_element", f"Return the elements of `xs` at positions 0, {k}, {2 * k}, ... in order.", [VEC],
        "Vec<i64>", f"    xs.iter().step_by({k}).cloned().collect()",
        lambda xs: xs[::k], lambda r: (_ints(r, longest=10),))),
    "clamp_all": Family(((0, 10), (-5, 5), (1, 3)), lambda lh: (
        f"clamp_to_{'minus_' if lh[0] < 0 else ''}{abs(lh[0])}_{lh[1]}",
        f"Return a vector with each element of `xs` clamped to the range {lh[0]}..={lh[1]}.", [VEC], "Vec<i64>",
        f"    xs.iter().map(|&x| x.max({lh[0]}).min({lh[1]})).collect()",
        lambda xs: [min(max(x, lh[0]), lh[1]) for x in xs], lambda r: (_ints(r),))),
    "words_longer_than": Family((2, 3, 4), lambda n: (
        f"count_words_longer_than_{n}", f"Count the words of `s` (separated by single spaces) that have more than "
        f"{n} characters.", ["s: String"], "i64",
        f"    s.split(' ').filter(|w| w.chars().count() > {n}).count() as i64",
        lambda s: sum(1 for w in s.split(" ") if len(w) > n), lambda r: (_words(r),))),
    "replace_letter": Family((("a", "o"), ("e", "x"), ("s", "z")), lambda ab: (
        f"replace_{ab[0]}_with_{ab[1]}", f"Return `s` with every '{ab[0]}' replaced by '{ab[1]}'.", ["s: String"],
        "String", f"    s.replace('{ab[0]}', \"{ab[1]}\")",
        lambda s: s.replace(ab[0], ab[1]), lambda r: (_words(r),))),
    "first_index_above": Family((0, 5, 12), lambda t: (
        f"first_index_above_{t}", f"Return the position of the first element of `xs` greater than {t}, or -1 if "
        "there is none.", [VEC], "i64",
        f"    xs.iter().position(|&x| x > {t}).map_or(-1, |i| i as i64)",
        lambda xs: next((i for i, x in enumerate(xs) if x > t), -1), lambda r: (_ints(r),))),
    "pad_left": Family((4, 6), lambda w: (
        f"pad_left_with_stars_to_{w}", f"Return `s` with '*' added on the left until it has at least {w} characters.",
        ["s: String"], "String",
        f"    format!(\"{{}}{{}}\", \"*\".repeat({w}usize.saturating_sub(s.chars().count())), s)",
        lambda s: "*" * max(0, w - len(s)) + s, lambda r: (_word(r),))),
    "zip_sum": Family((None,), lambda _: (
        "pairwise_sums", "Return the sums `xs[i] + ys[i]` for every position that both vectors have.",
        [VEC, "ys: Vec<i64>"], "Vec<i64>", "    xs.iter().zip(ys.iter()).map(|(x, y)| x + y).collect()",
        lambda xs, ys: [x + y for x, y in zip(xs, ys)], lambda r: (_ints(r), _ints(r)))),
    "count_runs": Family((None,), lambda _: (
        "count_runs_of_equal_values", "Count the maximal runs of equal adjacent values in `xs` "
        "(`[1, 1, 2, 1]` has 3).", [VEC], "i64",
        "    if xs.is_empty() { return 0; }\n    1 + xs.windows(2).filter(|w| w[0] != w[1]).count() as i64",
        lambda xs: (1 + sum(1 for a, b in zip(xs, xs[1:]) if a != b)) if xs else 0,
        lambda r: ([r.randint(0, 2) for _ in range(r.randint(0, 9))],))),
    "swap_pairs": Family((None,), lambda _: (
        "swap_adjacent_pairs", "Swap the elements of `xs` in pairs: positions 0 and 1, 2 and 3, and so on; an "
        "odd last element stays.", [VEC], "Vec<i64>",
        "    let mut ys = xs.clone();\n    for pair in ys.chunks_mut(2) {\n        pair.reverse();\n    }\n    ys",
        lambda xs: [v for i in range(0, len(xs), 2) for v in reversed(xs[i:i + 2])], lambda r: (_ints(r),))),
    "abs_steps": Family((None,), lambda _: (
        "total_absolute_steps", "Return the sum of `|xs[i + 1] - xs[i]|` over neighbouring elements of `xs`.",
        [VEC], "i64", "    xs.windows(2).map(|w| (w[1] - w[0]).abs()).sum()",
        lambda xs: sum(abs(b - a) for a, b in zip(xs, xs[1:])), lambda r: (_ints(r),))),
}


def _product_mod(xs: Sequence[int], m: int) -> int:
    acc = 1
    for x in xs:
        acc = acc * (x % m) % m
    return acc


def rust_literal(value, rust_type: str) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, str):
        return 'String::from("' + value.replace("\\", "\\\\").replace('"', '\\"') + '")'
    if isinstance(value, list):
        return "vec![" + ", ".join(rust_literal(v, "i64") for v in value) + "]"
    raise TypeError(f"no Rust literal for {value!r} ({rust_type})")


def _task(family: str, constant, seed: int) -> Problem:
    fn, description, params, ret, body, python, draw = FAMILIES[family].make(constant)
    rng = random.Random(f"{seed}:{fn}")
    cases, seen = [], set()
    for _ in range(200):  # distinct inputs, the first two from the generator's small end
        args = draw(rng)
        key = repr(args)
        if key not in seen:
            seen.add(key)
            cases.append((args, python(*args)))
        if len(cases) == TESTS_PER_TASK:
            break
    call = lambda args: ", ".join(rust_literal(a, p.split(": ")[1]) for a, p in zip(args, params))  # noqa: E731
    example_args, example_out = max(cases[:3], key=lambda case: len(repr(case)))
    prompt = (f"/// {description}\n/// >>> {fn}({call(example_args)})\n/// {rust_literal(example_out, ret)}\n"
              f"fn {fn}({', '.join(params)}) -> {ret} {{\n")
    asserts = "".join(f"    assert_eq!(candidate({call(args)}), {rust_literal(out, ret)});\n" for args, out in cases)
    tests = f"}}\n\nfn main() {{\n    let candidate = {fn};\n{asserts}}}\n"
    return Problem(f"train_{fn}", prompt, tests, ("\n}",), body)


def generate_tasks(seed: int = 0) -> list[Problem]:
    """Every family's every variant, with seeded test inputs; not yet verified or deduplicated."""
    return [_task(family, constant, seed) for family, f in FAMILIES.items() for constant in f.constants]


# --- keeping evaluation problems out -----------------------------------------------------------------
def _name_words(problem: Problem) -> tuple[str, ...]:
    """The function's name as lowercase words (snake_case and camelCase split)."""
    match = re.search(r"\bfn\s+(\w+)", problem.prompt)
    name = match.group(1) if match else problem.name
    return tuple(w.lower() for w in re.findall(r"[A-Z]?[a-z]+|[A-Z]+(?![a-z])|\d+", name))


def _contains(words: tuple[str, ...], part: tuple[str, ...]) -> bool:
    return any(words[i:i + len(part)] == part for i in range(len(words) - len(part) + 1))


def _description(problem: Problem) -> str:
    lines = [line.strip()[3:].strip() for line in problem.prompt.splitlines() if line.strip().startswith("///")]
    text = []
    for line in lines:
        if line.startswith(">>>"):
            break
        text.append(line)
    return " ".join(text).lower()


def _trigrams(text: str) -> set[tuple[str, ...]]:
    words = re.findall(r"[a-z0-9]+", text)
    return {tuple(words[i:i + 3]) for i in range(len(words) - 2)}


def _jaccard(x: set, y: set) -> float:
    return len(x & y) / len(x | y) if x and y else 0.0


def similarity(a: str, b: str) -> float:
    """Jaccard similarity of two descriptions' word trigrams."""
    return _jaccard(_trigrams(a), _trigrams(b))


def duplicates_of_evaluation(tasks: Iterable[Problem], evaluation: Sequence[Problem]) -> dict[str, str]:
    """Why each task that resembles an evaluation problem must go: {task name: reason}."""
    names = [(_name_words(p), p.name) for p in evaluation]
    texts = [(_trigrams(_description(p)), p.name) for p in evaluation]  # once: callers check many thousands
    reasons = {}
    for task in tasks:
        mine = _name_words(task)
        clash = next((name for words, name in names if words and (_contains(mine, words) or _contains(words, mine))),
                     None)
        if clash is not None:
            reasons[task.name] = f"its name resembles {clash}'s"
            continue
        grams = _trigrams(_description(task))
        best, name = max(((_jaccard(grams, t), n) for t, n in texts), default=(0.0, ""))
        if best >= MAX_SIMILARITY:
            reasons[task.name] = f"its description is {best:.2f} similar to {name}'s"
    return reasons


# --- verification in the sandbox -----------------------------------------------------------------------
WRONG_BODY = "    Default::default()"


def verify_tasks(tasks: Sequence[Problem], workers: int = 0, limits: Limits = Limits(),
                 progress: Callable[[int], None] | None = None) -> dict[str, str]:
    """Run every task's reference and a `Default::default()` body in the sandbox; {task name: why it
    fails the check} for the tasks to drop (empty when all are good)."""
    jobs = {p.name: [p.reference or "", WRONG_BODY] for p in tasks}
    outcomes = score(tasks, jobs, workers=workers, limits=limits, progress=progress, cut=False)
    failures = {}
    for name, (reference, wrong) in outcomes.items():
        if reference.outcome != "ok":
            why = "; ".join(reference.messages)[:300] or reference.stderr[-300:]
            failures[name] = f"the reference does not pass ({reference.outcome}: {why})"
        elif wrong.outcome == "ok":
            failures[name] = "a body returning Default::default() passes the tests"
    return failures


def problem_row(problem: Problem) -> dict:
    """A task as a JSONL row of the MultiPL-E layout, which `load_problems` reads."""
    return {"name": problem.name, "language": "rs", "prompt": problem.prompt,
            "canonical_solution": problem.reference, "tests": problem.tests, "stop_tokens": list(problem.stop_tokens)}


def build_training_tasks(out: Path, against: Sequence[str | Path] = (), workers: int = 0, seed: int = 0,
                         limits: Limits = Limits(), log=print) -> dict:
    """Generate the tasks, drop those resembling the shipped problems or any `against` set, verify the
    rest in the sandbox and write the good ones to `out` as JSONL; returns counts and every drop's reason."""
    from tqdm import tqdm

    from ternchat.verify.humaneval import SHIPPED, load_problems

    tasks = generate_tasks(seed)
    evaluation = [p for source in (SHIPPED, *against) for p in load_problems(source)]
    dropped = duplicates_of_evaluation(tasks, evaluation)
    kept = [t for t in tasks if t.name not in dropped]
    log(f"{len(tasks)} tasks from {len(FAMILIES)} families; {len(dropped)} resemble one of {len(evaluation)} "
        f"evaluation problems; verifying {len(kept)} in the sandbox (reference passes, a default body fails)")
    with tqdm(total=2 * len(kept), desc="verify", unit="program") as bar:
        failed = verify_tasks(kept, workers, limits, bar.update)
    good = [t for t in kept if t.name not in failed]
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(out.suffix + ".tmp")
    tmp.write_text("".join(json.dumps(problem_row(t)) + "\n" for t in good))
    tmp.replace(out)
    return {"generated": len(tasks), "evaluation_problems": len(evaluation), "kept": len(good),
            "dropped_as_duplicates": dropped, "failed_verification": failed, "out": str(out)}


def default_tasks_file() -> Path:
    from ternchat.paths import ternchat_home

    return ternchat_home() / "tasks" / "train_tasks.jsonl"


def build_tasks_file(out: Path, against: Sequence[str], workers: int, allow_unisolated: bool, log=print) -> dict:
    """`ternchat tasks`: build, check and write the training tasks, saying which were dropped and why."""

    limits = Limits(allow_unisolated=allow_unisolated)
    log(f"sandbox: {checked_isolation(limits).describe()}")
    report = build_training_tasks(out, against, workers, limits=limits)
    for name, why in {**report["dropped_as_duplicates"], **report["failed_verification"]}.items():
        log(f"  dropped {name}: {why}")
    log(f"{report['kept']} of {report['generated']} tasks kept -> {out}")
    return report


def training_tasks(path: Path | None, allow_unisolated: bool, log=print) -> list[Problem]:
    """The tasks of `path`, or of the default file, which is built on first use."""
    from ternchat.data.errors import DataError

    tasks_file = path or default_tasks_file()
    if not tasks_file.exists():
        if path:
            raise DataError(f"no tasks file at {tasks_file}; make one with ternchat tasks --out {tasks_file}")
        build_tasks_file(tasks_file, [], 0, allow_unisolated, log)
    return load_problems(tasks_file)
