import numpy as np
import pytest

from ternchat.data.shards import (HEADER_SIZE, ShardError, dtype_for_vocab, open_shard, shard_paths, write_index,
                                  write_shard, write_split)
from ternchat.data.tokenizer import Tokenizer

HASH = "ab" * 32


def test_round_trip_and_header_fields(tmp_path):
    tokens = np.arange(1000, dtype=np.uint16)
    write_shard(tmp_path / "s.bin", tokens, doc_count=3, tokenizer_hash=HASH)
    shard = open_shard(tmp_path / "s.bin", tokenizer_hash=HASH)
    assert np.array_equal(shard.tokens, tokens)
    assert shard.doc_count == 3 and shard.tokenizer_hash == HASH
    assert (tmp_path / "s.bin").stat().st_size == HEADER_SIZE + 2000


def test_dtype_follows_vocab_size():
    assert dtype_for_vocab(32768) == np.uint16 and dtype_for_vocab(65536) == np.uint16
    assert dtype_for_vocab(65537) == np.uint32


def corrupt(path, offset):
    data = bytearray(path.read_bytes())
    data[offset] ^= 0xFF
    path.write_bytes(bytes(data))


@pytest.fixture
def shard_file(tmp_path):
    path = tmp_path / "s.bin"
    write_shard(path, np.arange(5000, dtype=np.uint16) % 777, doc_count=1, tokenizer_hash=HASH)
    return path


def test_corrupt_body_is_refused(shard_file):
    corrupt(shard_file, HEADER_SIZE + 4321)
    with pytest.raises(ShardError, match="body checksum"):
        open_shard(shard_file)


def test_corrupt_header_is_refused(shard_file):
    corrupt(shard_file, 20)  # inside the token count
    with pytest.raises(ShardError, match="corrupt header"):
        open_shard(shard_file)


def test_truncated_shard_is_refused(shard_file):
    shard_file.write_bytes(shard_file.read_bytes()[:-10])
    with pytest.raises(ShardError, match="truncated"):
        open_shard(shard_file)


def test_shard_of_another_tokenizer_is_refused(shard_file):
    with pytest.raises(ShardError, match="made with tokenizer abab"):
        open_shard(shard_file, tokenizer_hash="cd" * 32)


def test_foreign_file_is_refused(tmp_path):
    (tmp_path / "x.bin").write_bytes(b"not a shard" * 100)
    with pytest.raises(ShardError, match="bad magic"):
        open_shard(tmp_path / "x.bin")


def test_split_shards_hold_every_document_between_bos_and_eod(tmp_path, real_rust_files):
    texts = [p.read_text(encoding="utf-8") for p in real_rust_files[:60]]
    tok = Tokenizer.train(texts, vocab_size=600)
    entries = write_split(iter(texts), tok, tmp_path, "train", shard_tokens=20_000, threads=2, batch_docs=7)
    assert len(entries) > 1 and all(e["tokens"] == 20_000 for e in entries[:-1])
    write_index(tmp_path, tok.hash, {"train": entries})
    stream = np.concatenate([open_shard(p, tok.hash).tokens for p in shard_paths(tmp_path, "train")])
    assert stream[0] == tok.bos_id and stream[-1] == tok.eod_id
    starts = np.flatnonzero(stream == tok.bos_id)
    ends = np.flatnonzero(stream == tok.eod_id)
    assert len(starts) == len(ends) == len(texts)
    decoded = [tok.decode(stream[s + 1:e].tolist()) for s, e in zip(starts, ends)]
    assert decoded == texts
    assert sum(e["documents"] for e in entries) == len(texts)


def test_missing_index_is_a_clear_error(tmp_path):
    with pytest.raises(ShardError, match="ternchat data shards"):
        shard_paths(tmp_path, "train")
