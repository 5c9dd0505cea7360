"""The rustc sandbox and HumanEval-Rust harness, on real rustc: known answers and adversarial programs."""

import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from ternchat.verify.humaneval import (Problem, ProblemError, build_program, load_problem_set, load_problems,
                                      references, score, stop_at_stop_tokens)
from ternchat.verify.inputs import InputError
from ternchat.verify.metrics import pass_at_k, summarize, write_reports
from ternchat.verify.sandbox import Limits, Outcome, check_metadata, check_parse, isolation, run_many, run_rust

needs_sandbox = pytest.mark.usefixtures("sandbox_ready")  # rustc and bubblewrap's namespaces

FAST = Limits(run_seconds=4, cpu_seconds=3, compile_seconds=30)
SHARED_HUMANEVAL = Path(__file__).resolve().parents[2] / "shared" / "data" / "humaneval-rs.jsonl"


def leftovers() -> set[str]:
    return {p for p in os.listdir(tempfile.gettempdir()) if p.startswith("ternchat-")}


@pytest.fixture
def clean_machine():
    before = leftovers()
    yield
    assert leftovers() <= before, "the sandbox left temporary folders behind"
    ps = subprocess.run(["ps", "-eo", "args"], capture_output=True, text=True).stdout
    assert "ternchat-orphan-marker" not in ps, "a sandboxed process outlived its run"


# --- known answers ------------------------------------------------------------------------------
@needs_sandbox
def test_shipped_reference_solutions_pass():
    problems = load_problems()
    assert len(problems) >= 10 and all(p.reference for p in problems)
    results = score(problems, {p.name: [p.reference] for p in problems})
    failed = {name: o[0].outcome for name, o in results.items() if o[0].outcome != "ok"}
    assert not failed


@needs_sandbox
def test_wrong_answers_fail_at_run_time():
    problems = {p.name: p for p in load_problems()}
    wrong = {"tc_3_fibonacci": "    n", "tc_6_gcd": "    a * b", "tc_0_sum_of_squares": "    xs.iter().sum()"}
    results = score(list(problems.values()), {name: [c] for name, c in wrong.items()})
    assert {o[0].outcome for o in results.values()} == {"runtime_error"}


@needs_sandbox
def test_todo_body_compiles_and_panics():
    p = load_problems()[0]
    outcome = score([p], {p.name: ["    todo!()"]})[p.name][0]
    assert outcome.phase == "run" and outcome.outcome == "runtime_error" and "not yet implemented" in outcome.stderr


@needs_sandbox
def test_syntax_and_type_errors_are_compile_errors_with_codes():
    syntax = run_rust("fn main() { let x = ; }", limits=FAST)
    assert syntax.outcome == "compile_error" and syntax.messages
    typed = run_rust('fn main() { let x: u32 = "text"; }', limits=FAST)
    assert typed.outcome == "compile_error" and typed.error_codes == ["E0308"]


