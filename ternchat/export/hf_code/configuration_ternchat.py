"""Configuration of a ternchat model exported for Hugging Face `transformers` (remote code).

Written by `ternchat export --format hf` beside the weights; `AutoConfig.from_pretrained(dir,
trust_remote_code=True)` reads it. The fields are ternchat's GPTShape under transformers' names.
"""

from transformers import PretrainedConfig


class TernchatConfig(PretrainedConfig):
    model_type = "ternchat"

    def __init__(self, vocab_size: int = 32768, hidden_size: int = 768, num_hidden_layers: int = 12,
                 num_attention_heads: int = 12, intermediate_size: int = 3072, max_position_embeddings: int = 2048,
                 quant: str = "ternary", mlp: str = "relu2", qk_norm: bool = True, rms_norm_eps: float = 1e-6,
                 rope_theta: float = 10000.0, tie_word_embeddings: bool = False, **kwargs):
        self.vocab_size = vocab_size
        self.hidden_size = hidden_size
        self.num_hidden_layers = num_hidden_layers
        self.num_attention_heads = num_attention_heads
        self.intermediate_size = intermediate_size
        self.max_position_embeddings = max_position_embeddings
        self.quant = quant  # "ternary": block linears hold 2-bit packed codes and a scale; "none": dense
        self.mlp = mlp  # relu2, relu2_glu or swiglu
        self.qk_norm = qk_norm
        self.rms_norm_eps = rms_norm_eps
        self.rope_theta = rope_theta
        super().__init__(tie_word_embeddings=tie_word_embeddings, **kwargs)
