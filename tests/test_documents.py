"""Documents as samples: FIM, compile-tag weights, the document loader and MinatoLoader."""

import json
import os
import signal
import time

import numpy as np
import pytest
import torch

from ternchat.config import ConfigError, LoaderConfig, load_config
from ternchat.data.errors import DataError
from ternchat.data.fim import FimTokens, fim_draw, fim_prompt, fim_tokens
from ternchat.data.loader import DocumentLoader
from ternchat.data.pipeline import prepare_data
from ternchat.data.samples import Delay, DocumentIndex, document_weights, epoch_documents
from ternchat.data.shards import shard_paths


@pytest.fixture
def data(overrides):
    return prepare_data(load_config(overrides=overrides), log=lambda _: None)


def doc_loader(art, loader=LoaderConfig(), **kw):
    args = dict(batch_size=8, seq_len=256, seed=5, bos_id=art.tokenizer.bos_id, tokenizer_hash=art.tokenizer.hash)
    args.update(kw)
    return DocumentLoader(shard_paths(art.shard_dir, "train"), art.tokenizer_dir, loader=loader, **args)


def corpus_texts(art, split="train"):
    return [json.loads(line)["text"] for line in (art.corpus_dir / f"{split}.jsonl").open()]


def split_fim(ids, tok):
    """(prefix, suffix, middle) texts of a FIM sample, in either order."""
    t = FimTokens.of(tok)
    assert ids[0] == t.bos and ids[-1] == t.eod and ids[1] == t.prefix
    body = ids[2:-1]
    s, m = body.index(t.suffix), body.index(t.middle)
    if s == 0:  # SPM: <pre> <suf> suffix <mid> prefix+middle
        return None, tok.decode(body[1:m]), tok.decode(body[m + 1:])
    return tok.decode(body[:s]), tok.decode(body[s + 1:m]), tok.decode(body[m + 1:])


def test_documents_of_the_shards_are_the_corpus_documents(data):
    index = DocumentIndex(shard_paths(data.shard_dir, "train"), data.tokenizer.bos_id, data.tokenizer.hash)
    texts = corpus_texts(data)
    assert index.n_docs == len(texts) and len(data.tokenizer_dir.name) > 0
    for doc in (0, index.n_docs // 2, index.n_docs - 1):
        ids = index.tokens(doc)
        assert ids[0] == data.tokenizer.bos_id and ids[-1] == data.tokenizer.eod_id
        assert data.tokenizer.decode(ids[1:-1].tolist()) == texts[doc]


def test_fim_round_trip_gives_back_the_document_in_psm_order(data):
    tok = data.tokenizer
    text = corpus_texts(data)[3]
    seen = set()
    for doc in range(40):
        cuts = fim_draw(7, 0, doc, len(text), rate=1.0, spm_rate=0.5)
        lo, hi, spm = cuts
        seen.add(spm)
        ids = fim_tokens(text, cuts, tok, FimTokens.of(tok)).tolist()
        prefix, suffix, rest = split_fim(ids, tok)
        if spm:  # SPM keeps prefix and middle together after <|fim_middle|>
            assert suffix == text[hi:] and rest == text[:hi]
        else:
            assert prefix + rest + suffix == text and (prefix, rest) == (text[:lo], text[lo:hi])
    assert seen == {True, False}
    assert fim_draw(7, 0, 1, len(text), rate=0.0, spm_rate=0.5) is None
    assert fim_draw(7, 0, 1, len(text), 0.5, 0.5) == fim_draw(7, 0, 1, len(text), 0.5, 0.5)
    assert fim_prompt("fn a() {", "}", tok)[-1] == tok.special("<|fim_middle|>")


def test_fim_rate_is_applied_per_document(data):
    draws = [fim_draw(1, 0, doc, 1000, 0.5, 0.5) for doc in range(2000)]
    share = sum(d is not None for d in draws) / len(draws)
    assert 0.45 < share < 0.55


def test_epoch_weights_repeat_and_filter_documents():
    weights = np.array([0.0, 1.0, 2.0, 0.5] * 500)
    counts = np.bincount(epoch_documents(len(weights), weights, seed=1, epoch=0), minlength=len(weights))
    assert counts[0::4].sum() == 0 and (counts[1::4] == 1).all() and (counts[2::4] == 2).all()
    assert 200 < counts[3::4].sum() < 300
    assert np.array_equal(epoch_documents(10, None, 3, 1), epoch_documents(10, None, 3, 1))


def test_tag_weights_come_from_compile_tags(data, tmp_path):
    n = DocumentIndex(shard_paths(data.shard_dir, "train"), data.tokenizer.bos_id).n_docs
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    with pytest.raises(DataError, match="ternchat data verify"):
        document_weights(corpus, "train", n, {"compiles": 2.0, "parses": 1.0, "syntax_error": 0.0, "fails": 1.0,
                                              "unchecked": 1.0})
    rows = [{"split": "train", "tag": tag} for tag in ("compiles", "parses", "syntax_error", "fails")]
    (corpus / "compile_tags.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    weights = document_weights(corpus, "train", n, {"compiles": 2.0, "parses": 1.0, "syntax_error": 0.0,
                                                    "fails": 0.25, "unchecked": 0.5})
    assert weights[:4].tolist() == [2.0, 1.0, 0.0, 0.25] and set(weights[4:]) == {0.5}
    assert document_weights(corpus, "train", n, LoaderConfig().weights()) is None


