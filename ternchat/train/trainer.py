"""The training loop: data -> model -> loss -> backward -> optimizer, with evals and checkpoints.

The loop knows the model, the optimizer factory's `CombinedOptimizer` and the schedule, and
nothing about which optimizer or linear layer runs. What happens besides training (samples, the
compiled Rust evaluation, the report, a schedule's stage switch) is a handler of the events the loop
emits (train/events.py), chosen from the config. A run lives in `runs/<name>/`: the resolved
`config.toml`, a copy of the tokenizer, `metrics.jsonl`, `checkpoints/`, `samples/`.

With a time budget instead of a step count (`train.time_limit_min`, `max_steps = 0`), the run
trains at constant LR after warmup until the wall clock reaches the start of the warmdown
(`1 - warmdown_frac` of 90% of the budget; the rest is left for the final evaluation), then
fixes the warmdown's step count from the seconds per step measured over all steps so far (each
session's first step, which compiles, left out; evals and checkpoints included), and
`bitnet_two_stage` switches stage when the clock passes the middle (a `clock` event handler). Those decisions are saved in
the checkpoints, so a resumed run repeats the same steps and losses; until they are made, the
LR does not depend on the run's length, so resuming earlier changes nothing either.
"""

from __future__ import annotations

import copy
import math
import resource
import shutil
import sys
import time
from pathlib import Path
import torch
from tqdm import tqdm

from ternchat.config import Config, load_config
from ternchat.data.loader import make_train_loader
from ternchat.data.pipeline import prepare_data
from ternchat.data.shards import shard_paths
from ternchat.eval.bpb import held_out_bpb
from ternchat.model.bitlinear import set_training_gemm, to_inference
from ternchat.model.gpt import GPT, Block, GPTShape
from ternchat.model.objective import objective_metrics
from ternchat.optim.factory import CombinedOptimizer, build_optimizer
from ternchat.train.events import Events, pretraining_events
from ternchat.train.errors import RunError
from ternchat.train.activation_checkpointing import apply_activation_checkpointing
from ternchat.train.checkpoint import latest_checkpoint, load_checkpoint, load_run_checkpoint, save_checkpoint
from ternchat.train.distributed import (Ranks, barrier, full_model_state, gather_objects, init_distributed,
                                        is_sharded, launched_ranks, model_home, parallelize, shutdown_distributed)
from ternchat.train.metrics import MetricsLog
from ternchat.train.schedule import RunLength, schedule
from ternchat.train.step import autocast_for, compute_dtype, optimizer_step

TRAINING_SHARE_OF_BUDGET = 0.9  # of a time budget; the rest is left for the final evals and samples


class TrainingError(RunError):
    """The run cannot go on (non-finite losses, an existing run without --resume, ...)."""


def pick_device() -> torch.device:
    return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")


def proc_status_bytes(field: str) -> int | None:
    """A memory field of /proc/self/status (VmRSS, VmHWM, ...) in bytes, or None off Linux."""
    try:
        for line in open("/proc/self/status"):
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def peak_memory_bytes(device: torch.device) -> int:
    """CUDA: peak allocated bytes. CPU: this process's peak resident set size."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    # VmHWM belongs to this process image; ru_maxrss would include a forking parent's peak.
    peak = proc_status_bytes("VmHWM")
    return peak if peak is not None else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def compile_if_possible(model: torch.nn.Module, device: torch.device, log, scope: str = "model") -> torch.nn.Module:
    """torch.compile of the whole model, or with `scope` "blocks" of each transformer block's forward in place
    (the FSDP2 and checkpointing wrappers around a block stay eager); eager, with a warning, where the CPU
    backend's C++ compiler is missing. Returns the module to call."""
    if device.type == "cpu" and not any(shutil.which(cc) for cc in ("g++", "c++", "clang++")):
        log("warning: train.compile is on but no C++ compiler (g++/clang++) is on PATH; training eagerly")
        return model
    if scope == "blocks":
        for block in (m for m in model.modules() if isinstance(m, Block)):
            block.forward = torch.compile(block.forward)
        return model
    return torch.compile(model)


def training_forward(cfg: Config, parallel_model: torch.nn.Module, device: torch.device, log) -> torch.nn.Module:
    """The module a training step calls: `parallel_model`, compiled as `train.compile` and its scope say."""
    if not cfg.train.compile:
        return parallel_model
    return compile_if_possible(parallel_model, device, log, cfg.compile_scope())


