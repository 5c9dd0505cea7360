"""The ternary GPT: BitLinear layers and the transformer built from them."""
