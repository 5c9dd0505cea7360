"""Training-Free GRPO (Cai et al. 2025, arXiv 2510.08191; TencentCloudADP/youtu-agent, `training_free_grpo/`),
adapted to a small model: the model's weights stay frozen, and what is learned is a library of text
experiences injected into the prompt.

The published loop, per step over a batch of tasks:
1. G rollouts per task, with the current library in the prompt.
2. Rewards from a verifier. Only groups with mixed outcomes (0 < mean reward < 1) are used.
3. A summary of each rollout given its grade.
4. Per task, a "semantic group advantage": what the better rollouts did that the worse ones did not. It
   becomes one operation against the library: add a new experience, or modify an existing one.
5. A batch-level consolidation of all the tasks' operations: merge experiences that say the same thing
   (delete them and add the merged one) and delete what is redundant.
6. The ids are renumbered (G0, G1, ...). The new library takes effect at the next step and at test time.

In the paper an LLM writes steps 3 to 5. A small ternary model cannot, so this adaptation keeps the
loop's structure and takes its semantic signal from the rustc sandbox:
- The summary of a rollout is its verdict (passed, failed its tests, did not compile) with the
  compiler's error codes and first message.
- A group's advantage is each error code that appears only in failing rollouts. With it goes the
  first line of a passing rollout as the example to follow.
- The per-task operation is keyed by error code: modify the experience that already names the code
  (new example, one more supporting task), or add one. Each task gives at most `tfgrpo.per_task`
  operations.
- Consolidation merges one batch's operations on the same code into one experience. It deletes the
  least supported experiences beyond `tfgrpo.max_experiences`.

Outputs and logs call it an adaptation. An external summarizer model is not built.

The library is a system message, "Experiences from earlier attempts", listing `[Gi]. text` lines. The
weights' hash is checked unchanged at the end. The library is saved after every step
(`experiences.json`, with its history), and `ternchat eval --experiences FILE` uses it at test time.
"""

from __future__ import annotations

import hashlib
import json
import random
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import torch
from tqdm import tqdm

from ternchat.data.tokenizer import Tokenizer
from ternchat.eval.engine import chat_reply
from ternchat.model.gpt import GPT
from ternchat.train.errors import RunError
from ternchat.verify.humaneval import Problem, score
from ternchat.verify.sandbox import Limits, Outcome

ADAPTATION = ("Training-Free GRPO, adapted: rustc verdicts and error codes stand in for the paper's LLM-written "
              "summaries and group advantages; the loop (group filter, add/modify per task, merge/delete per "
              "batch, renumbering, effect at the next step) is the paper's")


@dataclass
class Experience:
    key: str  # the rustc error code it is about
    text: str
    support: int = 1  # tasks whose groups produced or confirmed it


@dataclass
class Operation:
    option: str  # "add" or "modify" (per task); the batch step turns them into merges and deletes
    key: str
    text: str
    task: str
    target: int | None = None  # modify: the index of the experience it replaces


@dataclass
class Library:
    experiences: list[Experience] = field(default_factory=list)

    def ids(self) -> dict[str, Experience]:
        return {f"G{i}": e for i, e in enumerate(self.experiences)}

    def system_message(self) -> dict | None:
        if not self.experiences:
            return None
        lines = "\n".join(f"[{i}]. {e.text}" for i, e in self.ids().items())
        return {"role": "system", "content": f"Experiences from earlier attempts:\n{lines}"}

    def to_json(self) -> list[dict]:
        return [{"id": i, **asdict(e)} for i, e in self.ids().items()]

    @classmethod
    def from_json(cls, rows: Sequence[dict]) -> "Library":
        return cls([Experience(r["key"], r["text"], r.get("support", 1)) for r in rows])

    @classmethod
    def load(cls, path: Path) -> "Library":
        data = json.loads(Path(path).read_text())
        return cls.from_json(data["experiences"] if isinstance(data, dict) else data)


def messages_with(library: Library, task: Problem) -> list[dict]:
    system = library.system_message()
    return ([system] if system else []) + [{"role": "user", "content": task.prompt}]


# --- steps 2-5 of the loop -----------------------------------------------------------------------------
def mixed(rewards: Sequence[float]) -> bool:
    """The paper's filter: a group teaches only when its outcomes differ (0 < mean reward < 1)."""
    mean = sum(rewards) / len(rewards)
    return 0.0 < mean < 1.0


def summarize(outcome: Outcome, reply: str) -> dict:
    """A rollout's summary: the verdict, rustc's error codes and first message, the reply's first line."""
    verdict = ("passed" if outcome.outcome == "ok" else "failed its tests" if outcome.phase == "run"
               else "did not compile")
    first_line = next((line.strip() for line in reply.splitlines() if line.strip()), "")
    return {"verdict": verdict, "passed": outcome.outcome == "ok", "codes": sorted(set(outcome.error_codes)),
            "message": (outcome.messages[0] if outcome.messages else "")[:160], "first_line": first_line[:120]}


def group_advantage(summaries: Sequence[dict], per_task: int) -> list[tuple[str, str]]:
    """(error code, experience text) for each code only the failing rollouts of a mixed group show."""
    passing = [s for s in summaries if s["passed"]]
    failing = [s for s in summaries if not s["passed"]]
    if not passing or not failing:
        return []
    seen_passing = {c for s in passing for c in s["codes"]}
    counts: dict[str, tuple[int, str]] = {}
    for s in failing:
        for code in s["codes"]:
            if code not in seen_passing:
                n, message = counts.get(code, (0, s["message"]))
                counts[code] = (n + 1, message)
    example = passing[0]["first_line"]
    ranked = sorted(counts.items(), key=lambda kv: -kv[1][0])[:per_task]
    return [(code, f"Replies that hit rustc error {code} ({message}) failed; a passing reply began with "
                   f"`{example}`.") for code, (_, message) in ranked]


