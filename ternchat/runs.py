"""Find and load trained models for inference: a run folder's latest checkpoint or a packed file."""

from __future__ import annotations

import json
from pathlib import Path

from ternchat.data.errors import DataError
from ternchat.data.tokenizer import Tokenizer
from ternchat.export.packed import load_packed
from ternchat.model.bitlinear import to_inference
from ternchat.model.gpt import GPT
from ternchat.train.checkpoint import latest_checkpoint, load_run_checkpoint


def load_run_model(run_dir: Path, latent: bool = False) -> GPT:
    """The latest checkpoint's model in inference form (ternary layers with fixed codes), or with
    `latent` as trained (BitLinears holding their full-precision latent weights)."""
    model, _ = load_run_checkpoint(run_dir, for_inference=True)
    return (model if latent else to_inference(model)).eval()


def load_model_and_tokenizer(source: Path) -> tuple[GPT, Tokenizer]:
    """`source` is a run folder or a packed `.safetensors` file, which holds its tokenizer (one written
    before tokenizers were embedded needs the `tokenizer/` folder beside it)."""
    source = Path(source)
    if source.is_dir():
        model, tok_dir, want_hash = load_run_model(source), source / "tokenizer", None
    elif source.is_file():
        packed = load_packed(source)
        if packed.tokenizer is not None:
            return packed.model, packed.tokenizer
        model, want_hash, tok_dir = packed.model, packed.tokenizer_hash, source.parent / "tokenizer"
    else:
        raise DataError(f"no run folder or model file at {source}")
    tok = Tokenizer.load(tok_dir)
    if want_hash is not None and tok.hash != want_hash:
        raise DataError(f"{source} was made with tokenizer {want_hash[:12]}, but {tok_dir} holds {tok.hash[:12]}")
    return model, tok


def run_stage(source: Path) -> str:
    """The training stage that made a run folder's latest checkpoint or a packed model file: "pretrain",
    "sft" or "rl" (a packed file written before files recorded it counts as "pretrain")."""
    if Path(source).is_file():
        return load_packed(source).stage
    checkpoint = latest_checkpoint(source)
    if checkpoint is None:
        return "pretrain"
    return json.loads((checkpoint / "trainer.json").read_text()).get("stage", "pretrain")
