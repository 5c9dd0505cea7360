"""Shared fixtures: hand-written crates in tests/fixtures, and real crates fetched from Debian.

Real Debian crates come through ternchat's own `--debian` path (apt-get download + dpkg-deb).
Where apt is missing those tests skip, unless TERNCHAT_REQUIRE_DEBIAN=1 (as in CI), where they fail.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest

from ternchat.config import load_config
from ternchat.data.debian import fetch_debian_crates
from ternchat.data.errors import DataError
from ternchat.data.pipeline import prepare_data

FIXTURE_CRATES = Path(__file__).parent / "fixtures" / "crates"
# Small, hand-written crates (about 0.8 MB of Rust together).
DEBIAN_TEST_PACKAGES = ["librust-walkdir-dev", "librust-smallvec-dev", "librust-globset-dev",
                        "librust-fern-dev", "librust-radix-trie-dev", "librust-xxhash-rust-dev"]


@pytest.fixture(autouse=True)
def _isolated_home(tmp_path, monkeypatch):
    monkeypatch.setenv("TERNCHAT_HOME", str(tmp_path / "ternchat_home"))


@pytest.fixture
def fixture_crates() -> Path:
    return FIXTURE_CRATES


@pytest.fixture(scope="session")
def debian_roots(tmp_path_factory) -> list[Path]:
    cache = os.environ.get("TERNCHAT_TEST_CACHE")
    cache_dir = Path(cache) if cache else tmp_path_factory.mktemp("debian")
    required = os.environ.get("TERNCHAT_REQUIRE_DEBIAN") == "1"
    if shutil.which("apt-get") is None and not required:
        pytest.skip("needs apt-get to fetch real Debian crates")
    try:
        return fetch_debian_crates(DEBIAN_TEST_PACKAGES, cache_dir)
    except DataError as e:
        if required:
            raise
        pytest.skip(f"cannot fetch Debian crates: {e}")


@pytest.fixture(scope="session")
def real_rust_files(debian_roots) -> list[Path]:
    files = sorted(p for root in debian_roots for p in root.rglob("*.rs"))
    assert len(files) > 50, "the Debian test crates should hold dozens of .rs files"
    return files


@pytest.fixture(scope="session")
def sandbox_ready() -> None:
    """Skip unless rustc and the sandbox's namespaces work here; fail instead where CI requires
    them (TERNCHAT_REQUIRE_SANDBOX=1)."""
    from ternchat.verify.sandbox import Limits, SandboxUnavailable, checked_isolation

    try:
        checked_isolation(Limits())
    except SandboxUnavailable as e:
        if os.environ.get("TERNCHAT_REQUIRE_SANDBOX") == "1":
            raise
        pytest.skip(f"the rustc sandbox is unavailable here: {e}")


def tiny_overrides(sources):
    return [f"data.sources={json.dumps([str(s) for s in sources])}", "data.auto_discover=false",
            "data.debian=false", "data.val_fraction=0.1", "tokenizer.vocab_size=512", "data.shard_tokens=200000",
            "model.depth=2", "model.d_model=64", "model.n_heads=2", "model.seq_len=64", "train.batch_size=8",
            "train.compile=false", "train.time_limit_min=0", "train.warmup_steps=3", "eval.every_steps=0",
            "eval.val_batches=2", "eval.sample_tokens=8", "train.checkpoint_every=0", "eval.rust_problems=false"]


@pytest.fixture(scope="session")
def data_home(tmp_path_factory, debian_roots):
    home = tmp_path_factory.mktemp("train_home")
    old = os.environ.get("TERNCHAT_HOME")
    os.environ["TERNCHAT_HOME"] = str(home)
    try:
        prepare_data(load_config(overrides=tiny_overrides(debian_roots)), log=lambda _: None)
    finally:
        if old is None:
            os.environ.pop("TERNCHAT_HOME")
        else:
            os.environ["TERNCHAT_HOME"] = old
    return home


@pytest.fixture
def overrides(data_home, debian_roots, monkeypatch):
    monkeypatch.setenv("TERNCHAT_HOME", str(data_home))
    return tiny_overrides(debian_roots)


@pytest.fixture
def stop_and_resume():
    """`train_stop_and_resume`, for tests."""
    return train_stop_and_resume


def train_stop_and_resume(cfg, run: Path, last_step: int) -> list[dict]:
    """Train `cfg` into `run`, delete the last checkpoint (step `last_step`), resume, and check that the
    resumed run logs the same loss at every step; returns the first run's metrics rows."""
    from ternchat.train.trainer import train

    train(cfg, run, log=lambda _: None)
    first = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    shutil.rmtree(run / "checkpoints" / f"step_{last_step:06d}")
    train(cfg, run, resume=True, log=lambda _: None)
    again = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    losses = lambda rows: {r["step"]: r["loss"] for r in rows if "loss" in r}  # noqa: E731
    assert losses(again) == losses(first) and len(losses(first)) == last_step
    return first


@pytest.fixture(scope="session")
def task_tokenizer():
    """A small tokenizer trained on the training tasks' text, role tokens included."""
    from ternchat.data.tokenizer import Tokenizer
    from ternchat.verify.tasks import generate_tasks

    return Tokenizer.train([t.prompt + t.reference + t.tests for t in generate_tasks()] * 3, 512)


@pytest.fixture
def pretrained_run(task_tokenizer):
    """A factory of run folders holding a tiny randomly initialized model (2 x 64, context 256) at step 10,
    with its config and tokenizer: what post-training stages start from."""
    from dataclasses import asdict

    import torch

    from ternchat.config import load_config
    from ternchat.model.gpt import GPT, GPTShape
    from ternchat.train.checkpoint import save_checkpoint

    def make(parent: Path) -> Path:
        cfg = load_config(overrides=["model.depth=2", "model.d_model=64", "model.n_heads=2", "model.seq_len=256",
                                     f"tokenizer.vocab_size={task_tokenizer.vocab_size}", "train.dtype=fp32"])
        shape = GPTShape.from_config(cfg, task_tokenizer.vocab_size)
        torch.manual_seed(0)
        run = parent / "pre"
        run.mkdir(parents=True)
        (run / "config.toml").write_text(cfg.to_toml())
        task_tokenizer.save(run / "tokenizer")
        save_checkpoint(run, 10, GPT(shape).state_dict(), {}, {"step": 10, "model_shape": asdict(shape)})
        return run

    return make


@pytest.fixture
def random_model():
    """A factory of small inference models (2 x 64 unless the knobs say otherwise) whose every weight matters:
    the output projections, which training starts at zero, are random too."""
    import torch

    from ternchat.model.bitlinear import to_inference
    from ternchat.model.gpt import GPT, GPTShape

    def make(vocab_size: int, knobs: list[str], quant: str = "ternary") -> GPT:
        cfg = load_config(overrides=["model.depth=2", "model.d_model=64", "model.n_heads=2", "model.seq_len=128",
                                     f"tokenizer.vocab_size={vocab_size}", f"model.quant={quant}", *knobs])
        torch.manual_seed(0)
        model = GPT(GPTShape.from_config(cfg, vocab_size))
        with torch.no_grad():
            for name, p in model.named_parameters():
                if p.dim() == 2 and name != "embed.weight":
                    p.normal_(0, p.shape[1] ** -0.5)
                elif "norm" in name:
                    p.uniform_(0.5, 1.5)
        return to_inference(model).eval()

    return make
