"""GGUF export: llama.cpp's bitnet layout, and the ternary codes and scales round-trip exactly."""

from __future__ import annotations

import numpy as np
import pytest
import torch

gguf = pytest.importorskip("gguf")

from ternchat.data.errors import DataError  # noqa: E402
from ternchat.export.gguf import dequantize_codes, export_gguf, quantize_codes, vocab_and_merges  # noqa: E402
from ternchat.model.bitlinear import TernaryLinear  # noqa: E402

LLAMA_KNOBS = ["model.mlp=swiglu", "model.qk_norm=false", "model.tie_embeddings=true", "model.d_model=256",
               "model.d_ff=512", "model.n_heads=4"]


@pytest.mark.parametrize("quant", ["tq2_0", "tq1_0"])
def test_ternary_codes_round_trip_through_gguf_quantizers(quant):
    torch.manual_seed(0)
    codes = torch.randint(-1, 2, (64, 512), dtype=torch.int8)
    codes[3] = 0  # an all-zero block row: its scale is 0 and its codes stay 0
    back = dequantize_codes(quantize_codes(codes, quant), quant)
    assert np.array_equal(back, codes.float().numpy())


@pytest.mark.parametrize("quant", ["tq2_0", "tq1_0"])
def test_exported_file_holds_the_models_codes_and_scales(quant, random_model, task_tokenizer, tmp_path):
    model = random_model(task_tokenizer.vocab_size, LLAMA_KNOBS)
    path = tmp_path / f"model_{quant}.gguf"
    written = export_gguf(model, task_tokenizer, path, quant)
    assert written["bytes"] == path.stat().st_size
    reader = gguf.GGUFReader(str(path))
    tensors = {t.name: t for t in reader.tensors}
    assert reader.fields["general.architecture"].contents() == "bitnet"
    assert reader.fields["bitnet.block_count"].contents() == model.shape.depth
    assert "output.weight" not in tensors  # the head is the token embedding
    names = {"attn.q_proj": "attn_q", "attn.o_proj": "attn_output", "mlp.gate": "ffn_gate", "mlp.down": "ffn_down"}
    for i, block in enumerate(model.blocks):
        for path_in_block, short in names.items():
            layer = block.get_submodule(path_in_block)
            assert isinstance(layer, TernaryLinear)
            stored = tensors[f"blk.{i}.{short}.weight"]
            assert stored.tensor_type.name == quant.upper()
            codes = dequantize_codes(np.asarray(stored.data), quant).reshape(layer.out_features, layer.in_features)
            assert np.array_equal(codes, layer.codes.float().numpy())
            assert float(tensors[f"blk.{i}.{short}.scale"].data[0]) == float(layer.beta)
        assert np.array_equal(np.asarray(tensors[f"blk.{i}.ffn_sub_norm.weight"].data),
                              block.mlp.sub_norm.weight.detach().numpy())
    embed = np.asarray(tensors["token_embd.weight"].data).reshape(model.shape.vocab_size, model.shape.d_model)
    assert np.array_equal(embed, model.embed.weight.detach().numpy())


def test_vocabulary_spells_every_token_reversibly(task_tokenizer):
    tokens, merges, types = vocab_and_merges(task_tokenizer)
    assert len(tokens) == task_tokenizer.vocab_size == len(types)
    assert tokens[task_tokenizer.special("<|assistant_end|>")] == "<|assistant_end|>"
    assert types[task_tokenizer.bos_id] == 3 and types[0] == 1
    assert len(set(tokens)) == len(tokens)
    assert len(merges) == len(task_tokenizer.ranks) - 256  # one merge makes each multi-byte token


def test_models_llama_cpp_cannot_run_are_refused(random_model, task_tokenizer, tmp_path):
    with pytest.raises(DataError, match="swiglu.*qk_norm.*tie_embeddings.*multiples of 256"):
        export_gguf(random_model(task_tokenizer.vocab_size, []), task_tokenizer, tmp_path / "m.gguf")
