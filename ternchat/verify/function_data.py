"""Training data that teaches functions, mined from the corpus's train split (`ternchat data functions`).

A documented function is a `fn` item directly under `///` doc lines whose body closes at its own
indentation (`}` alone on a line); nested items, traits' default methods and impls' methods count.
Each gives up to two conversations in the chat format:
- `function`: the doc comment without its code blocks, and the signature, in; the body and `}` out
  (bodies of 1 to `max_body_lines` lines; none whose body only defers the work, `todo!()`,
  `unreachable!(..)`, `Self::default()` and the like, which would teach placeholders as answers);
- `example`: its doc-tests, the Rust code blocks of the doc comment (fences with no language, `rust`,
  or only rustdoc's attributes such as `no_run` and `should_panic`; not `text`, `ignore` or
  `compile_fail`), with rustdoc's hidden `# ` lines shown: the doc prose and signature in, "how is it
  used?", the example out.

Every item passes verify/tasks.py's near-duplicate check against the evaluation problems (the
shipped rust_basics and any `against` set such as HumanEval-Rust) before it is kept: a function whose
name's words run inside an evaluation problem's name (or the reverse: `fib` and `fib_mod_7`), or whose
description has word-trigram Jaccard similarity of at least 0.4 with one, is dropped.

`check_sample` compiles a seeded sample in the rustc sandbox, each alone as a library crate (a
function's doc, signature and body; an example wrapped in `fn main` unless it has one): most need
their crate (its types, `use crate_name::...`), so the share that compiles alone is a floor of how
much is self-contained, not of how much is correct.
"""

from __future__ import annotations

import json
import random
import re
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Iterable, Iterator, Sequence

from ternchat.data.corpus import iter_records
from ternchat.data.prepared import FUNCTIONS_FILE
from ternchat.verify.humaneval import SHIPPED, Problem, is_placeholder, load_problems
from ternchat.verify.sandbox import Limits, check_metadata
from ternchat.verify.tasks import duplicates_of_evaluation

_DOCUMENTED_FN = re.compile(r"^(?P<doc>(?:(?P<indent>[ \t]*)///[^\n]*\n)+)(?P=indent)(?P<sig>(?:pub(?:\([^)]*\))? )?"
                            r"(?:const |async |unsafe )*fn (?P<name>\w+)[^\n]*\{)[ \t]*\n", re.M)
_FENCE = re.compile(r"^\s*```+\s*(?P<info>[^`]*)$")
# rustdoc's code-block attributes that leave a block Rust that compiles (with its crate)
_RUST_INFO = {"", "rust", "no_run", "should_panic", "edition2015", "edition2018", "edition2021", "edition2024"}


@dataclass(frozen=True)
class DocumentedFunction:
    crate: str
    path: str
    edition: str
    name: str
    indent: str
    prose: str  # the doc comment's lines (`///` kept) without its code blocks
    signature: str
    body: str  # up to, not including, the closing brace
    examples: tuple[str, ...]  # the doc-tests' code

    @property
    def prompt(self) -> str:
        return f"{self.prose}{self.indent}{self.signature}\n"


def _doc_lines(doc: str) -> list[str]:
    """The text of each `///` line, without the slashes and one space."""
    out = []
    for line in doc.splitlines():
        text = line.strip()[3:]
        out.append(text[1:] if text.startswith(" ") else text)
    return out


def split_doc(doc: str, indent: str) -> tuple[str, list[str]]:
    """A `///` comment's prose (as `///` lines, code blocks left out) and its Rust doc-tests."""
    prose, examples, block, info = [], [], None, ""
    for text in _doc_lines(doc):
        fence = _FENCE.match(text)
        if fence and block is None:
            block, info = [], fence.group("info").strip()
            continue
        if fence:
            attributes = {a.strip() for a in info.split(",")}
            if attributes <= _RUST_INFO and any(line.strip() for line in block):
                examples.append("\n".join(block).strip("\n"))
            block = None
            continue
        if block is not None:
            block.append(text[2:] if text.startswith("# ") else "" if text == "#" else text)
        else:
            prose.append(f"{indent}/// {text}".rstrip() + "\n")
    while prose and prose[-1].strip() == "///":
        prose.pop()
    return "".join(prose), examples


