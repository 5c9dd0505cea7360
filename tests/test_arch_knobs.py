"""The architecture knobs other engines need: gated MLPs (relu2_glu, swiglu), no QK-norm, a head tied to the
embedding. Defaults leave the model as it was."""

import pytest
import torch
import torch.nn.functional as F

from ternchat.config import load_config
from ternchat.export.packed import export_packed, load_packed
from ternchat.model.gpt import GPT, GPTShape
from ternchat.optim.factory import build_optimizer
from ternchat.runs import load_run_model
from ternchat.train.checkpoint import save_checkpoint

pytestmark = pytest.mark.numerics  # rerun by .ci/run on other CPU kernel paths

SMALL = ["model.depth=2", "model.d_model=64", "model.n_heads=2", "model.seq_len=32", "tokenizer.vocab_size=512"]


def model_with(*sets: str) -> GPT:
    torch.manual_seed(0)
    cfg = load_config(overrides=[*SMALL, *sets])
    return GPT(GPTShape.from_config(cfg, 512))


def test_defaults_are_the_plain_model():
    shape = GPTShape.from_config(load_config(overrides=SMALL), 512)
    assert (shape.mlp, shape.qk_norm, shape.tie_embeddings) == ("relu2", True, False)
    model = model_with()
    assert model.blocks[0].mlp.gate is None and model.lm_head.weight is not model.embed.weight


@pytest.mark.parametrize("kind, act", [("relu2_glu", lambda g: F.relu(g).square()), ("swiglu", F.silu)])
def test_gated_mlps_compute_their_formula(kind, act):
    mlp = model_with("model.quant=none", f"model.mlp={kind}").blocks[0].mlp
    for p in mlp.parameters():
        torch.nn.init.normal_(p)
    x = torch.randn(3, 64)
    expected = mlp.down(mlp.sub_norm(act(x @ mlp.gate.weight.T) * (x @ mlp.up.weight.T)))
    assert torch.allclose(mlp(x), expected, atol=1e-5)
    assert mlp.gate.weight.shape == mlp.up.weight.shape == (256, 64)


def test_without_qk_norm_queries_and_keys_are_not_normalized():
    model = model_with("model.qk_norm=false")
    names = set(model.state_dict())
    assert not any("q_norm" in n or "k_norm" in n for n in names)
    assert any("q_norm" in n for n in model_with().state_dict())


def test_a_tied_head_is_the_embedding_through_training_and_checkpoints(tmp_path, task_tokenizer):
    model = model_with("model.tie_embeddings=true")
    assert model.lm_head.weight is model.embed.weight
    cfg = load_config(overrides=[*SMALL, "model.tie_embeddings=true"])
    optimizer = build_optimizer(model, cfg.optim)
    tied = [g for opt in optimizer.optimizers for g in opt.param_groups if any(p is model.embed.weight
                                                                               for p in g["params"])]
    assert len(tied) == 1 and tied[0]["lr"] == cfg.optim.lr_head
    x = torch.randint(0, 512, (2, 32))
    model(x, x).backward()
    optimizer.step()
    assert model.lm_head.weight is model.embed.weight
    save_checkpoint(tmp_path, 1, model.state_dict(), {}, {"step": 1, "model_shape": vars(model.shape)})
    loaded = load_run_model(tmp_path, latent=True)
    assert loaded.lm_head.weight is loaded.embed.weight
    model.eval()
    assert torch.allclose(loaded(x), model(x), atol=1e-6)
    packed = tmp_path / "packed.safetensors"
    export_packed(model, packed, task_tokenizer, torch.float32)
    again = load_packed(packed).model
    assert again.lm_head.weight is again.embed.weight
    assert torch.allclose(again(x), load_run_model(tmp_path)(x), atol=1e-5)
    assert model.parameter_counts()["head"] == 0
