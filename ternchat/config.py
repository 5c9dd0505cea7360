"""Typed configuration: one dataclass per TOML section, loading, `--set` overrides, validation.

A config file is TOML with the sections below. Every key is checked before anything runs: an
unknown section or key, a value of the wrong type or out of range raises `ConfigError` with one
message naming the key and what is valid (the CLI turns it into exit status 2). Techniques that
later work adds own their own section or keys; until then a key for them is unknown, not ignored.
A section with an `enabled` switch ([mhc], [loop], [collider]) takes its other keys only when it is
switched on: `--set mhc.streams=8` alone is an error that names `mhc.enabled = true`, never a
silently ignored key.
The defaults are the `configs/tiny_cpu.toml` preset.
"""

from __future__ import annotations

import dataclasses
import re
import sys
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - exercised on Python 3.10 only
    import tomli as tomllib

import tomli_w


class ConfigError(ValueError):
    """A config file or override that cannot be used; the message names the key and what is valid."""


def _field(default: Any, *, min: float | None = None, max: float | None = None,
           choices: tuple[str, ...] | None = None, doc: str = "") -> Any:
    meta = {"min": min, "max": max, "choices": choices, "doc": doc}
    if isinstance(default, list):
        return field(default_factory=lambda: list(default), metadata=meta)
    return field(default=default, metadata=meta)


@dataclass
class DataConfig:
    """[data]: where Rust sources come from, how they are cleaned and split, how shards are cut."""

    prepared: str = _field("", doc="a prepared-data folder (`ternchat data --export DIR`) to train from instead of "
                                   "building the corpus, tokenizer and shards; the source keys are then unused")
    sources: list[str] = _field([], doc="extra directories of Rust sources")
    auto_discover: bool = _field(True, doc="also scan Debian's crate registry, rust-src and ~/.cargo/registry/src")
    debian: bool = _field(True, doc="download and unpack the curated Debian librust-*-dev crates")
    debian_crates: str = _field("", doc="Debian packages to fetch: empty = the curated list shipped with ternchat, "
                                        "\"all\" = every real-crate librust-*-dev package, else a file of names")
    debian_releases: list[str] = _field([], doc="Debian releases (codenames, e.g. [\"bookworm\", \"trixie\"]) whose "
                                                "crates --debian takes through private apt lists; empty = this "
                                                "machine's own apt")
    debian_mirror: str = _field("http://deb.debian.org/debian", doc="the Debian mirror of debian_releases")
    rust_src: bool = _field(False, doc="also fetch Debian's rust-src (the standard library's sources)")
    rustc_src: bool = _field(False, doc="also take Rust's own sources (library, compiler, tools, UI tests) from "
                                        "Debian's rustc source package, of the last of debian_releases (else this "
                                        "machine's release)")
    hf_dataset: str = _field("", doc="optional Hugging Face dataset of Rust files (needs the 'hf' extra)")
    hf_max_files: int = _field(100_000, min=1, doc="cap on files taken from the Hugging Face dataset")
    min_file_bytes: int = _field(64, min=1, doc="drop files smaller than this")
    max_file_bytes: int = _field(400_000, min=1024, doc="drop files larger than this")
    max_line_chars: int = _field(1000, min=80, doc="a file with a longer line is treated as minified/generated")
    near_dup_threshold: float = _field(0.85, min=0.5, max=1.0, doc="MinHash Jaccard threshold for near duplicates")
    minhash_perms: int = _field(128, min=16, max=1024, doc="MinHash permutations")
    val_fraction: float = _field(0.03, min=0.02, max=0.5, doc="share of bytes held out, whole crates at a time")
    seed: int = _field(1234, min=0, doc="seed of the train/val crate split")
    shard_tokens: int = _field(16_000_000, min=1024, doc="tokens per shard file")
    workers: int = _field(0, min=0, doc="worker processes/threads; 0 = all cores")


