"""Hugging Face export: a `transformers` model folder (config, safetensors, tokenizer) of a ternchat run.

Two layouts, chosen by the model's architecture knobs:
- **native** `BitNetForCausalLM` (transformers' own class, no remote code) when the model has the shape of
  BitNet b1.58 2B4T: ternary, `mlp = "relu2_glu"` and no QK-norm. The block linears are written as
  transformers' offline `bitlinear` quantization: 2-bit packed codes (four per byte, value i of a byte is
  row r + i * ceil(out / 4)) and `weight_scale` = 1 / beta, which its BitLinear divides by.
- **remote code** (`model_type = "ternchat"`) otherwise: `modeling_ternchat.py` and
  `configuration_ternchat.py` are copied beside the weights and load with `trust_remote_code=True`; the same
  2-bit codes with beta itself. Every knob (any MLP, QK-norm, tied head) and dense models are covered.
MTP heads are not exported (a transformers model has one head). mHC streams and LoopLM's passes have no
counterpart in either class and are refused. The tokenizer becomes a `tokenizer.json` of the same
byte-level BPE (merges recovered from tiktoken's ranks), the code-aware split regex and the special tokens
at their ids, with a chat template that renders data/chat.py's format. `check_logits` loads the folder
with transformers and measures the largest logit difference against ternchat's model and how many
greedy tokens of transformers' `generate()` (its KV cache) equal ternchat's.
"""

from __future__ import annotations

import inspect
import json
import shutil
from pathlib import Path

import torch
from safetensors.torch import save_file

from ternchat.data.errors import DataError
from ternchat.data.tokenizer import BPE_FILE, Tokenizer
from ternchat.eval.engine import generate
from ternchat.model.bitlinear import as_ternary
from ternchat.model.gpt import GPT

REMOTE_CODE = Path(__file__).with_name("hf_code")
CODES_PER_BYTE = 4
CHAT_TEMPLATE = ("{{ bos_token }}{% for message in messages %}<|{{ message['role'] }}_start|>{{ message['content'] }}"
                 "<|{{ message['role'] }}_end|>{% endfor %}{% if add_generation_prompt %}<|assistant_start|>{% endif %}")


def pack_codes_2bit(codes: torch.Tensor) -> torch.Tensor:
    """(out, in) codes in {-1, 0, 1} -> (ceil(out / 4), in) uint8, transformers' BitNet packing."""
    rows = (codes.shape[0] + CODES_PER_BYTE - 1) // CODES_PER_BYTE
    shifted = torch.ones(rows * CODES_PER_BYTE, codes.shape[1], dtype=torch.uint8)  # pad rows with code 0
    shifted[:codes.shape[0]] = (codes.to(torch.int16) + 1).to(torch.uint8)
    packed = torch.zeros(rows, codes.shape[1], dtype=torch.uint8)
    for i in range(CODES_PER_BYTE):
        packed |= shifted[i * rows:(i + 1) * rows] << (2 * i)
    return packed


def native_bitnet(model: GPT) -> bool:
    """Whether transformers' BitNetForCausalLM computes this model (docs/use.md names the knobs)."""
    s = model.shape
    return s.quant == "ternary" and s.mlp == "relu2_glu" and not s.qk_norm


def _check_exportable(model: GPT) -> None:
    s = model.shape
    if s.mhc_streams > 1 or s.loop_steps > 1:
        raise DataError("the Hugging Face export covers the plain GPT; this model has "
                        + ("mHC residual streams" if s.mhc_streams > 1 else "LoopLM passes")
                        + ", which neither BitNetForCausalLM nor the exported remote code computes")


def _native_name(name: str) -> str:
    """ternchat's parameter name -> BitNetForCausalLM's."""
    if name == "embed.weight":
        return "model.embed_tokens.weight"
    if name == "final_norm.weight":
        return "model.norm.weight"
    if name == "lm_head.weight":
        return name
    parts = name.split(".")  # blocks.<i>.<rest>
    rest = ".".join(parts[2:])
    renames = {"attn_norm": "input_layernorm", "mlp_norm": "post_attention_layernorm",
               "attn.sub_norm": "self_attn.attn_sub_norm", "mlp.sub_norm": "mlp.ffn_sub_norm",
               "attn.q_proj": "self_attn.q_proj", "attn.k_proj": "self_attn.k_proj",
               "attn.v_proj": "self_attn.v_proj", "attn.o_proj": "self_attn.o_proj",
               "mlp.gate": "mlp.gate_proj", "mlp.up": "mlp.up_proj", "mlp.down": "mlp.down_proj"}
    module, leaf = rest.rsplit(".", 1)
    return f"model.layers.{parts[1]}.{renames[module]}.{leaf}"


