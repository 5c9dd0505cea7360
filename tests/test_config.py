import os
import subprocess
import sys
from pathlib import Path

import pytest

from ternchat.config import Config, ConfigError, load_config

CONFIGS = Path(__file__).parent.parent / "configs"


def test_defaults_are_the_tiny_cpu_preset():
    assert load_config(CONFIGS / "tiny_cpu.toml") == Config()


@pytest.mark.parametrize("path", sorted(CONFIGS.glob("*.toml")), ids=lambda p: p.stem)
def test_every_shipped_config_loads(path):
    cfg = load_config(path)
    assert cfg.model.d_model % cfg.model.n_heads == 0


def test_hardware_configs_have_the_planned_sizes():
    def params(cfg):  # block matrices only: 4 d^2 attention + 2 d d_ff MLP per layer, plus embedding + head
        m = cfg.model
        d_ff = m.d_ff or 4 * m.d_model
        return m.depth * (4 * m.d_model ** 2 + 2 * m.d_model * d_ff) + 2 * cfg.tokenizer.vocab_size * m.d_model

    sizes = {name: params(load_config(CONFIGS / f"{name}.toml")) / 1e9 for name in
             ("config_a_threadripper_blackwell", "config_b_9800x3d_dual4090", "config_c_dual_epyc_4090")}
    assert 6.5 < sizes["config_a_threadripper_blackwell"] < 7.5
    assert 2.7 < sizes["config_b_9800x3d_dual4090"] < 3.3
    assert 4.6 < sizes["config_c_dual_epyc_4090"] < 5.4


def write(tmp_path, text):
    path = tmp_path / "c.toml"
    path.write_text(text)
    return path


def test_unknown_section_names_the_valid_ones(tmp_path):
    with pytest.raises(ConfigError, match=r"unknown config section \[galore\].*valid sections: data, loader, tokenizer"):
        load_config(write(tmp_path, "[galore]\nrank = 512\n"))


def test_unknown_key_names_the_key_and_the_valid_keys(tmp_path):
    with pytest.raises(ConfigError) as e:
        load_config(write(tmp_path, "[optim]\nlion_beta = 0.9\n"))
    assert "'optim.lion_beta'" in str(e.value) and "matrix_optimizer" in str(e.value)


@pytest.mark.parametrize("override, message", [
    ("model.depth=2.5", "model.depth must be an int, got float"),
    ("model.depth=true", "model.depth must be an int, got bool"),
    ("data.val_fraction=0.9", r"data.val_fraction = 0.9 is out of range; valid values are >= 0.02 and <= 0.5"),
    ("model.quant=\"int4\"", "model.quant = 'int4' is not valid; choose one of: ternary, none"),
    ("data.sources=[1, 2]", "data.sources must be a list of str"),
    ("model.n_heads=7", "must be divisible by model.n_heads"),
    ("hardware.gpu_memory=\"lots\"", "hardware.gpu_memory: cannot read a memory size from 'lots'"),
    ("optim.gum_full_rank_layers=0", "optim.gum_full_rank_layers = 0 is out of range"),
    ("depth=3", "--set expects section.key=value"),
])
def test_bad_values_are_rejected_with_the_key(override, message):
    with pytest.raises(ConfigError, match=message):
        load_config(overrides=[override])


def test_overrides_parse_toml_values_and_bare_words():
    cfg = load_config(overrides=["train.run_name=my-run", "tokenizer.vocab_size=32768",
                                 "data.sources=['/a', '/b']", "optim.lr_matrix=1", "data.debian=true"])
    assert cfg.train.run_name == "my-run"
    assert cfg.tokenizer.vocab_size == 32768
    assert cfg.data.sources == ["/a", "/b"]
    assert cfg.optim.lr_matrix == 1.0 and isinstance(cfg.optim.lr_matrix, float)
    assert cfg.data.debian is True


def test_invalid_toml_file_is_a_config_error(tmp_path):
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_config(write(tmp_path, "[data\n"))


def run_cli(*args, env_home):
    env = dict(os.environ, TERNCHAT_HOME=str(env_home))
    return subprocess.run([sys.executable, "-m", "ternchat", *args], capture_output=True, text=True, env=env)