@dataclass
class LoaderConfig:
    """[loader]: how training batches are made (data/loader.py, data/minato.py). With the defaults,
    fixed windows of the token shards; with FIM, tag weights or kind = "minato", documents prepared
    one by one and packed into rows."""

    kind: str = _field("simple", choices=("simple", "minato"),
                       doc="simple: samples handed out in order; minato: MinatoLoader, slow samples finished by "
                           "background workers while batches are built from the ready ones")
    workers: int = _field(0, min=0, max=64, doc="worker processes preparing documents (simple: 0 = in the training "
                                                "process; minato: the fast workers, 0 = 1)")
    slow_workers: int = _field(1, min=1, max=64, doc="minato: background workers finishing the slow samples")
    timeout_ms: float = _field(500.0, min=1.0, doc="minato: per-sample time on the fast path (the paper's 0.5 s)")
    prefetch: int = _field(16, min=1, max=4096, doc="documents in preparation ahead of the batch being built")
    fim_rate: float = _field(0.0, min=0.0, max=1.0, doc="share of documents turned into fill-in-the-middle samples "
                                                        "(code models use 0.5)")
    fim_spm_rate: float = _field(0.5, min=0.0, max=1.0, doc="share of the FIM samples in SPM order (else PSM)")
    weight_compiles: float = _field(1.0, min=0.0, max=16.0, doc="copies per epoch of a document tagged compiles "
                                                               "by `ternchat data verify` (0 = filter out)")
    weight_parses: float = _field(1.0, min=0.0, max=16.0, doc="copies per epoch of a document tagged parses")
    weight_syntax_error: float = _field(1.0, min=0.0, max=16.0, doc="copies per epoch of a syntax_error document")
    weight_fails: float = _field(1.0, min=0.0, max=16.0, doc="copies per epoch of a document whose source says it "
                                                            "must not compile (rustc's UI tests, --rustc-src)")
    weight_unchecked: float = _field(1.0, min=0.0, max=16.0, doc="copies per epoch of a document without a tag")

    def weights(self) -> dict[str, float]:
        return {"compiles": self.weight_compiles, "parses": self.weight_parses,
                "syntax_error": self.weight_syntax_error, "fails": self.weight_fails,
                "unchecked": self.weight_unchecked}

    @property
    def per_document(self) -> bool:
        """Whether batches are packed from prepared documents rather than cut from the shards."""
        return self.kind != "simple" or self.workers > 0 or self.fim_rate > 0 or \
            any(w != 1.0 for w in self.weights().values())


@dataclass
class TokenizerConfig:
    """[tokenizer]: byte-level BPE trained on the train split."""

    vocab_size: int = _field(8192, min=512, max=262_144, doc="total vocabulary, special tokens included")
    max_train_bytes: int = _field(0, min=0, doc="cap on training text in bytes; 0 = the whole train split")


@dataclass
class ModelConfig:
    """[model]: the GPT's shape and weight quantization."""

    depth: int = _field(6, min=1, max=256, doc="transformer blocks")
    d_model: int = _field(384, min=16, doc="residual width")
    n_heads: int = _field(6, min=1, doc="attention heads")
    d_ff: int = _field(0, min=0, doc="MLP hidden width; 0 = 4 * d_model")
    seq_len: int = _field(256, min=8, max=1_048_576, doc="context length in tokens")
    quant: str = _field("ternary", choices=("ternary", "none"), doc="block linears: BitNet b1.58 ternary or dense")
    mlp: str = _field("relu2", choices=("relu2", "relu2_glu", "swiglu"),
                      doc="relu2: down(relu(up x)^2); relu2_glu: down(relu(gate x)^2 * up x), as HF BitNetForCausalLM; "
                          "swiglu: down(silu(gate x) * up x), as llama.cpp's bitnet graph (each with SubLN before down)")
    qk_norm: bool = _field(True, doc="RMSNorm on each head's queries and keys before RoPE (HF BitNet and llama.cpp's "
                                     "bitnet graph have none)")
    tie_embeddings: bool = _field(False, doc="the LM head is the token embedding (llama.cpp's bitnet graph and "
                                             "microsoft/bitnet-b1.58-2B-4T tie them)")
    ternary_gemm: str = _field("float", choices=("float", "int8", "int8_fp8_dx"),
                               doc="BitLinear's training products: float multiplies the dequantized operands in the "
                                   "autocast dtype; int8 multiplies the int8 activation and weight codes exactly "
                                   "(torch._int_mm, int8 tensor cores on CUDA sm_80+) and scales afterwards; "
                                   "int8_fp8_dx also computes the input gradient in FP8 (the codes exact in E4M3, "
                                   "the output gradient scaled per row; FP8 tensor cores on CUDA sm_89+)")


@dataclass
class MTPConfig:
    """[mtp] multi-token prediction (model/mtp.py): extra output blocks that predict tokens beyond the
    next one in training and draft them for self-speculative decoding."""

    kind: str = _field("none", choices=("none", "heads", "modules"),
                       doc="heads: Gloeckle et al.'s independent heads; modules: DeepSeek-V3's sequential modules")
    n_future: int = _field(3, min=1, max=8, doc="tokens predicted beyond the next one (heads or module depth)")
    weights: list[float] = _field([1.0, 0.5, 0.25, 0.125], doc="heads: loss weight of the next-token head, then "
                                  "of each extra head (n_future + 1 values; left at the default, the halving "
                                  "series follows n_future)")
    module_weight: float = _field(0.3, min=0.0, doc="modules: lambda; the loss adds (lambda / n_future) x the sum "
                                  "of the modules' cross-entropies (DeepSeek-V3: 0.3, later 0.1)")


