"""Training on real Rust shards: loss falls, kill -9 and resume repeats the same losses, bad input is refused."""

import json
import math
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch

from ternchat.config import load_config
from ternchat.train.checkpoint import CheckpointError, latest_checkpoint
from ternchat.train.schedule import RunLength, schedule
from ternchat.train.trainer import Trainer, TrainingError, train
from ternchat.verify.sandbox import isolation


def losses(run_dir):
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in rows if "loss" in r}


def test_forty_steps_clearly_lower_the_loss(tmp_path, overrides):
    cfg = load_config(overrides=[*overrides, "train.max_steps=40", "eval.rust_problems=true"])
    result = train(cfg, tmp_path / "run", log=lambda _: None)
    curve = losses(tmp_path / "run")
    first, last = sum(curve[s] for s in range(1, 6)) / 5, sum(curve[s] for s in range(36, 41)) / 5
    assert first > math.log(512) - 0.5  # starts near uniform
    assert last < first - 1.0, (first, last)
    assert 0 < result["val_bpb"] < 10 and result["tokens_seen"] == 40 * 8 * 64
    assert (tmp_path / "run" / "samples" / "step_000040.md").exists()
    if isolation().namespaces:  # the compiled evaluation ran on the shipped problems
        assert result["rust_problems"] >= 10 and 0 <= result["rust_compile_rate"] <= 1


def test_end_of_run_rust_eval_skips_where_programs_cannot_be_isolated(tmp_path, overrides, monkeypatch):
    bin_dir = tmp_path / "bin"  # a PATH without bubblewrap (and without rustc where there is none)
    bin_dir.mkdir()
    if shutil.which("rustc"):
        (bin_dir / "rustc").symlink_to(shutil.which("rustc"))
    monkeypatch.setenv("PATH", str(bin_dir))
    isolation.cache_clear()
    logs = []
    try:
        result = train(load_config(overrides=[*overrides, "train.max_steps=2", "eval.rust_problems=true"]),
                       tmp_path / "run", log=logs.append)
    finally:
        isolation.cache_clear()
    assert "rust_pass@1" not in result
    skipped = [line for line in logs if "skipping the compiled evaluation" in line]
    assert skipped and ("apt-get install bubblewrap" in skipped[0] or "rustc" in skipped[0])


def cli(*args, env):
    return subprocess.Popen([sys.executable, "-m", "ternchat", *args], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def test_kill_9_and_resume_gives_the_same_losses(tmp_path, overrides):
    env = dict(os.environ)
    sets = [a for o in [*overrides, "train.max_steps=14", "train.checkpoint_every=4"] for a in ("--set", o)]
    reference = cli("train", "--run-dir", str(tmp_path / "ref"), *sets, env=env)
    assert reference.wait(timeout=300) == 0, reference.stderr.read()

    victim = cli("train", "--run-dir", str(tmp_path / "cut"), *sets, env=env)
    deadline = time.time() + 300
    while not (tmp_path / "cut" / "checkpoints" / "step_000008" / "checksums.json").exists():
        assert victim.poll() is None and time.time() < deadline, "the run ended before its step-8 checkpoint"
        time.sleep(0.05)
    victim.send_signal(signal.SIGKILL)
    victim.wait()
    assert latest_checkpoint(tmp_path / "cut").name in ("step_000008", "step_000012")

    resumed = cli("train", "--run-dir", str(tmp_path / "cut"), "--resume", *sets, env=env)
    assert resumed.wait(timeout=300) == 0, resumed.stderr.read()
    expected, got = losses(tmp_path / "ref"), losses(tmp_path / "cut")
    assert sorted(got) == list(range(1, 15))
    assert got == expected  # bit-identical on CPU


def test_corrupt_checkpoint_is_refused(tmp_path, overrides):
    cfg = load_config(overrides=[*overrides, "train.max_steps=3"])
    train(cfg, tmp_path / "run", log=lambda _: None)
    weights = latest_checkpoint(tmp_path / "run") / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-100] ^= 0xFF
    weights.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="corrupt"):
        train(load_config(overrides=[*overrides, "train.max_steps=5"]), tmp_path / "run", resume=True,
              log=lambda _: None)


def test_checkpoint_of_another_model_is_refused(tmp_path, overrides):
    train(load_config(overrides=[*overrides, "train.max_steps=2"]), tmp_path / "run", log=lambda _: None)
    wider = load_config(overrides=[*overrides, "train.max_steps=4", "model.d_model=128"])
    with pytest.raises(CheckpointError, match="is for model"):
        train(wider, tmp_path / "run", resume=True, log=lambda _: None)


