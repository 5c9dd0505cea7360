"""Training tasks for post-training: they pass with their references in the sandbox, their tests reject a
default body, and none resembles an evaluation problem."""

import json
from pathlib import Path

import pytest

from ternchat.verify.humaneval import SHIPPED, Problem, load_problems
from ternchat.verify.sandbox import Limits
from ternchat.verify.tasks import (duplicates_of_evaluation, generate_tasks, problem_row, similarity,
                                   verify_tasks)

SHARED_HUMANEVAL = Path(__file__).resolve().parents[2] / "shared" / "data" / "humaneval-rs.jsonl"


def evaluation_problems() -> list[Problem]:
    return load_problems(SHIPPED) + (load_problems(SHARED_HUMANEVAL) if SHARED_HUMANEVAL.exists() else [])


@pytest.mark.usefixtures("sandbox_ready")
def test_every_task_passes_with_its_reference_and_fails_with_a_default_body():
    tasks = generate_tasks()
    assert len(tasks) >= 40 and len({t.name for t in tasks}) == len(tasks)
    assert verify_tasks(tasks, limits=Limits(run_seconds=4, cpu_seconds=3, compile_seconds=60)) == {}


def test_no_task_resembles_an_evaluation_problem():
    assert duplicates_of_evaluation(generate_tasks(), evaluation_problems()) == {}


def test_resemblance_is_caught_by_name_and_by_description():
    task = generate_tasks()[0]  # sum_multiples_of_2
    same_name = Problem("eval_a", task.prompt.replace("Return the sum", "Compute the total"), "}", ("\n}",))
    inside = Problem("eval_b", "/// Something else entirely.\nfn sum_multiples(xs: Vec<i64>) -> i64 {\n", "}", ("\n}",))
    reworded = Problem("eval_c", "/// Return the sum of the elements of `xs` that are divisible by 2 or 3.\n"
                                 "fn add_up(xs: Vec<i64>) -> i64 {\n", "}", ("\n}",))
    unrelated = Problem("eval_d", "/// Count the vowels in a word.\nfn vowels(s: String) -> i64 {\n", "}", ("\n}",))
    found = duplicates_of_evaluation([task], [unrelated])
    assert found == {}
    for problem, reason in ((same_name, "name"), (inside, "name"), (reworded, "description")):
        found = duplicates_of_evaluation([task], [problem])
        assert reason in found[task.name] and problem.name in found[task.name]
    assert similarity("return the sum of the squares", "return the sum of the squares") == 1.0


def test_tasks_are_seeded_and_load_back_as_problems(tmp_path):
    first, again, other = generate_tasks(0), generate_tasks(0), generate_tasks(1)
    assert first == again
    assert [t.tests for t in first] != [t.tests for t in other] and [t.name for t in first] == [t.name for t in other]
    path = tmp_path / "tasks.jsonl"
    path.write_text("".join(json.dumps(problem_row(t)) + "\n" for t in first))
    assert load_problems(path) == first
