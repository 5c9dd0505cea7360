"""Supervised fine-tuning: conversations from tasks and corpus functions, the assistant-only loss, a tiny
run that learns, resumes exactly and records FIRE at the switch."""

import json
import shutil

import pytest
from safetensors.torch import load_file
import torch

from ternchat.data.chat import render_conversation
from ternchat.runs import run_stage
from ternchat.train.checkpoint import latest_checkpoint
from ternchat.train.sft import IGNORE, conversation_batch, sft, task_conversation
from ternchat.verify.tasks import generate_tasks

def test_batches_train_on_the_replies_only(task_tokenizer):
    tok = task_tokenizer
    task = generate_tasks()[0]
    items = [render_conversation(task_conversation(task), tok), render_conversation(task_conversation(task, "  0"), tok)]
    x, y = conversation_batch(items, seq_len=512, pad_id=0)
    ids, mask = items[0]
    assert x.shape == y.shape == (2, max(len(i) for i, _ in items) - 1)
    kept = [int(t) for t in y[0] if t != IGNORE]
    assert kept == [t for t, m in zip(ids[1:], mask[1:]) if m]
    assert tok.decode(kept) == task.reference + "\n}<|assistant_end|>"
    assert (y[1, len(items[1][0]) - 1:] == IGNORE).all()  # padding
    short, _ = conversation_batch(items, seq_len=8, pad_id=0)
    assert short.shape[1] == 8


SETS = ["sft.steps=16", "sft.batch_size=4", "sft.eval_every=4", "sft.checkpoint_every=8", "sft.lr_scale=1.0",
        "sft.val_fraction=0.2", "sft.task_copies=2"]


def test_sft_learns_resumes_exactly_and_marks_its_stage(tmp_path, pretrained_run):
    parent, tasks = pretrained_run(tmp_path), generate_tasks()[:12]
    full = sft(parent, tmp_path / "full", tasks, None, SETS, log=lambda *a: None)
    assert full["steps"] == 16 and full["val_conversations"] == 4
    vals = full["val_losses"]
    assert len(vals) == 5 and vals[-1] < 0.8 * vals[0]  # held-out reply loss falls
    assert run_stage(tmp_path / "full") == "sft" and run_stage(parent) == "pretrain"
    state = json.loads((latest_checkpoint(tmp_path / "full") / "trainer.json").read_text())
    assert state["parent"] == str(parent) and state["step"] == 16

    cut = tmp_path / "cut"
    sft(parent, cut, tasks, None, SETS, log=lambda *a: None)
    shutil.rmtree(latest_checkpoint(cut))  # interrupted after the checkpoint at step 8
    assert latest_checkpoint(cut).name.endswith("8")
    sft(parent, cut, tasks, None, SETS, resume=True, log=lambda *a: None)
    a = load_file(latest_checkpoint(tmp_path / "full") / "model.safetensors")
    b = load_file(latest_checkpoint(cut) / "model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)
    with pytest.raises(Exception, match="already has checkpoints"):
        sft(parent, cut, tasks, None, SETS, log=lambda *a: None)


def test_fire_at_the_switch_is_applied_and_logged(tmp_path, pretrained_run):
    parent, tasks = pretrained_run(tmp_path), generate_tasks()[:4]
    result = sft(parent, tmp_path / "fired", tasks, None, [*SETS, "sft.steps=1", "fire.at_sft=true"],
                 log=lambda *a: None)
    from ternchat.train.fire import fire_targets
    from ternchat.train.stage import load_pretrained
    assert result["fire"]["mode"] == "exact"
    assert result["fire"]["matrices"] == len(fire_targets(load_pretrained(parent)[1])) > 0
    events = [json.loads(line) for line in (tmp_path / "fired" / "metrics.jsonl").read_text().splitlines()]
    assert events[0]["event"] == "fire" and 0 < events[0]["ternary_codes_flipped"] < 1


@pytest.mark.parametrize("command", ["sft", "rl", "tfgrpo"])
def test_stages_refuse_a_run_without_checkpoints_before_doing_anything(tmp_path, command):
    import subprocess
    import sys

    result = subprocess.run([sys.executable, "-m", "ternchat", command, "--run", str(tmp_path / "missing")],
                            capture_output=True, text=True, env={"TERNCHAT_HOME": str(tmp_path / "home"),
                                                                 "PATH": "/usr/bin:/bin"})
    assert result.returncode == 1 and "has no checkpoint to start from" in result.stderr
    assert not (tmp_path / "home").exists()  # no tasks or data were built first
