"""Compiler-verified evaluation: the rustc sandbox, HumanEval-Rust, pass@k, checked data."""
