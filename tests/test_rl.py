"""GRPO with the compiler: sandbox rewards, the reply-only mask, and a tiny run end to end."""

import json

import pytest
import torch

from ternchat.runs import run_stage
from ternchat.train.rl import reward_of, rl, sequences_batch
from ternchat.verify.humaneval import score
from ternchat.verify.sandbox import Limits
from ternchat.verify.tasks import generate_tasks

FAST = Limits(run_seconds=4, cpu_seconds=3, compile_seconds=60)


def test_batch_masks_the_reply_tokens_only():
    x, y, mask = sequences_batch([[1, 2, 3], [1, 2]], [[7, 8], [9]], pad_id=0)
    assert x.tolist() == [[1, 2, 3, 7], [1, 2, 0, 0]]
    assert y.tolist() == [[2, 3, 7, 8], [2, 9, 0, 0]]
    assert mask.tolist() == [[0, 0, 1, 1], [0, 1, 0, 0]]  # targets 7, 8 and 9: the replies
    x, y, mask = sequences_batch([[1, 2, 3]], [[7, 8]], pad_id=0, seq_len=3)  # the oldest prompt token goes
    assert x.tolist() == [[2, 3, 7]] and y.tolist() == [[3, 7, 8]] and mask.tolist() == [[0, 1, 1]]


@pytest.mark.usefixtures("sandbox_ready")
def test_rewards_come_from_the_sandbox():
    task = generate_tasks()[0]
    replies = [task.reference + "\n}", "    Default::default()\n}", "    this is not rust\n}"]
    outcomes = score([task], {task.name: replies}, limits=FAST)[task.name]
    assert [reward_of(o, 0.25) for o in outcomes] == [1.0, 0.25, 0.0]
    assert [reward_of(o, 0.0) for o in outcomes] == [1.0, 0.0, 0.0]


@pytest.mark.usefixtures("sandbox_ready")
def test_a_tiny_rl_run_samples_scores_updates_and_resumes(tmp_path, pretrained_run):
    parent, tasks = pretrained_run(tmp_path), generate_tasks()[:4]
    sets = ["rl.steps=2", "rl.prompts_per_step=2", "rl.group_size=2", "rl.max_tokens=12", "rl.checkpoint_every=1",
            "rl.kl_coef=0.1"]
    result = rl(parent, tmp_path / "rl", tasks, sets, limits=FAST, log=lambda *a: None)
    assert result["steps"] == 2 and run_stage(tmp_path / "rl") == "rl"
    rows = [json.loads(line) for line in (tmp_path / "rl" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2]
    assert all(0 <= r["mean_reward"] <= 1 and 0 <= r["compile_rate"] <= 1 and r["tokens"] > 0 and torch.isfinite(torch.tensor(r["loss"]))
               for r in rows)
    again = rl(parent, tmp_path / "rl", tasks, [*sets, "rl.steps=3"], resume=True, limits=FAST, log=lambda *a: None)
    assert again["steps"] == 3 and [h["step"] for h in again["history"]] == [3]