@dataclass
class MHCConfig:
    """[mhc] manifold-constrained hyper-connections (model/mhc.py): `streams` residual streams mixed by
    input-dependent doubly-stochastic matrices around every attention and MLP sublayer."""

    enabled: bool = _field(False, doc="widen the residual into `streams` streams with mHC wiring")
    streams: int = _field(4, min=2, max=16, doc="residual streams n (the paper's expansion rate, 4)")
    sinkhorn_iters: int = _field(20, min=1, max=200, doc="Sinkhorn-Knopp iterations projecting H_res onto "
                                                         "doubly-stochastic matrices")
    constraint: str = _field("sinkhorn", choices=("sinkhorn", "none"),
                             doc="sinkhorn: mHC; none: unconstrained hyper-connections (HC, the paper's ablation)")
    gate_init: float = _field(0.01, min=0.0, max=1.0, doc="initial gating factors alpha of the dynamic mappings")


@dataclass
class LoopConfig:
    """[loop] LoopLM (model/looped.py): the stack of blocks applied `steps` times with shared weights, a
    learned exit gate after each pass, and the exit-distribution objective."""

    enabled: bool = _field(False, doc="loop the blocks with an exit gate (Ouro's LoopLM)")
    steps: int = _field(4, min=1, max=16, doc="recurrent passes T over the shared blocks")
    stage: str = _field("joint", choices=("joint", "gate"),
                        doc="joint: stage I, LM and gate trained on sum_t p(t) L_t - beta H(p); gate: stage II, "
                            "LM frozen, gate trained on the detached loss improvements")
    entropy_beta: float = _field(0.05, min=0.0, doc="stage I: weight beta of the exit distribution's entropy")
    gate_k: float = _field(50.0, min=0.0, doc="stage II: slope k of the target sigmoid(k (I - gamma))")
    gate_gamma: float = _field(0.005, min=0.0, doc="stage II: improvement threshold gamma (nats)")
    exit_threshold: float = _field(1.0, min=0.0, max=1.0, doc="Q-exit at generation: stop at the first pass "
                                   "whose cumulative exit probability reaches q; 1 = always all passes")


@dataclass
class FP4Config:
    """[fp4] low-precision GEMMs in every block linear (model/fp4.py, model/linear.py): FP4 recipes emulated
    where the hardware has no FP4 tensor cores, FP8 through torch._scaled_mm."""

    recipe: str = _field("none", choices=("none", "mxfp4_backward", "nvfp4", "fp8"),
                         doc="mxfp4_backward: Tseng et al. (backward GEMMs MXFP4, stochastic rounding, RHT); "
                             "nvfp4: NVIDIA's recipe (all three GEMMs NVFP4); fp8: E4M3/E5M2 tensorwise")
    bf16_first_blocks: int = _field(0, min=0, doc="blocks at the start whose linears keep high precision")
    bf16_last_blocks: int = _field(1, min=0, doc="blocks at the end whose linears keep high precision "
                                                 "(NVIDIA keeps the last ~15% of linears in BF16)")
    quantize_head: bool = _field(False, doc="run the LM head's GEMMs under the recipe too")
    hadamard_block: int = _field(0, min=0, max=256, doc="random Hadamard block (a power of two); 0 = the "
                                 "recipe's own (mxfp4_backward 64, nvfp4 16)")
    seed: int = _field(0, min=0, doc="seed of nvfp4's fixed Hadamard sign vector (stochastic rounding and "
                                     "redrawn signs draw from torch's generator, seeded by train.seed)")
    fp8_min_macs: int = _field(-1, min=-1, doc="fp8's size rule: GEMMs of at least this many multiply-adds "
                               "(M x N x K) run in FP8, the others in the compute dtype; -1 = measured at start on "
                               "FP8 tensor cores (every GEMM where FP8 is emulated); 0 = every GEMM")


@dataclass
class ColliderConfig:
    """[collider] token filtering whose savings reach the backward pass (model/collider.py)."""

    enabled: bool = _field(False, doc="keep the top (1 - filter_frac) tokens by score; drop the others' "
                                      "gradients at every linear and shrink the backward GEMMs to the kept rows")
    filter_frac: float = _field(0.4, min=0.0, max=0.95, doc="share of each batch's tokens filtered (the paper: 0.4)")
    reference: str = _field("", doc="run folder of a reference model: score = Rho-1's excess loss (training loss "
                                    "minus the reference's); empty = score by the training loss")