# --- adversarial programs -----------------------------------------------------------------------
ADVERSARIAL = {
    "infinite_loop": ("fn main() { let mut x: u64 = 1; loop { x = x.wrapping_mul(3); if x == 0 { println!(\"{}\", x); } } }",
                      {"timeout"}),
    "sleep_forever": ("fn main() { std::thread::sleep(std::time::Duration::from_secs(600)); }", {"timeout"}),
    "fork_bomb": ("""fn main() {
        let mut kids = Vec::new();
        loop { match std::process::Command::new("/proc/self/exe").spawn() {
            Ok(c) => kids.push(c), Err(_) => std::process::exit(3) } } }""", {"runtime_error", "timeout"}),
    "allocate_10gb": ("fn main() { let v = vec![1u8; 10_000_000_000]; println!(\"{}\", v[v.len() - 1]); }",
                      {"memory_limit"}),
    "write_1gb_file": ("""use std::io::Write;
        fn main() { let mut f = std::fs::File::create("big.bin").unwrap(); let chunk = vec![7u8; 1 << 20];
        for _ in 0..1024 { f.write_all(&chunk).unwrap(); } }""", {"output_limit"}),
    "print_100mb": ('fn main() { let line = "y".repeat(999); for _ in 0..100_000 { println!("{}", line); } }',
                    {"output_limit"}),
    "read_host_files": ("""fn main() {
        for p in ["/etc/shadow", "/etc/passwd", "/root/.ssh/id_rsa", "/home"] {
            if std::fs::read(p).is_ok() || std::fs::read_dir(p).is_ok() { println!("read {}", p); std::process::exit(0); } }
        std::process::exit(1); }""", {"runtime_error"}),
    "network": ("""fn main() {
        let t = std::time::Duration::from_secs(2);
        let ok = ["1.1.1.1:80", "127.0.0.1:22"].iter().any(|a| std::net::TcpStream::connect_timeout(
            &a.parse().unwrap(), t).is_ok());
        std::process::exit(if ok { 0 } else { 1 }); }""", {"runtime_error"}),
    "orphan_child": ("""fn main() {
        if std::env::args().any(|a| a == "ternchat-orphan-marker") {
            std::thread::sleep(std::time::Duration::from_secs(300)); }
        std::process::Command::new("/proc/self/exe").arg("ternchat-orphan-marker").spawn().unwrap();
        println!("parent done"); }""", {"ok"}),
    "include_host_file": ('const S: &str = include_str!("/etc/shadow"); fn main() { println!("{}", S.len()); }',
                          {"compile_error"}),
    "include_relative_escape": ('const B: &[u8] = include_bytes!("../../../../etc/hostname"); '
                                'fn main() { println!("{}", B.len()); }', {"compile_error"}),
    "env_secret_at_compile_time": ('const K: &str = env!("TERNCHAT_TEST_SECRET"); fn main() { println!("{}", K); }',
                                   {"compile_error"}),
}


@needs_sandbox
@pytest.mark.parametrize("name", list(ADVERSARIAL))
def test_adversarial_program_is_contained_and_classified(name, clean_machine, monkeypatch):
    monkeypatch.setenv("TERNCHAT_TEST_SECRET", "hunter2")
    source, expected = ADVERSARIAL[name]
    outcome = run_rust(source, limits=FAST)
    assert outcome.outcome in expected, (outcome.outcome, outcome.stderr[-300:], outcome.messages)
    assert "hunter2" not in outcome.stdout + outcome.stderr
    assert outcome.run_seconds < 10 and outcome.compile_seconds < 60
    if name == "orphan_child":
        import time
        time.sleep(0.5)  # the clean_machine check then looks for the sleeping grandchild


@needs_sandbox
def test_host_secrets_are_out_of_reach_when_namespaces_are_active():
    assert isolation().namespaces
    outcome = run_rust('fn main() { print!("{}", std::fs::read_to_string("/etc/hostname").is_ok()); }', limits=FAST)
    assert outcome.stdout == "false"


@needs_sandbox
def test_pool_runs_many_and_keeps_order():
    sources = [f'fn main() {{ print!("{i}"); }}' for i in range(6)] + ["fn main() { panic!() }"]
    outcomes = run_many(sources, workers=2, limits=FAST)
    assert [o.stdout for o in outcomes[:6]] == [str(i) for i in range(6)]
    assert outcomes[6].outcome == "runtime_error"


@needs_sandbox
def test_isolation_report_names_the_mechanisms():
    text = isolation().describe()
    assert "rustc" in text and "network" in text and "filesystem" in text