def documented_functions(doc: dict, max_body_lines: int = 40) -> Iterator[DocumentedFunction]:
    """The documented functions of one corpus document (crate, path, edition, text)."""
    text = doc["text"]
    for m in _DOCUMENTED_FN.finditer(text):
        indent = m.group("indent")
        closing = re.compile(rf"^{re.escape(indent)}\}}[ \t]*$", re.M).search(text, m.end())
        if closing is None:
            continue
        body = text[m.end():closing.start()].rstrip()
        if not body.strip() or body.count("\n") + 1 > max_body_lines:
            continue
        prose, examples = split_doc(m.group("doc"), indent)
        if not prose.strip():
            continue
        yield DocumentedFunction(doc.get("crate", ""), doc.get("path", ""), doc.get("edition", "2021"),
                                 m.group("name"), indent, prose, m.group("sig"), body, tuple(examples))


def conversations(fn: DocumentedFunction) -> list[tuple[str, list[dict]]]:
    """The function's conversations, each with its kind; none teaches a placeholder body as an answer."""
    answer = [{"role": "user", "content": fn.prompt}, {"role": "assistant", "content": f"{fn.body}\n{fn.indent}}}"}]
    out = [] if is_placeholder(fn.body) else [("function", answer)]
    for example in fn.examples:
        out.append(("example", [{"role": "user", "content": f"{fn.prompt}How is `{fn.name}` used?"},
                                {"role": "assistant", "content": example}]))
    return out


def mine(docs: Iterable[dict], evaluation: Sequence[Problem], max_body_lines: int = 40) -> dict:
    """Every documented function of `docs` not resembling an evaluation problem, and the counts; the
    dropped ones as {"crate/path:name": why}."""
    found = [fn for doc in docs for fn in documented_functions(doc, max_body_lines)]
    why = duplicates_of_evaluation([Problem(name=str(i), prompt=fn.prompt, tests="", stop_tokens=())
                                    for i, fn in enumerate(found)], evaluation)
    kept = [fn for i, fn in enumerate(found) if str(i) not in why]
    dropped = {f"{found[int(i)].crate}/{found[int(i)].path}:{found[int(i)].name}": r for i, r in why.items()}
    return {"functions": kept, "found": len(found), "dropped": len(why), "dropped_as_duplicates": dropped,
            "kept": len(kept), "examples": sum(len(fn.examples) for fn in kept),
            "with_examples": sum(1 for fn in kept if fn.examples)}


def sample_conversations(functions: Sequence[DocumentedFunction], limit: int, seed: int = 0) -> list[list[dict]]:
    """A seeded sample of `limit` conversations drawn across all the functions' conversations."""
    every = [conv for fn in functions for _, conv in conversations(fn)]
    return random.Random(seed).sample(every, min(limit, len(every)))


def program(kind: str, fn: DocumentedFunction, example: str = "") -> str:
    """What `check_sample` compiles for one conversation."""
    if kind == "function":
        return f"{fn.prompt}{fn.body}\n{fn.indent}}}\n"
    return example if re.search(r"\bfn\s+main\s*\(", example) else f"fn main() {{\n{example}\n}}\n"


