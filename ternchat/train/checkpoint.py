"""Checkpoints: everything needed to continue a run exactly, written atomically and checksummed.

`checkpoints/step_XXXXXX/` holds `model.safetensors` (latent fp32 weights), `optimizer.pt`,
`trainer.json` (step, schedule length, loader position, RNG states, counters) and
`checksums.json` (SHA-256 of each file), written last. The folder is built under a temporary
name, every file is fsynced, then it is renamed into place, so a run killed at any moment (even
with SIGKILL) leaves either a complete checkpoint or none. Loading verifies the checksums and the
model shape and refuses anything else with a clear error.
"""

from __future__ import annotations

import base64
import json
import os

from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from ternchat.data.errors import DataError
from ternchat.model.gpt import GPT, GPTShape
from ternchat.paths import building, file_sha256
from ternchat.train.distributed import load_full_model_state
from ternchat.train.errors import RunError

CHECKSUMS = "checksums.json"


class CheckpointError(RunError):
    """A checkpoint that must not be used: incomplete, corrupt or from a different model."""


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def rng_state() -> dict[str, Any]:
    state = {"torch": base64.b64encode(torch.get_rng_state().numpy().tobytes()).decode()}
    if torch.cuda.is_available():
        state["cuda"] = [base64.b64encode(s.numpy().tobytes()).decode() for s in torch.cuda.get_rng_state_all()]
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    def decode(text: str) -> torch.Tensor:
        return torch.frombuffer(bytearray(base64.b64decode(text)), dtype=torch.uint8)

    torch.set_rng_state(decode(state["torch"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([decode(s) for s in state["cuda"]])


def checkpoint_dir(run_dir: Path, step: int) -> Path:
    return Path(run_dir) / "checkpoints" / f"step_{step:06d}"


def separate_storage(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Contiguous CPU tensors that share no memory, as safetensors requires: a tied matrix (the head that is
    the embedding) is written under both names, the second a copy."""
    seen, out = set(), {}
    for name, tensor in state.items():
        t = tensor.detach().contiguous().cpu()
        if t.untyped_storage().data_ptr() in seen:
            t = t.clone()
        seen.add(t.untyped_storage().data_ptr())
        out[name] = t
    return out


def save_checkpoint(run_dir: Path, step: int, model_state: dict[str, torch.Tensor], optimizer_state: Any,
                    trainer_state: dict) -> Path:
    """Write a checkpoint of whole tensors (a distributed run gathers them first: train/distributed.py)."""
    out = checkpoint_dir(run_dir, step)
    out.parent.mkdir(parents=True, exist_ok=True)
    with building(out) as tmp:
        save_file(separate_storage(model_state), tmp / "model.safetensors")
        torch.save(optimizer_state, tmp / "optimizer.pt")
        (tmp / "trainer.json").write_text(json.dumps({**trainer_state, "rng": rng_state()}, indent=1))
        sums = {}
        for name in ("model.safetensors", "optimizer.pt", "trainer.json"):
            _fsync(tmp / name)
            sums[name] = file_sha256(tmp / name)
        (tmp / CHECKSUMS).write_text(json.dumps(sums, indent=1))
        _fsync(tmp / CHECKSUMS)
    _fsync(out.parent)
    return out


def latest_checkpoint(run_dir: Path) -> Path | None:
    """The newest complete checkpoint of a run (one with its checksums file), or None."""
    found = sorted(p for p in (Path(run_dir) / "checkpoints").glob("step_*")
                   if p.is_dir() and not p.name.endswith(".partial") and (p / CHECKSUMS).exists())
    return found[-1] if found else None


def verify_checkpoint(path: Path) -> None:
    try:
        sums = json.loads((path / CHECKSUMS).read_text())
    except (OSError, ValueError) as e:
        raise CheckpointError(f"checkpoint {path} has no readable {CHECKSUMS} ({e}); it is incomplete") from None
    for name, expected in sums.items():
        if not (path / name).exists():
            raise CheckpointError(f"checkpoint {path} is missing {name}")
        if file_sha256(path / name) != expected:
            raise CheckpointError(f"checkpoint {path} is corrupt: {name} does not match its checksum. "
                                  "Delete this checkpoint folder to resume from the one before it.")


def required_checkpoint(run_dir: Path) -> Path:
    """The latest checkpoint of `run_dir`; a clear error when there is none (before any work is done)."""
    checkpoint = latest_checkpoint(run_dir) if Path(run_dir).is_dir() else None
    if checkpoint is None:
        raise DataError(f"{run_dir} has no checkpoint to start from; train it first (ternchat train), or pass a "
                        "packed model file where one is accepted")
    return checkpoint


def load_run_checkpoint(run_dir: Path, for_inference: bool = False) -> tuple[GPT, dict]:
    """The latest checkpoint of `run_dir`, verified, as a GPT with its latent weights (BitLinears holding
    their full-precision weights), and its trainer state. `for_inference` builds the model without the
    parts that only training uses (the FP4/FP8 recipe, Collider)."""
    checkpoint = required_checkpoint(run_dir)
    verify_checkpoint(checkpoint)
    state = json.loads((checkpoint / "trainer.json").read_text())
    shape = GPTShape.from_dict(state["model_shape"])
    model = GPT(shape.for_inference() if for_inference else shape)
    model.load_state_dict(load_file(checkpoint / "model.safetensors"))
    return model, state


def load_checkpoint(path: Path, model: torch.nn.Module, optimizer, shape) -> dict:
    """Verify and load a checkpoint into `model` and `optimizer`; return the trainer state."""
    verify_checkpoint(path)
    state = json.loads((path / "trainer.json").read_text())
    # A field added since the checkpoint was written reads as its default (GPTShape.from_dict).
    saved = state.get("model_shape")
    if saved is None or GPTShape.from_dict(saved) != shape:
        raise CheckpointError(f"checkpoint {path} is for model {saved}, but this run builds "
                              f"{shape.to_dict()}; resume with the run's own config")
    try:
        load_full_model_state(model, load_file(path / "model.safetensors"))
    except (SafetensorError, RuntimeError) as e:
        raise CheckpointError(f"checkpoint {path} does not fit the model: {e}") from None
    if optimizer is not None:
        optimizer.load_state_dict(torch.load(path / "optimizer.pt", weights_only=True))
    set_rng_state(state["rng"])
    return state