# --- harness logic ------------------------------------------------------------------------------
def test_stop_tokens_and_program_layout():
    assert stop_at_stop_tokens("    x + 1\n}\nfn extra() {}", ["\n}"]) == "    x + 1"
    assert stop_at_stop_tokens("abc", ["\n}", "\nfn"]) == "abc"
    assert stop_at_stop_tokens("a\nfn b\n}", ["\n}", "\nfn"]) == "a"
    p = Problem("p", "fn f() -> u32 {\n", "}\n\nfn main() { assert_eq!(f(), 1); }\n", ("\n}",))
    assert build_program(p, "    1\n}\ngarbage") == "fn f() -> u32 {\n    1\n}\n\nfn main() { assert_eq!(f(), 1); }\n"


@pytest.mark.parametrize("n, c, k, expected", [(1, 1, 1, 1.0), (1, 0, 1, 0.0), (10, 3, 1, 0.3), (5, 0, 2, 0.0),
                                               (5, 4, 2, 1.0), (4, 2, 2, 1 - 1 / 6)])
def test_pass_at_k_is_the_unbiased_estimator(n, c, k, expected):
    assert pass_at_k(n, c, k) == pytest.approx(expected)


def test_summary_and_reports(tmp_path):
    run = lambda outcome, phase, codes=(): Outcome(outcome, phase, error_codes=list(codes))
    results = {"a": [run("ok", "run"), run("runtime_error", "run")],
               "b": [run("compile_error", "compile", ["E0308"]), run("compile_error", "compile", ["E0308", "E0425"])]}
    summary = summarize(results, [1, 2])
    assert summary["pass@k"] == {"pass@1": 0.25, "pass@2": 0.5}
    assert summary["compile_rate"] == 0.5 and summary["semantic_correctness"] == 0.5
    assert summary["error_codes"] == {"E0308": 2, "E0425": 1}
    write_reports(results, summary, tmp_path, "test")
    assert len((tmp_path / "outcomes.jsonl").read_text().splitlines()) == 4
    assert "| pass@2 | 0.500 |" in (tmp_path / "summary.md").read_text()


def test_loader_reads_multipl_e_json_and_jsonl(tmp_path):
    rows = [{"name": "x", "prompt": "fn x() {\n", "tests": "}\nfn main() {}\n", "stop_tokens": ["\n}"]}]
    (tmp_path / "p.json").write_text(json.dumps(rows))
    (tmp_path / "p.jsonl").write_text(json.dumps(rows[0]) + "\n")
    assert load_problems(tmp_path / "p.json") == load_problems(tmp_path / "p.jsonl")
    if SHARED_HUMANEVAL.exists():
        assert len(load_problems(SHARED_HUMANEVAL)) == 134


@needs_sandbox
def test_compile_checks_for_data():
    assert check_metadata("pub fn f() -> u32 { 1 }").outcome == "ok"
    needs_crate = "mod elsewhere;\nuse crate::elsewhere::Thing;\npub fn f(t: Thing) {}\n"
    assert check_metadata(needs_crate).outcome == "compile_error"
    assert check_parse(needs_crate).outcome == "ok"
    assert check_parse("pub fn f( {").outcome == "compile_error"


NOISY_ADD = '    print!("{}", "x".repeat(1_000_000));\n    a + b\n'


@needs_sandbox
@pytest.mark.parametrize("layout", ["main", "test_module"])
def test_a_correct_program_that_prints_a_megabyte_before_its_tests_end_passes(layout):
    prompt = "fn add(a: i32, b: i32) -> i32 {\n"
    if layout == "main":
        problem = Problem("noisy", prompt, "}\n\nfn main() {\n    assert_eq!(add(2, 3), 5);\n}\n", ("\n}",))
        completion, wrong = NOISY_ADD, NOISY_ADD.replace("a + b", "a - b")
    else:
        tests = ("\n#[cfg(test)]\nmod tests {\n    use super::*;\n    #[test]\n"
                 "    fn adds() { assert_eq!(add(2, 3), 5); }\n}\n")
        problem = Problem("noisy", prompt, tests, ("\n#[cfg(test)]",), test_module=True)
        completion, wrong = NOISY_ADD + "}\n", NOISY_ADD.replace("a + b", "a - b") + "}\n"
    right, failing = (score([problem], {"noisy": [c]})["noisy"][0] for c in (completion, wrong))
    assert right.outcome == "ok", right.messages  # the proof line comes after 1 MB without a newline
    assert failing.outcome == "runtime_error"


