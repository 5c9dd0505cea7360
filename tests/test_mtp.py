"""Multi-token prediction (heads and modules) and self-speculative decoding."""

import math
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from ternchat.config import ConfigError, load_config
from ternchat.eval.engine import SpeculationStats, generate
from ternchat.model.gpt import GPT, GPTShape
from ternchat.optim.factory import build_optimizer

pytestmark = pytest.mark.numerics  # rerun by .ci/run on other CPU kernel paths

KINDS = ["heads", "modules"]


def tiny(kind: str, vocab: int = 16, n_future: int = 2, quant: str = "none", seq_len: int = 30) -> GPT:
    weights = [f"mtp.weights={[1.0] + [0.5] * n_future}"] if kind == "heads" else []
    cfg = load_config(overrides=[f'mtp.kind="{kind}"', f"mtp.n_future={n_future}", *weights, "model.depth=2",
                                 "model.d_model=64", "model.n_heads=2", f"model.seq_len={seq_len}",
                                 f'model.quant="{quant}"'])
    return GPT(GPTShape.from_config(cfg, vocab))


def jiggle(model: GPT, scale: float = 0.3) -> GPT:
    """Random weights everywhere (zero-initialized branches included), so every input matters."""
    torch.manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * scale)
    return model


@pytest.mark.parametrize("kind", KINDS)
def test_depth_k_sees_no_token_past_the_one_it_is_given(kind):
    model = jiggle(tiny(kind)).eval()
    torch.manual_seed(0)
    x = torch.randint(0, 16, (1, 20))
    i = 5
    for k in (1, 2):
        # heads see tokens <= i; module k also gets the embedding of token i + k
        seen = i + k if kind == "modules" else i
        base = model.future_logits(x)[k][0, i]
        later = x.clone()
        later[0, seen + 1] = (later[0, seen + 1] + 1) % 16
        # exact: the same shapes run the same kernels in the same order, and the causal mask adds exact zeros
        assert torch.equal(model.future_logits(later)[k][0, i], base)
        given = x.clone()
        given[0, seen] = (given[0, seen] + 1) % 16
        assert not torch.allclose(model.future_logits(given)[k][0, i], base)


def test_sequential_head_backward_gives_the_summed_losss_gradients():
    model = jiggle(tiny("heads", n_future=3))
    torch.manual_seed(0)
    x = torch.randint(0, 16, (3, 21))
    inputs, targets = x[:, :-1], x[:, 1:]
    T = inputs.shape[1]
    model(inputs, targets).backward()
    sequential = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    logits = model.future_logits(inputs)
    naive = sum(w * F.cross_entropy(lg.reshape(-1, 16), targets[:, j:T].reshape(-1))
                for j, (lg, w) in enumerate(zip(logits, model.mtp.weights)))
    naive.backward()
    for name, p in model.named_parameters():
        assert torch.allclose(sequential[name], p.grad, atol=1e-5, rtol=1e-4), name
    assert set(n.split(".")[0] for n, p in model.named_parameters() if p.grad.abs().sum() > 0) >= {"blocks", "mtp"}


def test_the_optimizer_trains_the_mtp_parameters():
    model = tiny("modules", quant="ternary")
    groups = [p for opt in build_optimizer(model, load_config().optim).optimizers for g in opt.param_groups
              for p in g["params"]]
    assert {id(p) for p in model.parameters()} <= {id(p) for p in groups}


