"""mHC hyper-connections and LoopLM looped depth: the pieces, the models, and a run that uses both."""


import pytest
import torch
import torch.nn.functional as F

from ternchat.config import load_config
from ternchat.eval.engine import generate
from ternchat.model.gpt import GPT, GPTShape, KVCache
from ternchat.model.looped import exit_distribution, gate_loss, joint_loss, q_exit_steps
from ternchat.model.mhc import HyperConnection, composite_gain, sinkhorn
from ternchat.optim.factory import build_optimizer

pytestmark = pytest.mark.numerics  # rerun by .ci/run on other CPU kernel paths

BASE = dict(vocab_size=48, depth=2, d_model=32, n_heads=2, d_ff=64, seq_len=24, quant="ternary")


def model_of(**extra) -> GPT:
    """The model of BASE with the technique knobs in `extra`, in the flat layout (mhc_streams=4, ...)."""
    torch.manual_seed(0)
    return GPT(GPTShape.from_dict({**BASE, **extra}))


def jiggle(model: GPT, scale: float = 0.3, seed: int = 1) -> GPT:
    """Random matrices everywhere (zero-initialized branches and coefficient maps included)."""
    torch.manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.ndim == 2:
                p.add_(torch.randn_like(p) * scale)
    return model


def test_sinkhorn_gives_doubly_stochastic_matrices():
    # logits of unit spread, and the init's (0 on the diagonal, -2 off it) with a little noise; far wider
    # spreads need more than 20 iterations to get rows within 1e-3 (the columns are exact after each)
    torch.manual_seed(0)
    init = torch.full((4, 4), -2.0).fill_diagonal_(0.0)
    m = sinkhorn(torch.cat([torch.randn(500, 4, 4), init + 0.1 * torch.randn(500, 4, 4)]), 20)
    assert (m >= 0).all()
    assert torch.allclose(m.sum(-1), torch.ones(1000, 4), atol=1e-3)
    assert torch.allclose(m.sum(-2), torch.ones(1000, 4), atol=1e-3)


def test_sinkhorn_gradients_through_the_recomputed_backward():
    torch.manual_seed(0)
    logits = torch.randn(3, 4, 4, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x: sinkhorn(x, 20), (logits,))


