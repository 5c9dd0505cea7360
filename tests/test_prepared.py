"""Prepared-data folders: exported on one machine, trained from on another with nothing else."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest

from conftest import tiny_overrides, train_stop_and_resume
from ternchat.config import load_config
from ternchat.data import shards as shards_mod
from ternchat.data.errors import DataError
from ternchat.data.prepared import MANIFEST, export_prepared, open_prepared
from ternchat.data.tokenizer import BPE_FILE, META_FILE
from ternchat.data.pipeline import prepare_data


def _export(tmp_path, fixture_crates, max_train_tokens=0, extra=()):
    """A prepared folder of the fixture crates, built under its own $TERNCHAT_HOME; the crates copied
    first so that the test can delete its sources."""
    sources = tmp_path / "sources"
    shutil.copytree(fixture_crates, sources)
    cfg = load_config(overrides=[*tiny_overrides([sources]), *extra])
    art = prepare_data(cfg, log=lambda _: None)
    folder = tmp_path / "made_here" / "prepared"
    manifest = export_prepared(folder, corpus_dir=art.corpus_dir, corpus_summary=art.corpus_summary,
                               tokenizer=art.tokenizer, shard_dir=art.shard_dir, max_train_tokens=max_train_tokens)
    return folder, manifest, art, sources


def test_a_moved_folder_trains_and_resumes_without_sources_or_cache(tmp_path, fixture_crates, monkeypatch):
    folder, manifest, art, sources = _export(tmp_path, fixture_crates)
    assert manifest["tokens"]["train"] == sum(len(shards_mod.open_shard(p))
                                              for p in shards_mod.shard_paths(art.shard_dir, "train"))
    assert set(manifest["files"]) >= {"index.json", f"tokenizer/{BPE_FILE}", f"tokenizer/{META_FILE}"} | {
        p.name for p in shards_mod.shard_paths(art.shard_dir, "train")}
    assert manifest["provenance"]["origins"] == ["source"]
    assert set(manifest["provenance"]["crates"]) == set(art.corpus_summary["splits"]["train"]["crates"]) | set(
        art.corpus_summary["splits"]["val"]["crates"])

    moved = tmp_path / "elsewhere" / "data"
    shutil.move(folder, moved)
    shutil.rmtree(sources)
    shutil.rmtree(tmp_path / "ternchat_home")
    monkeypatch.setenv("TERNCHAT_HOME", str(tmp_path / "fresh_home"))
    cfg = load_config(overrides=[*tiny_overrides([sources]), f"data.prepared={json.dumps(str(moved))}",
                                 "train.max_steps=6", "train.checkpoint_every=3"])
    rows = train_stop_and_resume(cfg, tmp_path / "run", last_step=6)
    assert all(np.isfinite(r["loss"]) for r in rows if "loss" in r)
    assert not any((tmp_path / "fresh_home").rglob("*.bin")), "training from a folder builds no shards"


def test_a_capped_export_ends_at_a_document_boundary_and_keeps_val_whole(tmp_path, fixture_crates):
    small_shards = ["data.shard_tokens=1024"]  # documents run on from one shard into the next
    _, whole, _, _ = _export(tmp_path / "whole", fixture_crates, extra=small_shards)
    folder, capped, art, _ = _export(tmp_path / "capped", fixture_crates, 2000, small_shards)
    assert 0 < capped["tokens"]["train"] <= 2000 < whole["tokens"]["train"]
    assert 1 < len(capped["files"]) - 3 < len(whole["files"]) - 3  # shards, besides index and tokenizer
    assert capped["tokens"]["val"] == whole["tokens"]["val"]
    prepared = open_prepared(folder, 512)
    tokens = np.concatenate([shards_mod.open_shard(p).tokens for p in shards_mod.shard_paths(folder, "train")])
    assert tokens[0] == prepared.tokenizer.bos_id and tokens[-1] == prepared.tokenizer.eod_id
    assert np.count_nonzero(tokens == prepared.tokenizer.bos_id) == capped["documents"]["train"]


def test_a_folder_for_another_vocab_or_with_a_changed_file_is_refused(tmp_path, fixture_crates):
    folder, _, _, _ = _export(tmp_path, fixture_crates)
    with pytest.raises(DataError, match=r"vocab 512.*tokenizer.vocab_size = 8192"):
        open_prepared(folder, 8192)
    cfg = load_config(overrides=["tokenizer.vocab_size=1024", f"data.prepared={json.dumps(str(folder))}"])
    with pytest.raises(DataError, match="vocab 512"):
        prepare_data(cfg, log=lambda _: None)

    shard = shards_mod.shard_paths(folder, "val")[0]
    data = bytearray(shard.read_bytes())
    data[-1] ^= 1
    shard.write_bytes(bytes(data))
    with pytest.raises(DataError, match=f"{shard.name} does not match its SHA-256"):
        open_prepared(folder, 512)
    (folder / MANIFEST).write_text("{")
    with pytest.raises(DataError, match="no readable manifest.json"):
        open_prepared(folder, 512)


def test_cli_exports_and_trains_from_the_folder(tmp_path, fixture_crates):
    common = [sys.executable, "-m", "ternchat"]
    sets = [a for o in tiny_overrides([fixture_crates]) for a in ("--set", o)]
    out = tmp_path / "prepared"
    done = subprocess.run([*common, "data", *sets, "--export", str(out), "--max-train-tokens", "20000"],
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert "exported to" in done.stdout and (out / MANIFEST).exists()
    again = subprocess.run([*common, "data", *sets, "--export", str(out)], capture_output=True, text=True)
    assert again.returncode != 0 and "not empty" in again.stderr
    run = subprocess.run([*common, "train", *sets, "--set", "train.max_steps=2", "--data", str(out),
                          "--run-dir", str(tmp_path / "run")], capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    assert "prepared data: vocab 512" in run.stdout


def test_two_ranks_train_from_a_folder_like_one_process(tmp_path, fixture_crates, monkeypatch):
    from test_distributed import finish, losses, torchrun

    folder, _, _, sources = _export(tmp_path, fixture_crates)
    shutil.rmtree(sources)
    monkeypatch.setenv("TERNCHAT_HOME", str(tmp_path / "fresh_home"))
    sets = [a for o in [*tiny_overrides([sources]), "train.max_steps=3", "train.batch_size=4",
                        "dist.strategy=ddp"] for a in ("--set", o)]
    train = ["-m", "ternchat", "train", *sets, "--data", str(folder)]
    finish(torchrun(2, *train, "--run-dir", str(tmp_path / "two")), timeout=300)
    alone = subprocess.run([sys.executable, *train, "--set", "train.batch_size=8", "--run-dir", str(tmp_path / "one")],
                           capture_output=True,
                           text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert alone.returncode == 0, alone.stderr
    two, one = losses(tmp_path / "two"), losses(tmp_path / "one")
    assert sorted(two) == sorted(one) == [1, 2, 3] and all(np.isfinite(list(two.values())))
    # the same weights and global batch (2 x 4 rows against 8), averaged in another order; later steps go
    # through Muon's Newton-Schulz, in bf16 on CPUs that have it, and may drift further
    assert two[1] == pytest.approx(one[1], rel=1e-5)
