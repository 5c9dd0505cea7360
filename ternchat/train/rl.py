"""GRPO with the compiler: the RL stage after SFT (`ternchat rl`), as nanochat's `chat_rl.py` runs it, with
rewards from the rustc sandbox.

Each step takes `rl.prompts_per_step` training tasks (verify/tasks.py; never the evaluation problems) in a
seeded order. For each task it samples a group of `rl.group_size` replies to the task's chat prompt from
the current policy (on-policy, temperature `rl.temperature`). Every reply is scored in the sandbox the
way the evaluation scores completions: cut at the stop tokens, compiled with the task's tests, run.
- The reward is 1 when the tests pass, `rl.compile_reward` when the program compiled but failed (partial
  credit, 0 to turn it off), and 0 otherwise.
- While one group is scored by the sandbox pool, the next group is generated.
- The advantages are r - mean(r) within each group, as in nanochat, or divided by the group's std with
  `rl.normalize_std`, the paper's form. Groups whose rewards are all equal add nothing.
- The loss is `grpo_loss` (train/grpo.py) over the reply tokens only, including the <|assistant_end|> that
  ended a reply. With `rl.kl_coef` > 0 the paper's k3 KL to the starting policy is added, which keeps a
  frozen copy of it.
- One update follows each step's samples.

The run starts from an SFT run (or any run) and writes a new run folder (train/stage.py), FIRE first
with `[fire] at_rl`. metrics.jsonl logs each step's mean reward, pass rate and compile rate.

Not built: RLEF's multi-turn episodes (compiler errors of public tests fed back as a user turn).
"""

from __future__ import annotations

import contextlib
import copy
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Sequence

import torch
from tqdm import tqdm

from ternchat.data.chat import completion_prompt
from ternchat.eval.engine import decodes_in_batches, generate, generate_batch
from ternchat.train.errors import RunError
from ternchat.train.grpo import group_advantages, grpo_loss, token_logprobs
from ternchat.train.stage import start_stage, step_items
from ternchat.train.step import autocast_for, optimizer_step
from ternchat.verify.humaneval import Problem, score
from ternchat.verify.sandbox import Limits, Outcome


def task_messages(task: Problem) -> list[dict]:
    return [{"role": "user", "content": task.prompt}]


def reward_of(outcome: Outcome, compile_reward: float) -> float:
    if outcome.outcome == "ok":
        return 1.0
    compiled = outcome.phase == "run" and outcome.outcome != "sandbox_error"
    return compile_reward if compiled else 0.0


def sample_group(model, tok, task: Problem, size: int, max_tokens: int, temperature: float, seed: int
                 ) -> tuple[list[int], list[list[int]], list[str]]:
    """The chat prompt's ids, and `size` sampled replies (reply i seeded `seed + i`, the group decoded as one
    batch): their token ids (with <|assistant_end|> where the model ended the reply) and their text."""
    prompt = completion_prompt(task_messages(task), tok)
    end = tok.special("<|assistant_end|>")
    stop_ids = [end, tok.eod_id]
    if decodes_in_batches(model):
        sampled = generate_batch(model, [prompt] * size, max_tokens, temperature=temperature,
                                 seeds=[seed + i for i in range(size)], stop_ids=stop_ids)
    else:  # Q-exit decides per token: one reply at a time
        sampled = [list(generate(model, prompt, max_tokens, temperature=temperature, seed=seed + i,
                                 stop_ids=stop_ids)) for i in range(size)]
    texts = [tok.decode(ids) for ids in sampled]
    replies = [ids + [end] if len(ids) < max_tokens else ids for ids in sampled]
    return prompt, replies, texts


