"""Batched decoding: prompts of different lengths decoded together give what one-at-a-time decoding gives,
greedy and seeded sampling alike, with each row's own stop handling."""

import copy

import pytest
import torch

from ternchat.eval.engine import complete_batch, for_batches, generate, generate_batch
from ternchat.model.bitlinear import TernaryLinear, set_kernel, to_inference
from ternchat.model.gpt import GPT, GPTShape

pytestmark = pytest.mark.numerics  # rerun by .ci/run on other CPU kernel paths
BASE = dict(vocab_size=256, depth=2, d_model=64, n_heads=2, d_ff=128, seq_len=64, quant="ternary")
# Batching changes how the fp32 GEMMs and softmaxes are blocked, and left padding shifts the rotary angles
# (attention depends on relative positions only): logits agree to ~1e-5 here. A greedy choice may differ
# only where the one-at-a-time top two logits are closer than this.
NEAR_TIE = 1e-3


def model_of(**extra) -> GPT:
    torch.manual_seed(0)
    model = GPT(GPTShape.from_dict({**BASE, **extra}))
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))  # residual branches start at zero: give every block a say
    return to_inference(model).eval()


def prompts_of(lengths) -> list[list[int]]:
    g = torch.Generator().manual_seed(1)
    return [torch.randint(0, 256, (n,), generator=g).tolist() for n in lengths]


def top2_gap(model: GPT, ids: list[int]) -> float:
    with torch.no_grad():
        top = model(torch.tensor([ids]))[0, -1].float().topk(2).values
    return float(top[0] - top[1])


def assert_same_greedy(model: GPT, prompt: list[int], one: list[int], batched: list[int]) -> None:
    for j, (a, b) in enumerate(zip(one, batched)):
        if a != b:  # allowed only at a near tie, and then the rest follows another path
            assert top2_gap(model, prompt + one[:j]) < NEAR_TIE, (j, a, b)
            return
    assert len(one) == len(batched)


@pytest.mark.parametrize("extra", [{}, {"mhc_streams": 4, "loop_steps": 2}], ids=["plain", "mhc-loop"])
def test_greedy_batch_equals_one_at_a_time(extra):
    model = model_of(**extra)
    prompts = prompts_of([3, 11, 7, 1, 20])
    batched = generate_batch(model, prompts, 24, temperature=0.0)
    for prompt, row in zip(prompts, batched):
        assert_same_greedy(model, prompt, list(generate(model, prompt, 24, temperature=0.0)), row)


def test_seeded_sampling_and_stops_are_per_row():
    model = model_of()
    prompts = prompts_of([5, 9, 2])
    stop = 7
    one = [list(generate(model, p, 30, temperature=1.0, top_k=0, top_p=1.0, seed=10 + i, stop_ids=[stop]))
           for i, p in enumerate(prompts)]
    batched = generate_batch(model, prompts, 30, temperature=1.0, top_k=0, top_p=1.0, seeds=[10, 11, 12],
                             stop_ids=[stop])
    assert batched == one  # the same draws from each row's own generator (a boundary case would be ~1e-6 away)
    assert all(stop not in row for row in batched)


def test_complete_batch_ends_each_row_at_its_stop_string():
    class Bytes:  # a byte-level tokenizer: token i is byte i
        eod_id = 255

        def encode(self, text):
            return list(text.encode())

        def decode(self, ids):
            return bytes(ids).decode("latin-1")

    model, tok = model_of(), Bytes()
    prompts = [tok.encode(t) for t in ("fn a() {", "let x = 1;", "struct S")]
    free = [tok.decode(row) for row in generate_batch(model, prompts, 20, temperature=0.0, stop_ids=[tok.eod_id])]
    stops = [[free[0][3:5]], [], [free[2][:1]]]  # stop strings that occur in rows 0 and 2

    def until_stop(text: str, stop: list[str]) -> str:  # as `complete`: up to the token that completes a stop
        for end in range(1, len(text) + 1):
            if any(s in text[:end] for s in stop):
                return text[:end]
        return text

    got = complete_batch(model, tok, prompts, 20, stops, [tok.eod_id], temperature=0.0, batch_size=3)
    assert got == [until_stop(t, s) for t, s in zip(free, stops)]
    assert len(got[0]) <= 5 and len(got[2]) == 1 and got[1] == free[1]


def test_the_dense_kernel_of_batched_evaluation_computes_what_training_computes():
    torch.manual_seed(0)
    latent = GPT(GPTShape.from_dict(BASE))
    with torch.no_grad():
        for p in latent.parameters():
            p.add_(0.05 * torch.randn_like(p))
    ids = torch.randint(0, 256, (3, 20), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        trained = latent.eval()(ids)
        dense = for_batches(copy.deepcopy(latent))
        assert all(m.kernel == "dense" for m in dense.modules() if isinstance(m, TernaryLinear))
        # the same weight values and the same float product, once dequantized instead of at every call
        assert torch.equal(dense(ids), trained)
        assert torch.equal(set_kernel(dense, "float")(ids), trained)
