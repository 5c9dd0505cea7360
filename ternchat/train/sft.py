"""Supervised fine-tuning (SFT): the chat stage after pretraining, as nanochat's `chat_sft.py` runs it.

The data is conversations in the chat format (data/chat.py). The user gives a Rust function's doc
comment and signature; the assistant writes its body and closing brace. There are two sources:
- the training tasks (verify/tasks.py, sandbox-verified, never the evaluation problems), each
  repeated `sft.task_copies` times per epoch since they are few;
- conversations mined from the pretraining corpus's train split (verify/function_data.py): documented
  functions (doc and signature in, body out) and their doc-test examples, none resembling an
  evaluation problem; the miner's `functions.jsonl` when `ternchat data functions` wrote one.

The loss is the cross-entropy of the assistant's tokens only (the mask of `render_conversation`),
averaged over those tokens in the batch. Conversations are padded to the longest in the batch and cut
at the model's context. A seeded share (`sft.val_fraction`, at most `sft.val_max` conversations) is held
out, and its loss is logged every `sft.eval_every` steps. That held-out curve is how plasticity is
compared with and without FIRE.

The run starts from a pretrained run's latest checkpoint, with its latent weights, tokenizer and
optimizers (learning rates times `sft.lr_scale`, decayed linearly to 0 over `sft.steps`, or over
`sft.time_limit_min` of training when that ends first: the held-out passes do not count, so that they
cannot eat a short budget; a resumed run's budget counts from the resume). With `[fire] at_sft` the
weights first go through FIRE. It writes a new run folder, with checkpoints in the
trainer's format, metrics.jsonl, the tokenizer, and config.toml whose `trainer.json` says `stage = "sft"`, so
`ternchat eval --run` prompts it in the chat format. `--resume` continues from its latest checkpoint.
"""

from __future__ import annotations

import math
import random
import time
from pathlib import Path
from typing import Sequence

import torch
import torch.nn.functional as F
from tqdm import tqdm

from ternchat.config import Config
from ternchat.data.chat import render_conversation
from ternchat.data.errors import DataError
from ternchat.data.pipeline import prepare_data
from ternchat.data.prepared import FUNCTIONS_FILE
from ternchat.model.gpt import GPT
from ternchat.train.errors import RunError
from ternchat.train.stage import start_stage, step_items
from ternchat.train.step import autocast_for, optimizer_step
from ternchat.verify.function_data import corpus_conversations
from ternchat.verify.humaneval import Problem

IGNORE = -100  # F.cross_entropy's ignore_index


def task_conversation(problem: Problem, reply: str | None = None) -> list[dict]:
    """A task as a conversation: its prompt (doc comment and signature) in, the body and `}` out."""
    body = problem.reference if reply is None else reply
    return [{"role": "user", "content": problem.prompt}, {"role": "assistant", "content": body.rstrip() + "\n}"}]


