"""`ternchat bench mtp`: multi-token prediction's data efficiency and self-speculative decoding.

(a) The same model, seed and batches trained for the same number of steps without MTP, with
Gloeckle et al.'s heads and with DeepSeek-V3's modules, each in its own process: validation bits per
byte of the next-token head (so the three compare), tokens/s, peak resident memory, parameters.
(b) From each trained MTP model: greedy decoding of the training run's sample prompts, plain and
self-speculative, timed in the same process one after the other, with the acceptance rate of the
drafts at each depth, tokens per verify step and whether the two outputs are identical; then the
same for sampling (temperature 0.8), which must only match in distribution.
"""

from __future__ import annotations

from ternchat.bench.runs import measure_in_subprocess, variants_table_head
from ternchat.train.report import machine

VARIANTS: dict[str, list[str]] = {
    "next token only": [],
    "heads, n_future 3, weights 1/0.5/0.25/0.125": ['mtp.kind="heads"', "mtp.n_future=3",
                                                   "mtp.weights=[1.0, 0.5, 0.25, 0.125]"],
    "modules, depth 1, lambda 0.3": ['mtp.kind="modules"', "mtp.n_future=1", "mtp.module_weight=0.3"],
}


def bench_mtp(config: str | None, overrides: list[str], steps: int, decode_tokens: int, log=print) -> dict:
    results = []
    for name, variant in VARIANTS.items():
        log(f"training '{name}' for {steps} steps in its own process ...")
        run = measure_in_subprocess(config, [*overrides, "train.compile=false", *variant], steps,
                                    decode_tokens=decode_tokens if variant else 0)
        results.append({"name": name, **run})
        log(f"  val bpb {run['val_bpb']:.4f}, {run['tok_s']:,.0f} tok/s")
    return {"machine": machine(), "steps": steps, "decode_tokens": decode_tokens, "variants": results}


def format_mtp(report: dict) -> str:
    base = report["variants"][0]
    lines = variants_table_head(report, ["variant", "params", "val bpb (next token)", "vs without", "train tok/s",
                                         "peak RSS"])
    for r in report["variants"]:
        lines.append(f"| {r['name']} | {r['params']:,} | {r['val_bpb']:.4f} | "
                     f"{100 * (r['val_bpb'] / base['val_bpb'] - 1):+.2f}% | {r['tok_s']:,.0f} | "
                     f"{r['peak_rss_bytes'] / 2**20:,.0f} MiB |")
    lines += ["", f"Decoding the sample prompts, {report['decode_tokens']} tokens each:", "",
              "| variant | mode | plain tok/s | speculative tok/s | speedup | acceptance by depth | tokens/step | "
              "output identical |", "|---|---|---|---|---|---|---|---|"]
    for r in report["variants"]:
        for mode, d in r.get("decoding", {}).items():
            acceptance = ", ".join(f"{a:.0%}" for a in d["acceptance_by_depth"])
            lines.append(f"| {r['name']} | {mode} | {d['plain_tok_s']:.1f} | {d['speculative_tok_s']:.1f} | "
                         f"{d['speedup']:.2f}x | {acceptance} | {d['tokens_per_step']:.2f} | "
                         f"{('yes' if d['identical'] else 'NO') if mode == 'greedy' else 'n/a (same distribution)'} |")
    return "\n".join(lines)
