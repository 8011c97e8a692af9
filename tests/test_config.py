"""Config files, dotted overrides and their errors."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from agents.config import (
    ConfigError,
    _init_defaults_from_source,
    core_arguments,
    core_arguments_from_signature,
    core_defines,
    core_registry,
    dotted_items,
    load_config,
    load_written_yaml,
    parse_yaml,
    parse_overrides,
)

REPO = Path(__file__).resolve().parent.parent
# Training configs; configs/studies/ holds study files (study.py), which name training configs.
CONFIGS = sorted(p for p in REPO.glob("configs/**/*.yaml")
                 if "studies" not in p.relative_to(REPO / "configs").parts)


def test_overrides_parse_to_nested_typed_values() -> None:
    parsed = parse_overrides(["core.k_active=3", "algo.lr=3e-4", "env.id=MiniGrid-MemoryS7-v0",
                              "log.progress_bar=false"])
    assert parsed == {"core": {"k_active": 3}, "algo": {"lr": "3e-4"}, "env": {"id": "MiniGrid-MemoryS7-v0"},
                      "log": {"progress_bar": False}}


def test_default_config_and_overrides_resolve() -> None:
    config = load_config(None, ["core.k_active=3", "algo.lr=3e-4", "total_frames=2e5", "env.n_envs=8"])
    assert config["core"]["name"] == "rims" and config["core"]["k_active"] == 3
    assert config["algo"]["lr"] == pytest.approx(3e-4) and isinstance(config["algo"]["lr"], float)
    assert config["total_frames"] == 200_000 and isinstance(config["total_frames"], int)
    assert config["env"]["n_envs"] == 8
    # Every field is filled, including the core's own defaults read from its signature.
    assert config["core"]["cell"] == "lstm" and config["algo"]["gae_lambda"] == 0.95
    assert config["name"] == "doorkey-5x5-rims-ppo"


def test_switching_core_on_the_command_line_starts_from_its_defaults() -> None:
    config = load_config(None, ["core.name=lstm", "core.hidden_size=64"])
    assert config["core"] == {"name": "lstm", "hidden_size": 64}


def test_a2c_has_its_own_defaults() -> None:
    config = load_config(None, ["algo.name=a2c"])
    assert config["algo"]["optimizer"] == "rmsprop" and config["algo"]["n_steps"] == 8


@pytest.mark.parametrize("key", ["n_epochs", "num_minibatches", "seq_len", "clip_range", "target_kl"])
def test_a2c_refuses_ppo_only_keys(key: str) -> None:
    # A2C makes one gradient step per rollout: a PPO setting would be silently ignored.
    with pytest.raises(ConfigError, match=f"algo.{key}"):
        load_config(None, ["algo.name=a2c", f"algo.{key}=2"])


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["algo.lrr=1e-3"], "algo.lrr"),
        (["core.k_activ=2"], "did you mean k_active"),
        (["bogus=1"], "'bogus'"),
        (["algo.lr=fast"], "algo.lr must be a number"),
        (["algo.lr=-1"], "algo.lr must be > 0"),
        (["env.n_envs=0"], "env.n_envs must be between 1 and 65,536"),
        (["env.n_envs=100000000"], "env.n_envs must be between 1 and 65,536"),
        (["total_frames=0"], "total_frames must be > 0"),
        (["env.n_envs=1.5"], "env.n_envs must be an integer"),
        (["core.name=transformer"], "core.name must be one of"),
        (["algo.name=dqn"], "algo.name must be one of"),
        (["algo.optimizer=sgd"], "algo.optimizer must be one of"),
        (["env.n_envs=6", "algo.seq_len=null"], "num_minibatches=8 must divide the 6 sequences of a rollout"),
        (["algo.n_steps=8"], "algo.seq_len=16 must divide algo.n_steps=8"),
        (["core.k_active"], "key=value"),
    ],
)
def test_bad_overrides_name_the_key(overrides: list[str], message: str) -> None:
    with pytest.raises(ConfigError, match=message.replace(".", r"\.").replace("(", r"\(")):
        load_config(None, overrides)


def test_yaml_parsing_is_pyyaml_for_hand_written_text_and_libyaml_only_for_written_yaml(tmp_path: Path) -> None:
    # parse_yaml (configs, study files, overrides) is PyYAML's safe_load, cached per text: a fresh copy
    # each call, and text PyYAML refuses stays refused on every call, libyaml or not.
    text = (REPO / "configs" / "minigrid" / "doorkey-rims-ppo.yaml").read_text()
    first = parse_yaml(text)
    assert first == yaml.safe_load(text)
    first["core"]["name"] = "changed"
    assert parse_yaml(text)["core"]["name"] == "rims"
    for bad in ("seed: 1\t# a tab before a comment", "[a?b]", "a: 1\n  b: 2\n"):  # libyaml accepts the first two
        for _ in range(2):
            with pytest.raises(yaml.YAMLError):
                parse_yaml(bad)
    assert parse_yaml("a: !") == {"a": None}  # libyaml would give ''
    with pytest.raises(ConfigError, match="override 'algo.lr' is not valid YAML"):  # a surrogate from argv
        parse_overrides(["algo.lr=\udcff"])
    with pytest.raises(ConfigError) as raised:  # on one line, as a config file's error is
        parse_overrides(["env.id=["])
    assert "\n" not in str(raised.value) and "at line 1, column 2" in str(raised.value)
    for where, message in ((tmp_path, "is a folder; give a YAML file"), (Path("/dev/null"), "is not a regular file")):
        with pytest.raises(ConfigError, match=message):
            load_config(where)
    bad = tmp_path / "tab.yaml"
    bad.write_text("seed: 1\t# comment\n")
    with pytest.raises(ConfigError, match="is not valid YAML"):
        load_config(bad)
    # load_written_yaml (what yaml.safe_dump wrote: run configs, study copies) reads them alike.
    for path in sorted((REPO / "configs").rglob("*.yaml")):
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
        assert load_written_yaml(yaml.safe_dump(data, sort_keys=False)) == data, path
    with pytest.raises(yaml.YAMLError, match="special characters are not allowed"):  # not libyaml's UnicodeEncodeError
        load_written_yaml("x: \udcff")
    with pytest.raises(yaml.YAMLError, match="mapping values are not allowed here"):  # PyYAML's own words
        load_written_yaml("a: 1\n  b: 2\n")


def test_config_file_errors(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("algo: {lr: [1, 2\n")
    with pytest.raises(ConfigError, match="not valid YAML") as raised:
        load_config(bad)
    assert "\n" not in str(raised.value)  # PyYAML's own text quotes the line over several
    bad.write_text("a: 1\n  b: 2\n")
    with pytest.raises(ConfigError, match="not valid YAML: mapping values are not allowed here at line 2, column 4$"):
        load_config(bad)
    # A repeated key: PyYAML kept the last silently, so a second algo section replaced the first whole.
    bad.write_text("algo: {name: ppo, lr: 0.0001}\nenv: {n_envs: 8}\nalgo: {ent_coef: 0.05}\n")
    with pytest.raises(ConfigError, match="not valid YAML: found duplicate key 'algo' at line 3, column 1"):
        load_config(bad)
    bad.write_text("algo:\n  lr: 0.001\n  lr: 0.002\n")
    with pytest.raises(ConfigError, match="duplicate key 'lr' at line 3"):
        load_config(bad)
    with pytest.raises(ConfigError, match="duplicate key 'mode'"):
        parse_overrides(["env.env_kwargs={mode: 1, mode: 2}"])
    # A merge key's entries may be overridden by the mapping's own, as YAML allows.
    bad.write_text("base: &b {lr: 0.001, ent_coef: 0.01}\nalgo:\n  <<: *b\n  lr: 0.002\n")
    assert parse_yaml(bad.read_text())["algo"] == {"lr": 0.002, "ent_coef": 0.01}
    scalar = tmp_path / "scalar.yaml"
    scalar.write_text("42\n")
    with pytest.raises(ConfigError, match="must hold a mapping"):
        load_config(scalar)


@pytest.mark.parametrize("path", CONFIGS, ids=[p.stem for p in CONFIGS])
def test_every_shipped_config_resolves_with_every_setting_it_makes(path: Path) -> None:
    """Each value the file sets is in the resolved config as written (a number written 1e-3 reads as 0.001):
    none dropped, renamed or replaced by a default on the way."""
    resolved = dotted_items(load_config(path))
    for key, value in dotted_items(yaml.safe_load(path.read_text())).items():
        assert key in resolved, f"{path.name}: {key} is not in the resolved config"
        written = float(value) if isinstance(value, str) and re.fullmatch(r"[-+]?\d+(\.\d*)?e[-+]?\d+", value) \
            else value
        assert resolved[key] == written, f"{path.name}: {key} is {resolved[key]!r}, the file says {value!r}"


def test_shipped_configs_cover_every_core_family_and_algo() -> None:
    names = {p.stem for p in CONFIGS}
    for core in ("lstm", "rims", "brims", "thalnet"):
        for env in ("doorkey", "memory", "multiroom"):
            assert f"{env}-{core}-ppo" in names and f"{env}-{core}-a2c" in names
        for game in ("pong", "breakout"):
            assert f"{game}-{core}-ppo" in names


def test_cli_parser_and_config_validation_do_not_import_the_heavy_stack() -> None:
    # A fresh interpreter: what train.py needs before training must not pull in torch & co (seconds).
    script = (
        "import sys\n"
        "import train\n"
        "args = train.parse_args(['core.name=brims', '--run-dir', 'runs/x', 'total_frames=4096'])\n"
        "from agents.config import ConfigError, load_config\n"
        "for name in ('lstm', 'gru', 'rims', 'brims', 'thalnet'):\n"
        "    load_config(None, [f'core.name={name}'])\n"
        "try:\n"
        "    load_config(None, ['core.hiden_size=3', 'core.name=lstm'])\n"
        "except ConfigError as exc:\n"
        "    assert 'hidden_size' in str(exc)\n"
        "else:\n"
        "    raise AssertionError('the typo core.hiden_size was accepted')\n"
        "for meta in ('doorkey-sizes', 'multiroom'):\n"  # meta_ppo / multitask_ppo configs too
        "    load_config(f'configs/meta/{meta}.yaml', [])\n"
        "load_config(None, ['algo.name=multitask_ppo', 'core.name=lstm', 'meta.tasks=[MiniGrid-DoorKey-5x5-v0]'])\n"
        "for bad, words in ((['meta.fast_lrr=1'], 'fast_lr'), (['core.name=lstm'], 'no such split')):\n"
        "    try:\n"
        "        load_config('configs/meta/doorkey-sizes.yaml', bad)\n"
        "    except ConfigError as exc:\n"
        "        assert words in str(exc), exc\n"
        "    else:\n"
        "        raise AssertionError(bad)\n"
        "import agents, policies, agents.run_dir\n"
        "from policies.checkpoint import CheckpointError\n"
        "heavy = [m for m in ('torch', 'gymnasium', 'stable_baselines3', 'ale_py', 'minigrid') if m in sys.modules]\n"
        "import envs.registry\n"  # what train.py checks env.id with: gymnasium's registry, no SB3 or torch
        "heavy += [m for m in ('torch', 'stable_baselines3') if m in sys.modules]\n"
        "print(heavy)\n"
    )
    result = subprocess.run([sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"


def test_a_bad_env_id_is_refused_before_the_heavy_imports(tmp_path: Path) -> None:
    script = ("import sys, train\n"
              "code = train.main(['env.id=MiniGrid-DoorKy-5x5-v0', '--run-dir', sys.argv[1]])\n"
              "print(code, [m for m in ('torch', 'stable_baselines3') if m in sys.modules])\n")
    result = subprocess.run([sys.executable, "-c", script, str(tmp_path / "run")], cwd=REPO, capture_output=True,
                            text=True, timeout=120)
    assert result.stdout.strip() == "2 []", result.stderr
    assert "env.id: Unknown environment id 'MiniGrid-DoorKy-5x5-v0'" in result.stderr
    assert "MiniGrid-DoorKey-5x5-v0" in result.stderr and not (tmp_path / "run").exists()


def test_core_defines_read_from_source_matches_the_classes() -> None:
    from policies.cores import CORES, RecurrentCore

    for name, cls in CORES.items():
        expected = cls.parameter_groups is not RecurrentCore.parameter_groups
        assert core_defines(name, "parameter_groups") == expected, name
    assert core_defines("rims", "forward") and not core_defines("lstm", "no_such_method")


def test_core_fields_read_from_source_match_the_constructors() -> None:
    # The ast reader (no torch) must give what inspect gives on the imported classes.
    from policies.cores import CORES

    assert list(core_registry()) == list(CORES)
    for name, cls in CORES.items():
        module, class_name = core_registry()[name]
        # The ast reader itself (core_arguments would fall back to importing on a layout it cannot read).
        assert _init_defaults_from_source(module, class_name) == core_arguments_from_signature(cls), name
        assert core_arguments(name) == core_arguments_from_signature(cls), name


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["algo.lr=1e-50"], "representable in float32"),
        (["algo.lr=1e39"], "representable in float32"),
        (["algo.lr=.nan"], "algo.lr must be finite"),
        (["algo.lr=0"], "algo.lr must be > 0"),
        (["torch_threads=0"], "torch_threads must be between 1 and this machine's CPU count"),
        ([f"torch_threads={(os.cpu_count() or 1) + 1}"], "torch_threads must be between 1"),
        (["name=../x"], "name must be a plain name, not a path"),
        (["name=/tmp/x"], "name must be a plain name, not a path"),
        (["device=cuda:x"], "device must be a torch device"),
    ],
)
def test_refused_values(overrides: list[str], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        load_config(None, overrides)


def test_accepted_edge_values() -> None:
    config = load_config(None, ["torch_threads=null", "device=cuda:1", f"torch_threads={os.cpu_count() or 1}"])
    assert config["torch_threads"] == (os.cpu_count() or 1) and config["device"] == "cuda:1"
    assert load_config(None, ["algo.lr=1e-40"])["algo"]["lr"] == 1e-40  # a float32 subnormal is still > 0


def test_a_shipped_config_is_found_from_any_directory(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """``--config configs/...`` names the package's file from any working directory (as study files do);
    a file of that name in the working directory comes first, and a name found nowhere says where it looked."""
    monkeypatch.chdir(tmp_path)
    assert load_config("configs/minigrid/doorkey-lstm-ppo.yaml")["core"]["name"] == "lstm"
    local = tmp_path / "configs" / "minigrid" / "doorkey-lstm-ppo.yaml"
    local.parent.mkdir(parents=True)
    local.write_text("core: {name: gru}\n")
    assert load_config("configs/minigrid/doorkey-lstm-ppo.yaml")["core"]["name"] == "gru"
    with pytest.raises(ConfigError, match=f"config file not found: configs/nope.yaml \\(looked in {tmp_path} and "):
        load_config("configs/nope.yaml")
