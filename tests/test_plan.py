import subprocess
import sys
from pathlib import Path

import pytest
import torch

from ternchat.config import load_config
from ternchat.model.gpt import GPT, GPTShape
from ternchat.plan import matrix_state_bytes, measure_cpu, parse_bytes, plan_memory

CONFIGS = Path(__file__).parent.parent / "configs"
SMALL = ["model.depth=2", "model.d_model=256", "model.n_heads=4", "model.seq_len=128", "train.batch_size=4",
         "tokenizer.vocab_size=2048", "train.dtype=bf16"]


def test_parse_bytes():
    assert parse_bytes("24GiB") == 24 * 2**30 and parse_bytes("96 GB") == 96 * 10**9 and parse_bytes("512") == 512
    with pytest.raises(ValueError, match="24GiB"):
        parse_bytes("lots")


def saved_activation_bytes(cfg) -> int:
    """Bytes autograd saves for backward in one forward pass, counted with saved-tensor hooks."""
    model = GPT(GPTShape.from_config(cfg.model, cfg.tokenizer.vocab_size))
    seen = {}

    def pack(t):
        if not (t.is_leaf and t.requires_grad):
            seen[(t.data_ptr(), t.dtype, tuple(t.shape))] = t.numel() * t.element_size()
        return t

    x = torch.randint(0, cfg.tokenizer.vocab_size, (cfg.train.batch_size, cfg.model.seq_len))
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), torch.autocast("cpu", dtype=torch.bfloat16):
        model(x, x)
    return sum(seen.values())


def test_activation_model_matches_what_autograd_saves():
    cfg = load_config(overrides=SMALL)
    planned = plan_memory(cfg, 2048, device="cpu").components["activations"]
    assert abs(planned - saved_activation_bytes(cfg)) < 0.02 * planned


def test_plan_is_a_close_upper_bound_of_the_measured_tensor_peak():
    cfg = load_config(overrides=SMALL)
    plan = plan_memory(cfg, 2048, device="cpu")
    measured = measure_cpu(cfg, 2048, cfg.train.batch_size)["tensor_peak"]
    # An upper bound: the plan adds all gradients to all activations, which never peak together.
    assert measured <= plan.total < 1.2 * measured, (plan.total, measured)


def test_optimizer_state_per_method():
    o = load_config().optim
    assert matrix_state_bytes(1024, 4096, o) == 4 * 1024 * 4096  # Muon momentum, fp32
    o8 = load_config(overrides=["optim.use_8bit_optim=true"]).optim
    assert matrix_state_bytes(1024, 4096, o8) == pytest.approx(1024 * 4096 * (1 + 4 / 2048))
    gum = load_config(overrides=["optim.use_galore=true", "optim.galore_rank=256"]).optim
    expected = (0.9 * 256 * 4096 + 0.1 * 1024 * 4096) * 4 + 4 * 256 * 1024
    assert matrix_state_bytes(1024, 4096, gum) == pytest.approx(expected)
    foam = load_config(overrides=["optim.matrix_optimizer=foam", "optim.foam_level=3"]).optim
    assert matrix_state_bytes(1024, 4096, foam) == 8 * 1024 * 4096 / 8


def test_cli_verdict_for_a_hardware_preset():
    result = subprocess.run([sys.executable, "-m", "ternchat", "plan", "--config",
                             str(CONFIGS / "config_c_dual_epyc_4090.toml"), "--gpu-mem", "24GiB"],
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert "verdict:" in result.stdout and "optimizer state" in result.stdout