def test_cli_bad_key_exits_2_with_one_message_and_writes_nothing(tmp_path):
    home = tmp_path / "home"
    result = run_cli("data", "--set", "data.colour=blue", env_home=home)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "'data.colour'" in lines[0] and "valid keys in [data]" in lines[0]
    assert not home.exists() or not any(home.iterdir())


def test_cli_help_lists_subcommands(tmp_path):
    top = run_cli("--help", env_home=tmp_path)
    assert top.returncode == 0 and "data" in top.stdout and "config" in top.stdout
    for sub in ("data", "config"):
        result = run_cli(sub, "--help", env_home=tmp_path)
        assert result.returncode == 0 and "--config" in result.stdout


def test_cli_config_prints_resolved_toml(tmp_path):
    result = run_cli("config", "--set", "model.depth=3", env_home=tmp_path)
    assert result.returncode == 0
    assert "[model]\ndepth = 3\n" in result.stdout


def test_gum_must_leave_some_blocks_low_rank():
    with pytest.raises(ConfigError, match="gum_full_rank_layers = 6 must be less than model.depth = 6"):
        load_config(overrides=["optim.use_galore=true", "optim.gum_full_rank_layers=6"])
    assert load_config(overrides=["optim.gum_full_rank_layers=6"]).optim.use_galore is False  # unused: fine


def test_sweep_grid_values_are_checked_before_anything_runs():
    from ternchat.bench.sweep import parse_grid

    assert parse_grid(["optim.lr_embed=0.01,0.1"]) == {"optim.lr_embed": ["0.01", "0.1"]}
    with pytest.raises(ConfigError, match="optim.lr_embed = 20.0 is out of range"):
        parse_grid(["optim.lr_embed=0.01,20"])
    with pytest.raises(ConfigError, match="--grid expects"):
        parse_grid(["optim.lr_embed"])


def test_8bit_state_needs_muon():
    with pytest.raises(ConfigError, match="optim.use_8bit_optim keeps Muon/GUM momentum in int8 and does nothing with "
                                         "optim.matrix_optimizer = 'adamw'"):
        load_config(overrides=["optim.use_8bit_optim=true", "optim.matrix_optimizer=adamw"])
    assert load_config(overrides=["optim.use_8bit_optim=true", "optim.use_galore=true"]).optim.use_8bit_optim


def test_offload_needs_fsdp2():
    with pytest.raises(ConfigError, match="dist.offload needs dist.strategy = 'fsdp2' \\(it is 'ddp'\\)"):
        load_config(overrides=["dist.offload=true", "dist.strategy=ddp"])
    assert load_config(overrides=["dist.offload=true", "dist.strategy=fsdp2"]).dist.offload


@pytest.mark.parametrize("key", ["mhc.streams=8", "mhc.constraint=none", "loop.steps=2", "collider.filter_frac=0.2",
                                 'collider.reference="runs/ref"'])
def test_a_key_of_a_technique_that_is_off_names_its_switch(key, tmp_path):
    section = key.split(".")[0]
    with pytest.raises(ConfigError, match=rf"\[{section}\] is off; set {section}.enabled = true"):
        load_config(overrides=[key])
    cfg = load_config(overrides=[key, f"{section}.enabled=true"])  # switched on, the key is used
    assert getattr(cfg, section).enabled
    result = run_cli("config", "--set", key, env_home=tmp_path)
    assert result.returncode == 2 and f"{section}.enabled = true" in result.stderr


def test_a_saved_config_of_a_technique_that_is_off_loads(tmp_path):
    (tmp_path / "c.toml").write_text(Config().to_toml())  # every key written out, at its default
    assert load_config(tmp_path / "c.toml") == Config()


def test_minato_alone_gets_a_fast_worker():
    assert load_config(overrides=['loader.kind="minato"']).loader.workers == 1
    assert load_config(overrides=['loader.kind="minato"', "loader.workers=3"]).loader.workers == 3
    assert load_config().loader.workers == 0  # the simple loader keeps preparing in the training process
