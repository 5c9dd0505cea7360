"""Short training runs for benchmarks: the same model, seed and batches under different overrides.

`measure` trains a config for a fixed number of steps in this process (no checkpoints, no periodic
evals, no Rust eval) and returns the validation loss and bits per byte at the end, tokens/s, peak
memory, the real optimizer-state bytes and the loss curve. `measure_in_subprocess` does the same in
a fresh Python process, so each run's peak resident memory is its own and no compiled or cached
state leaks from one run into the next.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Sequence

import torch

from ternchat.config import load_config

BENCH_OVERRIDES = ["train.time_limit_min=0", "eval.every_steps=0", "eval.rust_problems=false",
                   "train.checkpoint_every=0"]


def measure(config: str | None, overrides: list[str], steps: int, decode_tokens: int = 0, probe: str = "") -> dict:
    """Train `steps` steps in this process; return what was measured (with `decode_tokens`, also plain
    against speculative decoding of the sample prompts by the trained model, `measure_decoding`; with
    `probe`, 'module:function', what that function measures on the trained `Trainer`)."""
    from ternchat.train.run_evals import SAMPLE_PROMPTS
    from ternchat.train.trainer import Trainer

    cfg = load_config(config, [*overrides, *BENCH_OVERRIDES, f"train.max_steps={steps}"])
    decoding = None
    with tempfile.TemporaryDirectory(prefix="ternchat-bench-") as tmp:
        trainer = Trainer(cfg, Path(tmp) / "run", log=lambda _: None)
        result = trainer.run()
        losses = [(r["step"], r["loss"]) for r in trainer.metrics.read() if isinstance(r.get("loss"), float)]
        if decode_tokens:
            prompts = [trainer.tok.encode(p) for p in SAMPLE_PROMPTS]
            decoding = measure_decoding(trainer.inference_model(), prompts, decode_tokens)
        probed = _resolve(probe)(trainer) if probe else None
    matrix_opt = trainer.optimizer.optimizers[0]
    matrix_params = sum(p.numel() for g in matrix_opt.param_groups for p in g["params"])
    matrix_state = sum(t.numel() * t.element_size() for s in matrix_opt.state.values() for t in s.values()
                       if torch.is_tensor(t))
    all_params = sum(p.numel() for p in trainer.model.parameters())
    return {"val_loss": result["val_loss"], "val_bpb": result["val_bpb"], "tok_s": result["tok_s"],
            "peak_rss_bytes": result["peak_memory_bytes"], "matrix_state_bytes_per_param": matrix_state / matrix_params,
            "state_bytes_per_param": trainer.optimizer.state_bytes() / all_params, "losses": losses,
            "params": all_params, **({"decoding": decoding} if decoding else {}),
            **({"probe": probed} if probed is not None else {})}


def measure_decoding(model, prompts: Sequence[Sequence[int]], max_tokens: int) -> dict:
    """Plain against speculative decoding of `prompts` with `model` (which has MTP)."""
    from ternchat.eval.engine import SpeculationStats, generate

    def timed(speculative: bool, temperature: float, stats: SpeculationStats | None = None):
        outputs, start = [], time.perf_counter()
        for seed, prompt in enumerate(prompts):
            outputs.append(list(generate(model, prompt, max_tokens, temperature=temperature, seed=seed,
                                         speculative=speculative, stats=stats)))
        seconds = time.perf_counter() - start
        return outputs, sum(map(len, outputs)) / seconds

    result = {}
    for name, temperature in (("greedy", 0.0), ("sampling", 0.8)):
        timed(False, temperature)  # warm-up: first-call allocations out of the timing
        plain, plain_tok_s = timed(False, temperature)
        stats = SpeculationStats()
        spec, spec_tok_s = timed(True, temperature, stats)
        result[name] = {"plain_tok_s": plain_tok_s, "speculative_tok_s": spec_tok_s,
                        "speedup": spec_tok_s / plain_tok_s, "acceptance_by_depth": stats.acceptance(),
                        "tokens_per_step": stats.tokens / max(stats.steps, 1), "tokens": stats.tokens,
                        "identical": plain == spec}
    return result


def variants_table_head(report: dict, columns: list[str]) -> list[str]:
    """The opening lines of a bench report that trained each variant: the machine and steps, then the
    header of a markdown table with `columns`."""
    return [f"Machine: {report['machine']}; {report['steps']} steps per variant, same seed and batches.", "",
            "| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]


def _resolve(probe: str):
    import importlib

    module, _, name = probe.partition(":")
    return getattr(importlib.import_module(module), name)


def measure_in_subprocess(config: str | None, overrides: list[str], steps: int, ranks: int = 1,
                          decode_tokens: int = 0, probe: str = "") -> dict:
    """`measure` in a fresh process, or in `ranks` > 1 processes started by torchrun (rank 0 reports)."""
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={ranks}"]
    args = [*(launcher if ranks > 1 else [sys.executable]), "-m", "ternchat.bench.runs", "--steps", str(steps),
            "--decode-tokens", str(decode_tokens), "--probe", probe]
    args += (["--config", config] if config else []) + [a for o in overrides for a in ("--set", o)]
    done = subprocess.run(args, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"the run with {' '.join(overrides)} failed:\n{done.stderr[-2000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def _main() -> None:
    p = argparse.ArgumentParser(description="one benchmark run; prints its measurements as JSON")
    p.add_argument("--steps", type=int, required=True)
    p.add_argument("--config")
    p.add_argument("--set", dest="overrides", action="append", default=[])
    p.add_argument("--decode-tokens", type=int, default=0)
    p.add_argument("--probe", default="")
    args = p.parse_args()
    result = measure(args.config, args.overrides, args.steps, args.decode_tokens, args.probe)
    if os.environ.get("RANK", "0") == "0":
        print(json.dumps(result))


if __name__ == "__main__":
    _main()
