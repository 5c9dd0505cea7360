"""Training data that teaches functions: documented functions and their doc-test examples, mined from
the corpus, kept apart from the evaluation problems."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from conftest import tiny_overrides
from ternchat.config import load_config
from ternchat.verify.function_data import (FUNCTIONS_FILE, check_sample, conversations, corpus_conversations,
                                           documented_functions, mine, read_functions, sample_conversations)
from ternchat.verify.humaneval import SHIPPED, load_problems

SOURCE = '''
/// Adds one.
/// Twice documented.
pub fn add_one(x: i64) -> i64 {
    if x > 0 {
        x + 1
    } else {
        x + 1
    }
}

impl Stack {
    /// How many items the stack holds.
    ///
    /// ```
    /// # use stacks::Stack;
    /// let s = Stack::new();
    /// assert_eq!(s.size(), 0);
    /// ```
    ///
    /// ```text
    /// size() -> 0
    /// ```
    pub fn size(&self) -> usize {
        self.items.len()
    }
}

/// Undocumented below? No: this one has a doc but an empty body.
fn nothing() {
}

impl Default for Style {
    /// The plain style.
    fn default() -> Self {
        Self::default()
    }
}

/// The sum of the squares, as the evaluation problem asks.
pub fn sum_of_squares(xs: &[i64]) -> i64 {
    xs.iter().map(|x| x * x).sum()
}
'''
DOC = {"crate": "stacks", "path": "src/lib.rs", "edition": "2021", "text": SOURCE}


def test_documented_functions_come_whole_with_their_doc_tests():
    by_name = {fn.name: fn for fn in documented_functions(DOC)}
    assert set(by_name) == {"add_one", "size", "default", "sum_of_squares"}  # `nothing` has no body
    add_one, size = by_name["add_one"], by_name["size"]
    assert add_one.prompt == "/// Adds one.\n/// Twice documented.\npub fn add_one(x: i64) -> i64 {\n"
    assert add_one.body.count("x + 1") == 2 and add_one.body.endswith("    }")  # nested braces stay inside
    assert size.prompt == "    /// How many items the stack holds.\n    pub fn size(&self) -> usize {\n"
    assert size.examples == ("use stacks::Stack;\nlet s = Stack::new();\nassert_eq!(s.size(), 0);",)  # not `text`
    kinds = [kind for kind, _ in conversations(size)]
    assert kinds == ["function", "example"]
    assert conversations(size)[0][1][1]["content"] == "        self.items.len()\n    }"
    assert [fn.name for fn in documented_functions(DOC, max_body_lines=2)] == ["size", "default", "sum_of_squares"]
    assert conversations(by_name["default"]) == []  # a placeholder body is no answer to learn


def test_functions_resembling_an_evaluation_problem_are_dropped():
    mined = mine([DOC], load_problems(SHIPPED))
    assert mined["found"] == 4 and mined["kept"] == 3 and mined["dropped"] == 1 and mined["examples"] == 1
    [(name, why)] = mined["dropped_as_duplicates"].items()
    assert name.endswith(":sum_of_squares") and "sum_of_squares" in why
    every = sample_conversations(mined["functions"], limit=100)
    assert len(every) == 3 and len(sample_conversations(mined["functions"], limit=2)) == 2


@pytest.mark.usefixtures("sandbox_ready")
def test_a_checked_sample_compiles_what_stands_alone():
    functions = list(documented_functions(DOC))
    report = check_sample(functions, per_kind=10, workers=1)
    assert report["function"]["checked"] == 4 and report["function"]["compiles"] == 2  # 2 need their impl
    assert report["example"]["checked"] == 1 and report["example"]["compiles"] == 0  # needs the stacks crate


def test_cli_mines_the_corpus_and_sft_takes_the_file(tmp_path, fixture_crates):
    sets = [a for o in tiny_overrides([fixture_crates]) for a in ("--set", o)]
    done = subprocess.run([sys.executable, "-m", "ternchat", "data", "functions", *sets, "--check", "0"],
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert "documented functions in the train split" in done.stdout
    corpus_dir = next((tmp_path / "ternchat_home" / "corpus").iterdir())
    functions = read_functions(corpus_dir / FUNCTIONS_FILE)
    docs = [json.loads(line) for line in (corpus_dir / "train.jsonl").open()]
    assert len(functions) == sum(len(list(documented_functions(d))) for d in docs) > 0
    assert corpus_conversations(corpus_dir, limit=1000) == sample_conversations(functions, 1000)
    assert load_config(overrides=tiny_overrides([fixture_crates])).sft.corpus_conversations > 0
