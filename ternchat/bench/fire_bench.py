"""`ternchat bench fire --run DIR`: what FIRE (train/fire.py) does to a trained ternary model.

The run's latest checkpoint, as trained (BitLinears with their latent weights), gets FIRE's
replacement of every block matrix: the exact polar factor, and the official code's 5 cubic
Newton-Schulz steps. Reported per variant: validation loss and bits per byte on the run's val
split (tokenized with the run's own tokenizer), the share of ternary codes that flipped, the mean
ratio of the absmean scale after/before, and the spread of the normalized singular values. How fast
the next stage's loss then falls (plasticity) is for the stage switch itself to measure.
"""

from __future__ import annotations

import contextlib
import tempfile
from pathlib import Path

import torch

from ternchat.config import load_config
from ternchat.data.corpus import iter_documents
from ternchat.data.loader import TokenLoader
from ternchat.data.pipeline import prepare_data
from ternchat.data.shards import write_split
from ternchat.data.tokenizer import Tokenizer
from ternchat.eval.bpb import evaluate_bpb
from ternchat.runs import load_run_model
from ternchat.train.fire import apply_fire
from ternchat.train.report import machine

VARIANTS = {"as trained": None, "FIRE exact (polar factor)": ("exact", 0),
            "FIRE official (5 Newton-Schulz steps)": ("newton_schulz", 5)}


def bench_fire(run_dir: Path, batches: int = 20) -> dict:
    run_dir = Path(run_dir)
    cfg = load_config(run_dir / "config.toml")
    tok = Tokenizer.load(run_dir / "tokenizer")
    corpus = prepare_data(cfg, until="corpus", log=lambda _: None).corpus_dir
    token_bytes = torch.tensor(tok.token_bytes(), dtype=torch.float32)
    results = {}
    with tempfile.TemporaryDirectory(prefix="ternchat-fire-") as tmp:
        entries = write_split(iter_documents(corpus, "val"), tok, Path(tmp), "val", 1 << 30)
        paths = [Path(tmp) / e["file"] for e in entries]
        for name, how in VARIANTS.items():
            model = load_run_model(run_dir, latent=True)
            report = apply_fire(model, *how) if how else {}
            loader = TokenLoader(paths, cfg.train.batch_size, cfg.model.seq_len, shuffle=False, verify=False)
            with torch.no_grad():
                val = evaluate_bpb(model, loader, token_bytes, batches, contextlib.nullcontext())
            results[name] = {**val, **report}
    return {"machine": machine(), "run": str(run_dir), "batches": batches, "variants": results}


def format_fire(report: dict) -> str:
    lines = [f"Run {report['run']}; {report['batches']} validation batches. Machine: {report['machine']}.", "",
             "| model | val loss | val bpb | ternary codes flipped | absmean scale after/before | "
             "normalized singular values |", "|---|---|---|---|---|---|"]
    for name, r in report["variants"].items():
        flips = f"{100 * r['ternary_codes_flipped']:.1f}%" if r.get("ternary_codes_flipped") is not None else "-"
        scale = f"{r['ternary_scale_ratio']:.3f}" if r.get("ternary_scale_ratio") is not None else "-"
        sv = "{:.3f} to {:.3f}".format(*r["normalized_singular_values"]) if "normalized_singular_values" in r else "-"
        lines.append(f"| {name} | {r['val_loss']:.4f} | {r['val_bpb']:.4f} | {flips} | {scale} | {sv} |")
    return "\n".join(lines)
