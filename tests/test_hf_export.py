"""Hugging Face export: the folder loads with transformers, gives ternchat's logits and generates the same text."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("accelerate")

from ternchat.data.chat import completion_prompt  # noqa: E402
from ternchat.eval.engine import generate  # noqa: E402
from ternchat.export.hf import check_logits, export_hf  # noqa: E402
from ternchat.verify.tasks import generate_tasks  # noqa: E402

pytestmark = pytest.mark.numerics  # rerun by .ci/run on other CPU kernel paths


@pytest.fixture(scope="module")
def texts() -> list[str]:
    return [t.prompt + t.reference for t in generate_tasks()[:3]]


@pytest.fixture
def saved_tokenizer(task_tokenizer, tmp_path) -> Path:
    task_tokenizer.save(tmp_path / "tokenizer")
    return tmp_path / "tokenizer"


def hf_greedy(out: Path, prompt: list[int], n: int) -> list[int]:
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(str(out), trust_remote_code=True, dtype=torch.float32).eval()
    generated = hf.generate(torch.tensor([prompt]), max_new_tokens=n, do_sample=False, eos_token_id=None)
    return generated[0, len(prompt):].tolist()


@pytest.mark.parametrize("knobs,quant", [([], "ternary"),
                                         (["model.mlp=swiglu", "model.qk_norm=false", "model.tie_embeddings=true"],
                                          "ternary"),
                                         ([], "none")])
def test_remote_code_export_matches_ternchat(knobs, quant, random_model, task_tokenizer, saved_tokenizer, texts, tmp_path):
    model = random_model(task_tokenizer.vocab_size, knobs, quant)
    out = tmp_path / "hf"
    written = export_hf(model, task_tokenizer, saved_tokenizer, out)
    assert written["layout"].startswith("remote code")
    assert (out / "modeling_ternchat.py").exists() and (out / "tokenizer.json").exists()
    result = check_logits(out, model, task_tokenizer, texts)
    assert result["class"] == "TernchatForCausalLM"
    assert result["max_abs_logit_diff"] < 1e-4, result
    assert result["greedy_transformers"] == result["greedy_ternchat"] and result["greedy_agree"] == 16, result
    prompt = [task_tokenizer.bos_id] + task_tokenizer.encode("fn main() {")
    ours = list(generate(model, prompt, 12, temperature=0))
    assert hf_greedy(out, prompt, len(ours)) == ours  # generate() through transformers' KV cache, every token


@torch._dynamo.config.patch(disable=True)  # transformers compiles its BitLinear helpers
def test_bitnet_knobs_load_natively(random_model, task_tokenizer, saved_tokenizer, texts, tmp_path):
    # torch's own patch, not monkeypatch: undoing a setattr deletes the key, which hides it from every later
    # torch.compile in the process ("torch._dynamo.config.disable does not exist")
    import json

    model = random_model(task_tokenizer.vocab_size, ["model.mlp=relu2_glu", "model.qk_norm=false"])
    out = tmp_path / "hf"
    assert export_hf(model, task_tokenizer, saved_tokenizer, out)["layout"] == "native BitNetForCausalLM"
    config = json.loads((out / "config.json").read_text())
    assert config["model_type"] == "bitnet" and "auto_map" not in config
    assert not (out / "modeling_ternchat.py").exists()
    result = check_logits(out, model, task_tokenizer, texts)
    assert result["class"] == "BitNetForCausalLM"
    # The same top token everywhere. The ternary product is summed in another order ((x_int . c) / (s / beta)
    # against x_q . (c beta)), so an activation within float rounding of an 8-bit step can round the other way;
    # most positions still agree to float rounding.
    assert result["same_top_token"] == result["tokens"], result
    assert result["within_1e-4"] >= 0.75 * result["tokens"], result
    assert result["max_abs_logit_diff"] < 0.2, result


def test_native_layout_refused_for_other_knobs(random_model, task_tokenizer, saved_tokenizer, tmp_path):
    from ternchat.data.errors import DataError

    model = random_model(task_tokenizer.vocab_size, [])
    with pytest.raises(DataError, match="relu2_glu"):
        export_hf(model, task_tokenizer, saved_tokenizer, tmp_path / "hf", layout="native")


def test_tokenizer_and_chat_template_match(task_tokenizer, saved_tokenizer, tmp_path, texts):
    from transformers import AutoTokenizer

    from ternchat.export.hf import save_hf_tokenizer

    save_hf_tokenizer(task_tokenizer, saved_tokenizer, tmp_path)
    hf_tok = AutoTokenizer.from_pretrained(str(tmp_path))
    for text in texts + ["let é = \"✓\";\n\t\tx::<u64>()  // 12345"]:
        assert hf_tok(text, add_special_tokens=False)["input_ids"] == task_tokenizer.encode(text)
        assert hf_tok.decode(task_tokenizer.encode(text)) == text
    messages = [{"role": "system", "content": "Answer in Rust."}, {"role": "user", "content": "fn add"}]
    rendered = hf_tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
    ids = rendered["input_ids"] if isinstance(rendered, dict) or hasattr(rendered, "keys") else rendered
    assert list(ids) == completion_prompt(messages, task_tokenizer)
    assert hf_tok.convert_tokens_to_ids("<|assistant_end|>") == task_tokenizer.special("<|assistant_end|>")
