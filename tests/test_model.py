import copy

import pytest
import torch
import torch.nn.functional as F

from ternchat.eval.engine import generate
from ternchat.export.packed import export_packed, load_packed, pack_trits, unpack_trits
from ternchat.model.bitlinear import (BitLinear, TernaryLinear, quantize_activation, quantize_weight,
                                      to_inference)
from ternchat.model.gpt import GPT, GPTShape, KVCache
from ternchat.optim.muon import Muon, newton_schulz

pytestmark = pytest.mark.numerics  # rerun by .ci/run on other CPU kernel paths


def test_weights_take_exactly_three_values_scaled_by_absmean():
    w = torch.randn(64, 48) * 0.3
    q = quantize_weight(w)
    s = w.abs().mean()
    assert set(q.unique().tolist()) <= {-s.item(), 0.0, s.item()}
    assert len(q.unique()) == 3
    assert torch.equal(q, (w / s).round().clamp(-1, 1) * s)  # exact: the same ops in the same order


def test_activations_are_8_bit_per_token():
    x = torch.randn(4, 10, 32) * torch.linspace(0.1, 10, 10)[None, :, None]
    q = quantize_activation(x)
    scale = 127.0 / x.abs().amax(dim=-1, keepdim=True)
    levels = q * scale
    assert torch.allclose(levels, levels.round(), atol=1e-3)  # integers ...
    assert levels.round().abs().max() <= 127  # ... within 8 bits
    assert torch.allclose(q.abs().amax(-1), x.abs().amax(-1))  # each token keeps its own absmax
    assert (q - x).abs().max() <= (0.5 / scale).max() + 1e-6


def test_straight_through_gradients():
    layer = BitLinear(16, 8)
    x = torch.randn(5, 16, requires_grad=True)
    y = layer(x)
    g = torch.randn_like(y)
    y.backward(g)
    x_q, w_q = quantize_activation(x.detach()), quantize_weight(layer.weight.detach())
    assert torch.equal(y.detach(), F.linear(x_q, w_q))  # exact: the layer ends in this very call
    assert torch.allclose(layer.weight.grad, g.T @ x_q, atol=1e-5)  # d/dW as if W were w_q
    assert torch.allclose(x.grad, g @ w_q, atol=1e-5)  # d/dx as if x were x_q


def test_ternary_linear_matches_bitlinear_bit_for_bit():
    layer = BitLinear(32, 24)
    x = torch.randn(3, 7, 32)
    # exact: codes * beta is the training forward's ternary weight, and both end in the same F.linear
    assert torch.equal(TernaryLinear.from_bitlinear(layer)(x), layer(x))


@pytest.mark.parametrize("n", [1, 4, 5, 6, 1003])
def test_trit_packing_round_trip(n):
    codes = torch.randint(-1, 2, (n,), dtype=torch.int8)
    packed = pack_trits(codes)
    assert packed.dtype == torch.uint8 and packed.numel() == -(-n // 5)
    assert torch.equal(unpack_trits(packed, n), codes)


def test_batched_newton_schulz_orthogonalizes_each_matrix():
    g = torch.randn(3, 24, 40)
    stacked = newton_schulz(g).float()
    for i in range(3):
        assert torch.allclose(stacked[i], newton_schulz(g[i]).float(), atol=2e-2)


def test_newton_schulz_is_close_to_the_polar_factor():
    torch.manual_seed(0)
    for shape in ((64, 128), (128, 64)):
        g = torch.randn(*shape)
        x = newton_schulz(g).float()
        assert x.shape == g.shape
        sv = torch.linalg.svdvals(x)
        assert sv.min() > 0.5 and sv.max() < 1.5
        u, _, vh = torch.linalg.svd(g, full_matrices=False)
        core = u.T @ x @ vh.T  # diagonal when x shares g's singular vectors
        off_diagonal = core - torch.diag(torch.diagonal(core))
        assert off_diagonal.norm() < 0.1 * core.norm()


def test_muon_update_rule():
    torch.manual_seed(0)
    p = torch.nn.Parameter(torch.randn(32, 16))
    before = p.detach().clone()
    p.grad = torch.randn(32, 16)
    opt = Muon([p], lr=0.1, momentum=0.9, weight_decay=0.5)
    opt.step()
    buf = 0.1 * p.grad  # momentum starts at 0: lerp(0, g, 0.1)
    nesterov = p.grad.lerp(buf, 0.9)
    update = newton_schulz(nesterov[None])[0].float() * (32 / 16) ** 0.5
    assert torch.allclose(p.detach(), before * (1 - 0.1 * 0.5) - 0.1 * update, atol=1e-6)
    with pytest.raises(ValueError, match="2-D"):
        Muon([torch.nn.Parameter(torch.ones(3))])


SHAPE = GPTShape(vocab_size=300, depth=2, d_model=64, n_heads=4, d_ff=256, seq_len=64, quant="ternary")


def random_model(shape=SHAPE, seed=0):
    torch.manual_seed(seed)
    model = GPT(shape)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)  # zero-initialized projections would hide bugs
    return model.eval()


def test_kv_cache_decoding_matches_the_full_forward():
    model = random_model()
    idx = torch.randint(0, 300, (2, 20))
    full = model(idx)
    cache = KVCache(SHAPE, 2, 64, torch.device("cpu"), torch.float32)
    steps = [model(idx[:, :12], cache=cache)] + [model(idx[:, t:t + 1], cache=cache) for t in range(12, 20)]
    assert torch.allclose(torch.cat(steps, dim=1), full, atol=1e-4)