def _tensors(model: GPT, native: bool, float_dtype: torch.dtype) -> dict[str, torch.Tensor]:
    tensors: dict[str, torch.Tensor] = {}
    done: set[str] = set()
    for name, module in model.named_modules():
        if name.startswith("mtp"):
            continue
        ternary = as_ternary(module)
        if ternary is None:
            continue
        packed = pack_codes_2bit(ternary.codes)
        if native:
            tensors[_native_name(f"{name}.weight")] = packed
            tensors[_native_name(f"{name}.weight_scale")] = (1.0 / ternary.beta).reshape(1).to(float_dtype)
        else:
            tensors[f"model.{name}.packed"] = packed
            tensors[f"model.{name}.beta"] = ternary.beta.reshape(()).float()
        done.add(f"{name}.weight")
    for name, p in model.named_parameters():
        if name in done or name.startswith("mtp") or (name == "lm_head.weight" and model.shape.tie_embeddings):
            continue
        key = _native_name(name) if native else (name if name == "lm_head.weight" else f"model.{name}")
        tensors[key] = p.detach().to(float_dtype).contiguous()
    return tensors


def _config(model: GPT, tok: Tokenizer, native: bool, float_dtype: torch.dtype) -> dict:
    s = model.shape
    common = {"vocab_size": s.vocab_size, "hidden_size": s.d_model, "num_hidden_layers": s.depth,
              "num_attention_heads": s.n_heads, "intermediate_size": s.d_ff, "max_position_embeddings": s.seq_len,
              "rms_norm_eps": 1e-6, "tie_word_embeddings": s.tie_embeddings,
              "bos_token_id": tok.bos_id, "eos_token_id": tok.eod_id, "pad_token_id": tok.pad_id,
              "dtype": str(float_dtype).removeprefix("torch."), "use_cache": True}
    if native:
        return {**common, "architectures": ["BitNetForCausalLM"], "model_type": "bitnet", "hidden_act": "relu2",
                "num_key_value_heads": s.n_heads, "attention_bias": False, "attention_dropout": 0.0,
                # transformers 5 reads rope_parameters, 4.x the top-level rope_theta (its default is 500000)
                "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0}, "rope_theta": 10000.0,
                "quantization_config": {"quant_method": "bitnet", "linear_class": "bitlinear",
                                        "quantization_mode": "offline"}}
    return {**common, "architectures": ["TernchatForCausalLM"], "model_type": "ternchat", "quant": s.quant,
            "mlp": s.mlp, "qk_norm": s.qk_norm, "rope_theta": 10000.0,
            "auto_map": {"AutoConfig": "configuration_ternchat.TernchatConfig",
                         "AutoModelForCausalLM": "modeling_ternchat.TernchatForCausalLM"}}


def save_hf_tokenizer(tok: Tokenizer, tokenizer_dir: Path, out: Path) -> None:
    """The tokenizer as transformers' fast tokenizer (tokenizer.json, tokenizer_config.json) in `out`."""
    from transformers import PreTrainedTokenizerFast
    from transformers.convert_slow_tokenizer import TikTokenConverter

    specials = sorted(tok.specials, key=tok.specials.get)
    # transformers 5 renamed the converter's `additional_special_tokens` to `extra_special_tokens`
    accepted = inspect.signature(TikTokenConverter.__init__).parameters
    specials_key = "extra_special_tokens" if "extra_special_tokens" in accepted else "additional_special_tokens"
    converted = TikTokenConverter(vocab_file=str(tokenizer_dir / BPE_FILE), pattern=tok.pattern,
                                  **{specials_key: specials}).converted()
    hf_tok = PreTrainedTokenizerFast(tokenizer_object=converted, bos_token="<|bos|>", eos_token="<|eod|>",
                                     pad_token="<|pad|>", additional_special_tokens=specials,
                                     chat_template=CHAT_TEMPLATE)
    hf_tok.save_pretrained(str(out))


