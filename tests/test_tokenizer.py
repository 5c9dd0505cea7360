import pytest

from ternchat.data.errors import DataError
from ternchat.data.tokenizer import SPECIAL_TOKENS, Tokenizer, evaluate


@pytest.fixture(scope="module")
def real_texts(real_rust_files):
    return [p.read_text(encoding="utf-8") for p in real_rust_files]


@pytest.fixture(scope="module")
def tok(real_texts):
    return Tokenizer.train(real_texts, vocab_size=1024)


def test_vocab_size_and_special_tokens_come_after_the_merges(tok):
    assert tok.vocab_size == 1024
    assert len(tok.ranks) == 1024 - len(SPECIAL_TOKENS)
    ids = [tok.special(name) for name in SPECIAL_TOKENS]
    assert ids == list(range(len(tok.ranks), 1024))
    assert tok.decode([tok.bos_id]) == "<|bos|>"


def test_round_trip_is_exact_on_every_real_crate_file(tok, real_texts):
    for text in real_texts:
        assert tok.decode(tok.encode(text)) == text
    for ids, text in zip(tok.encode_batch(real_texts[:50], num_threads=2), real_texts[:50]):
        assert ids == tok.encode(text)


@pytest.mark.parametrize("text", [
    "fn main() {\r\n\tprintln!(\"caf\u00e9 \u6771\u4eac \U0001F980\");\r\n}\r\n",
    "let s = \"<|bos|> is just text here <|eod|>\";",
    "    \n\n\n   \t\t  trailing   ",
    "",
])
def test_round_trip_on_awkward_text(tok, text):
    ids = tok.encode(text)
    assert tok.decode(ids) == text
    assert tok.bos_id not in ids and tok.eod_id not in ids  # special spellings stay ordinary text


def test_vocabulary_learns_rust_units(tok):
    vocab = set(tok.ranks)
    assert {b"::", b" fn", b"self", b"    "} <= vocab
    assert any(b"_" in t and t.strip(b"_").isalpha() for t in vocab)  # snake_case pieces
    assert not any(b"::" in t and any(c.isalpha() for c in t.decode("latin-1")) for t in vocab)


def test_save_load_keeps_the_encoding_and_hash(tok, tmp_path, real_texts):
    tok.save(tmp_path / "tok")
    loaded = Tokenizer.load(tmp_path / "tok")
    assert loaded.hash == tok.hash
    assert loaded.encode(real_texts[0]) == tok.encode(real_texts[0])


def test_corrupt_tokenizer_is_refused(tok, tmp_path):
    tok.save(tmp_path / "tok")
    path = tmp_path / "tok" / "tokenizer.tiktoken"
    lines = path.read_bytes().splitlines()
    lines[300] = lines[301].split()[0] + b" 300"  # a token duplicated at another rank
    path.write_bytes(b"\n".join(lines) + b"\n")
    with pytest.raises(DataError, match="corrupt"):
        Tokenizer.load(tmp_path / "tok")


def test_too_small_vocab_is_rejected():
    with pytest.raises(ValueError, match="at least"):
        Tokenizer.train(["fn main() {}"], vocab_size=200)


def test_evaluate_reports_compression_and_speed(tok, real_texts):
    report = evaluate(tok, real_texts[:40], num_threads=2)
    assert 2.0 < report["bytes_per_token"] < 8.0
    assert report["encode_mb_s_1thread"] > 0 and report["encode_mb_s_batch"] > 0
