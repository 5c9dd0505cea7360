"""Errors of the data pipeline: each message says what is wrong and what to do."""


class DataError(RuntimeError):
    """Input data that cannot be used (missing tools, corrupt shard, empty corpus, ...)."""
