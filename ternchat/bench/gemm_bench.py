"""`ternchat bench precision` and `ternchat bench collider`: what the linear's GEMM hooks buy and cost.

precision: the same model, seed and batches trained for the same steps with the GEMMs in high precision
(the config's dtype) and under each `[fp4]` recipe, each in its own process: validation bits per byte,
the loss curve, training tokens/s (FP4 is emulated on every machine without Blackwell FP4 kernels, so
its tokens/s measure the emulation, not FP4 hardware). On the trained high-precision model, the
quantization error of each tensor kind (weights, activations, output gradients) in each format,
||Q(t) - t|| / ||t|| averaged over the block linears. With CUDA, the GEMM throughput of bf16 against
FP8 (`torch._scaled_mm`) for the presets' matrix shapes.

collider: forward and backward time of one training step at 0 / 20 / 40 / 60% filtered tokens, the
same model and batch, the fractions interleaved round by round (medians); then each fraction trained
for the same steps on the same batches (same tokens seen) for its validation bits per byte.
"""

from __future__ import annotations

import statistics
import time
from pathlib import Path

import torch

from ternchat.bench.runs import measure_in_subprocess, variants_table_head
from ternchat.config import load_config
from ternchat.model.fp4 import Operand, execution_path, quantize, random_hadamard
from ternchat.train.errors import RunError
from ternchat.train.report import machine

RECIPES = ("mxfp4_backward", "nvfp4", "fp8")
FORMATS: dict[str, Operand] = {
    "MXFP4 nearest": Operand("mxfp4"), "MXFP4 stochastic": Operand("mxfp4", True),
    "NVFP4 nearest": Operand("nvfp4"), "NVFP4 stochastic": Operand("nvfp4", True), "FP8 E4M3": Operand("e4m3"),
    "FP8 E5M2": Operand("e5m2"),
}
FILTER_FRACS = (0.0, 0.2, 0.4, 0.6)
# The presets' block matrices (d_model, d_ff) for the GPU GEMM rows: A 7B, B 3B, C 5B (configs/*.toml).
CONFIGS = Path(__file__).resolve().parents[2] / "configs"
PRESET_SHAPES = {"~125M": CONFIGS / "ternary_135m.toml", "A (7B)": CONFIGS / "config_a_threadripper_blackwell.toml",
                 "B (3B)": CONFIGS / "config_b_9800x3d_dual4090.toml",
                 "C (5B)": CONFIGS / "config_c_dual_epyc_4090.toml"}


def probe_quantization(trainer) -> dict:
    """Per tensor kind and format, the relative quantization error of the GEMM operands on one validation
    batch of the trained model (block linears only; a BitLinear's operands are its ternary weight and 8-bit
    activations), and the output gradients' error after a 16-wide random Hadamard transform along the token
    dimension (the weight-gradient GEMM's reduction dimension)."""
    from ternchat.data.loader import TokenLoader
    from ternchat.model.bitlinear import BitLinear, quantize_activation, quantize_weight

    model, cfg = trainer.model, trainer.cfg
    captured: dict[str, list[torch.Tensor]] = {"weights": [], "activations": [], "output gradients": []}
    handles = []
    for name, module in model.named_modules():
        if name.startswith("blocks.") and hasattr(module, "gemm"):
            def hook(mod, inputs, output):
                x, w = inputs[0].detach().float().flatten(0, -2), mod.weight.detach().float()
                if isinstance(mod, BitLinear):
                    x, w = quantize_activation(x), quantize_weight(w)
                captured["activations"].append(x)
                captured["weights"].append(w)
                output.register_hook(lambda g: captured["output gradients"].append(g.detach().flatten(0, -2)))
            handles.append(module.register_forward_hook(hook))
    loader = TokenLoader(trainer.val_paths, cfg.train.batch_size, cfg.model.seq_len, shuffle=False,
                         tokenizer_hash=trainer.tok.hash, device=trainer.device, verify=False)
    x, y = loader.next_batch()
    model.zero_grad(set_to_none=True)
    model(x, y).backward()
    for h in handles:
        h.remove()
    model.zero_grad(set_to_none=True)

    def error(t: torch.Tensor, op: Operand) -> float:
        t = t.float()
        return float((quantize(t, op) - t).norm() / t.norm().clamp(min=1e-30))

    table = {kind: {fmt: statistics.mean(error(t, op) for t in tensors) for fmt, op in FORMATS.items()}
             for kind, tensors in captured.items()}
    signs = torch.randint(0, 2, (16,), generator=torch.Generator().manual_seed(0)).float() * 2 - 1
    rotated = [random_hadamard(g.float().t(), signs) for g in captured["output gradients"]]
    table["output gradients, RHT 16 along tokens"] = {
        fmt: statistics.mean(error(t, op) for t in rotated) for fmt, op in FORMATS.items()}
    return {"quantization_error": table}