def test_a_checkpoint_from_before_the_fails_tag_resumes_with_it_at_one(data):
    first = doc_loader(data, LoaderConfig(fim_rate=0.5))
    first.next_batch()
    state = json.loads(json.dumps(first.state_dict()))
    del state["weights"]["fails"]  # what a checkpoint written before the tag existed holds
    doc_loader(data, LoaderConfig(fim_rate=0.5)).load_state_dict(state)
    with pytest.raises(DataError, match="saved weights="):
        doc_loader(data, LoaderConfig(fim_rate=0.5, weight_fails=0.0)).load_state_dict(state)


def delivered_in_epoch(art, loader_cfg, epoch=0, stop_at=None, went_slow=None, **kw):
    """Drive a loader until epoch `epoch` is delivered (or `stop_at` samples); return (loader, sample keys)."""
    seen = []

    def on_sample(sample):
        seen.append(sample.key)
        if sample.went_slow and went_slow is not None:
            went_slow.add(sample.key)

    ld = doc_loader(art, loader_cfg, on_sample=on_sample, **kw)
    n = ld.index.n_docs
    while sum(1 for e, _ in seen if e == epoch) < n and (stop_at is None or len(seen) < stop_at):
        ld.next_batch()
    return ld, seen


def check_exactly_once(keys, n):
    slots = sorted(s for e, s in keys if e == 0)
    assert slots == list(range(n)), "every document of the epoch exactly once"


def test_in_process_loader_delivers_each_document_once_and_resumes_exactly(data):
    cfg = LoaderConfig(fim_rate=0.5)
    reference = doc_loader(data, cfg)
    expected = [reference.next_batch() for _ in range(12)]
    first = doc_loader(data, cfg)
    for _ in range(5):
        first.next_batch()
    resumed = doc_loader(data, cfg)
    resumed.load_state_dict(json.loads(json.dumps(first.state_dict())))
    for x_ref, y_ref in expected[5:]:
        x, y = resumed.next_batch()
        assert torch.equal(x, x_ref) and torch.equal(y, y_ref)
    x, y = expected[0]
    assert x.shape == (8, 256) and torch.equal(x[:, 1:], y[:, :-1])
    ld, keys = delivered_in_epoch(data, cfg, batch_size=32)
    check_exactly_once(keys, ld.index.n_docs)


def test_ranks_take_disjoint_documents_that_cover_the_epoch(data):
    seen = {0: [], 1: []}
    loaders = [doc_loader(data, LoaderConfig(), rank=r, world_size=2, batch_size=32,
                          on_sample=lambda s, r=r: seen[r].append(s.doc)) for r in (0, 1)]
    n, per_rank = loaders[0].index.n_docs, [len(ld._epoch_docs(0)) for ld in loaders]
    while any(len(seen[r]) < per_rank[r] for r in (0, 1)):
        for ld in loaders:
            ld.next_batch()
    first = [seen[r][:per_rank[r]] for r in (0, 1)]
    assert not set(first[0]) & set(first[1]) and sorted(first[0] + first[1]) == list(range(n))


def test_minato_without_timeouts_gives_the_in_order_batches(data):
    cfg = dict(fim_rate=0.5, workers=2, prefetch=6)
    inline = doc_loader(data, LoaderConfig(fim_rate=0.5))
    minato = doc_loader(data, LoaderConfig(kind="minato", timeout_ms=60_000, **cfg))
    try:
        for _ in range(6):
            assert torch.equal(inline.next_batch()[0], minato.next_batch()[0])
        assert minato.pool.slow_count == 0
    finally:
        minato.close()