def build_training(cfg: Config, shape: GPTShape, ranks: Ranks, device: torch.device
                   ) -> tuple[GPT, torch.nn.Module, CombinedOptimizer]:
    """The model (seeded), the module to call for its forward (sharded, replicated or itself, with
    recompute as configured) and the optimizer, as a training run of `cfg` uses them."""
    torch.manual_seed(cfg.train.seed)
    model = set_training_gemm(GPT(shape).to(model_home(cfg.dist, device)), cfg.model.ternary_gemm)
    if model.collider is not None and model.collider.reference_run:  # Rho-1's reference model, frozen
        reference, _ = load_run_checkpoint(Path(model.collider.reference_run), for_inference=True)
        model.collider.reference = to_inference(reference).eval().to(device).requires_grad_(False)
    apply_activation_checkpointing(model, cfg.train.activation_checkpointing)
    parallel_model = parallelize(model, cfg.dist, ranks, device)
    return model, parallel_model, build_optimizer(model, cfg.optim, ranks)


class Trainer:
    def __init__(self, cfg: Config, run_dir: Path, resume: bool = False, log=print, events: Events | None = None):
        self.ranks = launched_ranks()
        self.run_dir, self.log = Path(run_dir), (log if self.ranks.main else lambda *a, **k: None)
        log = self.log
        checkpoint = latest_checkpoint(self.run_dir)
        if checkpoint is not None and not resume:
            raise TrainingError(f"{self.run_dir} already has checkpoints; pass --resume to continue that run, or "
                                "choose another name with --set train.run_name=NAME")
        if resume and checkpoint is None:
            log(f"no checkpoint in {self.run_dir}; starting a new run")
        self.cfg = cfg
        self.device = init_distributed(cfg.dist, self.ranks)
        if not self.ranks.main:
            barrier()  # rank 0 builds the data once; the others then find it in the cache
        data = prepare_data(cfg, log=log)
        if self.ranks.main:
            barrier()
        self.tok = data.tokenizer
        self.shape = GPTShape.from_config(cfg, self.tok.vocab_size)
        self.model, self.parallel_model, self.optimizer = build_training(cfg, self.shape, self.ranks, self.device)
        counts = self.model.parameter_counts()
        kind = "ternary" if self.model.is_ternary() else "dense"
        log(f"model: {self.shape.depth} blocks x {self.shape.d_model}, {counts['total']:,} parameters: embedding "
            f"{counts['embedding']:,}, head {counts['head']:,}, {kind} block matrices {counts['block_matrices']:,}, "
            f"norm gains {counts['norm_gains']:,}")
        t = cfg.train
        self.autocast = autocast_for(t.dtype, self.device)
        for line in self.model.fit_gemms(self.device, t.batch_size * cfg.model.seq_len, compute_dtype(self.autocast)):
            log(line)
        self.train_loader = make_train_loader(
            cfg.loader, shard_paths(data.shard_dir, "train"), tokenizer=self.tok, tokenizer_dir=data.tokenizer_dir,
            corpus_dir=data.corpus_dir, batch_size=t.batch_size, seq_len=cfg.model.seq_len, seed=t.seed,
            rank=self.ranks.rank, world_size=self.ranks.world_size, device=self.device, log=log)
        self.val_paths = shard_paths(data.shard_dir, "val")
        self.token_bytes = torch.tensor(self.tok.token_bytes(), dtype=torch.float32, device=self.device)
        self.forward = training_forward(cfg, self.parallel_model, self.device, log)
        self.metrics = MetricsLog(self.run_dir / "metrics.jsonl", enabled=self.ranks.main)
        self.step, self.tokens_seen, self.elapsed = 0, 0, 0.0
        self.length = RunLength.fixed(t.max_steps, t.warmdown_frac) if t.max_steps else RunLength()
        # Wall clock of the loop over all sessions, and the steps timed for the run-length decision.
        self.clock, self.wall_seconds, self.timed_seconds, self.timed_steps = time.perf_counter, 0.0, 0.0, 0
        self._inference: tuple[int | None, GPT | None] = (None, None)
        self.events = events if events is not None else pretraining_events(cfg)
        self.samples: list[dict] = []  # the last ones written (samples_when_due)
        if checkpoint is not None:
            self._resume(checkpoint)
        elif self.ranks.main:
            self._start_run_dir()

    # --- run directory ----------------------------------------------------------------------
    def _start_run_dir(self) -> None:
        self.run_dir.mkdir(parents=True, exist_ok=True)
        (self.run_dir / "config.toml").write_text(self.cfg.to_toml())
        shutil.rmtree(self.run_dir / "tokenizer", ignore_errors=True)
        self.tok.save(self.run_dir / "tokenizer")
        self.metrics.path.unlink(missing_ok=True)

    def _resume(self, checkpoint: Path) -> None:
        state = load_checkpoint(checkpoint, self.model, self.optimizer, self.shape)
        loader_state = state["loader"]
        if "ranks" in loader_state:  # a document loader's positions, one per rank
            if len(loader_state["ranks"]) != self.ranks.world_size:
                raise TrainingError(f"the checkpoint's loader ran on {len(loader_state['ranks'])} ranks; resume it "
                                    f"on as many (this run has {self.ranks.world_size})")
            loader_state = loader_state["ranks"][self.ranks.rank]
        self.train_loader.load_state_dict(loader_state)
        self.step, self.length = state["step"], RunLength(**state["length"])
        self.tokens_seen, self.elapsed = state["tokens_seen"], state["elapsed"]
        self.wall_seconds, self.timed_seconds, self.timed_steps = (state["wall_seconds"], state["timed_seconds"],
                                                                   state["timed_steps"])
        self.metrics.truncate_after(self.step)
        of = f"of {self.length.total}" if self.length.total else "of a time budget, length not fixed yet"
        self.log(f"resumed {self.run_dir} from {checkpoint.name} (step {self.step} {of})")

    def _loader_state(self) -> dict:
        """The loader's position: one for all ranks (shard windows), or each rank's (documents)."""
        if not self.train_loader.position_per_rank:
            return self.train_loader.state_dict()
        return {"ranks": gather_objects(self.train_loader.state_dict())}

    def _checkpoint(self) -> None:
        loader_state = self._loader_state()
        model_state, optimizer_state = full_model_state(self.model), self.optimizer.state_dict()
        if not self.ranks.main:
            barrier()
            return
        save_checkpoint(self.run_dir, self.step, model_state, optimizer_state, {
            "step": self.step, "length": self.length.to_dict(), "tokens_seen": self.tokens_seen,
            "elapsed": self.elapsed, "wall_seconds": self.wall_seconds, "timed_seconds": self.timed_seconds,
            "timed_steps": self.timed_steps, "loader": loader_state,
            "model_shape": self.shape.to_dict(), "world_size": self.ranks.world_size})
        barrier()

    # --- pieces of a step -------------------------------------------------------------------
    def _train_step(self) -> float:
        t = self.cfg.train
        self.lr_scale, wd_scale = schedule(self.step, self.length, t.warmup_steps, t.schedule)
        self.optimizer.set_schedule(self.lr_scale, wd_scale)
        batches = (self.train_loader.next_batch() for _ in range(t.grad_accum))
        return optimizer_step(self.forward, self.model, self.optimizer, batches, t.grad_accum, self.autocast,
                              self.cfg.optim.grad_clip, self.device)

    def evaluate(self) -> dict:
        return held_out_bpb(self.model, self.val_paths, self.token_bytes, self.cfg.train.batch_size,
                            self.cfg.model.seq_len, self.cfg.eval.val_batches, self.autocast, self.tok.hash)

    def inference_model(self) -> GPT:
        """A copy with fixed ternary codes: same logits, no weight re-quantization per generated token.
        Made once per step, so end-of-run samples and the Rust-problem eval share it."""
        if self._inference[0] != self.step:
            model = self.plain_model()
            self._inference = (self.step, model and to_inference(model).to(self.device).eval())
        return self._inference[1]

    def plain_model(self) -> GPT | None:
        """A whole copy of the model without recompute or sharding; for a sharded model a collective that
        gives rank 0 the copy in host memory (the fp32 latent weights may not fit on its GPU) and None to
        the others."""
        if not is_sharded(self.model):
            model = copy.deepcopy(self.model)
        else:
            state = full_model_state(self.model)
            if not self.ranks.main:
                return None
            model = GPT(self.shape)
            model.load_state_dict(state)
        apply_activation_checkpointing(model, "none")
        return model

    def training_budget_seconds(self) -> float:
        return self.cfg.train.time_limit_min * 60 * TRAINING_SHARE_OF_BUDGET

    def _follow_the_clock(self) -> None:
        """With a time budget: fix the warmdown when the clock reaches it."""
        t = self.cfg.train
        budget = self.training_budget_seconds()
        if self.wall_seconds < (1 - t.warmdown_frac) * budget:
            return
        per_step = (self.timed_seconds / self.timed_steps if self.timed_steps
                    else self.wall_seconds / max(self.step, 1))
        warmdown = max(1, round((budget - self.wall_seconds) / per_step))
        self.length.fix_warmdown(self.step, warmdown)
        self.metrics.write(step=self.step, event="run_length", total=self.length.total, seconds_per_step=per_step,
                           wall_seconds=self.wall_seconds)
        self.log(f"{per_step:.2f} s per step over {self.timed_steps} steps: the {t.time_limit_min:g}-minute budget "
                 f"ends after {self.length.total} steps ({warmdown} of warmdown from step {self.step})")

    def due(self, every: int) -> bool:
        return self.step == self.length.total or (every > 0 and self.step % every == 0)

    # --- the loop ---------------------------------------------------------------------------
    def run(self) -> dict:
        t, e = self.cfg.train, self.cfg.eval
        if self.length.total is None and t.time_limit_min == 0:
            raise TrainingError("set train.max_steps or train.time_limit_min; both are 0")
        tokens_per_step = t.batch_size * t.grad_accum * self.cfg.model.seq_len * self.ranks.world_size
        bar = tqdm(total=self.length.total, initial=self.step, desc="train", unit="step", file=sys.stderr,
                   disable=not self.ranks.main)
        bad_steps, last_val, start = 0, {}, time.perf_counter()
        first_of_session = True
        while self.length.total is None or self.step < self.length.total:
            iteration_start = self.clock()
            step_start, waited = time.perf_counter(), self.train_loader.wait_seconds
            loss = self._train_step()
            waited = self.train_loader.wait_seconds - waited
            self.step += 1
            self.tokens_seen += tokens_per_step
            step_seconds = time.perf_counter() - step_start
            self.elapsed += step_seconds
            if not math.isfinite(loss):
                bad_steps += 1
                self.metrics.write(step=self.step, event="nonfinite_loss", loss=str(loss))
                self.log(f"step {self.step}: loss is {loss}; update skipped ({bad_steps} in a row)")
                if bad_steps >= t.max_bad_steps:
                    raise TrainingError(f"{bad_steps} non-finite losses in a row at step {self.step}; stopping. "
                                        "The last good checkpoint is kept; lower the learning rate and --resume.")
            else:
                bad_steps = 0
                tok_s = tokens_per_step / max(step_seconds, 1e-9)
                self.metrics.write(step=self.step, loss=loss, lr_scale=self.lr_scale, tokens=self.tokens_seen,
                                   tok_s=tok_s, elapsed_s=self.elapsed, data_wait_s=waited,
                                   peak_memory_bytes=peak_memory_bytes(self.device), **objective_metrics(self.model))
                bar.set_postfix(loss=f"{loss:.3f}", tok_s=f"{tok_s:,.0f}")
                if self.due(e.every_steps):
                    last_val = self.evaluate()
                    self.metrics.write(step=self.step, **last_val)
                    bar.write(f"step {self.step}: val loss {last_val['val_loss']:.4f}, "
                              f"val bpb {last_val['val_bpb']:.4f}")
                    self.events.emit("eval", self, measured=last_val)
                self.events.emit("step_end", self, loss=loss)
            bar.update(1)
            iteration = self.clock() - iteration_start
            self.wall_seconds += iteration
            if not first_of_session:  # a session's first step compiles; it would skew the speed
                self.timed_seconds += iteration
                self.timed_steps += 1
            first_of_session = False
            if self.length.total is None:
                self.events.emit("clock", self)
                self._follow_the_clock()
                if self.length.total is not None:
                    bar.total = self.length.total  # keeps the bar's own clock, so its rate stays true
                    bar.refresh()
            if self.due(t.checkpoint_every) and bad_steps == 0:
                self._checkpoint()
                self.events.emit("checkpoint", self)
        bar.close()
        self.train_loader.close()
        result = {"steps": self.step, "tokens_seen": self.tokens_seen, "train_seconds": self.elapsed,
                  "tok_s": self.tokens_seen / max(self.elapsed, 1e-9), **last_val,
                  "peak_memory_bytes": peak_memory_bytes(self.device),
                  "parameters": self.model.parameter_counts(), "device": str(self.device), "samples": self.samples}
        self.events.fold("run_end", self, result)
        result.update(wall_seconds_this_session=time.perf_counter() - start,
                      peak_memory_bytes=peak_memory_bytes(self.device))
        return result


def resolve_run(config_path: str | None, overrides: list[str], run_dir: str | None, resume: bool) -> tuple[Config, Path]:
    """The config and run folder of a train command; a resumed run reuses its saved config."""
    cfg = load_config(config_path, overrides)
    path = Path(run_dir) if run_dir else Path("runs") / cfg.train.run_name
    saved = path / "config.toml"
    if resume and saved.exists():
        cfg = load_config(saved, overrides)
    return cfg, path


def train(cfg: Config, run_dir: Path, resume: bool = False, log=print) -> dict:
    """Train a run; in a distributed run every rank calls this and rank 0 gets the result ({} elsewhere)."""
    trainer = Trainer(cfg, run_dir, resume, log)
    main = trainer.ranks.main
    try:
        result = trainer.run()
    finally:
        del trainer  # its model holds the process group, which shutdown_distributed destroys
        shutdown_distributed()
    return result if main else {}
