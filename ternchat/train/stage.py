"""A post-training stage's run folder: what SFT and RL share.

A stage starts from another run's latest checkpoint (its latent weights, tokenizer and config), emits
the trainer event `stage_switch` (FIRE acts there with [fire] at_sft / at_rl), and writes a new run
folder: checkpoints in the trainer's format, whose `trainer.json` names the stage and the parent run,
metrics.jsonl, the tokenizer and config.toml.
`ternchat eval`, `sample` and `export` read it like any run. With `resume` it continues from the
folder's own latest checkpoint (weights, optimizer state and RNG), and metrics past that step are
dropped, since the run repeats them.
"""

from __future__ import annotations

import random
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import torch

from ternchat.config import Config, load_config
from ternchat.data.prepared import TASKS_FILE
from ternchat.data.tokenizer import Tokenizer
from ternchat.model.gpt import GPT
from ternchat.optim.factory import CombinedOptimizer, build_optimizer
from ternchat.train.checkpoint import latest_checkpoint, load_checkpoint, load_run_checkpoint, save_checkpoint
from ternchat.train.distributed import Ranks
from ternchat.train.errors import RunError
from ternchat.train.events import stage_events
from ternchat.train.metrics import MetricsLog
from ternchat.verify.humaneval import Problem
from ternchat.verify.tasks import training_tasks


def step_items(items: Sequence, per_step: int, step: int, seed: int) -> list:
    """Step `step`'s items: consecutive slices of a seeded order, reshuffled each epoch, so a resumed run
    draws exactly what the uninterrupted one would have."""
    per_epoch = max(1, len(items) // per_step)
    epoch, k = divmod(step, per_epoch)
    order = list(range(len(items)))
    random.Random(f"{seed}:{epoch}").shuffle(order)
    return [items[i] for i in order[k * per_step:(k + 1) * per_step]]


def stage_tasks(cfg: Config, tasks_file: Path | None, allow_unisolated: bool, log=print) -> list[Problem]:
    """The training tasks of a stage of a run with config `cfg`: `tasks_file`; else those of the run's
    prepared-data folder, which carries them so that no rustc is needed; else `ternchat tasks`' file,
    built (with rustc) on first use."""
    carried = Path(cfg.data.prepared) / TASKS_FILE if cfg.data.prepared else None
    if tasks_file is None and carried is not None and carried.exists():
        tasks_file = carried
    return training_tasks(tasks_file, allow_unisolated, log)


def load_pretrained(run_dir: Path) -> tuple[Config, GPT, Tokenizer, dict]:
    """A run's config, latent model (BitLinears with their full-precision weights), tokenizer and trainer state."""
    model, state = load_run_checkpoint(run_dir)
    cfg = load_config(run_dir / "config.toml") if (run_dir / "config.toml").exists() else load_config()
    return cfg, model, Tokenizer.load(run_dir / "tokenizer"), state


@dataclass
class Stage:
    name: str
    parent: Path
    out: Path
    cfg: Config
    model: GPT
    tok: Tokenizer
    optimizer: CombinedOptimizer
    metrics: MetricsLog
    device: torch.device
    step: int
    parent_state: dict
    fire_report: dict | None

    def save(self) -> Path:
        return save_checkpoint(self.out, self.step, self.model.state_dict(), self.optimizer.state_dict(),
                               {"step": self.step, "stage": self.name, "parent": str(self.parent),
                                "parent_step": self.parent_state.get("step"),
                                "model_shape": self.parent_state["model_shape"]})


def start_stage(name: str, parent: Path, out: Path, overrides: Sequence[str], resume: bool, log=print) -> Stage:
    """Load `parent`, apply FIRE when the config's `fire.at_<name>` says so (a new run only), and open or
    resume the run folder `out`."""
    parent, out = Path(parent), Path(out)
    if latest_checkpoint(out) is not None and not resume:
        raise RunError(f"{out} already has checkpoints; pass --resume to continue it, or choose another --out")
    _, model, tok, parent_state = load_pretrained(parent)
    saved = out / "config.toml" if resume and (out / "config.toml").exists() else parent / "config.toml"
    cfg = load_config(saved if saved.exists() else None, overrides)
    switched = {} if resume else stage_events(cfg, name).emit("stage_switch", cfg, model=model, stage=name, log=log)
    fire_report = switched.get("fire")
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model.to(device)
    optimizer = build_optimizer(model, cfg.optim, Ranks())
    metrics = MetricsLog(out / "metrics.jsonl")
    step = 0
    checkpoint = latest_checkpoint(out) if resume else None
    if checkpoint is not None:
        step = load_checkpoint(checkpoint, model, optimizer, model.shape)["step"]
        metrics.truncate_after(step)
        log(f"resumed {out} at step {step}")
    else:
        out.mkdir(parents=True, exist_ok=True)
        shutil.copytree(parent / "tokenizer", out / "tokenizer", dirs_exist_ok=True)
        (out / "config.toml").write_text(cfg.to_toml())
        metrics.path.unlink(missing_ok=True)
        if fire_report is not None:
            metrics.write(step=0, event="fire", **fire_report)
    return Stage(name, parent, out, cfg, model, tok, optimizer, metrics, device, step, parent_state, fire_report)
