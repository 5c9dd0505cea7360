import io

import pytest
import torch

from ternchat.config import load_config
from ternchat.model.gpt import GPT, GPTShape
from ternchat.optim.factory import build_optimizer
from ternchat.optim.foam import FOAM
from ternchat.optim.galore import GUM, GaLoreAdamW, randomized_svd_basis
from ternchat.optim.muon import Muon
from ternchat.optim.quant8 import dequantize_blockwise, quantize_blockwise

pytestmark = pytest.mark.numerics  # rerun by .ci/run on other CPU kernel paths


def test_blockwise_int8_error_is_within_half_a_step():
    x = torch.randn(10_000) * torch.linspace(0.01, 10, 10_000)
    for block in (128, 2048):
        codes, absmax = quantize_blockwise(x, block)
        assert codes.dtype == torch.int8 and absmax.numel() == -(-x.numel() // block)
        error = (dequantize_blockwise(codes, absmax, block) - x).abs()
        step = (absmax / 127).repeat_interleave(block)[: x.numel()]
        assert (error <= step / 2 + 1e-7).all()


def test_stochastic_rounding_is_unbiased_on_average():
    x = torch.full((2048,), 0.3) * torch.linspace(-1, 1, 2048)
    gen = torch.Generator().manual_seed(0)
    mean = torch.stack([dequantize_blockwise(*quantize_blockwise(x, 2048, True, gen), 2048) for _ in range(400)]).mean(0)
    nearest = dequantize_blockwise(*quantize_blockwise(x, 2048), 2048)
    assert (mean - x).abs().mean() < 0.25 * (nearest - x).abs().mean()


def state_bytes(opt) -> int:
    return sum(t.numel() * t.element_size() for s in opt.state.values() for t in s.values() if torch.is_tensor(t))


def test_8bit_muon_state_is_about_one_byte_per_parameter():
    params = [torch.nn.Parameter(torch.randn(256, 512)) for _ in range(3)]
    opt = Muon(params, state_bits=8, block_size=2048)
    for p in params:
        p.grad = torch.randn_like(p)
    opt.step()
    n = sum(p.numel() for p in params)
    assert state_bytes(opt) / n <= 1 + 4 / 2048 + 1e-9


def test_8bit_muon_tracks_fp32_muon():
    torch.manual_seed(0)
    a = torch.nn.Parameter(torch.randn(64, 128))
    b = torch.nn.Parameter(a.detach().clone())
    fp32, int8 = Muon([a], lr=0.01), Muon([b], lr=0.01, state_bits=8, block_size=128)
    for _ in range(20):
        g = torch.randn(64, 128)
        a.grad, b.grad = g.clone(), g.clone()
        fp32.step(), int8.step()
    assert (a - b).norm() < 0.05 * (a.detach() - a.detach().mean()).norm()


def test_randomized_svd_recovers_a_low_rank_subspace():
    torch.manual_seed(0)
    g = torch.randn(200, 12) @ torch.randn(12, 300)
    basis = randomized_svd_basis(g, 12, oversample=6, power_iters=2, generator=torch.Generator().manual_seed(1))
    assert torch.allclose(basis.T @ basis, torch.eye(12), atol=1e-4)
    assert (basis @ basis.T @ g - g).norm() < 1e-4 * g.norm()


def test_gum_at_full_rank_equals_muon():
    torch.manual_seed(0)
    a = torch.nn.Parameter(torch.randn(48, 96))
    b = torch.nn.Parameter(a.detach().clone())
    start = a.detach().clone()
    muon = Muon([a], lr=0.02, momentum=0.9, nesterov=False)
    # One period (GUM restarts momentum when the subspace changes, plain Muon does not).
    gum = GUM([b], lr=0.02, momentum=0.9, rank=48, min_dim=1, update_freq=10)
    for _ in range(7):
        g = torch.randn(48, 96)
        a.grad, b.grad = g.clone(), g.clone()
        muon.step(), gum.step()
    assert gum.uses_galore(b) and not gum.state[b]["full_rank"]
    moved = (a.detach() - start).norm()
    assert (a - b).norm() < 0.03 * moved  # equal up to bf16 Newton-Schulz rounding


def test_galore_adamw_update_stays_in_the_subspace_and_state_is_low_rank():
    torch.manual_seed(0)
    p = torch.nn.Parameter(torch.randn(64, 256))
    opt = GaLoreAdamW([p], lr=0.1, rank=8, min_dim=32, update_freq=100)
    before = p.detach().clone()
    p.grad = torch.randn(64, 256)
    opt.step()
    basis = opt.state[p]["basis"]
    delta = p.detach() - before
    assert (delta - basis @ basis.T @ delta).norm() < 1e-4 * delta.norm()
    moments = opt.state[p]["exp_avg"].numel() + opt.state[p]["exp_avg_sq"].numel()
    assert moments / (2 * p.numel()) == 8 / 64  # r / min(m, n) of AdamW's state


def test_foam_level_0_is_adamw_and_folds_state():
    torch.manual_seed(0)
    a = torch.nn.Parameter(torch.randn(8, 32))
    b, c = (torch.nn.Parameter(a.detach().clone()) for _ in range(2))
    adamw = torch.optim.AdamW([a], lr=1e-2, weight_decay=0.1)
    foam0, foam3 = FOAM([b], lr=1e-2, weight_decay=0.1, level=0), FOAM([c], lr=1e-2, level=3)
    for _ in range(5):
        g = torch.randn(8, 32)
        a.grad, b.grad, c.grad = g.clone(), g.clone(), g.clone()
        adamw.step(), foam0.step(), foam3.step()
    assert torch.allclose(a, b, atol=1e-6)
    assert foam3.state[c]["exp_avg_folded"].shape == (8, 4)


SHAPE = GPTShape(vocab_size=256, depth=2, d_model=64, n_heads=2, d_ff=256, seq_len=32, quant="ternary")
VARIANTS = {
    "muon": [],
    "muon_8bit_sr": ["optim.use_8bit_optim=true", "optim.block_size_8bit=128", "optim.stochastic_rounding=true"],
    "gum": ["optim.use_galore=true", "optim.galore_rank=8", "optim.galore_min_dim=32", "optim.galore_update_freq=2",
            "optim.gum_full_rank_layers=1"],
    "gum_8bit": ["optim.use_galore=true", "optim.galore_rank=8", "optim.galore_min_dim=32",
                 "optim.galore_update_freq=2", "optim.use_8bit_optim=true", "optim.block_size_8bit=128"],
    "galore_adamw": ["optim.matrix_optimizer=adamw", "optim.use_galore=true", "optim.galore_rank=8",
                     "optim.galore_min_dim=32", "optim.galore_update_freq=2"],
    "foam": ["optim.matrix_optimizer=foam", "optim.foam_level=2", "optim.foam_embed_head=true"],
}


def run(opt_overrides, steps, state=None, model_state=None):
    torch.manual_seed(0)
    model = GPT(SHAPE)
    if model_state is not None:
        model.load_state_dict(model_state)
    opt = build_optimizer(model, load_config(overrides=opt_overrides).optim)
    if state is not None:
        opt.load_state_dict(state)
    gen = torch.Generator().manual_seed(len(opt_overrides))
    data = [torch.randint(0, 256, (4, 33), generator=gen) for _ in range(12)]
    start = 0 if state is None else 12 - steps
    for batch in data[start:start + steps]:
        model(batch[:, :-1], batch[:, 1:]).backward()
        opt.step()
        opt.zero_grad()
    buffer = io.BytesIO()
    torch.save(opt.state_dict(), buffer)
    buffer.seek(0)
    return model, torch.load(buffer, weights_only=True)


@pytest.mark.parametrize("name", list(VARIANTS))
def test_state_dict_round_trip_continues_exactly(name):
    overrides = VARIANTS[name]
    straight, _ = run(overrides, 12)
    half, saved = run(overrides, 7)
    resumed, _ = run(overrides, 5, state=saved, model_state=half.state_dict())
    for (n, a), b in zip(straight.state_dict().items(), resumed.state_dict().values()):
        assert torch.equal(a, b), n  # exact: the resumed steps run the same ops on the same values


def test_8bit_adamw_uses_bitsandbytes_or_says_why():
    model = GPT(SHAPE)
    opt = build_optimizer(model, load_config(overrides=["optim.adamw_8bit=true"]).optim)
    try:
        import bitsandbytes  # noqa: F401
    except ImportError:
        assert type(opt.optimizers[1]) is torch.optim.AdamW
    else:
        assert type(opt.optimizers[1]).__name__ == "AdamW8bit"


def test_gum_draws_exactly_gamma_whole_layers_each_period():
    layers = [[torch.nn.Parameter(torch.randn(32, 64)) for _ in range(3)] for _ in range(10)]
    opt = GUM([dict(params=ps) for ps in layers], rank=4, min_dim=8, update_freq=1, full_rank_layers=3)
    assert opt.q == 3 / 10
    draws, counts = [], [0] * 10
    for _ in range(60):
        for p in (p for ps in layers for p in ps):
            p.grad = torch.randn_like(p)
        opt.step()
        flags = [[opt.state[p]["full_rank"] for p in ps] for ps in layers]
        assert all(len(set(f)) == 1 for f in flags)  # a layer's matrices go together
        drawn = [f[0] for f in flags]
        assert sum(drawn) == 3  # exactly gamma layers, not independent coins
        draws.append(drawn)
        counts = [c + d for c, d in zip(counts, drawn)]
    assert len({tuple(d) for d in draws}) > 20  # new draws each period
    assert all(6 <= c <= 32 for c in counts)  # every layer about q = 0.3 of the time (expected 18)


def test_gum_gradient_estimate_is_unbiased():
    """E[G_hat] = (1 - q) E[G_hat | low rank] + q E[G_hat | full rank] = G for the estimate fed to the
    momentum (the update after Newton-Schulz is not unbiased)."""
    torch.manual_seed(0)
    u, _ = torch.linalg.qr(torch.randn(24, 4))
    v, _ = torch.linalg.qr(torch.randn(48, 4))
    g = (u * torch.tensor([10.0, 9.0, 8.0, 7.0])) @ v.T + 0.3 * torch.randn(24, 48)  # a stable top-4 subspace
    params = [torch.nn.Parameter(torch.zeros(24, 48)) for _ in range(2)]
    opt = GUM([dict(params=[p]) for p in params], rank=4, min_dim=8, update_freq=1, full_rank_layers=1,
              momentum=0.0)
    branches = {True: [], False: []}
    for _ in range(40):
        for p in params:
            p.grad = g.clone()
        opt.step()
        state = opt.state[params[0]]
        buf = state["momentum"]  # momentum 0: the buffer is this step's estimate
        branches[state["full_rank"]].append(buf if state["full_rank"] else state["basis"] @ buf)
    low, full = (torch.stack(branches[b]).mean(0) for b in (False, True))
    assert len(branches[True]) > 5 and len(branches[False]) > 5
    assert ((1 - opt.q) * low + opt.q * full - g).norm() < 1e-3 * g.norm()
    assert (low - g).norm() > 0.5 * g.norm()  # one branch alone is biased


def test_galore_adamw_bias_correction_restarts_with_the_moments():
    """Constant gradient: every step of the second period moves the weights as the same step of the first."""
    torch.manual_seed(0)
    u, _ = torch.linalg.qr(torch.randn(64, 8))
    v, _ = torch.linalg.qr(torch.randn(128, 8))
    g = (u * torch.linspace(8, 1, 8)) @ v.T  # rank 8, distinct singular values: the subspace is unique
    p = torch.nn.Parameter(torch.zeros(64, 128))
    opt = GaLoreAdamW([p], lr=0.1, betas=(0.9, 0.999), rank=8, min_dim=32, update_freq=10, scale=1.0)
    deltas = []
    for _ in range(20):
        before = p.detach().clone()
        p.grad = g.clone()
        opt.step()
        deltas.append(p.detach() - before)
    for first, second in zip(deltas[:10], deltas[10:]):
        assert torch.allclose(first, second, atol=1e-5 * first.abs().max())


def foam_reference_step(p, g, m, v, step, lr, b1, b2, eps, level, scale):
    """One step of zqOuO/FOAM foam_torch/foam_adam.py, transcribed for a 2-D tensor."""
    k = 2 ** level
    blocks = g.view(g.shape[0], -1, k)
    folded, folded_sq = blocks.mean(-1), (blocks ** 2).mean(-1)
    res = g - folded.repeat_interleave(k, -1)
    m = b1 * m + (1 - b1) * folded
    v = b2 * v + (1 - b2) * folded_sq
    update_m = m.repeat_interleave(k, -1) + res
    update_v = v.repeat_interleave(k, -1) + res ** 2
    norm_grad = scale * update_m / (update_v.sqrt() + eps)
    step_size = lr * (1 - b2 ** step) ** 0.5 / (1 - b1 ** step)
    return p - step_size * norm_grad, m, v


def test_foam_follows_the_official_update():
    torch.manual_seed(0)
    p = torch.nn.Parameter(torch.randn(8, 32))
    ref, m, v = p.detach().clone(), torch.zeros(8, 8), torch.zeros(8, 8)
    opt = FOAM([p], lr=1e-2, betas=(0.9, 0.95), level=2, scale=0.25)
    for step in range(1, 6):
        g = torch.randn(8, 32)
        p.grad = g.clone()
        opt.step()
        ref, m, v = foam_reference_step(ref, g, m, v, step, 1e-2, 0.9, 0.95, 1e-8, 2, 0.25)
        assert torch.allclose(p.detach(), ref, atol=1e-6)


def test_foam_second_moment_folds_the_squared_gradient():
    p = torch.nn.Parameter(torch.zeros(1, 8))
    opt = FOAM([p], betas=(0.9, 0.99), level=3)
    p.grad = torch.tensor([[1.0, -1.0] * 4])  # block mean 0, mean square 1
    opt.step()
    v = opt.state[p]["exp_avg_sq_folded"]
    assert torch.allclose(v, torch.tensor([[0.01]]))  # (1 - b2) * mean(g^2); (mean g)^2 would give 0


def test_stochastic_rounding_noise_changes_with_step_and_slot():
    from ternchat.optim.quant8 import StateCodec
    codec = StateCodec(8, 128, stochastic=True, seed=0)
    x = torch.rand(4096) * 0.01 + 0.5
    codes = []
    for step, slot in ((1, 0), (2, 0), (1, 1), (1, 0)):
        state = {}
        codec.store(state, "m", x, step, slot)
        codes.append(state["m_q"])
    assert not torch.equal(codes[0], codes[1]) and not torch.equal(codes[0], codes[2])
    assert torch.equal(codes[0], codes[3])  # exact: the same seed, step and slot draw the same rounding