def test_minato_slow_samples_are_delivered_once_and_resume_from_the_queues(data):
    cfg = LoaderConfig(kind="minato", workers=2, slow_workers=1, timeout_ms=100, prefetch=12)
    delay = [Delay(frac=0.25, seconds=0.4, seed=2)]
    went_slow = set()
    ld, keys = delivered_in_epoch(data, cfg, batch_size=4, extra_stages=delay, stop_at=25, went_slow=went_slow)
    while not ld.pool.slow:  # take the position while a sample sits in the slow queue
        ld.next_batch()
    state = json.loads(json.dumps(ld.state_dict()))
    assert ld.pool.slow_count > 0 and len(state["pending"]) > 0
    ld.close()
    again = []

    def on_sample(sample):
        again.append(sample.key)
        if sample.went_slow:
            went_slow.add(sample.key)

    resumed = doc_loader(data, cfg, batch_size=4, extra_stages=delay, on_sample=on_sample)
    resumed.load_state_dict(state)
    try:
        while sum(1 for e, _ in keys + again if e == 0) < resumed._docs.size:
            resumed.next_batch()
    finally:
        resumed.close()
    check_exactly_once(keys + again, resumed.index.n_docs)
    order = [slot for epoch, slot in keys + again if epoch == 0]
    late = [slot for i, slot in enumerate(order) if slot < max(order[:i], default=-1)]
    assert late and all((0, slot) in went_slow for slot in late), "only samples gone slow arrive after later ones"
    docs = epoch_documents(resumed.index.n_docs, None, seed=5, epoch=0)
    assert all(delay[0].is_slow(docs[slot]) for slot in late)


def test_a_dead_worker_is_an_error_not_a_hang(data):
    ld = doc_loader(data, LoaderConfig(kind="minato", workers=1, slow_workers=1, timeout_ms=50))
    try:
        ld.next_batch()
        for proc in ld.pool.procs:
            os.kill(proc.pid, signal.SIGKILL)
        start = time.monotonic()
        with pytest.raises(DataError, match="worker .* died"):
            for _ in range(1000):
                ld.next_batch()
        assert time.monotonic() - start < 30
    finally:
        ld.close()


def test_loader_config_is_checked():
    assert load_config(overrides=["loader.kind=minato"]).loader.workers == 1  # one key: a fast worker follows
    with pytest.raises(ConfigError, match="loader.workers"):
        load_config(overrides=["loader.kind=minato", "loader.workers=65"])
    assert not LoaderConfig().per_document and LoaderConfig(fim_rate=0.5).per_document


def test_training_with_fim_on_minato_resumes_exactly(tmp_path, overrides, stop_and_resume):
    cfg = load_config(overrides=[*overrides, "train.max_steps=6", "train.checkpoint_every=3", "loader.kind=minato",
                                 "loader.workers=1", "loader.timeout_ms=60000", "loader.fim_rate=0.5"])
    rows = stop_and_resume(cfg, tmp_path / "run", last_step=6)
    assert all("data_wait_s" in r for r in rows if "loss" in r)


def test_training_without_loader_settings_uses_the_shard_windows(data):
    from ternchat.data.loader import TokenLoader, make_train_loader

    art = data
    ld = make_train_loader(LoaderConfig(), shard_paths(art.shard_dir, "train"), tokenizer=art.tokenizer,
                           tokenizer_dir=art.tokenizer_dir, corpus_dir=art.corpus_dir, batch_size=2, seq_len=16,
                           seed=0, log=lambda _: None)
    assert isinstance(ld, TokenLoader)


def test_cli_sample_fills_in_the_middle(tmp_path, overrides):
    import subprocess
    import sys

    run = tmp_path / "run"
    cfg = load_config(overrides=[*overrides, "train.max_steps=2", "loader.fim_rate=1.0"])
    from ternchat.train.trainer import train

    train(cfg, run, log=lambda _: None)
    out = subprocess.run([sys.executable, "-m", "ternchat", "sample", "--run", str(run), "--prompt", "fn add(",
                          "--fim-suffix", "}\n", "--max-tokens", "5", "--seed", "1"],
                         capture_output=True, text=True, env={**os.environ}, timeout=300)
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith("fn add(") and out.stdout.endswith("}\n") and len(out.stdout) > len("fn add(}\n")