@dataclass
class OptimConfig:
    """[optim]: optimizer of the 2-D block matrices and of everything else."""

    matrix_optimizer: str = _field("muon", choices=("muon", "adamw", "foam"), doc="optimizer of the 2-D block matrices")
    lr_matrix: float = _field(0.02, min=0.0, max=10.0, doc="learning rate of the block matrices")
    lr_embed: float = _field(0.3, min=0.0, max=10.0, doc="AdamW learning rate of the token embedding (std-1 "
                                                          "init; the sweep is in docs/benchmarks.md)")
    lr_head: float = _field(0.003, min=0.0, max=10.0, doc="AdamW learning rate of the LM head")
    lr_scalar: float = _field(0.003, min=0.0, max=10.0, doc="AdamW learning rate of norms and gains")
    weight_decay: float = _field(0.0, min=0.0, max=1.0, doc="decoupled weight decay")
    beta1: float = _field(0.9, min=0.0, max=1.0, doc="AdamW beta1")
    beta2: float = _field(0.95, min=0.0, max=1.0, doc="AdamW beta2")
    muon_momentum: float = _field(0.95, min=0.0, max=1.0, doc="Muon Nesterov momentum")
    grad_clip: float = _field(1.0, min=0.0, doc="global gradient-norm clip; 0 = off")
    use_8bit_optim: bool = _field(False, doc="keep Muon/GUM momentum as blockwise int8 (8-bit Muon)")
    block_size_8bit: int = _field(2048, min=16, max=1 << 20, doc="values per int8 block (one fp32 scale each)")
    stochastic_rounding: bool = _field(False, doc="round 8-bit state stochastically (unbiased)")
    use_galore: bool = _field(False, doc="GaLore 2 low-rank projection of the block matrices (GUM with Muon)")
    galore_rank: int = _field(128, min=1, doc="rank of the GaLore subspace")
    galore_update_freq: int = _field(200, min=1, doc="steps between projector refreshes (GUM's period)")
    galore_scale: float = _field(0.25, min=0.0, doc="GaLore's update scale (AdamW base only)")
    galore_min_dim: int = _field(256, min=1, doc="project only matrices whose smaller side is at least this")
    galore_oversample: int = _field(8, min=0, doc="randomized SVD oversampling columns")
    galore_power_iters: int = _field(2, min=0, max=10, doc="randomized SVD power iterations")
    gum_full_rank_layers: int = _field(1, min=1, doc="GUM's gamma: transformer blocks drawn each period (without "
                                                        "replacement) for a full-rank step; q = gamma / depth")
    foam_level: int = _field(3, min=0, max=12, doc="FOAM fold level l: moments kept as means over 2^l entries")
    foam_scale: float = _field(0.25, min=0.0, doc="FOAM's update scale for the block matrices (the official "
                                                   "scripts' 0.25)")
    foam_embed_head: bool = _field(False, doc="also use FOAM for the embedding and the head")
    adamw_8bit: bool = _field(False, doc="8-bit AdamW (bitsandbytes) for the embedding and the head")
    seed: int = _field(0, min=0, doc="seed of the optimizers' randomness (sketches, draws, rounding)")


@dataclass
class TrainConfig:
    """[train]: batch, length and schedule of a run."""

    run_name: str = _field("tiny_cpu", doc="run directory name under runs/")
    batch_size: int = _field(16, min=1, doc="sequences per micro-batch per device")
    grad_accum: int = _field(1, min=1, doc="micro-batches per optimizer step")
    max_steps: int = _field(0, min=0, doc="optimizer steps; 0 = until time_limit_min")
    time_limit_min: float = _field(10.0, min=0.0, doc="wall-clock budget in minutes; 0 = no limit")
    warmup_steps: int = _field(20, min=0, doc="linear LR warmup")
    warmdown_frac: float = _field(0.3, min=0.0, max=1.0, doc="share of the run with linear LR decay to 0")
    schedule: str = _field("wsd", choices=("wsd", "bitnet_two_stage"),
                           doc="wsd: warmup-constant-warmdown; bitnet_two_stage: LR halves and weight decay "
                               "drops to 0 at mid-training, then warmdown")
    max_bad_steps: int = _field(5, min=1, doc="consecutive non-finite losses that stop the run")
    dtype: str = _field("auto", choices=("auto", "bf16", "fp32"), doc="autocast dtype; auto = bf16 where supported")
    compile: bool = _field(True, doc="torch.compile the model (falls back to eager without a C++ compiler on CPU)")
    compile_scope: str = _field("auto", choices=("auto", "model", "blocks"),
                                doc="what train.compile compiles: the whole model, or each transformer block on its "
                                    "own (regional compilation: the blocks share one compiled graph, so it compiles "
                                    "once whatever the depth); auto = blocks with mhc.enabled, whose whole-model "
                                    "graph compiles 4-5x slower than the plain model's, else model")
    seed: int = _field(42, min=0, doc="seed of init and data order")
    checkpoint_every: int = _field(200, min=0, doc="steps between checkpoints; 0 = only at the end")
    activation_checkpointing: str = _field("none", choices=("none", "full", "selective"),
                                           doc="recompute activations in backward: full = each block's whole "
                                               "forward; selective = keep matmul and attention outputs and "
                                               "BitLinear's scales, recompute the rest")


