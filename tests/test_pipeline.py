import os
import shutil
import subprocess
import sys

from ternchat.config import load_config
from ternchat.data.loader import TokenLoader
from ternchat.data.pipeline import prepare_data
from ternchat.data.shards import shard_paths


def run(cfg, **kw):
    lines = []
    art = prepare_data(cfg, log=lines.append, **kw)
    return art, "\n".join(lines)


def config_for(*roots, **extra):
    overrides = [f"data.sources={[str(r) for r in roots]!r}".replace("'", '"'), "data.auto_discover=false",
                 "data.debian=false", "data.val_fraction=0.1", "tokenizer.vocab_size=700", "data.shard_tokens=50000"]
    overrides += [f"{k.replace('__', '.')}={v}" for k, v in extra.items()]
    return load_config(overrides=overrides)


def test_pipeline_builds_then_skips_unchanged_steps(tmp_path, debian_roots, fixture_crates):
    src = tmp_path / "src"
    for root in debian_roots:
        shutil.copytree(root, src, dirs_exist_ok=True)
    shutil.copytree(fixture_crates, src / "fixtures")
    cfg = config_for(src)

    art, log = run(cfg)
    assert "up to date" not in log and "corpus:" in log and "shards:" in log
    loader = TokenLoader(shard_paths(art.shard_dir, "train"), 2, 64, tokenizer_hash=art.tokenizer.hash)
    x, _ = loader.next_batch()
    assert int(x.max()) < art.tokenizer.vocab_size

    again, log = run(cfg)
    assert log.count("up to date") == 3 and again.shard_dir == art.shard_dir

    bigger, log = run(config_for(src, tokenizer__vocab_size=800))  # tokenizer and shards rebuild
    assert "corpus: up to date" in log and "tokenizer: up to date" not in log and "shards: up to date" not in log
    assert bigger.corpus_dir == art.corpus_dir and bigger.shard_dir != art.shard_dir

    edited = src / "fixtures" / "geometry" / "src" / "lib.rs"
    edited.write_text(edited.read_text() + "\npub fn unit() -> Vec2 { Vec2::new(1.0, 1.0) }\n")
    changed, log = run(cfg)  # a changed source file rebuilds everything
    assert "up to date" not in log and changed.corpus_dir != art.corpus_dir


def test_cli_runs_the_pipeline_and_prints_the_summary(tmp_path, debian_roots):
    env = dict(os.environ, TERNCHAT_HOME=str(tmp_path / "home"))
    args = [sys.executable, "-m", "ternchat", "data", "--no-auto", "--no-debian", "--vocab-size", "600", "--eval",
            "--set", "data.val_fraction=0.1"]
    for root in debian_roots:
        args += ["--source", str(root)]
    result = subprocess.run(args, capture_output=True, text=True, env=env)
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert "duplicates removed:" in out and "train:" in out and "val:" in out
    assert "bytes/token" in out and "MB/s" in out
    assert "data ready:" in out


def test_cli_missing_source_is_an_error_not_a_crash(tmp_path):
    env = dict(os.environ, TERNCHAT_HOME=str(tmp_path / "home"))
    result = subprocess.run([sys.executable, "-m", "ternchat", "data", "--no-auto", "--no-debian", "--source",
                             str(tmp_path / "nope")], capture_output=True, text=True, env=env)
    assert result.returncode == 1
    assert "no such directory" in result.stderr and "Traceback" not in result.stderr


def test_an_interrupted_build_leaves_nothing_that_looks_finished(tmp_path):
    import pytest
    from ternchat.paths import building

    out = tmp_path / "step"
    with pytest.raises(KeyboardInterrupt):
        with building(out) as scratch:
            (scratch / "half.json").write_text("{")
            raise KeyboardInterrupt
    assert not out.exists() and (tmp_path / "step.partial").exists()
    with building(out) as scratch:
        (scratch / "done.json").write_text("{}")
    assert sorted(p.name for p in out.iterdir()) == ["done.json"]
    assert not (tmp_path / "step.partial").exists()
