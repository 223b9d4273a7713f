"""Configs: one dataclass per trainable part, a YAML file per dataclass, key=value overrides.

    cfg = load_config(AcousticConfig, "configs/acoustic.yaml", ["lr=3e-4", "steps=100"])

The YAML holds the fields of the dataclass at top level (a partial file keeps the defaults
for the rest). Overrides are parsed as YAML scalars/lists and checked against the field's
type, so `steps=1e3` is rejected for an int and `levels=[1,2]` is a list. An unknown key is
rejected with the list of valid keys.
"""
from __future__ import annotations

import dataclasses
import json
import types
import typing
from pathlib import Path
from typing import Any, Iterable, TypeVar

import yaml

from common.errors import ConfigError

T = TypeVar("T")


def _field_types(cls: type) -> dict[str, Any]:
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls)}


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Check `value` against type `tp`; ints are accepted for floats. Returns the value."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        options = typing.get_args(tp)
        if value is None and type(None) in options:
            return None
        for option in options:
            if option is type(None):
                continue
            try:
                return _coerce(value, option, key)
            except ConfigError:
                pass
        raise ConfigError(f"{key}={value!r} does not match type {tp}")
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}={value!r} must be a list, e.g. {key}=[1,2]")
        (item_tp, *_) = typing.get_args(tp) or (Any,)
        items = [_coerce(v, item_tp, key) for v in value]
        return items if origin is list else tuple(items)
    if tp is Any:
        return value
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if tp is float and isinstance(value, str):  # YAML 1.1 reads '3e-4' as a string
        try:
            return float(value)
        except ValueError:
            raise ConfigError(f"{key}={value!r} must be a number") from None
    if tp is int and isinstance(value, bool):
        raise ConfigError(f"{key}={value!r} must be an integer")
    if tp is str and isinstance(value, (int, float)) and not isinstance(value, bool):
        return str(value)
    if not isinstance(value, tp):
        raise ConfigError(f"{key}={value!r} must be of type {tp.__name__}")
    return value


def _check_keys(cls: type, keys: Iterable[str], where: str) -> None:
    valid = [f.name for f in dataclasses.fields(cls)]
    for key in keys:
        if key not in valid:
            raise ConfigError(f"unknown key '{key}' in {where}; valid keys: {', '.join(valid)}")


def parse_overrides(overrides: Iterable[str]) -> dict[str, Any]:
    """['a=1', 'b=[1,2]', 'c=hello'] -> {'a': 1, 'b': [1, 2], 'c': 'hello'}."""
    out = {}
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override '{item}' is not key=value (e.g. lr=3e-4)")
        key, text = item.split("=", 1)
        try:
            out[key.strip()] = yaml.safe_load(text) if text.strip() else ""
        except yaml.YAMLError:
            out[key.strip()] = text
    return out


def config_from_dict(cls: type[T], values: dict[str, Any], where: str = "config") -> T:
    """Build `cls` from a dict, rejecting unknown keys and values of the wrong type."""
    _check_keys(cls, values, where)
    types_ = _field_types(cls)
    return cls(**{k: _coerce(v, types_[k], k) for k, v in values.items()})


def load_config(cls: type[T], path: str | Path | None = None, overrides: Iterable[str] = ()) -> T:
    """Defaults <- YAML file at `path` <- key=value `overrides`."""
    values: dict[str, Any] = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file {path} not found; pass an existing YAML (see configs/)")
        try:
            loaded = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as e:
            raise ConfigError(f"{path} is not valid YAML ({str(e).splitlines()[0]})") from None
        if not isinstance(loaded, dict):
            raise ConfigError(f"{path} must be a mapping of key: value")
        _check_keys(cls, loaded, str(path))
        values.update(loaded)
    extra = parse_overrides(overrides)
    _check_keys(cls, extra, "command-line overrides")
    values.update(extra)
    return config_from_dict(cls, values, str(path or "config"))


def config_to_dict(cfg: Any) -> dict[str, Any]:
    return json.loads(json.dumps(dataclasses.asdict(cfg)))


def format_config(cfg: Any) -> str:
    """The resolved config as YAML, for printing at the start of a run."""
    name = type(cfg).__name__
    return f"# {name}\n" + yaml.safe_dump(config_to_dict(cfg), sort_keys=False)


# configs/NAME.yaml and configs/debug/NAME.yaml hold the fields of this class.
CONFIG_CLASSES = {}


def register_config(name: str):
    """Class decorator: `configs/<name>.yaml` is a YAML of this dataclass."""
    def wrap(cls):
        CONFIG_CLASSES[name] = cls
        return cls
    return wrap


CONFIG_MODULES = {"acoustic": "audio_tokenizers.acoustic", "semantic_tokenizer": "audio_tokenizers.semantic",
                  "mulan": "audio_tokenizers.mulan",
                  "semantic": "stages.base", "coarse": "stages.base", "fine": "stages.base", "delay": "stages.base", "masked": "stages.base",
                  "pipeline": "pipeline"}


def config_class(path: str | Path) -> type:
    """The dataclass a YAML file in configs/ maps to, from its file name: the whole stem, or its first word
    (`coarse_delay.yaml` is a coarse-stage config)."""
    import importlib
    name = Path(path).stem
    if name not in CONFIG_MODULES:
        name = name.split("_")[0]
    if name in CONFIG_MODULES:
        importlib.import_module(CONFIG_MODULES[name])
    if name not in CONFIG_CLASSES:
        raise ConfigError(f"no config class is registered for {path}; known: {', '.join(sorted(CONFIG_MODULES))}")
    return CONFIG_CLASSES[name]


def parse_args_with_overrides(ap):
    """ap.parse_args(), but key=value overrides may come on either side of options
    (`... lr=1e-3 --resume steps=900`): argparse alone gives them one place. Returns the namespace
    with every key=value in `overrides`; anything else unknown is an argparse error (exit 2)."""
    args, rest = ap.parse_known_args()
    takes = hasattr(args, "overrides")   # (a subcommand without overrides takes none)
    unknown = [r for r in rest if not takes or r.startswith("-") or "=" not in r]
    if unknown:
        ap.error(f"unrecognized arguments: {' '.join(unknown)}")
    if takes:
        args.overrides = list(args.overrides or []) + rest
    return args