@dataclass
class EvalConfig:
    """[eval]: held-out loss, bits per byte and samples during training."""

    every_steps: int = _field(100, min=0, doc="steps between validation passes; 0 = only at the end")
    val_batches: int = _field(20, min=1, doc="batches per validation pass")
    sample_every: int = _field(0, min=0, doc="steps between samples; 0 = only at the end")
    sample_tokens: int = _field(128, min=1, doc="tokens per sample")
    report: bool = _field(False, doc="at the end of the run write report.md and loss.png in the run folder "
                                     "(ternchat speedrun turns it on)")
    rust_problems: bool = _field(True, doc="after training, score one greedy completion per shipped Rust problem "
                                           "in the rustc sandbox: compile rate and pass@1 (skipped without rustc "
                                           "or bubblewrap)")
    allow_unisolated: bool = _field(False, doc="run model-written Rust even without bubblewrap's namespaces (the "
                                               "programs can then read host files and reach the network)")


@dataclass
class DistConfig:
    """[dist]: training across the processes torchrun starts (train/distributed.py)."""

    strategy: str = _field("none", choices=("none", "ddp", "fsdp2"),
                           doc="ddp: replicate the model, average gradients; fsdp2: shard parameters, gradients "
                               "and AdamW state per block (fully_shard); none: one process")
    backend: str = _field("auto", choices=("auto", "nccl", "gloo"), doc="process group backend; auto = nccl on "
                                                                         "GPUs, gloo on CPU")
    fsdp_param_dtype: str = _field("bf16", choices=("bf16", "fp32"),
                                   doc="dtype FSDP2 all-gathers the weights in for forward and backward; "
                                       "gradients are reduced in fp32 either way")
    reshard_after_forward: bool = _field(True, doc="FSDP2: free each block's gathered weights after its forward "
                                                   "and gather them again in backward (less memory, more traffic)")
    offload: bool = _field(False, doc="keep fp32 weights, gradients and optimizer state in host memory: FSDP2's "
                                      "CPUOffloadPolicy streams each block's weights to the GPU and its gradients "
                                      "back, and each matrix is stepped on the GPU; needs strategy = 'fsdp2' "
                                      "(also in one process, without torchrun)")


@dataclass
class HardwareConfig:
    """[hardware]: the machine a config is meant for; `ternchat plan` checks the run against it."""

    name: str = _field("", doc="the machine in words, for the plan's title")
    gpus: int = _field(1, min=1, doc="GPUs, one rank each")
    gpu_memory: str = _field("", doc="memory per GPU, e.g. '24GiB' or '96GB'; empty = not declared")
    host_memory: str = _field("", doc="host RAM for the whole machine, e.g. '512GiB'; the plan checks what "
                                      "dist.offload keeps there against it; empty = not declared")


@dataclass
class SFTConfig:
    """[sft]: supervised fine-tuning on chat conversations (`ternchat sft`, train/sft.py)."""

    steps: int = _field(300, min=1, doc="optimizer steps")
    time_limit_min: float = _field(0.0, min=0.0, doc="training budget in minutes (0 = none; held-out loss passes do "
                                                     "not count): SFT ends at `steps` or here, whichever comes "
                                                     "first, and the learning rate decays over whichever is nearer")
    batch_size: int = _field(8, min=1, doc="conversations per step (padded to the longest)")
    lr_scale: float = _field(0.1, min=0.0, doc="multiplier of the pretraining learning rates, decayed linearly to 0")
    corpus_conversations: int = _field(2000, min=0, doc="most conversations mined from the corpus (a `///` "
                                                         "documented fn: doc and signature in, body out)")
    task_copies: int = _field(4, min=0, doc="times each training task appears per epoch (they are few)")
    val_fraction: float = _field(0.1, min=0.0, max=0.5, doc="share of the conversations held out for the loss")
    val_max: int = _field(256, min=0, doc="most held-out conversations (0 = no cap), so that each held-out "
                                          "pass stays short")
    eval_every: int = _field(25, min=1, doc="steps between held-out loss passes")
    checkpoint_every: int = _field(100, min=0, doc="steps between checkpoints; 0 = only at the end")
    seed: int = _field(0, min=0, doc="seed of the conversation order and the held-out split")


@dataclass
class RLConfig:
    """[rl]: GRPO with rustc rewards on the training tasks (`ternchat rl`, train/rl.py)."""

    steps: int = _field(30, min=1, doc="optimizer steps, one per batch of groups")
    prompts_per_step: int = _field(4, min=1, doc="training tasks per step")
    group_size: int = _field(8, min=2, doc="replies sampled per task (the group of GRPO)")
    max_tokens: int = _field(96, min=1, doc="longest reply")
    temperature: float = _field(1.0, min=0.0, doc="sampling temperature of the replies")
    compile_reward: float = _field(0.2, min=0.0, max=1.0, doc="reward of a reply that compiles but fails its "
                                                              "tests (passing: 1, not compiling: 0)")
    normalize_std: bool = _field(False, doc="divide advantages by the group's std (the paper; nanochat does not)")
    kl_coef: float = _field(0.0, min=0.0, doc="weight of the k3 KL to the starting policy (0 = none, nanochat)")
    lr_scale: float = _field(0.05, min=0.0, doc="multiplier of the pretraining learning rates")
    checkpoint_every: int = _field(10, min=0, doc="steps between checkpoints; 0 = only at the end")
    seed: int = _field(0, min=0, doc="seed of the task order and the sampling")


