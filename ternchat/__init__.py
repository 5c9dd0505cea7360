"""ternchat: train, evaluate and run small ternary-weight (BitNet b1.58) language models for Rust code."""

__version__ = "0.1.0"