def triples(batch: int, length: int, vocab: int, generator: torch.Generator) -> torch.Tensor:
    """(a, r, f(a)) repeated: the token after a is random, the one two after it follows from a."""
    a = torch.randint(0, vocab, (batch, length // 3), generator=generator)
    r = torch.randint(0, vocab, (batch, length // 3), generator=generator)
    return torch.stack([a, r, (3 * a + 1) % vocab], dim=2).reshape(batch, -1)


def train_on_triples(kind: str, steps: int = 150) -> GPT:
    torch.manual_seed(0)
    model = tiny(kind, n_future=1, seq_len=32)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    generator = torch.Generator().manual_seed(0)
    for _ in range(steps):
        x = triples(32, 33, 16, generator)
        model(x[:, :-1], x[:, 1:]).backward()
        optimizer.step()
        optimizer.zero_grad()
    return model.eval()


@pytest.fixture(scope="module", params=KINDS)
def trained(request) -> GPT:
    return train_on_triples(request.param)


@pytest.mark.statistical  # compares whole runs or sampled distributions: the numerics pass leaves it out
def test_depth_one_learns_token_t_plus_2_while_the_next_token_stays_random(trained):
    x = triples(64, 33, 16, torch.Generator().manual_seed(99))
    inputs = x[:, :-1]
    with torch.no_grad():
        logits = trained.future_logits(inputs)
    at_a = torch.arange(0, 30, 3)  # positions of `a`: next is random, two ahead is f(a)
    next_loss = F.cross_entropy(logits[0][:, at_a].reshape(-1, 16), x[:, at_a + 1].reshape(-1))
    ahead_loss = F.cross_entropy(logits[1][:, at_a].reshape(-1, 16), x[:, at_a + 2].reshape(-1))
    assert ahead_loss < 0.3 < math.log(16) - 0.25 < next_loss


def test_speculative_greedy_equals_plain_greedy_on_a_trained_model(trained):
    stats = SpeculationStats()
    for seed in range(4):
        prompt = triples(1, 9, 16, torch.Generator().manual_seed(seed))[0].tolist()
        plain = list(generate(trained, prompt, 18, temperature=0))
        assert list(generate(trained, prompt, 18, temperature=0, speculative=True, stats=stats)) == plain
    assert stats.accepted[0] > 0 and stats.steps < stats.tokens  # drafts were taken, not only offered


@pytest.mark.statistical  # compares whole runs or sampled distributions: the numerics pass leaves it out
def test_speculative_sampling_with_a_bad_draft_keeps_the_target_distribution():
    """The drafting heads are random, so drafts are often rejected; the second token (the first one
    drafted) must still follow the main model: chi-square against its exact marginal."""
    model = jiggle(tiny("heads", vocab=8, n_future=1), scale=0.5).eval()
    prompt = [1, 2, 3]
    with torch.no_grad():
        first = torch.softmax(model(torch.tensor([prompt]))[0, -1], -1)
        second = sum(first[t] * torch.softmax(model(torch.tensor([prompt + [t]]))[0, -1], -1) for t in range(8))
    n = 2000
    counts = torch.zeros(8)
    stats = SpeculationStats()
    for seed in range(n):
        tokens = list(generate(model, prompt, 2, temperature=1.0, top_k=0, top_p=1.0, seed=seed, speculative=True,
                               stats=stats))
        counts[tokens[1]] += 1
    expected = second * n
    chi2 = float(((counts - expected) ** 2 / expected).sum())
    assert chi2 < 30.0, (chi2, counts, expected)  # 7 degrees of freedom: p < 1e-4 above 29.9
    assert 0 < stats.accepted[0] < stats.offered[0]  # some drafts were rejected, some accepted


def test_a_draft_as_the_target_distribution_is_always_accepted(monkeypatch):
    """The other side of the bad draft: with drafts drawn from p itself, min(1, p/q) = 1."""
    model = jiggle(tiny("heads", vocab=8, n_future=1), scale=0.5).eval()
    from ternchat.eval import engine

    def oracle(self, tokens, last, pick):  # the main model's own next-token distribution
        return [pick(model(torch.tensor([tokens[:last + 2]]))[0, -1])]

    monkeypatch.setattr(engine._Drafter, "draft", oracle)
    stats = SpeculationStats()
    for seed in range(50):
        list(generate(model, [1, 2, 3], 4, temperature=1.0, top_k=0, top_p=1.0, seed=seed, speculative=True,
                      stats=stats))
    assert stats.accepted[0] == stats.offered[0] > 0


def test_mtp_config_is_checked():
    # one key: the default weights follow n_future; weights given by hand must fit it
    assert load_config(overrides=['mtp.kind="heads"', "mtp.n_future=2"]).mtp.weights == [1.0, 0.5, 0.25]
    assert load_config(overrides=['mtp.kind="heads"', "mtp.n_future=5"]).mtp.weights == [0.5 ** i for i in range(6)]
    with pytest.raises(ConfigError, match="mtp.weights has 2 values"):
        load_config(overrides=['mtp.kind="heads"', "mtp.n_future=2", "mtp.weights=[1.0, 0.3]"])
    with pytest.raises(ConfigError, match="FSDP2"):
        load_config(overrides=['mtp.kind="heads"', 'dist.strategy="fsdp2"'])
    assert load_config(overrides=['mtp.kind="modules"', "mtp.n_future=1"]).mtp.module_weight == 0.3


def test_speculative_needs_mtp():
    model = GPT(GPTShape(16, 1, 32, 2, 64, 16, "none"))
    with pytest.raises(ValueError, match="multi-token prediction"):
        list(generate(model, [1], 3, speculative=True))


@pytest.mark.statistical  # compares whole runs or sampled distributions: the numerics pass leaves it out
@pytest.mark.parametrize("kind", KINDS)
def test_an_mtp_run_resumes_exactly_and_its_export_drafts(tmp_path, overrides, kind, stop_and_resume):
    from ternchat.export.packed import export_packed, load_packed
    from ternchat.runs import load_model_and_tokenizer

    extra = [f'mtp.kind="{kind}"', "mtp.n_future=2"] + (["mtp.weights=[1.0, 0.5, 0.25]"] if kind == "heads" else [])
    cfg = load_config(overrides=[*overrides, *extra, "train.max_steps=6", "train.checkpoint_every=3"])
    run = tmp_path / "run"
    stop_and_resume(cfg, run, 6)

    model, tok = load_model_and_tokenizer(run)
    assert model.mtp is not None
    export_packed(model, tmp_path / "m.safetensors", tok)
    packed = load_packed(tmp_path / "m.safetensors").model
    prompt = tok.encode("fn main() {")
    plain = list(generate(packed, prompt, 16, temperature=0))
    assert list(generate(packed, prompt, 16, temperature=0, speculative=True)) == plain

    def sample(*flags: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "ternchat", "sample", "--run", str(run), "--prompt", "fn main() {",
                               "--max-tokens", "16", "--temperature", "0", *flags], capture_output=True, text=True)

    plain_cli, speculative_cli = sample(), sample("--speculative")
    assert plain_cli.returncode == speculative_cli.returncode == 0, speculative_cli.stderr
    assert speculative_cli.stdout == plain_cli.stdout and "draft acceptance by depth" in speculative_cli.stderr