def test_mappings_are_bounded_dynamic_and_fp32_under_autocast():
    torch.manual_seed(0)
    hc = HyperConnection(16, 4, gate_init=0.5)
    with torch.no_grad():
        hc.phi.normal_(std=1.0)
    x = torch.randn(2, 5, 4, 16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        pre, post, res = hc.mappings(x)
    assert pre.dtype == post.dtype == res.dtype == torch.float32
    assert ((pre > 0) & (pre < 1)).all() and ((post > 0) & (post < 2)).all()
    # two tokens, two different sets of coefficients: the mappings depend on the input
    assert not torch.allclose(pre[0, 0], pre[0, 1]) and not torch.allclose(res[0, 0], res[0, 1])


def test_the_composite_mapping_stays_bounded_and_hc_does_not():
    idx = torch.randint(0, 48, (2, 24))
    deep = dict(BASE, depth=12)
    gains = {}
    for constraint in ("sinkhorn", "none"):
        torch.manual_seed(0)
        model = GPT(GPTShape.from_dict({**deep, "mhc_streams": 4, "mhc_constraint": constraint, "mhc_gate_init": 1.0}))
        torch.manual_seed(3)
        with torch.no_grad():
            for name, p in model.named_parameters():
                if name.endswith("_residual.phi"):
                    p.normal_(std=1.0)
        gains[constraint] = composite_gain(model, idx)
    # 24 (nearly) doubly-stochastic factors: Sinkhorn ends on a column normalization, so every column of
    # the product sums to one; with logits this spread 20 iterations leave the rows a little off, and
    # the product's rows stay near one (the paper measures ~1.6 at 27B); HC's product runs away
    assert gains["sinkhorn"]["backward_gain"] == pytest.approx(1.0, abs=1e-3)
    assert gains["sinkhorn"]["forward_gain"] < 2
    assert gains["none"]["forward_gain"] > 100 and gains["none"]["backward_gain"] > 100


def test_at_init_the_mhc_model_computes_the_plain_models_function():
    plain = jiggle(model_of())
    wide = model_of(mhc_streams=4)
    missing = wide.load_state_dict(plain.state_dict(), strict=False).missing_keys
    assert missing and all("_residual." in k for k in missing)
    idx = torch.randint(0, 48, (2, 24))
    assert torch.allclose(plain(idx), wide(idx), atol=1e-5)


@pytest.mark.inductor
def test_compiling_the_mhc_model_block_by_block_gives_the_eager_loss_and_gradients():
    from ternchat.train.trainer import compile_if_possible

    assert load_config(overrides=["mhc.enabled=true"]).compile_scope() == "blocks"  # one key: mHC compiles by block
    assert load_config().compile_scope() == "model"
    model = jiggle(model_of(mhc_streams=4, depth=3))
    x = torch.randint(0, 48, (2, 25), generator=torch.Generator().manual_seed(0))
    eager_loss = model(x[:, :-1], x[:, 1:])
    eager_loss.backward()
    eager_grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    forward = compile_if_possible(model, torch.device("cpu"), print, "blocks")
    assert forward is model and all(hasattr(b.forward, "_torchdynamo_orig_callable") for b in model.blocks)
    loss = forward(x[:, :-1], x[:, 1:])
    loss.backward()
    # inductor fuses and reorders the fp32 reductions, and a difference within rounding can move an 8-bit
    # activation code by one step: the loss stays within 1e-5, the gradients within 1e-3
    assert loss.item() == pytest.approx(eager_loss.item(), rel=1e-5)
    for name, p in model.named_parameters():
        torch.testing.assert_close(p.grad, eager_grads[name], rtol=1e-3, atol=1e-5, msg=name)


def test_exit_distribution_of_constant_half_gates():
    p = exit_distribution(torch.full((4, 3), 0.5))
    assert torch.allclose(p[:, 0], torch.tensor([0.5, 0.25, 0.125, 0.125]))
    assert torch.allclose(p.sum(0), torch.ones(3))
    assert q_exit_steps(torch.full((4, 3), 0.5), 0.7).tolist() == [1, 1, 1]  # cdf .5, .75: the second pass
    assert q_exit_steps(torch.full((4, 3), 0.5), 1.0).tolist() == [3, 3, 3]


def test_stage_one_loss_is_its_formula():
    model = jiggle(model_of(loop_steps=3, loop_entropy_beta=0.1))
    with torch.no_grad():
        model.loop.gate.weight.normal_()
    idx = torch.randint(0, 48, (2, 25))
    x, y = idx[:, :-1], idx[:, 1:]
    loss = model(x, y)
    states, _ = model.passes(x)
    ce = torch.stack([F.cross_entropy(model.logits(z).flatten(0, 1), y.reshape(-1), reduction="none") for z in states])
    lam = torch.stack([model.loop.gate(model.final_norm(z)).reshape(-1) for z in states])
    p = torch.stack([lam[0], (1 - lam[0]) * lam[1], (1 - lam[0]) * (1 - lam[1])])
    expected = ((p * ce).sum(0) + 0.1 * (p * p.log()).sum(0)).mean()
    assert torch.allclose(loss, expected, atol=1e-5)
    assert torch.allclose(joint_loss(ce, lam, 0.1), expected, atol=1e-6)


def test_stage_two_trains_only_the_gate_towards_the_improvement_targets():
    model = jiggle(model_of(loop_steps=3, loop_stage="gate"))
    idx = torch.randint(0, 48, (2, 25))
    model(idx[:, :-1], idx[:, 1:]).backward()
    grads = {name: p.grad for name, p in model.named_parameters()}
    assert all(g is None for name, g in grads.items() if not name.startswith("loop.gate."))
    assert grads["loop.gate.weight"].abs().sum() > 0
    # a big improvement asks to continue (target ~1), none asks to stop (target ~0)
    losses = torch.tensor([[3.0, 3.0], [2.0, 3.0]])  # pass 2 improves token 0 by 1 nat, token 1 not at all
    lam = torch.tensor([[0.5, 0.5], [0.5, 0.5]], requires_grad=True)
    gate_loss(losses, lam, 50.0, 0.005).backward()
    assert lam.grad[0, 0] > 0 and lam.grad[0, 1] < 0  # raise lambda (stop) where nothing improved


def test_the_loop_adds_only_the_exit_gate_whatever_the_steps():
    plain, two, four = model_of(), model_of(loop_steps=2), model_of(loop_steps=4)
    names = lambda m: {n: p.shape for n, p in m.named_parameters()}
    assert names(two) == names(four)
    assert set(names(two)) - set(names(plain)) == {"loop.gate.weight", "loop.gate.bias"}
    assert two.parameter_counts()["exit_gate"] == BASE["d_model"] + 1


@pytest.mark.parametrize("extra", [dict(loop_steps=3), dict(mhc_streams=4, loop_steps=2)])
def test_incremental_decoding_with_a_cache_per_pass_equals_the_full_forward(extra):
    model = jiggle(model_of(**extra)).eval()
    idx = torch.randint(0, 48, (1, 20))
    with torch.no_grad():
        full = model(idx)
        cache = KVCache(model.shape, 1, 24, torch.device("cpu"), torch.float32)
        steps = [model(idx[:, :7], cache=cache)] + [model(idx[:, t:t + 1], cache=cache) for t in range(7, 20)]
    assert torch.allclose(full, torch.cat(steps, 1), atol=1e-5)


def test_q_exit_decoding_stops_early_and_q_one_is_fixed_depth():
    model = jiggle(model_of(loop_steps=4)).eval()
    prompt = [1, 2, 3]
    early, full = [], []
    tokens = list(generate(model, prompt, 8, temperature=0, exit_threshold=0.4, passes_run=early))
    fixed = list(generate(model, prompt, 8, temperature=0, exit_threshold=1.0, passes_run=full))
    assert early[1:] == [1] * 8 and full == [4] * 9  # gates start at 0.5: cdf 0.5 >= 0.4 after one pass
    with torch.no_grad():  # q = 1 is plain greedy decoding of the last pass's logits
        ids = list(prompt)
        for _ in range(8):
            ids.append(int(model(torch.tensor([ids]))[0, -1].argmax()))
    assert fixed == ids[3:] and len(tokens) == 8


@pytest.mark.parametrize("optimizer", ["muon", "adamw", "foam", "gum", "muon8"])
def test_every_optimizer_trains_mhc_and_the_loop(optimizer):
    # GUM projects the 32-wide block matrices; the 24-row coefficient maps step whole (below galore_min_dim)
    sets = {"gum": ["optim.use_galore=true", "optim.galore_rank=4", "optim.galore_min_dim=25",
                    "optim.gum_full_rank_layers=1"],
            "muon8": ["optim.use_8bit_optim=true"]}.get(optimizer, [f"optim.matrix_optimizer={optimizer}"])
    cfg = load_config(overrides=sets)
    model = model_of(mhc_streams=4, loop_steps=2)
    opt = build_optimizer(model, cfg.optim)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    idx = torch.randint(0, 48, (2, 25))
    for _ in range(3):  # zero-initialized branches and coefficient maps: some move only from the third step
        model(idx[:, :-1], idx[:, 1:]).backward()
        opt.step()
        opt.zero_grad()
    moved = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    assert {"blocks.0.attn_residual.phi", "blocks.1.mlp_residual.alpha", "loop.gate.weight"} <= moved


@pytest.mark.parametrize("kind", ["heads", "modules"])
def test_mtp_composes_with_mhc_and_the_loop(kind):
    mtp = dict(mtp_kind="heads", mtp_n_future=2, mtp_weights=(1.0, 0.5, 0.25)) if kind == "heads" else \
        dict(mtp_kind="modules", mtp_n_future=1, mtp_weights=(0.3,))
    model = jiggle(model_of(mhc_streams=4, loop_steps=2, **mtp))
    idx = torch.randint(0, 48, (2, 25))
    model(idx[:, :-1], idx[:, 1:]).backward()
    assert all(p.grad is not None for p in model.parameters())
    model.eval()
    plain = list(generate(model, [1, 2, 3], 10, temperature=0))
    assert list(generate(model, [1, 2, 3], 10, temperature=0, speculative=True)) == plain


def test_a_run_with_mhc_and_the_loop_resumes_exactly_and_exports(tmp_path, overrides, stop_and_resume):
    from ternchat.export.packed import export_packed, load_packed
    from ternchat.runs import load_model_and_tokenizer

    cfg = load_config(overrides=[*overrides, "mhc.enabled=true", "loop.enabled=true", "loop.steps=2",
                                 "train.max_steps=4", "train.checkpoint_every=2"])
    run = tmp_path / "run"
    stop_and_resume(cfg, run, 4)

    model, tok = load_model_and_tokenizer(run)
    assert model.shape.mhc_streams == 4 and model.shape.loop_steps == 2
    export_packed(model, tmp_path / "m.safetensors", tok, float_dtype=torch.float32)
    packed = load_packed(tmp_path / "m.safetensors").model
    assert packed.blocks[0].attn_residual.phi.dtype == torch.float32
    idx = torch.tensor([tok.encode("fn main() {")])
    with torch.no_grad():
        assert torch.allclose(packed(idx), model.eval()(idx), atol=1e-4)
