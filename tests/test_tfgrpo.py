"""Training-Free GRPO, adapted: the mixed-group filter, add/modify per task, merge/delete per batch, the library's
effect from the next step on, and frozen weights."""

import json
import subprocess
import sys

import pytest
import torch

from ternchat.model.gpt import GPT, GPTShape
from ternchat.train.tfgrpo import (Experience, Library, consolidate, group_advantage, mixed,
                                   task_operations, tfgrpo, weights_hash)
from ternchat.verify.sandbox import Limits
from ternchat.verify.tasks import generate_tasks

FAST = Limits(run_seconds=4, cpu_seconds=3, compile_seconds=60)


def test_only_mixed_groups_teach():
    assert mixed([0.0, 1.0, 0.0]) and not mixed([0.0, 0.0]) and not mixed([1.0, 1.0])


def summary(passed: bool, codes=(), message="", first_line="x"):
    return {"verdict": "passed" if passed else "did not compile", "passed": passed, "codes": list(codes),
            "message": message, "first_line": first_line}


def test_group_advantage_names_the_codes_only_failures_show():
    group = [summary(True, first_line="xs.iter().sum()"), summary(False, ["E0308", "E0599"], "mismatched types"),
             summary(False, ["E0308"], "mismatched types"), summary(True, ["E0599"])]
    advantages = group_advantage(group, per_task=2)
    assert [code for code, _ in advantages] == ["E0308"]  # E0599 also shows in a passing rollout
    assert "mismatched types" in advantages[0][1] and "`xs.iter().sum()`" in advantages[0][1]
    assert group_advantage([summary(False, ["E0308"])] * 3, 2) == []  # no passing rollout to contrast


def test_operations_add_modify_merge_delete_and_renumber():
    library = Library([Experience("E0308", "old text", support=3), Experience("E0425", "unused", support=1)])
    ops = (task_operations(library, "a", [("E0308", "new E0308"), ("E0599", "a's E0599")])
           + task_operations(library, "b", [("E0599", "b's E0599")]))
    assert [(op.option, op.key, op.target) for op in ops] == [("modify", "E0308", 0), ("add", "E0599", None),
                                                              ("add", "E0599", None)]
    new, log = consolidate(library, ops, max_experiences=2)
    assert log["modified"] == ["E0308"] and log["added"] == ["E0599"]
    assert log["merged"] == [{"key": "E0599", "from": ["add", "add"], "tasks": ["a", "b"]}]
    assert log["deleted"] == ["E0425"]  # support 1, the least
    assert [(i, e.key, e.support) for i, e in new.ids().items()] == [("G0", "E0308", 4), ("G1", "E0599", 2)]
    assert new.experiences[0].text == "new E0308" and "seen in 2 tasks" in new.experiences[1].text
    assert library.experiences[0].text == "old text"  # the step's library is not changed in place
    assert Library.from_json(new.to_json()) == new


@pytest.mark.usefixtures("sandbox_ready")
def test_the_library_takes_effect_at_the_next_step_and_weights_stay_frozen(tmp_path):
    tasks = generate_tasks()[:2]
    seen = []

    def policy(messages, task, seed):  # half the group passes, half returns a string where i64 is due (E0308)
        seen.append((seed // 1000, messages[0]["content"] if messages[0]["role"] == "system" else None))
        return task.reference + "\n}" if seed % 2 == 0 else '    "not a number"\n}'

    model = GPT(GPTShape(vocab_size=64, depth=1, d_model=32, n_heads=2, d_ff=64, seq_len=16, quant="ternary"))
    result = tfgrpo(policy, tasks, tmp_path, steps=2, tasks_per_step=2, group_size=2, per_task=1, max_experiences=4,
                    seed=0, limits=FAST, model=model, log=lambda *a: None)
    first, second = result["history"]
    assert first["mixed_groups"] == 2 and [op["option"] for op in first["operations"]] == ["add", "add"]
    assert first["changes"]["merged"][0]["key"] == "E0308" and first["experiences"] == 1
    assert all(system is None for step, system in seen if step == 0)
    assert all(system is not None and "[G0]" in system and "E0308" in system for step, system in seen if step == 1)
    assert second["operations"][0]["option"] == "modify"
    saved = json.loads((tmp_path / "experiences.json").read_text())
    assert saved["experiences"][0]["id"] == "G0" and "adapted" in saved["method"]
    assert result["weights_sha256"] == weights_hash(model)
    with torch.no_grad():
        model.lm_head.weight[0, 0] += 1
    assert weights_hash(model) != result["weights_sha256"]


@pytest.mark.usefixtures("sandbox_ready")
def test_cli_learns_a_library_and_eval_uses_it(tmp_path, pretrained_run):
    run = pretrained_run(tmp_path)
    tasks = tmp_path / "tasks.jsonl"
    from ternchat.verify.tasks import problem_row
    tasks.write_text("".join(json.dumps(problem_row(t)) + "\n" for t in generate_tasks()[:2]))
    common = [sys.executable, "-m", "ternchat"]
    learned = subprocess.run([*common, "tfgrpo", "--run", str(run), "--tasks", str(tasks), "--set", "tfgrpo.steps=1",
                              "--set", "tfgrpo.group_size=2", "--set", "tfgrpo.max_tokens=8"],
                             capture_output=True, text=True)
    assert learned.returncode == 0, learned.stderr[-2000:]
    assert "weights unchanged" in learned.stdout and "adapted" in learned.stdout
    library = run / "tfgrpo" / "experiences.json"
    scored = subprocess.run([*common, "eval", "humaneval-rust", "--run", str(run), "--problems", str(tasks),
                             "--experiences", str(library), "--max-tokens", "8", "--out", str(tmp_path / "eval")],
                            capture_output=True, text=True)
    assert scored.returncode == 0, scored.stderr[-2000:]
    assert "chat format" in scored.stdout and "experiences as the system message" in scored.stdout
