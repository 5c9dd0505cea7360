"""Fill-in-the-middle (Bavarian et al. 2022, "Efficient Training of Language Models to Fill in the
Middle", arXiv 2207.14255), the document-level, character-level transform code models train with.

With probability `rate` a document is cut at two character positions drawn uniformly (and sorted)
into prefix, middle and suffix; each piece is tokenized on its own and the document becomes
  PSM:  <|fim_prefix|> prefix <|fim_suffix|> suffix <|fim_middle|> middle
  SPM:  <|fim_prefix|> <|fim_suffix|> suffix <|fim_middle|> prefix middle
(SPM with probability `spm_rate`, in the variant of the paper's appendix and StarCoder's code, which
keeps prefix and middle adjacent), between the document's own <|bos|> and <|eod|>; the model learns
to write the middle after <|fim_middle|> and end it with <|eod|>. Other documents stay as they are.
The draws come from a generator seeded by (seed, epoch, document), so the transform is deterministic
and a resumed run sees the same samples.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ternchat.data.tokenizer import Tokenizer


@dataclass(frozen=True)
class FimTokens:
    prefix: int
    middle: int
    suffix: int
    bos: int
    eod: int

    @classmethod
    def of(cls, tok: Tokenizer) -> "FimTokens":
        return cls(tok.special("<|fim_prefix|>"), tok.special("<|fim_middle|>"), tok.special("<|fim_suffix|>"),
                   tok.bos_id, tok.eod_id)


def fim_draw(seed: int, epoch: int, doc: int, n_chars: int, rate: float, spm_rate: float
             ) -> tuple[int, int, bool] | None:
    """(cut 1, cut 2, spm) for this document and epoch, or None when it stays plain."""
    rng = np.random.default_rng([seed, epoch, doc, 0x46494D])  # "FIM": its own stream, apart from the order
    if rng.random() >= rate:
        return None
    lo, hi = sorted(int(x) for x in rng.integers(0, n_chars + 1, size=2))
    return lo, hi, bool(rng.random() < spm_rate)


def fim_tokens(text: str, cuts: tuple[int, int, bool], tok: Tokenizer, ids: FimTokens) -> np.ndarray:
    """The FIM sample of `text` cut at `cuts`, framed by <|bos|> ... <|eod|>, as int64 ids."""
    lo, hi, spm = cuts
    prefix, middle, suffix = (tok.encode(part) for part in (text[:lo], text[lo:hi], text[hi:]))
    if spm:
        body = [ids.prefix, ids.suffix, *suffix, ids.middle, *prefix, *middle]
    else:
        body = [ids.prefix, *prefix, ids.suffix, *suffix, ids.middle, *middle]
    return np.asarray([ids.bos, *body, ids.eod], dtype=np.int64)


def fim_prompt(prefix: str, suffix: str, tok: Tokenizer) -> list[int]:
    """A PSM prompt: the model's continuation is the middle, ended by <|eod|>."""
    ids = FimTokens.of(tok)
    return [ids.bos, ids.prefix, *tok.encode(prefix), ids.suffix, *tok.encode(suffix), ids.middle]