def export_hf(model: GPT, tok: Tokenizer, tokenizer_dir: Path, out: Path, float_dtype: torch.dtype = torch.float32,
              layout: str = "auto") -> dict:
    """Write `model` as a transformers folder `out`. layout: "auto" (native BitNet when the knobs allow,
    remote code otherwise), "native" or "remote". Returns what was written."""
    _check_exportable(model)
    if layout not in ("auto", "native", "remote"):
        raise ValueError(f"layout {layout!r}: choose auto, native or remote")
    native = native_bitnet(model) if layout == "auto" else layout == "native"
    if native and not native_bitnet(model):
        s = model.shape
        raise DataError(f"BitNetForCausalLM needs quant=ternary, mlp=relu2_glu and qk_norm=false; this model has "
                        f"quant={s.quant}, mlp={s.mlp}, qk_norm={str(s.qk_norm).lower()} (use the remote-code layout)")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    tensors = _tensors(model, native, float_dtype)
    save_file({k: v.cpu().contiguous() for k, v in tensors.items()}, str(out / "model.safetensors"),
              metadata={"format": "pt"})
    (out / "config.json").write_text(json.dumps(_config(model, tok, native, float_dtype), indent=1) + "\n")
    eos = [tok.eod_id, tok.special("<|assistant_end|>")]
    (out / "generation_config.json").write_text(json.dumps(
        {"bos_token_id": tok.bos_id, "eos_token_id": eos, "pad_token_id": tok.pad_id}, indent=1) + "\n")
    if not native:
        for source in REMOTE_CODE.glob("*.py"):
            shutil.copy(source, out / source.name)
    save_hf_tokenizer(tok, tokenizer_dir, out)
    return {"layout": "native BitNetForCausalLM" if native else "remote code (TernchatForCausalLM)",
            "bytes": sum(f.stat().st_size for f in out.iterdir() if f.is_file()),
            "mtp_dropped": model.mtp is not None}


@torch.no_grad()
def check_logits(out: Path, model: GPT, tok: Tokenizer, texts: list[str], greedy_tokens: int = 16) -> dict:
    """Load `out` with transformers (remote code trusted: it is the file this exporter wrote) and compare its
    logits on `texts` with ternchat's, in fp32; also check the tokenizers agree on them, and greedy decoding
    with `generate()` from the start of the first text: `greedy_agree` leading tokens equal ternchat's."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    hf_model = AutoModelForCausalLM.from_pretrained(str(out), trust_remote_code=True, dtype=torch.float32).eval()
    hf_tok = AutoTokenizer.from_pretrained(str(out), trust_remote_code=True)
    max_diff, tokens, same_top, close = 0.0, 0, 0, 0
    for text in texts:
        ids = [tok.bos_id] + tok.encode(text)[:model.shape.seq_len - 1]
        hf_ids = hf_tok(text, add_special_tokens=False)["input_ids"]
        if hf_ids[:len(ids) - 1] != ids[1:]:
            raise DataError(f"the exported tokenizer encodes {text[:40]!r} differently from ternchat's")
        x = torch.tensor([ids])
        ours = model.float()(x).float()
        theirs = hf_model(x).logits.float()
        per_position = (ours - theirs).abs().amax(dim=-1)
        max_diff = max(max_diff, float(per_position.max()))
        close += int((per_position < 1e-4).sum())
        same_top += int((ours.argmax(-1) == theirs.argmax(-1)).sum())
        tokens += len(ids)
    # generate() runs through transformers' own cache handling, which full-sequence logits never touch
    prompt = ([tok.bos_id] + tok.encode(texts[0]))[:16]
    ours = list(generate(model, prompt, greedy_tokens, temperature=0))
    ids = torch.tensor([prompt])
    theirs = hf_model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=len(ours),
                               min_new_tokens=len(ours), do_sample=False, eos_token_id=None,
                               pad_token_id=tok.bos_id)[0, len(prompt):].tolist()
    agree = next((i for i, (a, b) in enumerate(zip(ours, theirs)) if a != b), min(len(ours), len(theirs)))
    return {"class": type(hf_model).__name__, "max_abs_logit_diff": max_diff, "tokens": tokens,
            "same_top_token": same_top, "within_1e-4": close, "greedy_ternchat": ours, "greedy_transformers": theirs,
            "greedy_agree": agree}
