"""Data path: Rust crates -> clean corpus -> BPE tokenizer -> token shards -> (B, T) batches."""