def gemm_throughput(device: torch.device, tokens: int = 8192, reps: int = 30) -> list[dict]:
    """bf16 against FP8 `_scaled_mm` and int8 `_int_mm` (BitLinear's exact forward) GEMM TFLOP/s (TOPS for
    int8) for the ~125M model's and the presets' block matrices (CUDA only): the median of `reps` launches
    timed one by one with CUDA events, after 5 untimed ones, on random data."""
    from ternchat.model.fp4 import time_gemm, to_fp8

    rows = []
    for preset, path in PRESET_SHAPES.items():
        m = load_config(path).model
        for name, (k, n) in {"d x d": (m.d_model, m.d_model), "d x d_ff": (m.d_model, m.d_ff or 4 * m.d_model),
                             "d_ff x d": (m.d_ff or 4 * m.d_model, m.d_model)}.items():
            a = torch.randn(tokens, k, device=device, dtype=torch.bfloat16)
            b = torch.randn(n, k, device=device, dtype=torch.bfloat16)
            a8, sa = to_fp8(a, "e4m3")
            b8, sb = to_fp8(b, "e4m3")
            a_int = torch.randint(-128, 128, (tokens, k), device=device, dtype=torch.int8)
            b_int = torch.randint(-1, 2, (n, k), device=device, dtype=torch.int8)
            timed = {"bf16": lambda: a @ b.t(),
                     "fp8": lambda: torch._scaled_mm(a8, b8.t(), sa, sb, out_dtype=torch.bfloat16),
                     "int8": lambda: torch._int_mm(a_int, b_int.t())}
            rows.append({"preset": preset, "matrix": f"{name} ({k} x {n})",
                         **{label: 2 * tokens * k * n / time_gemm(fn, device, reps, warmup=5) / 1e12
                            for label, fn in timed.items()}})
    return rows


def preset_fp8_rules(device: torch.device) -> list[dict]:
    """The size rule that the `fp8` recipe measures at the start of training each preset on `device`: its
    model's block GEMMs at its micro-batch's rows, the bf16 product against FP8 with the casts and amax
    reductions included (model/fp4.py). The model is built on the meta device: only its shapes are used."""
    from ternchat.model.gpt import GPT, GPTShape

    rows = []
    for preset, path in PRESET_SHAPES.items():
        cfg = load_config(path, ["fp4.recipe=fp8", "fp4.fp8_min_macs=-1", "fp4.hadamard_block=0",
                                 "model.ternary_gemm=float", "collider.enabled=false"])
        with torch.device("meta"):
            model = GPT(GPTShape.from_config(cfg, cfg.tokenizer.vocab_size))
        tokens = cfg.train.batch_size * cfg.model.seq_len
        lines = model.fit_gemms(device, tokens, torch.bfloat16)
        rule = next(m.gemm.quantizer.rule for m in model.modules()
                    if getattr(getattr(m, "gemm", None), "quantizer", None) is not None)
        rows.append({"preset": preset, "rows": tokens, "min_macs": rule.min_macs, "speedup": rule.speedup(),
                     "lines": lines[1:],
                     "gemms": [{"role": g.role, "m": g.m, "n": g.n, "k": g.k, "count": rule.counts.get(g, 1),
                                "bf16_s": plain, "fp8_s": fp8} for g, plain, fp8 in rule.timings]})
    return rows