def test_existing_run_needs_resume(tmp_path, overrides):
    cfg = load_config(overrides=[*overrides, "train.max_steps=2"])
    train(cfg, tmp_path / "run", log=lambda _: None)
    with pytest.raises(TrainingError, match="--resume"):
        train(cfg, tmp_path / "run", log=lambda _: None)


def test_non_finite_losses_stop_the_run_and_keep_the_last_checkpoint(tmp_path, overrides):
    cfg = load_config(overrides=[*overrides, "train.max_steps=4", "train.checkpoint_every=2"])
    train(cfg, tmp_path / "run", log=lambda _: None)
    more = load_config(overrides=[*overrides, "train.max_steps=20", "train.max_bad_steps=3"])
    trainer = Trainer(more, tmp_path / "run", resume=True, log=lambda _: None)
    trainer.length = RunLength.fixed(20, 0.3)  # the checkpoint's run was 4 steps long: extend it
    with torch.no_grad():
        trainer.model.embed.weight.fill_(float("nan"))
    with pytest.raises(TrainingError, match="3 non-finite losses in a row"):
        trainer.run()
    assert latest_checkpoint(tmp_path / "run").name == "step_000004"
    bad = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
           if "nonfinite" in line]
    assert len(bad) == 3


def test_schedules():
    length = RunLength.fixed(100, 0.2)
    lrs = [schedule(s, length, 10)[0] for s in range(100)]
    assert lrs[0] == 0.1 and lrs[9] == 1.0 and lrs[50] == 1.0
    assert lrs[85] == pytest.approx(15 / 20) and lrs[99] == pytest.approx(1 / 20)
    assert schedule(40, length, 10, "bitnet_two_stage") == (1.0, 1.0)
    assert schedule(60, length, 10, "bitnet_two_stage") == (0.5, 0.0)
    unknown = RunLength()  # a time budget before the clock fixed anything: warmup, then constant
    assert [schedule(s, unknown, 10, "bitnet_two_stage")[0] for s in (0, 9, 500, 10_000)] == [0.1, 1.0, 1.0, 1.0]


class FakeClock:
    """Seconds that pass only when a training step runs: the first step of a session takes `first`."""

    def __init__(self, trainer, first=3.0, per_step=1.0, stop_at=None):
        self.now, self.first, self.per_step, self.stop_at = 0.0, first, per_step, stop_at
        trainer.clock = lambda: self.now
        real_step = trainer._train_step

        def step():
            if self.stop_at is not None and trainer.step == self.stop_at:
                raise KeyboardInterrupt  # the run is cut off here
            self.now += self.first if self.first is not None else self.per_step
            self.first = None
            return real_step()
        trainer._train_step = step


def rows(run_dir):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("kind", ["wsd", "bitnet_two_stage"])
def test_time_budget_trains_at_constant_lr_until_the_clock_fixes_the_warmdown(tmp_path, overrides, kind):
    # 0.5 min -> 27 s of training (90%); warmdown from 0.7 * 27 = 18.9 s; first step 3 s, then 1 s each.
    sets = [*overrides, "train.time_limit_min=0.5", "train.warmdown_frac=0.3", f"train.schedule={kind}"]
    trainer = Trainer(load_config(overrides=sets), tmp_path / "run", log=lambda _: None)
    FakeClock(trainer)
    result = trainer.run()
    # Clock after step s is 3 + (s - 1): it passes 18.9 at step 17, leaving 27 - 19 = 8 steps of warmdown.
    assert trainer.length.total == result["steps"] == 25 and trainer.length.warmdown_start == 17
    lrs = {r["step"]: r["lr_scale"] for r in rows(tmp_path / "run") if "loss" in r}
    scale = 0.5 if kind == "bitnet_two_stage" else 1.0
    assert [lrs[s] for s in (1, 2, 3)] == [pytest.approx(1 / 3), pytest.approx(2 / 3), 1.0]  # warmup 3
    if kind == "wsd":
        assert all(lrs[s] == 1.0 for s in range(3, 18))  # never the 'total = 1' decay while timing
    else:  # the clock passed half of 27 s at step 12: stage 2 halves the LR from the 13th step on
        assert trainer.length.stage2_start == 12
        assert all(lrs[s] == 1.0 for s in range(3, 13)) and all(lrs[s] == 0.5 for s in range(13, 18))
    assert [lrs[s] for s in range(18, 26)] == [pytest.approx(scale * (25 - i) / 8) for i in range(17, 25)]


