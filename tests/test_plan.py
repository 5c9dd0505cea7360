import subprocess
import sys
from pathlib import Path

import pytest
import torch

from ternchat.config import load_config
from ternchat.model.gpt import GPT, GPTShape
from ternchat.optim.muon import Muon
from ternchat.plan import (adamw_8bit_available, gum_full_rank_share, matrix_state_bytes, measure_cpu,
                           newton_schulz_workspace, newton_schulz_workspace_of, parse_bytes, plan_memory)

CONFIGS = Path(__file__).parent.parent / "configs"
SMALL = ["model.depth=2", "model.d_model=256", "model.n_heads=4", "model.seq_len=128", "train.batch_size=4",
         "tokenizer.vocab_size=2048", "train.dtype=bf16"]


def test_parse_bytes():
    assert parse_bytes("24GiB") == 24 * 2**30 and parse_bytes("96 GB") == 96 * 10**9 and parse_bytes("512") == 512
    with pytest.raises(ValueError, match="24GiB"):
        parse_bytes("lots")


def saved_activation_bytes(cfg) -> int:
    """Bytes autograd saves for backward in one forward pass, counted with saved-tensor hooks."""
    model = GPT(GPTShape.from_config(cfg, cfg.tokenizer.vocab_size))
    seen = {}

    def pack(t):
        if not (t.is_leaf and t.requires_grad):
            storage = t.untyped_storage()  # views of one tensor count once
            seen[storage.data_ptr()] = storage.nbytes()
        return t

    x = torch.randint(0, cfg.tokenizer.vocab_size, (cfg.train.batch_size, cfg.model.seq_len))
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), torch.autocast("cpu", dtype=torch.bfloat16):
        model(x, x)
    return sum(seen.values())


@pytest.mark.parametrize("extra", [[], ["model.mlp=relu2_glu"], ["model.mlp=swiglu", "model.qk_norm=false"],
                                   ["model.tie_embeddings=true", "model.qk_norm=false"],
                                   ["mhc.enabled=true"], ["mhc.enabled=true", "mhc.streams=2"],
                                   ["loop.enabled=true", "loop.steps=3"],
                                   ["mhc.enabled=true", "loop.enabled=true", "loop.steps=2"]])
def test_activation_model_matches_what_autograd_saves(extra):
    cfg = load_config(overrides=[*SMALL, *extra])
    planned = plan_memory(cfg, 2048, device="cpu").components["activations"]
    assert abs(planned - saved_activation_bytes(cfg)) < 0.02 * planned


@pytest.mark.parametrize("extra", [[], ["mhc.enabled=true", "loop.enabled=true", "loop.steps=2"],
                                   ["model.mlp=relu2_glu", "model.qk_norm=false", "model.tie_embeddings=true"]])
def test_plan_is_a_close_upper_bound_of_the_measured_tensor_peak(extra):
    cfg = load_config(overrides=[*SMALL, *extra])
    plan = plan_memory(cfg, 2048, device="cpu")
    params = sum(p.numel() for p in GPT(GPTShape.from_config(cfg, 2048)).parameters())
    assert plan.components["weights (fp32 latent)"] == 4 * params
    measured = measure_cpu(cfg, 2048, cfg.train.batch_size)["tensor_peak"]
    # An upper bound: the plan adds all gradients to all activations, which never peak together.
    assert measured <= plan.total < 1.2 * measured, (plan.total, measured)


@pytest.mark.parametrize("kind", ["heads", "modules"])
def test_plan_counts_the_mtp_blocks(kind):
    weights = ["mtp.weights=[1.0, 0.5, 0.25]"] if kind == "heads" else []
    cfg = load_config(overrides=[*SMALL, f'mtp.kind="{kind}"', "mtp.n_future=2", *weights])
    model = GPT(GPTShape.from_config(cfg, 2048))
    plan = plan_memory(cfg, 2048, device="cpu")
    assert plan.components["weights (fp32 latent)"] == 4 * sum(p.numel() for p in model.parameters())
    assert plan.total > plan_memory(load_config(overrides=SMALL), 2048, device="cpu").total
    measured = measure_cpu(cfg, 2048, cfg.train.batch_size)["tensor_peak"]
    # an upper bound; with heads a looser one (their logits and gradient buffers never peak together)
    assert measured <= plan.total < (1.35 if kind == "heads" else 1.2) * measured, (plan.total, measured)


def test_optimizer_state_per_method():
    o = load_config().optim
    assert matrix_state_bytes(1024, 4096, o) == 4 * 1024 * 4096  # Muon momentum, fp32
    o8 = load_config(overrides=["optim.use_8bit_optim=true"]).optim
    assert matrix_state_bytes(1024, 4096, o8) == pytest.approx(1024 * 4096 * (1 + 4 / 2048))
    gum = load_config(overrides=["optim.use_galore=true", "optim.galore_rank=256",
                                 "optim.gum_full_rank_layers=2"]).optim
    share = gum_full_rank_share(1024, 4096, gum, depth=20)
    assert share == 2 / 20  # exactly gamma of the blocks are drawn: the count is not a chance
    expected = (0.9 * 256 * 4096 + 0.1 * 1024 * 4096) * 4 + 4 * 256 * 1024
    assert matrix_state_bytes(1024, 4096, gum, share) == pytest.approx(expected)
    assert gum_full_rank_share(200, 4096, gum, depth=20) == 0  # below galore_min_dim: plain Muon
    foam = load_config(overrides=["optim.matrix_optimizer=foam", "optim.foam_level=3"]).optim
    assert matrix_state_bytes(1024, 4096, foam) == 8 * 1024 * 4096 / 8