def bench_gemm() -> dict:
    """`ternchat bench gemm`: the GEMM rows alone, without `bench precision`'s training runs, and the FP8
    size rule each preset's training would measure."""
    if not torch.cuda.is_available():
        raise RunError("bench gemm times CUDA tensor cores and there is no CUDA device here")
    device = torch.device("cuda")
    return {"machine": torch.cuda.get_device_name(device), "torch": torch.__version__,
            "gemm_throughput": gemm_throughput(device), "fp8_rules": preset_fp8_rules(device)}


def format_gemm(report: dict) -> str:
    if not report["gemm_throughput"]:
        return "GEMM throughput rows: no CUDA device here; they run on a GPU."
    lines = [f"GEMM throughput, 8192 tokens (TFLOP/s, median of 30), {report['machine']}:", "",
             "| preset | matrix | bf16 | fp8 | int8 (TOPS) | fp8 / bf16 | int8 / bf16 |",
             "|---|---|---|---|---|---|---|"]
    for r in report["gemm_throughput"]:
        lines.append(f"| {r['preset']} | {r['matrix']} | {r['bf16']:.0f} | {r['fp8']:.0f} | {r['int8']:.0f} | "
                     f"{r['fp8'] / r['bf16']:.2f}x | {r['int8'] / r['bf16']:.2f}x |")
    for r in report.get("fp8_rules", []):
        lines += ["", f"{r['preset']}, {r['rows']:,} rows per micro-batch: "
                      f"the fp8 recipe's block GEMMs {r['speedup']:.2f}x as fast as bf16 under its size rule", *r["lines"]]
    return "\n".join(lines)


def bench_precision(config: str | None, overrides: list[str], steps: int, log=print) -> dict:
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    variants = {"high precision": [], **{r: [f"fp4.recipe={r}"] for r in RECIPES}}
    results = []
    for name, variant in variants.items():
        log(f"training '{name}' for {steps} steps in its own process ...")
        probe = "ternchat.bench.gemm_bench:probe_quantization" if not variant else ""
        run = measure_in_subprocess(config, ["train.compile=false", *overrides, *variant], steps, probe=probe)
        path = execution_path(name, device) if variant else "the config's dtype"
        results.append({"name": name, "path": path, **run})
        log(f"  val bpb {run['val_bpb']:.4f}, {run['tok_s']:,.0f} tok/s ({path})")
    throughput = gemm_throughput(device) if device.type == "cuda" else None
    return {"machine": machine(), "steps": steps, "variants": results, "gemm_throughput": throughput}


def format_precision(report: dict) -> str:
    base = report["variants"][0]
    lines = variants_table_head(report, ["GEMMs", "val bpb", "vs high precision", "train tok/s",
                                         "vs high precision", "path"])
    for r in report["variants"]:
        lines.append(f"| {r['name']} | {r['val_bpb']:.4f} | {100 * (r['val_bpb'] / base['val_bpb'] - 1):+.2f}% | "
                     f"{r['tok_s']:,.0f} | {r['tok_s'] / base['tok_s']:.2f}x | {r['path']} |")
    marks = sorted({step for r in report["variants"] for step, _ in r["losses"]})
    marks = [marks[i] for i in sorted({int(f * (len(marks) - 1)) for f in (0, 0.1, 0.25, 0.5, 0.75, 1)})]
    lines += ["", "Training loss (the step's batch):", "",
              "| step | " + " | ".join(r["name"] for r in report["variants"]) + " |",
              "|---|" + "---|" * len(report["variants"])]
    for step in marks:
        cells = [next((f"{loss:.3f}" for s, loss in r["losses"] if s == step), "-") for r in report["variants"]]
        lines.append(f"| {step} | " + " | ".join(cells) + " |")
    errors = base.get("probe", {}).get("quantization_error")
    if errors:
        lines += ["", "Relative quantization error ||Q(t) - t|| / ||t|| of the trained high-precision model's block "
                  "linears, one validation batch:", "", "| tensor | " + " | ".join(FORMATS) + " |",
                  "|---|" + "---|" * len(FORMATS)]
        for kind, row in errors.items():
            lines.append(f"| {kind} | " + " | ".join(f"{row[f]:.4f}" for f in FORMATS) + " |")
    lines += ["", format_gemm(report)]
    return "\n".join(lines)


