"""`ternchat bench arch`: mHC hyper-connections and LoopLM against the plain GPT.

The same model shape, seed and batches trained for the same number of steps, each variant in its
own process (eager unless `--set train.compile=true`): plain, mHC (n = 4), unconstrained HC (the
paper's ablation), LoopLM with T = 2 and 4, and mHC with LoopLM T = 4. Reported: validation bits per byte (a looped model's from its last pass),
training tokens/s and its ratio to the plain model's (mHC's overhead), peak resident memory and
parameters. For the hyper-connection variants, the composite gain on a validation batch: the product
of every sublayer's H_res, first block to last, and its largest absolute row sum (forward) and column
sum (backward), the maximum over tokens. For the looped variants, Q-exit at a few thresholds q on
the validation batches: bits per byte with each token's logits taken from the pass it exits at, the
mean exit pass and the share of block passes saved; and greedy decoding of the sample prompts at
each q with the KV cache per pass (tokens/s and passes per token).
"""

from __future__ import annotations

import math
import time

import torch

from ternchat.bench.runs import measure_in_subprocess, variants_table_head
from ternchat.train.report import machine

VARIANTS: dict[str, list[str]] = {
    "plain": [],
    "mHC, n 4": ["mhc.enabled=true", "mhc.streams=4"],
    "HC (unconstrained), n 4": ["mhc.enabled=true", "mhc.streams=4", 'mhc.constraint="none"'],
    "LoopLM, T 2": ["loop.enabled=true", "loop.steps=2"],
    "LoopLM, T 4": ["loop.enabled=true", "loop.steps=4"],
    "mHC n 4 + LoopLM T 4": ["mhc.enabled=true", "mhc.streams=4", "loop.enabled=true", "loop.steps=4"],
}
EXIT_THRESHOLDS = (1.0, 0.9, 0.7, 0.5)
DECODE_TOKENS = 64


@torch.no_grad()
def q_exit_on_validation(model, loader, token_bytes: torch.Tensor, batches: int, autocast) -> list[dict]:
    """Per q: bits per byte with each token's logits from its Q-exit pass, its mean exit pass (1-based)
    and the share of block passes saved; all thresholds from the same forward passes."""
    from ternchat.model.looped import q_exit_steps

    T = model.shape.loop_steps
    nats = {q: 0.0 for q in EXIT_THRESHOLDS}
    exits = {q: 0.0 for q in EXIT_THRESHOLDS}
    nbytes, count = 0.0, 0
    for _ in range(min(batches, loader.steps_per_epoch)):
        x, y = loader.next_batch()
        with autocast:
            states, _ = model.passes(x)
            normed = [model.final_norm(z) for z in states]
            lambdas = torch.stack([model.loop.gate(h) for h in normed])
            losses = torch.stack([torch.nn.functional.cross_entropy(model.lm_head(h).float().flatten(0, 1),
                                                                    y.reshape(-1), reduction="none")
                                  for h in normed])  # (T, tokens)
        per_token_bytes = token_bytes[y.reshape(-1)]
        counted = (per_token_bytes > 0).float()
        nbytes += float(per_token_bytes.sum())
        count += y.numel()
        for q in EXIT_THRESHOLDS:
            chosen = q_exit_steps(lambdas, q).reshape(1, -1)
            nats[q] += float((losses.gather(0, chosen)[0] * counted).sum())
            exits[q] += float((chosen + 1).sum())
    return [{"q": q, "val_bpb": nats[q] / (math.log(2) * max(nbytes, 1)), "mean_exit_pass": exits[q] / count,
             "passes_saved": 1 - exits[q] / count / T} for q in EXIT_THRESHOLDS]


