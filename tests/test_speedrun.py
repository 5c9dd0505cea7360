"""The speedrun's stages: pretraining from a prepared-data folder that carries SFT's material, SFT for a
time budget, and the packed model file of the last stage, with nothing of the corpus or rustc needed."""

from __future__ import annotations

import json
import shutil
import time

import pytest

from conftest import tiny_overrides
from ternchat.config import load_config
from ternchat.data.errors import DataError
from ternchat.data.pipeline import prepare_data
from ternchat.paths import ternchat_home
from ternchat.data.prepared import FUNCTIONS_FILE, TASKS_FILE, export_prepared, open_prepared
from ternchat.eval.engine import complete
from ternchat.cli import main
from ternchat.evaluation import validation_bpb
from ternchat.runs import load_model_and_tokenizer, run_stage
from ternchat.speedrun import speedrun
from ternchat.train.metrics import MetricsLog
from ternchat.train import sft as sft_module
from ternchat.train.sft import sft, sft_corpus, split_conversations
from ternchat.verify.function_data import mine_corpus, read_functions
from ternchat.verify.tasks import generate_tasks, problem_row

TASKS = 3  # carried tasks: fewer than `ternchat tasks` makes, so the SFT log tells which file was used


def _carrying_folder(tmp_path, fixture_crates, max_functions: int = 0, with_functions: bool = True):
    """A prepared folder of the fixture crates with their mined functions and a tasks file; the sources
    and the cache it was made from deleted."""
    sources = tmp_path / "sources"
    shutil.copytree(fixture_crates, sources)
    art = prepare_data(load_config(overrides=tiny_overrides([sources])), log=lambda _: None)
    if with_functions:
        mine_corpus(art.corpus_dir)
    tasks_file = tmp_path / "tasks.jsonl"
    tasks_file.write_text("".join(json.dumps(problem_row(t)) + "\n" for t in generate_tasks()[:TASKS]))
    folder = tmp_path / "prepared"
    manifest = export_prepared(folder, corpus_dir=art.corpus_dir, corpus_summary=art.corpus_summary,
                               tokenizer=art.tokenizer, shard_dir=art.shard_dir, max_functions=max_functions,
                               tasks_file=tasks_file)
    mined = read_functions(art.corpus_dir / FUNCTIONS_FILE) if with_functions else []
    shutil.rmtree(sources)
    shutil.rmtree(ternchat_home())
    return folder, manifest, mined, sources


def test_the_folder_carries_a_sample_of_the_functions_and_the_tasks(tmp_path, fixture_crates):
    folder, manifest, mined, _ = _carrying_folder(tmp_path, fixture_crates, max_functions=3)
    assert len(mined) > 3
    carried = read_functions(folder / FUNCTIONS_FILE)
    assert len(carried) == 3 == manifest["sft"]["functions"] and all(fn in mined for fn in carried)
    assert manifest["sft"]["tasks"] == TASKS and {FUNCTIONS_FILE, TASKS_FILE} <= set(manifest["files"])
    open_prepared(folder, 512)  # both are checked like the shards

    bare, bare_manifest, _, sources = _carrying_folder(tmp_path / "bare", fixture_crates, with_functions=False)
    assert bare_manifest["sft"]["functions"] == 0
    cfg = load_config(overrides=[*tiny_overrides([sources]), f"data.prepared={json.dumps(str(bare))}"])
    with pytest.raises(DataError, match="ternchat data functions"):
        sft_corpus(cfg)


def test_sft_stops_at_its_time_budget_with_the_learning_rate_decayed_over_it(tmp_path, pretrained_run):
    parent = pretrained_run(tmp_path)
    sets = ["sft.steps=100000", "sft.time_limit_min=0.02", "sft.batch_size=2", "sft.eval_every=100000",
            "sft.checkpoint_every=0", "sft.val_fraction=0.2"]
    result = sft(parent, tmp_path / "sft", generate_tasks()[:4], None, sets, log=lambda *a: None)
    assert 1 <= result["steps"] < 100000
    rows = MetricsLog(tmp_path / "sft" / "metrics.jsonl").read()
    scales = [r["lr_scale"] for r in rows if r.get("event") == "train"]
    assert len(scales) == result["steps"] and all(a > b for a, b in zip(scales, scales[1:]))
    assert scales[0] <= 0.1  # sft.lr_scale's default, decaying from the first step on
    assert [r["step"] for r in rows if r.get("event") == "val"] == [0, result["steps"]]  # the last step is evaluated