def test_inference_form_gives_the_training_models_eval_logits():
    model = random_model()
    idx = torch.randint(0, 300, (2, 16))
    assert torch.equal(to_inference(copy.deepcopy(model))(idx), model(idx))  # exact: the same ops (TernaryLinear)


def test_parameter_counts_by_kind():
    counts = GPT(SHAPE).parameter_counts()
    assert counts["embedding"] == counts["head"] == 300 * 64
    assert counts["block_matrices"] == 2 * (4 * 64 * 64 + 2 * 64 * 256)
    assert counts["total"] == sum(p.numel() for p in GPT(SHAPE).parameters())


def test_dense_baseline_has_no_ternary_layers():
    dense = GPT(GPTShape(**{**SHAPE.__dict__, "quant": "none"}))
    assert not dense.is_ternary() and GPT(SHAPE).is_ternary()


@pytest.mark.parametrize("quant", ["ternary", "none"])
def test_packed_export_reloads_to_identical_logits(tmp_path, quant, task_tokenizer):
    model = random_model(GPTShape(**{**SHAPE.__dict__, "quant": quant}))
    idx = torch.randint(0, 300, (2, 16))
    sizes = export_packed(model, tmp_path / "fp32.safetensors", task_tokenizer, torch.float32)
    packed = load_packed(tmp_path / "fp32.safetensors")
    loaded = packed.model
    assert packed.tokenizer.hash == packed.tokenizer_hash == task_tokenizer.hash and packed.stage == "pretrain"
    assert packed.tokenizer.encode("fn f() {}") == task_tokenizer.encode("fn f() {}")
    assert torch.equal(loaded(idx), model(idx))  # exact: the same values through the same ops
    # bf16 embedding/head: identical to the model with those two matrices rounded to bf16
    export_packed(model, tmp_path / "bf16.safetensors", task_tokenizer, torch.bfloat16)
    rounded = copy.deepcopy(model)
    with torch.no_grad():
        for p in (rounded.embed.weight, rounded.lm_head.weight):
            p.copy_(p.bfloat16().float())
        if quant == "none":
            for block in rounded.blocks:
                for m in block.modules():
                    if isinstance(m, torch.nn.Linear):
                        m.weight.copy_(m.weight.bfloat16().float())
    assert torch.equal(load_packed(tmp_path / "bf16.safetensors").model(idx), rounded(idx))
    if quant == "ternary":
        assert sizes["packed_bytes"] - sizes["tokenizer_bytes"] < sizes["fp32_bytes"] / 3  # weights alone


def test_seeded_sampling_is_reproducible():
    model = random_model()
    run = lambda seed: list(generate(model, [1, 2, 3], 20, temperature=1.0, top_k=50, top_p=0.9, seed=seed))
    assert run(7) == run(7)
    assert run(7) != run(8)
    greedy = list(generate(model, [1, 2, 3], 10, temperature=0))
    assert greedy == list(generate(model, [1, 2, 3], 10, temperature=0, seed=99))


def test_q_k_v_are_separate_ternary_matrices_with_their_own_scales():
    model = GPT(SHAPE)
    attn = model.blocks[0].attn
    assert all(isinstance(m, BitLinear) and m.weight.shape == (64, 64) for m in (attn.q_proj, attn.k_proj, attn.v_proj))
    with torch.no_grad():
        attn.k_proj.weight.mul_(100)  # a fused QKV matrix would share one absmean scale across the three
    betas = [m.weight.abs().mean() for m in (attn.q_proj, attn.k_proj, attn.v_proj)]
    for m, beta in zip((attn.q_proj, attn.k_proj, attn.v_proj), betas):
        assert set(quantize_weight(m.weight.detach()).unique().tolist()) == {-beta.item(), 0.0, beta.item()}
    packed = TernaryLinear.from_bitlinear(attn.k_proj)
    assert packed.beta.item() == pytest.approx(betas[1].item()) and betas[1] > 50 * betas[0]


def test_muon_orthogonalizes_q_k_and_v_as_three_matrices():
    from ternchat.config import load_config
    from ternchat.optim.factory import build_optimizer

    model = GPT(SHAPE)
    muon = build_optimizer(model, load_config().optim).optimizers[0]
    attn = model.blocks[0].attn
    ids = {id(p) for g in muon.param_groups for p in g["params"]}
    assert {id(m.weight) for m in (attn.q_proj, attn.k_proj, attn.v_proj)} <= ids
    before = [m.weight.detach().clone() for m in (attn.q_proj, attn.k_proj, attn.v_proj)]
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    for scale, m in zip((1.0, 1e-3, 30.0), (attn.q_proj, attn.k_proj, attn.v_proj)):
        m.weight.grad = scale * torch.randn(64, 64)  # very different gradient scales
    muon.step()
    moves = [(m.weight.detach() - b) for m, b in zip((attn.q_proj, attn.k_proj, attn.v_proj), before)]
    for move in moves:  # each update is orthogonalized on its own: all have singular values near 1 x lr
        sv = torch.linalg.svdvals(move / 0.02)
        assert 0.5 < sv.mean() < 1.5