def check_sample(functions: Sequence[DocumentedFunction], per_kind: int, seed: int = 0, workers: int = 2,
                 limits: Limits = Limits()) -> dict:
    """Compile a seeded sample of `per_kind` functions and `per_kind` examples alone, in the sandbox;
    return how many of each compiled and rustc's most frequent error codes."""
    rng = random.Random(seed)
    items = {"function": [("function", fn, "") for fn in functions],
             "example": [("example", fn, ex) for fn in functions for ex in fn.examples]}
    chosen = [item for kind in items for item in rng.sample(items[kind], min(per_kind, len(items[kind])))]
    with ThreadPoolExecutor(max_workers=workers) as pool:
        outcomes = list(pool.map(lambda it: check_metadata(program(*it), it[1].edition, limits), chosen))
    report: dict = {}
    for kind in items:
        mine = [o for (k, _, _), o in zip(chosen, outcomes) if k == kind]
        codes = Counter(code for o in mine for code in o.error_codes)
        report[kind] = {"checked": len(mine), "compiles": sum(o.outcome == "ok" for o in mine),
                        "top_error_codes": codes.most_common(5)}
    return report


def mine_corpus(corpus_dir: Path, against: Sequence[str | Path] = ()) -> dict:
    """Mine a corpus's train split against the shipped problems and `against`, into its `functions.jsonl`."""
    evaluation = [p for source in (SHIPPED, *against) for p in load_problems(source)]
    mined = mine(iter_records(corpus_dir, "train"), evaluation)
    write_functions(mined["functions"], Path(corpus_dir) / FUNCTIONS_FILE)
    return {**mined, "evaluation_problems": len(evaluation), "out": Path(corpus_dir) / FUNCTIONS_FILE}


def corpus_conversations(corpus_dir: Path, limit: int, seed: int = 0) -> list[list[dict]]:
    """A seeded sample of `limit` mined conversations of a corpus: from its `functions.jsonl` (`ternchat
    data functions`), else mined now from its train split against the shipped evaluation problems."""
    path = Path(corpus_dir) / FUNCTIONS_FILE
    functions = read_functions(path) if path.exists() else \
        mine(iter_records(corpus_dir, "train"), load_problems(SHIPPED))["functions"]
    return sample_conversations(functions, limit, seed)


def write_functions(functions: Sequence[DocumentedFunction], out: Path) -> None:
    tmp = out.with_suffix(out.suffix + ".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        for fn in functions:
            f.write(json.dumps(asdict(fn)) + "\n")
    tmp.replace(out)


def read_functions(path: Path) -> list[DocumentedFunction]:
    with open(path, encoding="utf-8") as f:
        return [DocumentedFunction(**{**row, "examples": tuple(row["examples"])}) for row in map(json.loads, f)]


def mine_configured_corpus(cfg, against: Sequence[str | Path] = (), check: int = 0, force: bool = False,
                           allow_unisolated: bool = False, log=print) -> dict:
    """`ternchat data functions`: mine the config's corpus and, with `check`, compile a sample of each kind."""
    import time

    from ternchat.data.pipeline import prepare_data
    from ternchat.verify.sandbox import checked_isolation

    corpus_dir = prepare_data(cfg, until="corpus", force=force).corpus_dir
    start = time.perf_counter()
    mined = mine_corpus(corpus_dir, against)
    log(f"documented functions in the train split: {mined['found']:,} found, {mined['dropped']:,} "
        f"dropped as resembling one of {mined['evaluation_problems']} evaluation problems, {mined['kept']:,} kept "
        f"({mined['with_examples']:,} with doc-test examples, {mined['examples']:,} examples) in "
        f"{time.perf_counter() - start:.0f} s -> {mined['out']}")
    if check:
        limits = Limits(allow_unisolated=allow_unisolated or cfg.eval.allow_unisolated)
        checked_isolation(limits)
        mined["checked"] = check_sample(mined["functions"], check, workers=cfg.data.workers or 2, limits=limits)
        for kind, r in mined["checked"].items():
            share = r["compiles"] / r["checked"] if r["checked"] else 0.0
            codes = ", ".join(f"{code} {n}" for code, n in r["top_error_codes"]) or "none"
            log(f"  {kind}: {r['compiles']} of a sample of {r['checked']} compile alone ({100 * share:.0f}%); "
                f"most frequent rustc errors: {codes}")
    return mined