def test_held_out_passes_do_not_count_against_the_sft_budget(tmp_path, pretrained_run, monkeypatch):
    parent = pretrained_run(tmp_path)
    loss = sft_module.masked_loss

    def slow_held_out_loss(model, inputs, targets, reduction="mean"):  # held-out batches sum; each takes 0.5 s
        if reduction == "sum":
            time.sleep(0.5)
        return loss(model, inputs, targets, reduction)

    monkeypatch.setattr(sft_module, "masked_loss", slow_held_out_loss)
    # 16 conversations, 3 held out in 2 batches: each held-out pass takes over 1 s, the training budget 3 s
    sets = ["sft.steps=5", "sft.time_limit_min=0.05", "sft.batch_size=2", "sft.eval_every=1",
            "sft.checkpoint_every=0", "sft.val_fraction=0.2"]
    result = sft(parent, tmp_path / "sft", generate_tasks()[:4], None, sets, log=lambda *a: None)
    assert result["steps"] == 5  # counting the 5 held-out passes (over 5 s) the budget would have ended it by step 3
    assert result["seconds"] > 5 and result["val_conversations"] == 3


def test_the_held_out_share_is_capped():
    conversations = [[{"role": "user", "content": str(i)}] for i in range(100)]
    train, held_out = split_conversations(conversations, 0.2, seed=0, val_max=7)
    assert len(held_out) == 7 and len(train) == 93
    assert sorted(c[0]["content"] for c in train + held_out) == sorted(str(i) for i in range(100))
    assert len(split_conversations(conversations, 0.2, seed=0)[1]) == 20  # 0: no cap


def test_speedrun_pretrains_fine_tunes_and_writes_a_model_file_from_the_folder_alone(tmp_path, fixture_crates,
                                                                                      monkeypatch, capsys):
    folder, manifest, _, sources = _carrying_folder(tmp_path, fixture_crates)
    monkeypatch.setenv("TERNCHAT_HOME", str(tmp_path / "fresh_home"))  # no corpus, no tasks file here
    cfg = load_config(overrides=[*tiny_overrides([sources]), f"data.prepared={json.dumps(str(folder))}",
                                 "train.max_steps=4", "eval.report=true", "speedrun.sft=true", "speedrun.export=true",
                                 "sft.steps=3", "sft.batch_size=2", "sft.task_copies=1", "model.seq_len=256",
                                 "train.batch_size=4"])
    logs: list[str] = []
    result = speedrun(cfg, tmp_path / "runs" / "tiny", log=lambda *a: logs.append(" ".join(map(str, a))))

    assert result["steps"] == 4 and result["sft"]["steps"] == 3
    assert any(f"SFT data: {TASKS} tasks x 1 + 4 from the corpus -> " in line for line in logs), logs  # 4 mined
    assert result["sft"]["run"] == str(tmp_path / "runs" / "tiny_sft")
    model_file = tmp_path / "runs" / "tiny_sft" / "model_packed.safetensors"
    assert result["model_file"] == str(model_file) and run_stage(model_file) == "sft"
    report = (tmp_path / "runs" / "tiny" / "report.md").read_text()
    assert "## SFT" in report and "| steps | 3 in" in report and str(model_file) in report
    model, tok = load_model_and_tokenizer(model_file)  # the file alone: tokenizer inside
    assert isinstance(complete(model, tok, "fn main() {", 4, temperature=0.0), str)
    # eval bpb measures any stage as the trainer measured the pretrained model: on its final weights, the same number
    pretrained = tmp_path / "runs" / "tiny"
    assert validation_bpb(pretrained, log=logs.append)["val_bpb"] == pytest.approx(result["val_bpb"], rel=1e-6)
    sft_stage = validation_bpb(model_file, folder, batch_size=4, log=logs.append)  # from the model file alone
    assert 0 < sft_stage["val_bpb"] < 20
    assert main(["eval", "bpb", "--run", str(model_file), "--data", str(folder), "--batch-size", "4"]) == 0
    assert main(["eval", "bpb", "--run", str(model_file)]) == 1  # a file alone does not say which data
    assert "give its prepared-data folder (--data)" in capsys.readouterr().err
    assert not (tmp_path / "fresh_home").exists() or not any((tmp_path / "fresh_home").rglob("*.jsonl"))