@dataclass
class TFGRPOConfig:
    """[tfgrpo]: Training-Free GRPO, adapted (`ternchat tfgrpo`, train/tfgrpo.py): an experience library in
    the prompt, learned from groups of rollouts, weights frozen."""

    steps: int = _field(3, min=1, doc="steps (the paper: 3 epochs over 100 problems)")
    tasks_per_step: int = _field(8, min=1, doc="tasks per step")
    group_size: int = _field(5, min=2, doc="rollouts per task (the paper's G = 5)")
    temperature: float = _field(0.7, min=0.0, doc="sampling temperature of the rollouts (the paper's 0.7)")
    max_tokens: int = _field(96, min=1, doc="longest rollout")
    per_task: int = _field(1, min=1, max=8, doc="operations one task's group may propose (the paper: one)")
    max_experiences: int = _field(16, min=1, doc="largest library; the least supported experiences go first")
    seed: int = _field(0, min=0, doc="seed of the task order and the sampling")


@dataclass
class FireConfig:
    """[fire]: FIRE (train/fire.py) on the weights when a run switches stage."""

    at_sft: bool = _field(False, doc="orthogonalize the pretrained weights before SFT starts")
    at_rl: bool = _field(False, doc="orthogonalize the SFT weights before RL starts")
    mode: str = _field("exact", choices=("exact", "newton_schulz"),
                       doc="exact: the polar factor by SVD (the paper's objective); newton_schulz: the official "
                           "code's cubic iteration")
    iterations: int = _field(5, min=1, max=100, doc="newton_schulz: steps (the official code uses 5)")


@dataclass
class SpeedrunConfig:
    """[speedrun]: what `ternchat speedrun` does after pretraining (speedrun.py)."""

    sft: bool = _field(False, doc="then SFT on the training tasks and the corpus's mined functions, for "
                                  "sft.time_limit_min or sft.steps, into the run folder NAME_sft")
    export: bool = _field(False, doc="then write the last stage's packed model file (model_packed.safetensors in "
                                     "its run folder), which samples and evaluates on any machine")


