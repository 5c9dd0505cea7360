"""Byte-level BPE tokenizer for Rust: trained with `rustbpe`, encoded with `tiktoken` (as nanochat).

Training is GPT-style byte-level BPE (Sennrich et al. 2016; Radford et al. 2019) over pre-tokens
cut by a code-aware regex: identifiers keep their underscores and digits (`snake_case`, `u64`),
lifetimes and method calls keep their sigil (`'static`, `.iter`), operator runs stay together
(`::`, `->`, `=>`), numbers split into groups of up to three digits, and indentation is its own
pre-token. Special tokens follow the learned ranks. Every byte sequence round-trips exactly.
On disk: `tokenizer.tiktoken` (tiktoken's base64 rank format) and `tokenizer.json` (pattern,
special tokens, content hash); the hash is checked on load and stamped into every shard.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import time
from pathlib import Path
from typing import Iterable, Sequence

import rustbpe
import tiktoken

from ternchat.data.errors import DataError

SPECIAL_TOKENS = [
    "<|bos|>",  # starts every document
    "<|eod|>",  # ends every document
    "<|pad|>",
    "<|fim_prefix|>", "<|fim_middle|>", "<|fim_suffix|>",  # fill-in-the-middle
    "<|system_start|>", "<|system_end|>",  # chat roles, for later fine-tuning
    "<|user_start|>", "<|user_end|>",
    "<|assistant_start|>", "<|assistant_end|>",
    "<|output_start|>", "<|output_end|>",  # tool / compiler output shown to the model
]

SPLIT_PATTERN = (
    r"""[^\r\n\p{L}\p{N}_]?+[\p{L}_][\p{L}\p{N}_]*"""  # identifier with one optional sigil: ' .iter 'a &self
    r"""|\p{N}{1,3}"""  # numbers, at most three digits a piece
    r"""| ?[^\s\p{L}\p{N}_]++[\r\n]*"""  # operator / punctuation runs: :: -> => {} ();
    r"""|\s*[\r\n]"""  # line ends
    r"""|\s+(?!\S)"""  # indentation (whitespace before whitespace)
    r"""|\s+"""
)

BPE_FILE = "tokenizer.tiktoken"
META_FILE = "tokenizer.json"


def _content_hash(pattern: str, ranks: dict[bytes, int], specials: dict[str, int]) -> str:
    h = hashlib.sha256()
    h.update(pattern.encode())
    h.update(json.dumps(specials, sort_keys=True).encode())
    for token, rank in sorted(ranks.items(), key=lambda kv: kv[1]):
        h.update(base64.b64encode(token) + b" %d\n" % rank)
    return h.hexdigest()


class Tokenizer:
    """A trained BPE vocabulary with fast (threaded) encoding."""

    def __init__(self, pattern: str, ranks: dict[bytes, int], specials: dict[str, int]):
        self.pattern = pattern
        self.ranks = ranks
        self.specials = specials
        self.hash = _content_hash(pattern, ranks, specials)
        self.enc = tiktoken.Encoding(name=f"ternchat-{self.hash[:12]}", pat_str=pattern,
                                     mergeable_ranks=ranks, special_tokens=specials)

    # --- construction -----------------------------------------------------------------------
    @classmethod
    def train(cls, texts: Iterable[str], vocab_size: int, pattern: str = SPLIT_PATTERN) -> "Tokenizer":
        """Train byte-level BPE on `texts` to `vocab_size` tokens, special tokens included."""
        n_merged = vocab_size - len(SPECIAL_TOKENS)
        if n_merged < 256:
            raise ValueError(f"vocab_size must be at least {256 + len(SPECIAL_TOKENS)} "
                             f"(256 bytes + {len(SPECIAL_TOKENS)} special tokens), got {vocab_size}")
        trainer = rustbpe.Tokenizer()
        trainer.train_from_iterator(iter(texts), n_merged, pattern=pattern)
        ranks = {bytes(token): rank for token, rank in trainer.get_mergeable_ranks()}
        specials = {name: len(ranks) + i for i, name in enumerate(SPECIAL_TOKENS)}
        return cls(trainer.get_pattern(), ranks, specials)

    def files(self) -> dict[str, str]:
        """The tokenizer as the texts of its two files (what `save` writes)."""
        lines = (base64.b64encode(t).decode() + f" {r}\n" for t, r in sorted(self.ranks.items(), key=lambda kv: kv[1]))
        meta = {"pattern": self.pattern, "special_tokens": self.specials, "vocab_size": self.vocab_size,
                "hash": self.hash}
        return {BPE_FILE: "".join(lines), META_FILE: json.dumps(meta, indent=1)}

    def save(self, directory: Path) -> None:
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        for name, text in self.files().items():
            (directory / name).write_text(text, encoding="ascii")

    @classmethod
    def from_files(cls, files: dict[str, str], where: str) -> "Tokenizer":
        """The tokenizer whose two files' texts are `files`; `where` names their place in errors."""
        try:
            meta = json.loads(files[META_FILE])
            ranks = {}
            for line in files[BPE_FILE].splitlines():
                token, rank = line.split()
                ranks[base64.b64decode(token)] = int(rank)
        except (ValueError, KeyError) as e:
            raise DataError(f"cannot read the tokenizer in {where}: {e}. Rebuild it with "
                            "`ternchat data tokenizer`.") from None
        tok = cls(meta["pattern"], ranks, meta["special_tokens"])
        if tok.hash != meta.get("hash"):
            raise DataError(f"tokenizer in {where} is corrupt: its content hash {tok.hash[:16]} does not "
                            f"match the recorded {str(meta.get('hash'))[:16]}. Rebuild it with "
                            "`ternchat data tokenizer`.")
        return tok

    @classmethod
    def load(cls, directory: Path) -> "Tokenizer":
        directory = Path(directory)
        try:
            files = {name: (directory / name).read_text(encoding="ascii") for name in (BPE_FILE, META_FILE)}
        except (OSError, ValueError) as e:
            raise DataError(f"cannot read the tokenizer in {directory}: {e}. Rebuild it with "
                            "`ternchat data tokenizer`.") from None
        return cls.from_files(files, str(directory))

    # --- use --------------------------------------------------------------------------------
    @property
    def vocab_size(self) -> int:
        return self.enc.n_vocab

    def special(self, name: str) -> int:
        return self.specials[name]

    @property
    def bos_id(self) -> int:
        return self.specials["<|bos|>"]

    @property
    def eod_id(self) -> int:
        return self.specials["<|eod|>"]

    @property
    def pad_id(self) -> int:
        return self.specials["<|pad|>"]

    def encode(self, text: str) -> list[int]:
        """Encode as ordinary text: a special token's spelling inside `text` is not special."""
        return self.enc.encode_ordinary(text)

    def encode_batch(self, texts: Sequence[str], num_threads: int = 0) -> list[list[int]]:
        threads = num_threads if num_threads > 0 else (os.cpu_count() or 1)
        return self.enc.encode_ordinary_batch(list(texts), num_threads=threads)

    def decode(self, ids: Sequence[int]) -> str:
        return self.enc.decode(list(ids))

    def decode_bytes(self, ids: Sequence[int]) -> bytes:
        return self.enc.decode_bytes(list(ids))

    def token_bytes(self) -> list[int]:
        """UTF-8 length in bytes of every token id (0 for special tokens): bits-per-byte needs it."""
        lengths = [0] * self.vocab_size
        for token, rank in self.ranks.items():
            lengths[rank] = len(token)
        return lengths


def evaluate(tok: Tokenizer, texts: list[str], num_threads: int = 0) -> dict:
    """Compression (bytes per token) and encoding speed (MB/s, one thread and batched) on `texts`."""
    n_bytes = sum(len(t.encode("utf-8")) for t in texts)
    start = time.perf_counter()
    batch = tok.encode_batch(texts, num_threads)
    batch_s = time.perf_counter() - start
    start = time.perf_counter()
    for text in texts:
        tok.encode(text)
    single_s = time.perf_counter() - start
    n_tokens = sum(len(ids) for ids in batch)
    return {"documents": len(texts), "bytes": n_bytes, "tokens": n_tokens,
            "bytes_per_token": n_bytes / max(n_tokens, 1),
            "encode_mb_s_1thread": n_bytes / 1e6 / max(single_s, 1e-9),
            "encode_mb_s_batch": n_bytes / 1e6 / max(batch_s, 1e-9),
            "threads": num_threads if num_threads > 0 else (os.cpu_count() or 1)}
