"""What a pretraining run measures besides its losses: samples from fixed prompts, and at the end one
greedy completion per shipped Rust problem, compiled and run in the sandbox. Both are trainer-event
handlers (train/events.py) and read the trainer's inference copy of the model."""

from __future__ import annotations

from pathlib import Path

from ternchat.data.tokenizer import Tokenizer
from ternchat.eval.engine import complete, complete_batch, decodes_in_batches
from ternchat.model.gpt import GPT

SAMPLE_PROMPTS = ["fn fibonacci(n: u64) -> u64 {", "pub struct Stack<T> {",
                  "use std::collections::HashMap;\n\nfn main() {"]


def write_samples(model: GPT, tok: Tokenizer, path: Path, max_tokens: int, seed: int) -> list[dict]:
    samples = [{"prompt": prompt, "completion": complete(model, tok, prompt, max_tokens, temperature=0.8, seed=seed)}
               for prompt in SAMPLE_PROMPTS]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(f"### prompt\n```rust\n{s['prompt']}\n```\n### completion\n```rust\n"
                            f"{s['prompt']}{s['completion']}\n```\n\n" for s in samples))
    return samples


def samples_when_due(trainer, **_) -> dict | None:
    """`step_end`: samples every `eval.sample_every` steps and at the last step, to samples/step_N.md."""
    e = trainer.cfg.eval
    if not trainer.due(e.sample_every) or (model := trainer.inference_model()) is None:
        return None
    trainer.samples = write_samples(model, trainer.tok, trainer.run_dir / "samples" / f"step_{trainer.step:06d}.md",
                                    e.sample_tokens, seed=trainer.cfg.train.seed)
    return None


def rust_problems_eval(trainer) -> dict:
    """Compile rate and pass@1 of greedy completions of the shipped Rust problems, in the sandbox;
    skipped, with the reason, where the sandbox cannot isolate the programs (or rustc is missing)."""
    from ternchat.verify.humaneval import load_problems, score
    from ternchat.verify.metrics import summarize
    from ternchat.verify.sandbox import Limits, SandboxUnavailable, checked_isolation

    limits = Limits(allow_unisolated=trainer.cfg.eval.allow_unisolated)
    try:
        checked_isolation(limits)
    except SandboxUnavailable as err:
        trainer.log(f"warning: skipping the compiled evaluation of the shipped Rust problems: {err}")
        return {}
    problems = load_problems()
    model = trainer.inference_model()
    tok = trainer.tok
    if decodes_in_batches(model):
        texts = complete_batch(model, tok, [tok.encode(p.prompt) for p in problems], 256,
                               [p.stop_tokens for p in problems], [tok.eod_id], temperature=0.0)
    else:
        texts = [complete(model, tok, p.prompt, 256, p.stop_tokens, temperature=0.0) for p in problems]
    completions = {p.name: [text] for p, text in zip(problems, texts)}
    summary = summarize(score(problems, completions, limits=limits), [1])
    record = {"rust_pass@1": summary["pass@k"]["pass@1"], "rust_compile_rate": summary["compile_rate"],
              "rust_problems": summary["problems"]}
    trainer.metrics.write(step=trainer.step, **record)
    trainer.log(f"shipped Rust problems: pass@1 {record['rust_pass@1']:.3f}, compile rate "
                f"{record['rust_compile_rate']:.3f} ({summary['problems']} problems, greedy)")
    return record


def rust_problems_at_end(trainer, **_) -> dict:
    """`run_end`: the compiled evaluation on rank 0 (every rank gathers a sharded model first)."""
    trainer.inference_model()
    return rust_problems_eval(trainer) if trainer.ranks.main else {}
