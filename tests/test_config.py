from dataclasses import dataclass, field

import pytest

from common.config import config_class, format_config, load_config, parse_overrides
from common.errors import ConfigError


@dataclass
class Toy:
    lr: float = 1e-3
    steps: int = 10
    name: str = "toy"
    levels: list[int] = field(default_factory=lambda: [1, 2])
    ckpt: str | None = None
    ema: bool = False


def test_overrides_are_typed(tmp_path):
    cfg = load_config(Toy, None, ["lr=3e-4", "steps=20", "levels=[4,5,6]", "ema=true", "ckpt=a/b"])
    assert cfg == Toy(lr=3e-4, steps=20, levels=[4, 5, 6], ema=True, ckpt="a/b")
    assert isinstance(load_config(Toy, None, ["lr=1"]).lr, float)  # int accepted for float


@pytest.mark.parametrize("bad, words", [
    (["steps=1.5"], ["steps", "int"]), (["steps=true"], ["steps", "integer"]),
    (["levels=3"], ["levels", "list"]), (["ema=maybe"], ["ema", "bool"]), (["lr"], ["key=value"]),
])
def test_bad_override_values_are_rejected(bad, words):
    with pytest.raises(ConfigError) as e:
        load_config(Toy, None, bad)
    for w in words:
        assert w in str(e.value)


def test_unknown_key_lists_valid_keys(tmp_path):
    with pytest.raises(ConfigError, match=r"unknown key 'step'.*valid keys: lr, steps, name, levels, ckpt, ema"):
        load_config(Toy, None, ["step=3"])
    yml = tmp_path / "c.yaml"
    yml.write_text("lr: 0.1\nwarmup: 5\n")
    with pytest.raises(ConfigError, match=r"unknown key 'warmup' in .*c.yaml"):
        load_config(Toy, yml)


def test_yaml_then_overrides(tmp_path):
    yml = tmp_path / "c.yaml"
    yml.write_text("lr: 0.1\nsteps: 7\n")
    cfg = load_config(Toy, yml, ["steps=9"])
    assert (cfg.lr, cfg.steps, cfg.name) == (0.1, 9, "toy")
    assert "steps: 9" in format_config(cfg) and format_config(cfg).startswith("# Toy")


def test_missing_and_broken_yaml(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_config(Toy, tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("lr: [1, 2\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(Toy, bad)


def test_parse_overrides_keeps_strings():
    assert parse_overrides(["a=hello world", "b=", "c=[1, 2]"]) == {"a": "hello world", "b": "", "c": [1, 2]}


def test_every_yaml_in_configs_loads_and_is_complete(root):
    files = sorted((root / "configs").rglob("*.yaml"))
    assert files, "configs/ has no YAML files"
    for path in files:
        cls = config_class(path)
        cfg = load_config(cls, path)
        assert type(cfg) is cls
        if path.parent.name == "configs":  # top-level files spell out every field
            import yaml
            from dataclasses import fields
            assert set(yaml.safe_load(path.read_text())) == {f.name for f in fields(cls)}, path


def test_every_config_class_has_a_yaml_and_debug_yaml(root):
    from common.config import CONFIG_MODULES
    assert CONFIG_MODULES
    for name in CONFIG_MODULES:
        assert (root / "configs" / f"{name}.yaml").is_file(), name
        assert (root / "configs" / "debug" / f"{name}.yaml").is_file(), name


def test_overrides_on_both_sides_of_an_option(monkeypatch, capsys):
    import argparse
    import sys

    from common.config import parse_args_with_overrides
    ap = argparse.ArgumentParser()
    ap.add_argument("--resume", action="store_true")
    ap.add_argument("overrides", nargs="*")
    monkeypatch.setattr(sys, "argv", ["x", "lr=0.1", "--resume", "steps=900"])
    args = parse_args_with_overrides(ap)
    assert args.resume and args.overrides == ["lr=0.1", "steps=900"]
    monkeypatch.setattr(sys, "argv", ["x", "lr=0.1", "--resume", "--nope", "stray"])
    with pytest.raises(SystemExit) as e:
        parse_args_with_overrides(ap)
    assert e.value.code == 2 and "--nope stray" in capsys.readouterr().err