def test_time_budget_decision_is_saved_and_a_resumed_run_repeats_it(tmp_path, overrides):
    sets = [*overrides, "train.time_limit_min=0.5", "train.checkpoint_every=5"]
    straight = Trainer(load_config(overrides=sets), tmp_path / "straight", log=lambda _: None)
    FakeClock(straight)
    straight.run()
    cut = Trainer(load_config(overrides=sets), tmp_path / "cut", log=lambda _: None)
    FakeClock(cut, stop_at=22)  # after the decision (step 17) and its checkpoint at step 20
    with pytest.raises(KeyboardInterrupt):
        cut.run()
    resumed = Trainer(load_config(overrides=sets), tmp_path / "cut", resume=True, log=lambda _: None)
    assert resumed.step == 20 and resumed.length == straight.length
    FakeClock(resumed, first=50.0)  # a slow restart does not change the fixed length
    resumed.run()
    assert losses(tmp_path / "cut") == losses(tmp_path / "straight") and len(losses(tmp_path / "cut")) == 25


def test_cli_export_and_sample(tmp_path, overrides):
    train(load_config(overrides=[*overrides, "train.max_steps=3"]), tmp_path / "run", log=lambda _: None)
    env = dict(os.environ)

    def run(*args):
        result = subprocess.run([sys.executable, "-m", "ternchat", *args], env=env, capture_output=True, text=True)
        assert result.returncode == 0, result.stderr
        return result

    exported = run("export", "--run", str(tmp_path / "run"), "--format", "packed")
    assert "MiB in fp32" in exported.stdout and (tmp_path / "run" / "model_packed.safetensors").exists()
    prompt = ["--prompt", "fn main() {", "--max-tokens", "12", "--seed", "3"]
    first = run("sample", "--run", str(tmp_path / "run"), *prompt)
    again = run("sample", "--run", str(tmp_path / "run"), *prompt)
    assert first.stdout == again.stdout and first.stdout.startswith("fn main() {")
    assert "tokens/s" in first.stderr
    packed = run("sample", "--run", str(tmp_path / "run" / "model_packed.safetensors"), *prompt)
    assert packed.stdout.startswith("fn main() {")
    refused = subprocess.run([sys.executable, "-m", "ternchat", "sample", "--run", str(tmp_path / "run"), *prompt,
                              "--speculative"], env=env, capture_output=True, text=True)
    assert refused.returncode == 2 and "needs a model trained with multi-token prediction" in refused.stderr


@pytest.mark.usefixtures("sandbox_ready")
def test_a_packed_model_file_alone_samples_and_evaluates(tmp_path, overrides):
    """The file carries its tokenizer: moved away from its run (and its tokenizer folder) it samples as
    before; a file of the earlier kind, without one, needs the folder beside it."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    from ternchat.verify.tasks import generate_tasks, problem_row

    train(load_config(overrides=[*overrides, "train.max_steps=3"]), tmp_path / "run", log=lambda _: None)
    common = [sys.executable, "-m", "ternchat"]
    exported = subprocess.run([*common, "export", "--run", str(tmp_path / "run")], capture_output=True, text=True)
    assert exported.returncode == 0, exported.stderr
    alone = tmp_path / "elsewhere" / "model.safetensors"
    alone.parent.mkdir()
    shutil.move(tmp_path / "run" / "model_packed.safetensors", alone)
    prompt = ["--prompt", "fn main() {", "--max-tokens", "12", "--seed", "3"]
    beside = subprocess.run([*common, "sample", "--run", str(alone), *prompt], capture_output=True, text=True)
    assert beside.returncode == 0, beside.stderr
    assert beside.stdout.startswith("fn main() {") and not (alone.parent / "tokenizer").exists()

    tasks = tmp_path / "tasks.jsonl"
    tasks.write_text("".join(json.dumps(problem_row(t)) + "\n" for t in generate_tasks()[:2]))
    scored = subprocess.run([*common, "eval", "humaneval-rust", "--run", str(alone), "--problems", str(tasks),
                             "--max-tokens", "8", "--out", str(tmp_path / "eval")], capture_output=True, text=True)
    assert scored.returncode == 0, scored.stderr[-2000:]
    assert "by plain completion" in scored.stdout and "pass@1" in scored.stdout

    with safe_open(str(alone), framework="pt") as f:  # the same model as a file of the earlier kind
        tensors = {k: f.get_tensor(k) for k in f.keys()}
        meta = {k: v for k, v in f.metadata().items() if k in ("format", "shape", "tokenizer_hash")}
    earlier = tmp_path / "earlier" / "model.safetensors"
    earlier.parent.mkdir()
    save_file(tensors, str(earlier), metadata=meta)
    lost = subprocess.run([*common, "sample", "--run", str(earlier), *prompt], capture_output=True, text=True)
    assert lost.returncode != 0 and "tokenizer" in lost.stderr
    shutil.copytree(tmp_path / "run" / "tokenizer", earlier.parent / "tokenizer")
    old = subprocess.run([*common, "sample", "--run", str(earlier), *prompt], capture_output=True, text=True)
    assert old.returncode == 0 and old.stdout == beside.stdout
