"""An evaluation people can read: each outcome row carries the completion and the program compiled, the
summary names the most common rustc errors with an example each, the sampling settings, and the share of
completions whose body is only a placeholder (todo!(), Default::default(), ...)."""

import json
import subprocess
import sys

import pytest

from ternchat.verify.humaneval import is_placeholder, load_problems
from ternchat.verify.metrics import summarize, write_reports
from ternchat.verify.sandbox import Outcome

needs_sandbox = pytest.mark.usefixtures("sandbox_ready")  # rustc and bubblewrap's namespaces


@pytest.mark.parametrize("body, placeholder", [
    ("    todo!()\n", True), ("    unimplemented!(\"later\");\n}", True), ("    Default::default()\n", True),
    ("    panic!(\"no {}\", (1))\n", True), ("    Vec::<i32>::default()\n", True), ("    unreachable!()", True),
    ("    <T as Default>::default()\n", True), ("  // not yet\n  todo!();\n", True), ("\n", True),
    ("    n * 2\n", False), ("    if n < 2 { return n; }\n    todo!()\n", False), ("    x.default()\n", False),
])
def test_placeholder_bodies_are_recognised(body, placeholder):
    assert is_placeholder(body) is placeholder


def test_summary_counts_placeholders_and_gives_an_example_per_error(tmp_path):
    mismatch = "error[E0308]: mismatched types\n --> main.rs:3:5"
    results = {"a": [Outcome("ok", "run"), Outcome("runtime_error", "run")],
               "b": [Outcome("compile_error", "compile", error_codes=["E0308"], messages=[mismatch]),
                     Outcome("compile_error", "compile", error_codes=["E0425", "E0308"],
                             messages=["error[E0425]: cannot find value `x`", mismatch])]}
    bodies = {"a": ["    1\n", "    todo!()\n"], "b": ["    \"s\"\n", "    x\n"]}
    summary = summarize(results, [1], bodies=bodies, settings={"temperature": 0.8})
    assert summary["placeholder_share"] == 0.25
    assert summary["compile_rate"] == 0.5 and summary["compile_rate_without_placeholders"] == pytest.approx(1 / 3)
    assert [e["code"] for e in summary["common_errors"]] == ["E0308", "E0425"]
    assert summary["common_errors"][0] == {"code": "E0308", "count": 2,
                                           "example": {"name": "b", "sample": 0, "message": mismatch}}
    write_reports(results, summary, tmp_path, "t", bodies, {n: [f"prog {n}{i}" for i in range(2)] for n in bodies})
    rows = [json.loads(line) for line in (tmp_path / "outcomes.jsonl").read_text().splitlines()]
    assert [(r["completion"], r["program"]) for r in rows][1] == ("    todo!()\n", "prog a1")
    text = (tmp_path / "summary.md").read_text()
    assert "Completions: temperature 0.8" in text and "E0308** (2x), b sample 0" in text and "mismatched types" in text


@needs_sandbox
def test_the_cli_report_shows_what_was_written_and_why_it_failed(tmp_path):
    problem = load_problems()[0]
    completions = [problem.reference, "    todo!()\n", "    \"not a number\"\n"]
    (tmp_path / "c.jsonl").write_text(json.dumps({"name": problem.name, "completions": completions}) + "\n")
    result = subprocess.run([sys.executable, "-m", "ternchat", "eval", "humaneval-rust", "--completions",
                             str(tmp_path / "c.jsonl"), "--out", str(tmp_path / "out")], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    rows = [json.loads(line) for line in (tmp_path / "out" / "outcomes.jsonl").read_text().splitlines()]
    assert [r["completion"] for r in rows] == [c for c in completions]  # no stop token inside them
    assert all(r["program"].startswith(problem.prompt) and problem.tests in r["program"] for r in rows)
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert summary["placeholder_share"] == pytest.approx(1 / 3)
    assert summary["common_errors"][0]["code"] == "E0308"
    assert "E0308" in summary["common_errors"][0]["example"]["message"]
    assert summary["settings"] == {"completions": str(tmp_path / "c.jsonl")}


def test_batched_completions_equal_one_at_a_time_and_generate_only_keeps_the_settings(tmp_path, pretrained_run):
    from ternchat.evaluation import evaluate, model_completions

    run, problems = pretrained_run(tmp_path), load_problems("rust_basics")[:3]
    quiet = lambda *a: None  # noqa: E731
    args = (run, problems, 2, 0.8, 12, 5, None, None)
    batched, settings = model_completions(*args, batch_size=4, log=quiet)
    alone, _ = model_completions(*args, batch_size=1, log=quiet)
    assert batched == alone  # seeded per sample: the same draws (a boundary case would be ~1e-6 away)
    assert settings["temperature"] == 0.8 and settings["batch"] == 4

    made = evaluate("rust_basics", run=run, samples=2, temperature=0.8, max_tokens=12, seed=5, out=tmp_path / "gen",
                    generate_only=True, log=quiet)
    rows = [json.loads(line) for line in open(made["completions"])]
    assert {r["name"]: r["completions"] for r in rows[:3]} == batched
    assert json.loads((tmp_path / "gen" / "completions_settings.json").read_text())["samples per problem"] == 2


@needs_sandbox
def test_scoring_generated_completions_reports_how_they_were_made(tmp_path):
    from ternchat.evaluation import SETTINGS_FILE, evaluate

    problems = load_problems("rust_basics")[:2]
    folder = tmp_path / "gen"
    folder.mkdir()
    (folder / "completions.jsonl").write_text("".join(
        json.dumps({"name": p.name, "completions": [p.reference, "    todo!()\n}"]}) + "\n" for p in problems))
    (folder / SETTINGS_FILE).write_text(json.dumps({"temperature": 0.8, "top-p": 0.95}))
    summary = evaluate("rust_basics", completions_file=folder / "completions.jsonl", out=tmp_path / "scored",
                       ks=[1, 2], log=lambda *a: None)
    assert summary["settings"]["temperature"] == 0.8 and summary["settings"]["top-p"] == 0.95
    assert summary["placeholder_share"] == 0.5