def q_exit_decoding(model, prompts: list[list[int]]) -> list[dict]:
    """Greedy decoding of `prompts` at each q: tokens/s and block passes per generated token."""
    from ternchat.eval.engine import generate

    result = []
    list(generate(model, prompts[0], 8, temperature=0))  # warm-up
    for q in EXIT_THRESHOLDS:
        decode_passes: list[int] = []
        start, tokens = time.perf_counter(), 0
        for prompt in prompts:
            passes: list[int] = []
            tokens += len(list(generate(model, prompt, DECODE_TOKENS, temperature=0, exit_threshold=q,
                                        passes_run=passes)))
            decode_passes += passes[1:]  # the prompt's forward runs every pass
        seconds = time.perf_counter() - start
        result.append({"q": q, "tok_s": tokens / seconds,
                       "passes_per_token": sum(decode_passes) / max(len(decode_passes), 1)})
    return result


def probe_arch(trainer) -> dict:
    """What `ternchat bench arch` measures on a trained model besides the training run's numbers."""
    from ternchat.data.loader import TokenLoader
    from ternchat.model.mhc import composite_gain
    from ternchat.train.run_evals import SAMPLE_PROMPTS

    model = trainer.inference_model()
    cfg = trainer.cfg

    def val_loader() -> TokenLoader:
        return TokenLoader(trainer.val_paths, cfg.train.batch_size, cfg.model.seq_len, shuffle=False,
                           tokenizer_hash=trainer.tok.hash, device=trainer.device, verify=False)
    out: dict = {}
    if model.shape.mhc_streams > 1:
        x, _ = val_loader().next_batch()
        out["composite_gain"] = composite_gain(model, x)
    if model.loop is not None:
        out["q_exit"] = q_exit_on_validation(model, val_loader(), trainer.token_bytes, cfg.eval.val_batches,
                                             trainer.autocast)
        out["decoding"] = q_exit_decoding(model, [trainer.tok.encode(p) for p in SAMPLE_PROMPTS])
    return out


def bench_arch(config: str | None, overrides: list[str], steps: int, log=print) -> dict:
    results = []
    for name, variant in VARIANTS.items():
        log(f"training '{name}' for {steps} steps in its own process ...")
        run = measure_in_subprocess(config, ["train.compile=false", *overrides, *variant], steps,
                                    probe="ternchat.bench.arch_bench:probe_arch")
        results.append({"name": name, **run})
        log(f"  val bpb {run['val_bpb']:.4f}, {run['tok_s']:,.0f} tok/s")
    return {"machine": machine(), "steps": steps, "variants": results}


def format_arch(report: dict) -> str:
    base = report["variants"][0]
    lines = variants_table_head(report, ["variant", "params", "val bpb", "vs plain", "train tok/s", "vs plain",
                                         "peak RSS", "composite gain fwd / bwd"])
    for r in report["variants"]:
        gain = r.get("probe", {}).get("composite_gain")
        gain_text = f"{gain['forward_gain']:.4f} / {gain['backward_gain']:.4f}" if gain else "-"
        lines.append(f"| {r['name']} | {r['params']:,} | {r['val_bpb']:.4f} | "
                     f"{100 * (r['val_bpb'] / base['val_bpb'] - 1):+.2f}% | {r['tok_s']:,.0f} | "
                     f"{r['tok_s'] / base['tok_s']:.2f}x | {r['peak_rss_bytes'] / 2**20:,.0f} MiB | {gain_text} |")
    lines += ["", "Q-exit of the looped variants: validation bpb with each token's logits from its exit pass, and "
              f"greedy decoding of the sample prompts ({DECODE_TOKENS} tokens each) with a KV cache per pass:", "",
              "| variant | q | val bpb | vs q = 1 | mean exit pass | passes saved | decode tok/s | passes per token |",
              "|---|---|---|---|---|---|---|---|"]
    for r in report["variants"]:
        probe = r.get("probe", {})
        for row, dec in zip(probe.get("q_exit", []), probe.get("decoding", [])):
            full = probe["q_exit"][0]["val_bpb"]
            lines.append(f"| {r['name']} | {row['q']:g} | {row['val_bpb']:.4f} | "
                         f"{100 * (row['val_bpb'] / full - 1):+.2f}% | {row['mean_exit_pass']:.2f} | "
                         f"{row['passes_saved']:.0%} | {dec['tok_s']:.1f} | {dec['passes_per_token']:.2f} |")
    return "\n".join(lines)