@needs_sandbox
def test_cli_scores_a_completions_file(tmp_path):
    problems = load_problems()
    lines = [json.dumps({"name": p.name, "completions": [p.reference, "    todo!()"]}) for p in problems[:3]]
    (tmp_path / "c.jsonl").write_text("\n".join(lines) + "\n")
    result = subprocess.run([sys.executable, "-m", "ternchat", "eval", "humaneval-rust", "--completions",
                             str(tmp_path / "c.jsonl"), "--k", "1,2", "--out", str(tmp_path / "out")],
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert summary["pass@k"] == {"pass@1": 0.5, "pass@2": 1.0} and summary["compile_rate"] == 1.0


@needs_sandbox
def test_corpus_files_are_tagged_and_cached(tmp_path, fixture_crates):
    from ternchat.config import load_config
    from ternchat.data.corpus import build_corpus, discover_files
    from ternchat.verify.checked_data import verify_corpus

    src = tmp_path / "src"
    shutil.copytree(fixture_crates, src)
    (src / "broken" / "src").mkdir(parents=True)
    (src / "broken" / "Cargo.toml").write_text('[package]\nname = "broken"\nversion = "0.1.0"\n')
    (src / "broken" / "src" / "lib.rs").write_text("pub fn oops( {\n    let x = 1;\n}\n" * 3)
    cfg = load_config(overrides=["data.val_fraction=0.2"])
    roots = [(src, "test")]
    build_corpus(cfg.data, discover_files(roots), roots, tmp_path / "corpus")
    counts = verify_corpus(tmp_path / "corpus", tmp_path / "cache")
    assert counts["syntax_error"] == 1 and counts["compiles"] >= 3 and counts["parses"] >= 2
    tags = {(r["crate"], r["path"]): r["tag"] for r in map(json.loads, open(tmp_path / "corpus" / "compile_tags.jsonl"))}
    assert tags[("geometry", "src/lib.rs")] == "parses"  # `pub mod shapes;` needs its crate
    assert tags[("textkit", "src/lib.rs")] == "compiles"
    assert tags[("broken", "src/lib.rs")] == "syntax_error"
    again = verify_corpus(tmp_path / "corpus", tmp_path / "cache")
    assert again["checked_now"] == 0 and {k: v for k, v in again.items() if k != "checked_now"} == \
        {k: v for k, v in counts.items() if k != "checked_now"}


# --- the test-module layout (task_id, prompt, canonical_solution, test, entry_point, edition) --------
TEST_MODULE = Path(__file__).parent / "fixtures" / "humaneval_test_module.jsonl"


def plain_rustc_test(program: str, edition: str, tmp: Path) -> str:
    """What plain `rustc --test` and a run of the test binary say, without ternchat: pass, fail or compile_error."""
    (tmp / "main.rs").write_text(program)
    built = subprocess.run(["rustc", "--edition", edition, "--test", "-o", str(tmp / "prog"), str(tmp / "main.rs")],
                           capture_output=True, timeout=120)
    if built.returncode != 0:
        return "compile_error"
    return "pass" if subprocess.run([str(tmp / "prog")], capture_output=True, timeout=60).returncode == 0 else "fail"


def verdict(outcome: Outcome) -> str:
    return {"ok": "pass", "compile_error": "compile_error"}.get(outcome.outcome, "fail")


@needs_sandbox
def test_test_module_canonical_solutions_agree_with_plain_rustc_test(tmp_path):
    problems = load_problems(TEST_MODULE)
    expected = {row["task_id"]: row["expected"] for row in map(json.loads, TEST_MODULE.read_text().splitlines())}
    assert all(p.test_module for p in problems) and {p.edition for p in problems} == {"2015", "2021"}
    results = score(problems, references(problems), cut=False)
    for p in problems:
        ours = verdict(results[p.name][0])
        plain = plain_rustc_test(build_program(p, p.reference, cut=False), p.edition, tmp_path)
        assert ours == plain == expected[p.name], (p.name, ours, plain, results[p.name][0].messages)


@needs_sandbox
def test_test_module_model_completions_are_cut_before_their_own_tests():
    problem = load_problems(TEST_MODULE)[0]
    rambling = problem.reference + "\n#[cfg(test)]\nmod tests {\n    #[test]\n    fn mine() {}\n}\n"
    cut, whole = (score([problem], {problem.name: [rambling]}, cut=c)[problem.name][0] for c in (True, False))
    assert cut.outcome == "ok"
    assert whole.outcome == "compile_error" and "E0428" in whole.error_codes  # `tests` defined twice


EMPTY_TEST_MODULE = {"task_id": "X/0", "prompt": "fn f() -> u32 {", "canonical_solution": "1 }", "entry_point": "f",
                     "test": "\n#[cfg(test)]\nmod tests {\n    fn helper() {}\n}\n"}


def test_test_module_rows_without_a_test_function_are_skipped_or_refused_when_strict(tmp_path, capsys):
    rows = [json.loads(line) for line in TEST_MODULE.read_text().splitlines()][:2] + [EMPTY_TEST_MODULE]
    (tmp_path / "p.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    problem_set = load_problem_set(tmp_path / "p.jsonl")
    assert [p.name for p in problem_set.problems] == [rows[0]["task_id"], rows[1]["task_id"]]
    assert list(problem_set.skipped) == [f"{tmp_path / 'p.jsonl'}:3: problem X/0"]
    err = capsys.readouterr().err
    assert "warning: skipped" in err and "problem X/0" in err and "1 problem(s) skipped, 2 to score" in err
    with pytest.raises(InputError, match="p.jsonl:3: problem X/0: its test has no #\\[test\\] function"):
        load_problems(tmp_path / "p.jsonl", strict=True)
    with pytest.raises(ProblemError, match="canonical_solution"):  # nothing to score without --completions
        references([Problem("p", "fn f() {", "}", ("\n}",))])


@needs_sandbox
def test_cli_scores_the_rest_of_a_file_and_counts_the_skipped_problems(tmp_path):
    rows = TEST_MODULE.read_text() + json.dumps(EMPTY_TEST_MODULE) + "\n"
    (tmp_path / "p.jsonl").write_text(rows)
    command = [sys.executable, "-m", "ternchat", "eval", "humaneval-rust", "--problems", str(tmp_path / "p.jsonl")]
    result = subprocess.run([*command, "--out", str(tmp_path / "out")], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert "warning: skipped" in result.stderr and "problem X/0" in result.stderr
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert summary["problems"] == 9 and list(summary["skipped"]) == [f"{tmp_path / 'p.jsonl'}:10: problem X/0"]
    assert "1 problem(s) skipped" in (tmp_path / "out" / "summary.md").read_text()
    strict = subprocess.run([*command, "--strict"], capture_output=True, text=True)
    assert strict.returncode == 2 and "problem X/0: its test has no #[test] function" in strict.stderr


@needs_sandbox
def test_cli_scores_canonical_solutions_when_no_completions_are_given(tmp_path):
    result = subprocess.run([sys.executable, "-m", "ternchat", "eval", "humaneval-rust", "--problems", str(TEST_MODULE),
                             "--out", str(tmp_path / "out")], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert summary["problems"] == 9 and summary["pass@k"]["pass@1"] == pytest.approx(5 / 9)
    assert summary["outcomes"]["compile_error"] == 2


@needs_sandbox
def test_a_deep_folder_tree_left_by_a_program_is_cleaned_and_scored(tmp_path, monkeypatch):
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    deep = ('fn main() {\n    for _ in 0..3000 {\n        std::fs::create_dir("a").unwrap();\n'
            '        std::env::set_current_dir("a").unwrap();\n    }\n    println!("done");\n}\n')
    outcome = run_rust(deep)
    assert outcome.outcome == "ok" and outcome.stdout == "done\n"
    assert list(tmp_path.iterdir()) == []  # its sandbox folder is gone


@needs_sandbox
def test_a_completion_that_is_not_unicode_text_is_that_samples_failure():
    problem = load_problems()[0]
    results = score([problem], {problem.name: ["\ud800", problem.reference]}, cut=False)[problem.name]
    assert results[0].outcome == "compile_error" and "not valid Unicode" in results[0].messages[0]
    assert results[1].outcome == "ok"


GOOD_PROBLEM = {"name": "p", "prompt": "fn f() -> u32 {", "tests": "\nfn main() { assert_eq!(f(), 1); }\n"}


@pytest.mark.parametrize("problems, completions, message", [
    ("", None, "p.jsonl: the file is empty; expected JSON Lines"),
    ("{\"name\": \"p\",\n", None, "p.jsonl:1: invalid JSON"),
    (json.dumps({**GOOD_PROBLEM, "tests": None}), None, "p.jsonl:1: missing field 'tests' (a string)"),
    (json.dumps({k: v for k, v in GOOD_PROBLEM.items() if k != "tests"}), None, "missing field 'tests'"),
    (json.dumps({**GOOD_PROBLEM, "prompt": 3}), None, "p.jsonl:1: field 'prompt' must be a string, got a number"),
    (json.dumps({**GOOD_PROBLEM, "stop_tokens": "\n}"}), None, "field 'stop_tokens' must be a list of strings"),
    (json.dumps({**GOOD_PROBLEM, "stop_tokens": [""]}), None, "'stop_tokens'[0] is an empty string"),
    (json.dumps(GOOD_PROBLEM) + "\n" + json.dumps(GOOD_PROBLEM), None,
     "p.jsonl:2: duplicate problem name 'p' (first at "),
    (json.dumps([GOOD_PROBLEM, 7], indent=2), None, "p.jsonl[1]: expected a JSON object, got a number"),
    (json.dumps(GOOD_PROBLEM), "", "c.jsonl: the file is empty"),
    (json.dumps(GOOD_PROBLEM), json.dumps({"name": "q", "completion": "1 }"}), "c.jsonl:1: no problem named 'q'"),
    (json.dumps(GOOD_PROBLEM), json.dumps({"name": "p", "completions": "1 }"}),
     "c.jsonl:1: field 'completions' must be a list of strings, got a string"),
    (json.dumps(GOOD_PROBLEM), json.dumps({"name": "p"}), "c.jsonl:1: missing field 'completion'"),
    (json.dumps(GOOD_PROBLEM), json.dumps({"completion": "1 }"}), "c.jsonl:1: missing field 'name'"),
])
def test_malformed_input_files_stop_with_one_clear_line_and_status_2(tmp_path, problems, completions, message):
    (tmp_path / "p.jsonl").write_text(problems)
    args = [sys.executable, "-m", "ternchat", "eval", "humaneval-rust", "--problems", str(tmp_path / "p.jsonl"),
            "--out", str(tmp_path / "out")]
    if completions is not None:
        (tmp_path / "c.jsonl").write_text(completions)
        args += ["--completions", str(tmp_path / "c.jsonl")]
    result = subprocess.run(args, capture_output=True, text=True)
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr and len(result.stderr.strip().splitlines()) == 1
    assert message in result.stderr


def test_a_byte_order_mark_and_a_pretty_printed_problem_are_accepted(tmp_path):
    (tmp_path / "p.json").write_bytes(b"\xef\xbb\xbf" + json.dumps(GOOD_PROBLEM, indent=2).encode())
    assert [p.name for p in load_problems(tmp_path / "p.json")] == ["p"]