def task_operations(library: Library, task: str, advantages: Sequence[tuple[str, str]]) -> list[Operation]:
    """Step 4: per task, modify the experience already about a code, else add one."""
    by_key = {e.key: i for i, e in enumerate(library.experiences)}
    return [Operation("modify", key, text, task, by_key[key]) if key in by_key else Operation("add", key, text, task)
            for key, text in advantages]


def consolidate(library: Library, operations: Sequence[Operation], max_experiences: int) -> tuple[Library, dict]:
    """Step 5: apply one batch's operations to a new library. Operations on the same code merge into one
    experience (the merged sources are deleted and the merge added). Beyond `max_experiences`, the least
    supported are deleted. Ids are renumbered by position. Returns the library and what happened."""
    by_key: dict[str, list[Operation]] = {}
    for op in operations:
        by_key.setdefault(op.key, []).append(op)
    kept = [Experience(e.key, e.text, e.support) for e in library.experiences]
    log = {"added": [], "modified": [], "merged": [], "deleted": []}
    for key, ops in by_key.items():
        tasks = sorted({op.task for op in ops})
        text = ops[-1].text if len(tasks) == 1 else ops[-1].text.rstrip(".") + f" (seen in {len(tasks)} tasks)."
        existing = next((e for e in kept if e.key == key), None)
        if len(ops) > 1:
            log["merged"].append({"key": key, "from": [op.option for op in ops], "tasks": tasks})
        if existing is not None:
            existing.text, existing.support = text, existing.support + len(tasks)
            log["modified"].append(key)
        else:
            kept.append(Experience(key, text, len(tasks)))
            log["added"].append(key)
    if len(kept) > max_experiences:
        order = sorted(range(len(kept)), key=lambda i: (-kept[i].support, i))
        drop = set(order[max_experiences:])
        log["deleted"] = [kept[i].key for i in sorted(drop)]
        kept = [e for i, e in enumerate(kept) if i not in drop]
    return Library(kept), log


def weights_hash(model: GPT) -> str:
    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


# --- the loop ---------------------------------------------------------------------------------------------
Policy = Callable[[list[dict], Problem, int], str]  # (messages, task, seed) -> the reply


def model_policy(model: GPT, tok: Tokenizer, max_tokens: int, temperature: float) -> Policy:
    """The frozen model's replies in the chat format."""
    model.eval()
    return lambda messages, task, seed: chat_reply(model, tok, messages, max_tokens, task.stop_tokens,
                                                   temperature=temperature, seed=seed)


def tfgrpo(policy: Policy, tasks: Sequence[Problem], out: Path, *, steps: int, tasks_per_step: int,
           group_size: int, per_task: int, max_experiences: int, seed: int, limits: Limits = Limits(),
           workers: int = 0, library: Library | None = None, model: GPT | None = None, log=print) -> dict:
    """Run the loop (module docstring); writes `out`/experiences.json after each step. With `model` (the
    policy's), its weights are hashed before and after and must not change."""
    if not tasks:
        raise RunError("Training-Free GRPO needs training tasks (ternchat tasks)")
    out.mkdir(parents=True, exist_ok=True)
    library = library or Library()
    before = weights_hash(model) if model is not None else None
    history = []
    rng = random.Random(seed)
    start = time.perf_counter()
    for step in tqdm(range(steps), desc="tf-grpo", unit="step"):
        batch = rng.sample(list(tasks), min(tasks_per_step, len(tasks)))
        frozen = library  # every rollout of this step sees the library as the step began
        replies = {t.name: [policy(messages_with(frozen, t), t, seed + 1000 * step + i) for i in range(group_size)]
                   for t in batch}
        outcomes = score(batch, replies, workers=workers, limits=limits)
        operations, groups = [], []
        for t in batch:
            rewards = [1.0 if o.outcome == "ok" else 0.0 for o in outcomes[t.name]]
            used = mixed(rewards)
            groups.append({"task": t.name, "rewards": rewards, "used": used})
            if used:
                summaries = [summarize(o, r) for o, r in zip(outcomes[t.name], replies[t.name])]
                operations += task_operations(frozen, t.name, group_advantage(summaries, per_task))
        library, changes = consolidate(frozen, operations, max_experiences)
        record = {"step": step + 1, "pass_rate": sum(sum(g["rewards"]) for g in groups) / (len(batch) * group_size),
                  "mixed_groups": sum(g["used"] for g in groups), "groups": groups,
                  "operations": [asdict(op) for op in operations], "changes": changes,
                  "experiences": len(library.experiences)}
        history.append(record)
        (out / "experiences.json").write_text(json.dumps(
            {"method": ADAPTATION, "step": step + 1, "experiences": library.to_json(), "history": history}, indent=1))
    after = weights_hash(model) if model is not None else None
    if after != before:
        raise RunError("the model's weights changed during Training-Free GRPO; they must stay frozen")
    log(ADAPTATION)
    return {"steps": steps, "seconds": time.perf_counter() - start, "history": history,
            "library": library.to_json(), "weights_sha256": after, "out": str(out / "experiences.json")}
