"""Token shard files: a checked header followed by a flat, memory-mappable array of token ids.

Layout (little-endian), header of 256 bytes:
  magic b"TCSHARD\\0" | format version u32 | dtype code u32 (1 = uint16, 2 = uint32)
  | token count u64 | document count u64 | tokenizer hash (32 raw bytes of SHA-256)
  | body SHA-256 (32 bytes) | CRC32 of everything before it (u32) | zero padding
then `token count` ids. Documents are `<|bos|> tokens <|eod|>` back to back. Opening a shard checks
the magic, version, header CRC, file length, tokenizer hash and (unless told not to) the body
checksum, so a truncated, corrupt or foreign shard is refused instead of silently trained on.
"""

from __future__ import annotations

import hashlib
import json
import os
import struct
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Iterable, Iterator

import numpy as np
from tqdm import tqdm

from ternchat.data.errors import DataError

if TYPE_CHECKING:
    from ternchat.data.tokenizer import Tokenizer

MAGIC = b"TCSHARD\0"
FORMAT_VERSION = 1
HEADER_SIZE = 256
_HEAD = struct.Struct("<8sIIQQ32s32s")
_CRC = struct.Struct("<I")
DTYPES = {1: np.dtype("<u2"), 2: np.dtype("<u4")}
INDEX_FILE = "index.json"


class ShardError(DataError):
    """A shard that must not be used: corrupt, truncated, or made with another tokenizer."""


def dtype_for_vocab(vocab_size: int) -> np.dtype:
    return DTYPES[1] if vocab_size <= 2 ** 16 else DTYPES[2]


def _dtype_code(dtype: np.dtype) -> int:
    for code, dt in DTYPES.items():
        if dt == dtype:
            return code
    raise ValueError(f"unsupported shard dtype {dtype}")


def write_shard(path: Path, tokens: np.ndarray, doc_count: int, tokenizer_hash: str) -> str:
    """Write `tokens` atomically (temp file, fsync, rename); return the body's SHA-256."""
    path = Path(path)
    body = np.ascontiguousarray(tokens).tobytes()
    body_sha = hashlib.sha256(body).digest()
    head = _HEAD.pack(MAGIC, FORMAT_VERSION, _dtype_code(tokens.dtype), len(tokens), doc_count,
                      bytes.fromhex(tokenizer_hash), body_sha)
    header = head + _CRC.pack(zlib.crc32(head))
    header += b"\0" * (HEADER_SIZE - len(header))
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        f.write(header)
        f.write(body)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    return body_sha.hex()


@dataclass
class Shard:
    path: Path
    tokens: np.ndarray  # read-only memory map
    doc_count: int
    tokenizer_hash: str

    def __len__(self) -> int:
        return len(self.tokens)


def open_shard(path: Path, tokenizer_hash: str | None = None, verify_body: bool = True) -> Shard:
    """Open and check a shard; raise ShardError naming the file and the problem."""
    path = Path(path)
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            header = f.read(HEADER_SIZE)
    except OSError as e:
        raise ShardError(f"cannot read shard {path}: {e}") from None
    if len(header) < HEADER_SIZE or header[:8] != MAGIC:
        raise ShardError(f"{path} is not a ternchat token shard (bad magic)")
    head = header[:_HEAD.size]
    (crc,) = _CRC.unpack_from(header, _HEAD.size)
    if zlib.crc32(head) != crc:
        raise ShardError(f"shard {path} has a corrupt header (CRC mismatch); rebuild with `ternchat data shards`")
    _, version, code, count, docs, tok_hash, body_sha = _HEAD.unpack(head)
    if version != FORMAT_VERSION:
        raise ShardError(f"shard {path} has format version {version}; this ternchat reads version "
                         f"{FORMAT_VERSION}. Rebuild with `ternchat data shards`.")
    if code not in DTYPES:
        raise ShardError(f"shard {path} has unknown dtype code {code}")
    dtype = DTYPES[code]
    expected = HEADER_SIZE + count * dtype.itemsize
    if size != expected:
        raise ShardError(f"shard {path} is {size} bytes but its header promises {expected}: truncated or "
                         "padded. Rebuild with `ternchat data shards`.")
    if tokenizer_hash is not None and tok_hash.hex() != tokenizer_hash:
        raise ShardError(f"shard {path} was made with tokenizer {tok_hash.hex()[:16]}, not the expected "
                         f"{tokenizer_hash[:16]}. Re-run `ternchat data shards` with the current tokenizer.")
    tokens = np.memmap(path, dtype=dtype, mode="r", offset=HEADER_SIZE, shape=(count,)) if count else \
        np.zeros(0, dtype=dtype)
    if verify_body:
        digest = hashlib.sha256(tokens.data if count else b"").digest()
        if digest != body_sha:
            raise ShardError(f"shard {path} is corrupt: its body checksum does not match the header. "
                             "Rebuild with `ternchat data shards`.")
    return Shard(path, tokens, docs, tok_hash.hex())


def write_split(documents: Iterable[str], tokenizer: "Tokenizer", out_dir: Path, split: str, shard_tokens: int,
                threads: int = 0, batch_docs: int = 512, total: int | None = None) -> list[dict]:
    """Tokenize `documents` (threaded) into shards `<split>_NNNNN.bin`; return their index entries."""
    dtype = dtype_for_vocab(tokenizer.vocab_size)
    entries: list[dict] = []
    pending: list[np.ndarray] = []
    pending_len = 0

    def flush(chunk: np.ndarray) -> None:
        name = f"{split}_{len(entries):05d}.bin"
        docs = int(np.count_nonzero(chunk == tokenizer.bos_id))
        sha = write_shard(out_dir / name, chunk, docs, tokenizer.hash)
        entries.append({"file": name, "tokens": int(len(chunk)), "documents": docs, "sha256": sha})

    def batches() -> Iterator[list[str]]:
        batch: list[str] = []
        for doc in documents:
            batch.append(doc)
            if len(batch) == batch_docs:
                yield batch
                batch = []
        if batch:
            yield batch

    bar = tqdm(total=total, desc=f"shards[{split}]", unit="doc")
    for batch in batches():
        for ids in tokenizer.encode_batch(batch, threads):
            pending.append(np.asarray([tokenizer.bos_id, *ids, tokenizer.eod_id], dtype=dtype))
            pending_len += len(ids) + 2
        bar.update(len(batch))
        while pending_len >= shard_tokens:
            flat = np.concatenate(pending)
            flush(flat[:shard_tokens])
            pending, pending_len = [flat[shard_tokens:]], len(flat) - shard_tokens
    bar.close()
    if pending_len:
        flush(np.concatenate(pending))
    return entries


def write_index(out_dir: Path, tokenizer_hash: str, splits: dict[str, list[dict]]) -> None:
    index = {"format_version": FORMAT_VERSION, "tokenizer_hash": tokenizer_hash, "splits": splits}
    tmp = out_dir / (INDEX_FILE + ".tmp")
    tmp.write_text(json.dumps(index, indent=1))
    os.replace(tmp, out_dir / INDEX_FILE)


def shard_paths(shard_dir: Path, split: str) -> list[Path]:
    """The shard files of one split, from the directory's index."""
    index_path = Path(shard_dir) / INDEX_FILE
    try:
        index = json.loads(index_path.read_text())
    except (OSError, ValueError) as e:
        raise ShardError(f"no usable shard index at {index_path} ({e}); run `ternchat data shards`") from None
    if split not in index["splits"]:
        raise ShardError(f"{index_path} has no split {split!r}; it has {', '.join(index['splits'])}")
    return [Path(shard_dir) / entry["file"] for entry in index["splits"][split]]