def time_collider(config: str | None, overrides: list[str], rounds: int = 8) -> dict:
    """Median forward and backward seconds of one step per filtered fraction: one model's weights, one
    batch, the fractions interleaved within each round (the first round is warm-up)."""
    from ternchat.model.gpt import GPT, GPTShape
    from ternchat.train.step import autocast_for

    cfg = load_config(config, overrides)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    vocab = cfg.tokenizer.vocab_size
    torch.manual_seed(0)
    models = {}
    for frac in FILTER_FRACS:
        sets = [*overrides, "collider.enabled=true", f"collider.filter_frac={frac}"] if frac else overrides
        model = GPT(GPTShape.from_config(load_config(config, sets), vocab)).to(device)
        if models:
            model.load_state_dict(models[0.0].state_dict())
        for p in model.parameters():  # trained-like weights: the init's silent residual branches are not
            if p.dim() == 2 and not models:
                torch.nn.init.normal_(p, std=p.shape[1] ** -0.5)
        models[frac] = model
    idx = torch.randint(0, vocab, (cfg.train.batch_size, cfg.model.seq_len), device=device)
    autocast = autocast_for(cfg.train.dtype, device)
    times = {frac: {"forward": [], "backward": []} for frac in FILTER_FRACS}

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    for round_ in range(rounds + 1):
        for frac, model in models.items():
            model.zero_grad(set_to_none=True)
            sync()
            start = time.perf_counter()
            with autocast:
                loss = model(idx, idx.roll(-1, 1))
            sync()
            middle = time.perf_counter()
            loss.backward()
            sync()
            if round_:
                times[frac]["forward"].append(middle - start)
                times[frac]["backward"].append(time.perf_counter() - middle)
    dtype = "bf16 autocast" if isinstance(autocast, torch.autocast) else "fp32"
    return {"dtype": dtype, "tokens": idx.numel(), "rows": [
        {"filter_frac": frac, "forward_s": statistics.median(t["forward"]),
         "backward_s": statistics.median(t["backward"])} for frac, t in times.items()]}


def bench_collider(config: str | None, overrides: list[str], steps: int, log=print) -> dict:
    log("timing one step at each filtered fraction, interleaved ...")
    timing = time_collider(config, overrides)
    runs = []
    for frac in FILTER_FRACS:
        sets = ["collider.enabled=true", f"collider.filter_frac={frac}"] if frac else []
        log(f"training with {frac:.0%} filtered for {steps} steps in its own process ...")
        run = measure_in_subprocess(config, ["train.compile=false", *overrides, *sets], steps)
        runs.append({"filter_frac": frac, **run})
        log(f"  val bpb {run['val_bpb']:.4f}, {run['tok_s']:,.0f} tok/s")
    return {"machine": machine(), "steps": steps, "timing": timing, "runs": runs}


def format_collider(report: dict) -> str:
    t = report["timing"]
    base = t["rows"][0]
    lines = [f"Machine: {report['machine']}; one step of {t['tokens']:,} tokens ({t['dtype']}), medians of "
             "interleaved rounds:", "",
             "| filtered | forward s | backward s | backward saved | step s | step saved |",
             "|---|---|---|---|---|---|"]
    for r in t["rows"]:
        step, base_step = r["forward_s"] + r["backward_s"], base["forward_s"] + base["backward_s"]
        lines.append(f"| {r['filter_frac']:.0%} | {r['forward_s']:.3f} | {r['backward_s']:.3f} | "
                     f"{1 - r['backward_s'] / base['backward_s']:+.1%} | {step:.3f} | {1 - step / base_step:+.1%} |")
    first = report["runs"][0]
    lines += ["", f"Training, {report['steps']} steps on the same batches (same tokens seen):", "",
              "| filtered | val bpb | vs unfiltered | train tok/s | vs unfiltered |", "|---|---|---|---|---|"]
    for r in report["runs"]:
        change = 100 * (r["val_bpb"] / first["val_bpb"] - 1)
        lines.append(f"| {r['filter_frac']:.0%} | {r['val_bpb']:.4f} | {change:+.2f}% | {r['tok_s']:,.0f} | "
                     f"{r['tok_s'] / first['tok_s']:.2f}x |")
    return "\n".join(lines)