@pytest.mark.parametrize("preset, gpus, memory", [("config_a_threadripper_blackwell", 1, "96.0 GiB"),
                                                   ("config_b_9800x3d_dual4090", 2, "24.0 GiB"),
                                                   ("config_c_dual_epyc_4090", 1, "24.0 GiB")])
def test_cli_verdict_for_a_hardware_preset_needs_no_flags(preset, gpus, memory):
    result = subprocess.run([sys.executable, "-m", "ternchat", "plan", "--config", str(CONFIGS / f"{preset}.toml")],
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert f"in {memory}" in result.stdout and f"({gpus} device(s)" in result.stdout
    assert "verdict: fits" in result.stdout and "optimizer state" in result.stdout
    assert "host memory: " not in result.stdout or " GiB fits in " in result.stdout
    assert load_config(CONFIGS / f"{preset}.toml").hardware.name in result.stdout


def test_offload_moves_the_resident_state_to_the_host():
    cfg = load_config(overrides=SMALL)
    offloaded = load_config(overrides=[*SMALL, "dist.strategy=fsdp2", "dist.offload=true"])
    on_gpu, streamed = plan_memory(cfg, 2048), plan_memory(offloaded, 2048, 4, 2**40, host_mem=2**40)
    resident = ("weights (fp32 latent)", "gradients (fp32)", "optimizer state")
    assert all(k not in streamed.components for k in resident)
    assert [streamed.host[k] for k in resident] == [on_gpu.components[k] for k in resident]
    assert streamed.host["whole-model copy for samples and evals"] == 2 * on_gpu.components["weights (fp32 latent)"]
    assert streamed.fits and not on_gpu.host
    # fp32 weights twice per micro-batch (forward, then backward), fp32 gradients back once
    params = on_gpu.components["weights (fp32 latent)"] / 4
    accum = cfg.train.grad_accum
    assert streamed.link_bytes_per_step["to the GPU"] > accum * 2 * 4 * params
    assert streamed.link_bytes_per_step["to the host"] > accum * 4 * params
    assert not plan_memory(offloaded, 2048, 4, 2**40, host_mem=int(streamed.host_total) - 1).fits


def test_8bit_adamw_is_planned_as_fp32_without_bitsandbytes():
    fp32 = plan_memory(load_config(overrides=SMALL), 2048)
    eight = plan_memory(load_config(overrides=[*SMALL, "optim.adamw_8bit=true"]), 2048)
    if adamw_8bit_available():
        assert eight.components["optimizer state"] < fp32.components["optimizer state"] and not eight.notes
    else:
        assert eight.components["optimizer state"] == fp32.components["optimizer state"]
        assert any("bitsandbytes is not installed" in n for n in eight.notes)


def optimizer_step_peak(opt) -> int:
    """The most bytes the optimizer's step allocates beyond what was alive before it (CPU profiler)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        opt.step()
    current = peak = 0
    for _, nbytes in sorted((e.start_ns(), e.nbytes()) for e in prof.profiler.kineto_results.events()
                            if e.name() == "[memory]"):
        current += nbytes
        peak = max(peak, current)
    return peak


@pytest.mark.parametrize("eight_bit", [False, True])
@pytest.mark.parametrize("count, rows, cols", [(12, 128, 128), (8, 512, 128), (6, 128, 512)])
def test_newton_schulz_workspace_covers_a_whole_stack(count, rows, cols, eight_bit, monkeypatch):
    monkeypatch.setattr("ternchat.optim.muon.bf16_native", lambda device: True)  # the plan's (a GPU's) bf16 path
    params = [torch.nn.Parameter(torch.randn(rows, cols)) for _ in range(count)]
    opt = Muon(params, state_bits=8 if eight_bit else 32, block_size=2048)
    for _ in range(2):  # the second step is the steady state (the momentum exists)
        for p in params:
            p.grad = torch.randn_like(p)
        measured = optimizer_step_peak(opt)
    o = load_config(overrides=[f"optim.use_8bit_optim={str(eight_bit).lower()}"]).optim
    planned = newton_schulz_workspace_of(count, rows, cols, o)
    assert measured <= planned < 1.25 * measured, (measured, planned)


def test_newton_schulz_workspace_is_the_largest_stack():
    o = load_config().optim
    shape = GPTShape.from_config(load_config(), 8192)  # 6 blocks: 24 of 384x384, 6 of 1536x384, 6 of 384x1536
    assert newton_schulz_workspace(shape, o) == max(newton_schulz_workspace_of(24, 384, 384, o),
                                                    newton_schulz_workspace_of(6, 1536, 384, o))
    big = GPTShape.from_config(load_config(CONFIGS / "config_a_threadripper_blackwell.toml"), 32768)
    muon = load_config(overrides=["optim.use_galore=false"]).optim
    assert newton_schulz_workspace(big, muon) == newton_schulz_workspace_of(4, 4096, 4096, muon)  # 128 -> stacks of 4