def conversation_batch(items: Sequence[tuple[list[int], list[int]]], seq_len: int,
                       pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(inputs, targets) of padded conversations; targets are IGNORE except at the assistant's tokens."""
    length = min(seq_len, max(len(ids) - 1 for ids, _ in items))
    inputs = torch.full((len(items), length), pad_id, dtype=torch.long)
    targets = torch.full((len(items), length), IGNORE, dtype=torch.long)
    for row, (ids, mask) in enumerate(items):
        ids, mask = ids[:length + 1], mask[:length + 1]
        n = len(ids) - 1
        inputs[row, :n] = torch.tensor(ids[:-1])
        targets[row, :n] = torch.tensor([t if m else IGNORE for t, m in zip(ids[1:], mask[1:])])
    return inputs, targets


def masked_loss(model: GPT, inputs: torch.Tensor, targets: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
    """Cross-entropy (mean or sum) over the target tokens that are not IGNORE (the next-token head only)."""
    logits = model(inputs).float()
    return F.cross_entropy(logits.view(-1, logits.shape[-1]), targets.reshape(-1), ignore_index=IGNORE,
                           reduction=reduction)


def split_conversations(conversations: list[list[dict]], val_fraction: float, seed: int, val_max: int = 0
                        ) -> tuple[list[list[dict]], list[list[dict]]]:
    """(train, held out): a seeded share `val_fraction` held out, at most `val_max` conversations (0 = no cap)."""
    order = list(range(len(conversations)))
    random.Random(seed).shuffle(order)
    n_val = int(len(order) * val_fraction)
    if val_max:
        n_val = min(n_val, val_max)
    return [conversations[i] for i in order[n_val:]], [conversations[i] for i in order[:n_val]]


def sft_corpus(cfg: Config) -> Path:
    """Where SFT's mined functions come from for a run with config `cfg`: its prepared-data folder's
    functions.jsonl, or the corpus (its functions.jsonl, else mined from its train split)."""
    if not cfg.data.prepared:
        return prepare_data(cfg, until="corpus").corpus_dir
    folder = Path(cfg.data.prepared)
    if not (folder / FUNCTIONS_FILE).exists():
        raise DataError(f"data.prepared = {folder} carries no {FUNCTIONS_FILE}: run `ternchat data functions` "
                        "where the corpus is and export the folder again, or give --no-corpus (tasks only)")
    return folder


def sft(parent: Path, out: Path, tasks: Sequence[Problem], corpus_dir: Path | None, overrides: Sequence[str] = (),
        resume: bool = False, log=print) -> dict:
    """Fine-tune `parent`'s model on chat conversations into the run folder `out` (module docstring)."""
    stage = start_stage("sft", parent, out, overrides, resume, log)
    cfg, model, tok, optimizer, device = stage.cfg, stage.model, stage.tok, stage.optimizer, stage.device
    s = cfg.sft
    conversations = [task_conversation(p) for p in tasks for _ in range(s.task_copies)]
    mined = corpus_conversations(corpus_dir, s.corpus_conversations, s.seed) if corpus_dir else []
    train_set, val_set = split_conversations(conversations + mined, s.val_fraction, s.seed, s.val_max)
    if not train_set:
        raise DataError("no SFT conversations: give training tasks or a corpus with documented functions")
    seq_len = model.shape.seq_len
    rendered = {name: [render_conversation(c, tok) for c in convs] for name, convs in (("train", train_set),
                                                                                       ("val", val_set))}
    # a conversation whose reply starts past the context has no token to learn from (and a batch of only
    # such would average the loss over nothing)
    train_items, val_items = ([(ids, mask) for ids, mask in items if any(mask[1:seq_len + 1])]
                              for items in rendered.values())
    cut = len(rendered["train"]) + len(rendered["val"]) - len(train_items) - len(val_items)
    log(f"SFT data: {len(tasks)} tasks x {s.task_copies} + {len(mined)} from the corpus -> {len(train_items)} "
        f"training and {len(val_items)} held-out conversations"
        + (f" ({cut} left out: their reply starts past the {seq_len}-token context)" if cut else ""))
    if not train_items:
        raise DataError(f"no SFT conversation has its reply within the model's {seq_len}-token context")
    pad = tok.special("<|assistant_end|>")
    autocast = autocast_for(cfg.train.dtype, device)

    def batch_at(i: int) -> tuple[torch.Tensor, torch.Tensor]:
        x, y = conversation_batch(step_items(train_items, s.batch_size, i, s.seed), model.shape.seq_len, pad)
        return x.to(device), y.to(device)

    @torch.no_grad()
    def held_out_loss() -> float | None:
        if not val_items:
            return None
        model.eval()
        total, count = 0.0, 0
        for i in range(0, len(val_items), s.batch_size):
            x, y = conversation_batch(val_items[i:i + s.batch_size], model.shape.seq_len, pad)
            x, y = x.to(device), y.to(device)
            with autocast:
                total += masked_loss(model, x, y, reduction="sum").item()
            count += int((y != IGNORE).sum())
        model.train()
        return total / max(count, 1)

    if stage.step == 0:
        stage.metrics.write(step=0, event="val", val_loss=held_out_loss())
    model.train()
    start, losses = time.perf_counter(), []
    budget, held_out_seconds = s.time_limit_min * 60, 0.0

    def progress() -> float:  # the share of the run done: of its steps, or of its training-time budget if nearer
        trained = time.perf_counter() - start - held_out_seconds
        return max(stage.step / s.steps, trained / budget if budget else 0.0)

    bar = tqdm(total=s.steps, initial=stage.step, desc="sft", unit="step")
    while stage.step < s.steps and progress() < 1:
        lr_scale = s.lr_scale * (1 - progress())
        optimizer.set_schedule(lr_scale)
        loss = optimizer_step(lambda x, y: masked_loss(model, x, y), model, optimizer, [batch_at(stage.step)], 1,
                              autocast, 0.0, device)
        if not math.isfinite(loss):  # the update was skipped; stop before a checkpoint keeps anything
            raise RunError(f"SFT loss is {loss} at step {stage.step}; lower sft.lr_scale")
        stage.step += 1
        losses.append(loss)
        stage.metrics.write(step=stage.step, event="train", loss=losses[-1], lr_scale=lr_scale)
        bar.update(1)
        bar.set_postfix(loss=f"{losses[-1]:.3f}")
        last = stage.step == s.steps or progress() >= 1
        if stage.step % s.eval_every == 0 or last:
            held_out_start = time.perf_counter()
            stage.metrics.write(step=stage.step, event="val", val_loss=held_out_loss())
            held_out_seconds += time.perf_counter() - held_out_start
        if s.checkpoint_every and stage.step % s.checkpoint_every == 0 and not last:
            stage.save()
    bar.close()
    stage.save()
    vals = [r["val_loss"] for r in stage.metrics.read() if r.get("event") == "val" and r.get("val_loss") is not None]
    return {"run": str(out), "steps": stage.step, "seconds": time.perf_counter() - start,
            "final_train_loss": losses[-1] if losses else None, "val_losses": vals,
            "train_conversations": len(train_items), "val_conversations": len(val_items), "fire": stage.fire_report}
