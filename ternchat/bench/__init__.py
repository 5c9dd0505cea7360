"""Benchmarks that compare ternchat against a baseline measured in the same run."""