def sequences_batch(prompts: Sequence[list[int]], replies: Sequence[list[int]], pad_id: int, seq_len: int = 1 << 30
                    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(inputs, targets, mask) of prompt + reply rows, padded; mask 1 where the target is a reply token. A
    prompt loses its oldest tokens where its row would not fit the context, as it did at generation."""
    prompts = [p[max(0, len(p) + len(r) - 1 - seq_len):] for p, r in zip(prompts, replies)]
    rows = [p + r for p, r in zip(prompts, replies)]
    length = max(len(r) for r in rows) - 1
    inputs = torch.full((len(rows), length), pad_id, dtype=torch.long)
    targets = torch.full((len(rows), length), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), length))
    for i, (p, r) in enumerate(zip(prompts, replies)):
        row = p + r
        inputs[i, :len(row) - 1] = torch.tensor(row[:-1])
        targets[i, :len(row) - 1] = torch.tensor(row[1:])
        mask[i, len(p) - 1:len(row) - 1] = 1.0
    return inputs, targets, mask


def rl(parent: Path, out: Path, tasks: Sequence[Problem], overrides: Sequence[str] = (), resume: bool = False,
       limits: Limits = Limits(), workers: int = 0, log=print) -> dict:
    """GRPO on `tasks` with sandbox rewards, from `parent` into the run folder `out` (module docstring)."""
    if not tasks:
        raise RunError("RL needs training tasks (ternchat tasks)")
    stage = start_stage("rl", parent, out, overrides, resume, log)
    cfg, model, tok, optimizer, device = stage.cfg, stage.model, stage.tok, stage.optimizer, stage.device
    r = cfg.rl
    reference = copy.deepcopy(model).eval().requires_grad_(False) if r.kl_coef > 0 else None
    autocast = autocast_for(cfg.train.dtype, device)
    pad = tok.special("<|assistant_end|>")
    pool = ThreadPoolExecutor(max_workers=1)  # the sandbox scores one group while the next is sampled

    def scored(task: Problem, texts: list[str]) -> list[tuple[float, bool]]:
        outcomes = score([task], {task.name: texts}, workers=workers, limits=limits)[task.name]
        return [(reward_of(o, r.compile_reward), reward_of(o, 1.0) > 0) for o in outcomes]

    start, history = time.perf_counter(), []
    bar = tqdm(total=r.steps, initial=stage.step, desc="rl", unit="step")
    while stage.step < r.steps:
        model.eval()
        prompts, replies, pending = [], [], []
        for j, task in enumerate(step_items(tasks, r.prompts_per_step, stage.step, r.seed)):
            prompt, ids, texts = sample_group(model, tok, task, r.group_size, r.max_tokens, r.temperature,
                                              seed=r.seed + 1000 * stage.step + 100 * j)
            prompts += [prompt] * len(ids)
            replies += ids
            pending.append(pool.submit(scored, task, texts))
        results = [x for f in pending for x in f.result()]
        rewards = torch.tensor([reward for reward, _ in results]).view(len(pending), r.group_size)
        compiled = sum(c for _, c in results) / len(results)
        advantages = group_advantages(rewards, r.normalize_std).flatten()
        model.train()
        optimizer.set_schedule(r.lr_scale)
        x, y, mask = (t.to(device) for t in sequences_batch(prompts, replies, pad, model.shape.seq_len))
        ref_logprobs = None
        if reference is not None:
            with torch.no_grad(), autocast:
                ref_logprobs = token_logprobs(reference(x), y)
        stats = {}

        def objective(x: torch.Tensor) -> torch.Tensor:  # the logits under autocast, the GRPO loss in fp32
            with autocast:
                logits = model(x)
            loss, found = grpo_loss(logits, y, mask, advantages.to(device), ref_logprobs=ref_logprobs,
                                    kl_coef=r.kl_coef)
            stats.update(found)
            return loss

        loss = optimizer_step(objective, model, optimizer, [(x,)], 1, contextlib.nullcontext(), 0.0, device)
        stage.step += 1
        record = {"step": stage.step, "event": "train", "loss": loss, "mean_reward": rewards.mean().item(),
                  "pass_rate": (rewards == 1.0).float().mean().item(), "compile_rate": compiled,
                  "mixed_groups": int(((rewards.max(1).values - rewards.min(1).values) > 0).sum()), **stats}
        stage.metrics.write(**record)
        history.append(record)
        bar.update(1)
        bar.set_postfix(reward=f"{record['mean_reward']:.3f}", passed=f"{record['pass_rate']:.2f}")
        if r.checkpoint_every and stage.step % r.checkpoint_every == 0 and stage.step < r.steps:
            stage.save()
    bar.close()
    pool.shutdown()
    stage.save()
    return {"run": str(out), "steps": stage.step, "seconds": time.perf_counter() - start, "history": history,
            "fire": stage.fire_report}