@dataclass
class Config:
    data: DataConfig = field(default_factory=DataConfig)
    loader: LoaderConfig = field(default_factory=LoaderConfig)
    tokenizer: TokenizerConfig = field(default_factory=TokenizerConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    mtp: MTPConfig = field(default_factory=MTPConfig)
    mhc: MHCConfig = field(default_factory=MHCConfig)
    loop: LoopConfig = field(default_factory=LoopConfig)
    fp4: FP4Config = field(default_factory=FP4Config)
    collider: ColliderConfig = field(default_factory=ColliderConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    dist: DistConfig = field(default_factory=DistConfig)
    hardware: HardwareConfig = field(default_factory=HardwareConfig)
    sft: SFTConfig = field(default_factory=SFTConfig)
    rl: RLConfig = field(default_factory=RLConfig)
    tfgrpo: TFGRPOConfig = field(default_factory=TFGRPOConfig)
    fire: FireConfig = field(default_factory=FireConfig)
    speedrun: SpeedrunConfig = field(default_factory=SpeedrunConfig)

    def to_dict(self) -> dict[str, dict[str, Any]]:
        return dataclasses.asdict(self)

    def compile_scope(self) -> str:
        """What `train.compile` compiles, "model" or "blocks", with `auto` resolved: mHC's whole-model graph
        compiles 4-5x slower than the plain model's, so auto compiles an mHC model block by block."""
        if self.train.compile_scope != "auto":
            return self.train.compile_scope
        return "blocks" if self.mhc.enabled else "model"

    def to_toml(self) -> str:
        return tomli_w.dumps(self.to_dict())


SECTIONS: dict[str, type] = typing.get_type_hints(Config)


def _type_name(tp: Any) -> str:
    if typing.get_origin(tp) is list:
        return f"list of {typing.get_args(tp)[0].__name__}"
    return tp.__name__


def _coerce(key: str, tp: Any, value: Any) -> Any:
    """Return `value` as type `tp`, or raise ConfigError naming `key`."""
    ok = False
    if tp is bool:
        ok = isinstance(value, bool)
    elif tp is int:
        ok = isinstance(value, int) and not isinstance(value, bool)
    elif tp is float:
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        value = float(value) if ok else value
    elif tp is str:
        ok = isinstance(value, str)
    elif typing.get_origin(tp) is list:
        (item,) = typing.get_args(tp)
        ok = isinstance(value, list) and all(isinstance(v, item) for v in value)
    if not ok:
        name = _type_name(tp)
        article = "an" if name[0] in "aeiou" else "a"
        raise ConfigError(f"{key} must be {article} {name}, got {type(value).__name__} {value!r}")
    return value


def _check_range(key: str, f: dataclasses.Field, value: Any) -> None:
    lo, hi, choices = f.metadata.get("min"), f.metadata.get("max"), f.metadata.get("choices")
    if choices is not None and value not in choices:
        raise ConfigError(f"{key} = {value!r} is not valid; choose one of: {', '.join(choices)}")
    if (lo is not None and value < lo) or (hi is not None and value > hi):
        bounds = " and ".join(b for b in (f">= {lo}" if lo is not None else "", f"<= {hi}" if hi is not None else "") if b)
        raise ConfigError(f"{key} = {value!r} is out of range; valid values are {bounds}")


def _apply(cfg: Config, section: str, key: str, value: Any, origin: str) -> None:
    if section not in SECTIONS:
        raise ConfigError(f"unknown config section [{section}] ({origin}); valid sections: {', '.join(SECTIONS)}")
    obj = getattr(cfg, section)
    fields = {f.name: f for f in dataclasses.fields(obj)}
    if key not in fields:
        raise ConfigError(f"unknown config key '{section}.{key}' ({origin}); valid keys in [{section}]: "
                          f"{', '.join(fields)}")
    tp = typing.get_type_hints(type(obj))[key]
    full = f"{section}.{key}"
    value = _coerce(full, tp, value)
    _check_range(full, fields[key], value)
    setattr(obj, key, value)


def parse_bytes(text: str) -> int:
    """A memory size such as '24GiB', '96 GB' or '512' (bytes)."""
    match = re.fullmatch(r"\s*([\d.]+)\s*(b|kib|mib|gib|tib|kb|mb|gb|tb)?\s*", text.lower())
    if not match:
        raise ValueError(f"cannot read a memory size from {text!r}; write e.g. 24GiB or 96GB")
    units = {None: 1, "b": 1, "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40,
             "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12}
    return int(float(match.group(1)) * units[match.group(2)])


def _parse_override(text: str) -> tuple[str, str, Any]:
    if "=" not in text or "." not in text.split("=", 1)[0]:
        raise ConfigError(f"--set expects section.key=value, got {text!r}")
    dotted, raw = text.split("=", 1)
    section, key = dotted.strip().split(".", 1)
    try:
        value = tomllib.loads(f"v = {raw}")["v"]
    except tomllib.TOMLDecodeError:
        value = raw  # a bare word is a string: --set train.run_name=myrun
    return section, key, value


def _follow_main_keys(cfg: Config) -> None:
    """Companion keys left at their defaults follow a technique's main key, so that one key switches it on:
    `loader.kind = "minato"` gets one fast worker, and `mtp.n_future` heads get the default weights' halving
    series at their number (1, 1/2, 1/4, ...). A companion set by hand is kept and checked."""
    defaults = Config()
    if cfg.loader.kind == "minato" and cfg.loader.workers == 0:
        cfg.loader.workers = 1
    mtp = cfg.mtp
    if mtp.kind == "heads" and mtp.weights == defaults.mtp.weights and len(mtp.weights) != mtp.n_future + 1:
        mtp.weights = [0.5 ** i for i in range(mtp.n_future + 1)]


def _check_switched_on(cfg: Config) -> None:
    """A section with an `enabled` switch that is off takes no other key: a key set away from its default
    there would be silently ignored, so it is an error naming the key and the switch."""
    for section in SECTIONS:
        obj = getattr(cfg, section)
        if getattr(obj, "enabled", True):
            continue
        defaults = type(obj)()
        for f in dataclasses.fields(obj):
            if f.name != "enabled" and getattr(obj, f.name) != getattr(defaults, f.name):
                raise ConfigError(f"{section}.{f.name} = {getattr(obj, f.name)!r} is set but [{section}] is off; "
                                  f"set {section}.enabled = true to use it, or leave {section}.{f.name} unset")


def _validate(cfg: Config) -> None:
    _follow_main_keys(cfg)
    _check_switched_on(cfg)
    m = cfg.model
    if m.d_model % m.n_heads:
        raise ConfigError(f"model.d_model = {m.d_model} must be divisible by model.n_heads = {m.n_heads}")
    if (m.d_model // m.n_heads) % 2:
        raise ConfigError(f"model head size d_model/n_heads = {m.d_model // m.n_heads} must be even (RoPE)")
    o = cfg.optim
    if o.use_galore and o.matrix_optimizer == "muon" and o.gum_full_rank_layers >= m.depth:
        raise ConfigError(f"optim.gum_full_rank_layers = {o.gum_full_rank_layers} must be less than model.depth = "
                          f"{m.depth}: GUM draws that many of the blocks each period for a full-rank step")
    if o.use_8bit_optim and o.matrix_optimizer != "muon":
        raise ConfigError(f"optim.use_8bit_optim keeps Muon/GUM momentum in int8 and does nothing with "
                          f"optim.matrix_optimizer = {o.matrix_optimizer!r}; for bitsandbytes' 8-bit AdamW on the "
                          "embedding and head set optim.adamw_8bit")
    for key in ("gpu_memory", "host_memory"):
        if value := getattr(cfg.hardware, key):
            try:
                parse_bytes(value)
            except ValueError as e:
                raise ConfigError(f"hardware.{key}: {e}") from None
    if cfg.dist.offload and cfg.dist.strategy != "fsdp2":
        raise ConfigError(f"dist.offload needs dist.strategy = 'fsdp2' (it is {cfg.dist.strategy!r}): FSDP2 does "
                          "the streaming, also in a single process")
    if cfg.mtp.kind == "heads" and len(cfg.mtp.weights) != cfg.mtp.n_future + 1:
        raise ConfigError(f"mtp.weights has {len(cfg.mtp.weights)} values; mtp.kind = 'heads' needs mtp.n_future + 1 "
                          f"= {cfg.mtp.n_future + 1} (the next-token head's weight, then each extra head's)")
    if cfg.mtp.kind == "heads" and cfg.dist.strategy == "fsdp2":
        raise ConfigError("mtp.kind = 'heads' runs each head's backward inside the forward, which FSDP2's sharded "
                          "parameters do not support yet; use dist.strategy = 'ddp' or mtp.kind = 'modules'")
    if cfg.data.min_file_bytes >= cfg.data.max_file_bytes:
        raise ConfigError("data.min_file_bytes must be smaller than data.max_file_bytes")
    f = cfg.fp4
    if f.recipe != "none" and f.bf16_first_blocks + f.bf16_last_blocks >= m.depth:
        raise ConfigError(f"fp4.bf16_first_blocks + fp4.bf16_last_blocks = {f.bf16_first_blocks + f.bf16_last_blocks} "
                          f"leaves none of the model.depth = {m.depth} blocks to fp4.recipe = {f.recipe!r}")
    if f.fp8_min_macs != -1 and f.recipe != "fp8":
        raise ConfigError(f"fp4.fp8_min_macs = {f.fp8_min_macs} is the size rule of fp4.recipe = 'fp8', and the "
                          f"recipe is {f.recipe!r}: set fp4.recipe = 'fp8', or leave fp4.fp8_min_macs out")
    if f.hadamard_block & (f.hadamard_block - 1):
        raise ConfigError(f"fp4.hadamard_block = {f.hadamard_block} must be a power of two (or 0 for the recipe's)")
    if cfg.collider.enabled and (cfg.mtp.kind != "none" or cfg.loop.enabled):
        raise ConfigError("collider.enabled filters the next-token loss of a plain objective; it does not combine "
                          "with mtp.kind or loop.enabled yet")
    if m.ternary_gemm != "float" and m.quant != "ternary":
        raise ConfigError(f"model.ternary_gemm = {m.ternary_gemm!r} multiplies ternary codes; it needs "
                          "model.quant = 'ternary'")
    if m.ternary_gemm != "float" and (f.recipe != "none" or cfg.collider.enabled):
        raise ConfigError(f"model.ternary_gemm = {m.ternary_gemm!r} replaces the linear's own GEMMs, so it does not "
                          "combine with fp4.recipe or collider.enabled; set model.ternary_gemm = 'float' for those")


def load_config(path: str | Path | None = None, overrides: typing.Sequence[str] = ()) -> Config:
    """Build a Config from the defaults, then the TOML file at `path`, then `section.key=value` overrides."""
    cfg = Config()
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file not found: {path}")
        try:
            doc = tomllib.loads(path.read_text(encoding="utf-8"))
        except tomllib.TOMLDecodeError as e:
            raise ConfigError(f"{path} is not valid TOML: {e}") from None
        for section, table in doc.items():
            if not isinstance(table, dict):
                raise ConfigError(f"top-level key '{section}' in {path} must be a [section]; "
                                  f"valid sections: {', '.join(SECTIONS)}")
            for key, value in table.items():
                _apply(cfg, section, key, value, str(path))
    for text in overrides:
        section, key, value = _parse_override(text)
        _apply(cfg, section, key, value, f"--set {text}")
    _validate(cfg)
    return cfg


def describe(section: str) -> list[tuple[str, str, Any, str]]:
    """(key, type, default, doc) rows of one section, for `ternchat config --keys`."""
    cls = SECTIONS[section]
    hints = typing.get_type_hints(cls)
    rows = []
    for f in dataclasses.fields(cls):
        default = f.default_factory() if f.default is dataclasses.MISSING else f.default
        rows.append((f.name, _type_name(hints[f.name]), default, f.metadata.get("doc", "")))
    return rows
