"""Fast decoding: the int8 ternary kernel and the compiled one-token step compute what the exact path computes."""

from __future__ import annotations

import pytest
import torch

from ternchat.eval.decode_step import CompiledStep, prepare_decoding
from ternchat.eval.engine import generate
from ternchat.model.bitlinear import set_kernel
from ternchat.model.gpt import KVCache

pytestmark = pytest.mark.numerics  # rerun by .ci/run on other CPU kernel paths

KNOBS = [[], ["model.mlp=swiglu", "model.qk_norm=false", "model.tie_embeddings=true"]]


@pytest.mark.parametrize("kernel", ["int8", "int2"])
@pytest.mark.parametrize("knobs", KNOBS)
def test_decoding_kernels_match_the_float_kernel(random_model, knobs, kernel):
    model = random_model(512, knobs)
    ids = torch.randint(0, 512, (2, 40), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        exact = model(ids)
        set_kernel(model, kernel)
        fast = model(ids)
    tolerance = 1e-4 * exact.abs().max()
    assert (exact - fast).abs().max() < tolerance
    # the same top token, except where two logits are within the kernels' rounding of each other
    chosen = exact.gather(-1, fast.argmax(-1, keepdim=True)).squeeze(-1)
    assert (exact.amax(-1) - chosen <= 2 * tolerance).all()


@pytest.mark.parametrize("knobs", KNOBS)
def test_static_step_matches_the_cached_forward(random_model, knobs):
    model = set_kernel(random_model(512, knobs), "int2")
    tokens = [5, 17, 99, 3, 250, 7, 1, 42, 8, 300]
    step = CompiledStep(model, compile=False)  # the same static-shape graph, run eagerly
    cache = KVCache(model.shape, 1, model.shape.seq_len, torch.device("cpu"), torch.float32)
    reference = model(torch.tensor([tokens]))[0]
    with torch.no_grad():
        model.passes(torch.tensor([tokens[:3]]), cache)
        for i, token in enumerate(tokens[3:], start=3):
            assert torch.allclose(step(token, cache), reference[i], atol=1e-4, rtol=1e-4)
    prompt = tokens[:4]
    assert list(generate(model, prompt, 30, temperature=0, compiled_step=step)) == \
        list(generate(model, prompt, 30, temperature=0))


def test_static_step_spans_grow_with_the_position(random_model):
    model = set_kernel(random_model(512, ["model.seq_len=512"]), "int2")
    step = CompiledStep(model, compile=False)
    assert [step.span(p) for p in (0, 100, 127, 128, 300, 511)] == [128, 128, 128, 256, 512, 512]
    prompt = list(torch.randint(0, 512, (120,), generator=torch.Generator().manual_seed(1)))
    prompt = [int(t) for t in prompt]  # decoding crosses from the 128 span into the 256 one
    assert list(generate(model, prompt, 40, temperature=0, compiled_step=step)) == \
        list(generate(model, prompt, 40, temperature=0))


@pytest.mark.inductor
def test_compiled_step_decodes_like_eager(random_model):
    model = random_model(512, KNOBS[1])
    compiled = prepare_decoding(model, "int2", compile=True)
    assert isinstance(compiled, CompiledStep)
    prompt = [3, 14, 15, 92, 65]
    assert list(generate(model, prompt, 24, temperature=0, compiled_step=compiled)) == \
        list(generate(model, prompt, 24, temperature=0))
    sampled = [list(generate(model, prompt, 16, temperature=0.8, seed=s, compiled_step=compiled)) for s in (1, 2)]
    assert sampled == [list(generate(model, prompt, 16, temperature=0.8, seed=s)) for s in (1, 2)]


def test_bf16_model_decodes_with_a_bf16_cache(random_model):
    model = random_model(512, [], quant="none").to(torch.bfloat16)
    out = list(generate(model, [1, 2, 3], 8, temperature=0))
    assert len(out) == 8


def test_packed_kernel_computes_exact_integer_products():
    from ternchat.model import ternary_kernel

    ternary_kernel.load()
    generator = torch.Generator().manual_seed(0)
    for rows, inputs, outputs in [(1, 64, 130), (1, 768, 2050), (3, 256, 96), (17, 2048, 40)]:
        codes = torch.randint(-1, 2, (outputs, inputs), dtype=torch.int8, generator=generator)
        x = torch.randint(-128, 128, (rows, inputs), dtype=torch.int8, generator=generator)
        products = torch.ops.ternchat.ternary_mm(x, ternary_kernel.pack(codes), outputs)
        assert torch.equal(products, x.int() @ codes.int().t())  # exact: integer products, int32 sums
    with pytest.raises(ValueError, match="multiples of 64"):
        ternary_kernel.pack(torch.zeros(4, 100, dtype=torch.int8))
