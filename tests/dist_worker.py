"""Three training steps of a small GPT on a fixed global batch, in one process or as a torchrun rank.

With --offload (FSDP2's shards and the optimizer state in host memory, also in one process), the
results must be those of the same run without it.

Each of N ranks takes its 1/N of the batch's rows, as TokenLoader hands them out; one process can
take the same rows as N accumulated micro-batches, which makes its gradients equal to the ranks'
averaged ones bit for bit (halving is exact in floating point). Rank 0 writes
the whole gradients of the first step and the whole parameters after the last to --out, so a test
can compare a 2-rank run with a 1-process run of the same global batch.
"""

import argparse
import glob
import sys
from pathlib import Path

import torch

from ternchat.config import load_config
from ternchat.model.bitlinear import set_training_gemm
from ternchat.model.gpt import GPT, GPTShape
from ternchat.optim.factory import build_optimizer
from ternchat.train.distributed import (Ranks, full_model_state, gradients_complete, init_distributed,
                                        launched_ranks, micro_batch_done, model_home, parallelize,
                                        shutdown_distributed)

VOCAB, ROWS, SEQ = 256, 4, 32


def whole(t: torch.Tensor) -> torch.Tensor:
    return t.full_tensor() if hasattr(t, "full_tensor") else t


def main() -> Ranks:
    parser = argparse.ArgumentParser()
    parser.add_argument("--strategy", default="none")
    parser.add_argument("--optim", choices=("sgd", "muon", "8bit-muon", "gum"), default="sgd")
    parser.add_argument("--checkpointing", default="none")
    parser.add_argument("--offload", action="store_true", help="dist.offload: shards and state in host memory")
    parser.add_argument("--micro-batches", type=int, default=1,
                        help="split this rank's rows into this many accumulated micro-batches")
    parser.add_argument("--mtp", choices=("none", "heads", "modules"), default="none",
                        help="multi-token prediction: two heads, or one module")
    parser.add_argument("--arch", choices=("plain", "mhc-loop", "gemm-hooks", "int8"), default="plain",
                        help="mhc-loop: four mHC residual streams and two LoopLM passes; gemm-hooks: FP8 GEMMs "
                             "everywhere and Collider filtering 40% of the tokens; int8: the exact int8 forward")
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    overrides = ["model.depth=2", "model.d_model=64", "model.n_heads=2", f"model.seq_len={SEQ}",
                 f"dist.strategy={args.strategy}", "dist.fsdp_param_dtype=fp32",
                 f"dist.offload={str(args.offload).lower()}",
                 f"train.activation_checkpointing={args.checkpointing}", "optim.muon_momentum=0.9"]
    if args.mtp != "none":
        overrides += [f"mtp.kind={args.mtp}", "mtp.n_future=" + ("2" if args.mtp == "heads" else "1"),
                      "mtp.weights=[1.0,0.5,0.25]"]
    if args.arch == "mhc-loop":
        overrides += ["mhc.enabled=true", "loop.enabled=true", "loop.steps=2"]
    if args.arch == "gemm-hooks":
        overrides += ["fp4.recipe=fp8", "fp4.bf16_last_blocks=0", "fp4.quantize_head=true", "collider.enabled=true"]
    if args.arch == "int8":
        overrides.append("model.ternary_gemm=int8")
    if args.optim == "8bit-muon":
        overrides.append("optim.use_8bit_optim=true")
    if args.optim == "gum":
        overrides += ["optim.use_galore=true", "optim.galore_rank=8", "optim.galore_min_dim=32",
                      "optim.galore_update_freq=2"]
    cfg = load_config(overrides=overrides)
    ranks = launched_ranks()
    device = init_distributed(cfg.dist, ranks)
    torch.manual_seed(0)
    model = GPT(GPTShape.from_config(cfg, VOCAB)).to(model_home(cfg.dist, device))
    set_training_gemm(model, cfg.model.ternary_gemm)
    with torch.no_grad():  # the residual projections start at zero; give every matrix a gradient
        for p in model.parameters():
            p.add_(0.02 * torch.randn_like(p))
    forward = parallelize(model, cfg.dist, ranks, device)
    if args.optim == "sgd":
        optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    else:
        optimizer = build_optimizer(model, cfg.optim, ranks)
    per_rank = ROWS // ranks.world_size
    first_grads = {}
    for step in range(3):
        batch = torch.randint(0, VOCAB, (ROWS, SEQ + 1), generator=torch.Generator().manual_seed(step))
        mine = batch[ranks.rank * per_rank:(ranks.rank + 1) * per_rank]
        for rows in mine.chunk(args.micro_batches):
            (forward(rows[:, :-1], rows[:, 1:]) / args.micro_batches).backward()
            micro_batch_done(model)
        gradients_complete(model)
        if step == 0:
            first_grads = {n: whole(p.grad).clone() for n, p in model.named_parameters()}
        optimizer.step()
        optimizer.zero_grad()
    state = {k: v.clone() for k, v in full_model_state(model).items()}
    if ranks.main:
        torch.save({"grads": first_grads, "params": state}, args.out)
    return ranks


def gloo_threads() -> list[str]:
    """gloo's worker and transport threads still running in this process (Linux)."""
    names = [Path(task, "comm").read_text().strip() for task in glob.glob("/proc/self/task/*")]
    return [n for n in names if "gloo" in n]


if __name__ == "__main__":
    distributed = main().distributed
    shutdown_distributed()
    # The group must be gone, its threads joined, before the interpreter finalizes: a gloo thread that
    # outlives it can abort the process at exit (train/distributed.py, shutdown_distributed).
    if distributed and sys.platform == "linux" and (left := gloo_threads()):
        sys.exit(f"the process group outlived shutdown_distributed: threads {left} still run")
