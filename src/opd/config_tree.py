"""Plain data <-> frozen dataclass trees: the loader under `config.py`, which knows nothing of opd's schema.

`build` turns nested dicts and lists (YAML) into a dataclass tree, rejecting unknown keys, moved keys (a
class's `MOVED` table: old key -> where it went), wrong types and non-finite numbers with the key's dotted
path; `load_yaml` refuses a key given twice in one mapping (PyYAML keeps the last silently); `apply_override`
applies `a.b.c=value`; `to_dict` is the way back (the run record).
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from typing import Any, Literal

import yaml


class ConfigError(ValueError):
    """A configuration problem, reported with the dotted key and the file it came from."""


class _UniqueKeyLoader(yaml.SafeLoader):
    """SafeLoader that refuses a mapping key given twice (a second `train:` section would replace the first)."""

    def construct_mapping(self, node, deep=False):
        if isinstance(node, yaml.MappingNode):
            seen: dict[Any, int] = {}
            for key_node, _ in node.value:
                if key_node.tag == "tag:yaml.org,2002:merge":  # `<<: *anchor` merges are allowed to be overridden
                    continue
                key, line = self.construct_object(key_node, deep=True), key_node.start_mark.line + 1
                try:
                    first = seen.get(key)
                except TypeError:  # an unhashable key: the base constructor reports it
                    continue
                if first is not None:
                    raise ConfigError(f"key {key!r} appears twice in one mapping (lines {first} and {line}); "
                                      "the second would silently replace the first")
                seen[key] = line
        return super().construct_mapping(node, deep=deep)


def load_yaml(text: str) -> Any:
    """`yaml.safe_load`, refusing duplicate keys (ConfigError naming the key and both lines)."""
    return yaml.load(text, Loader=_UniqueKeyLoader)  # noqa: S506 - a SafeLoader subclass


def apply_override(data: dict, override: str) -> None:
    """`a.b=1` sets data['a']['b']; `teachers.0.lam=1.5` indexes lists. Values are parsed as YAML."""
    if "=" not in override:
        raise ConfigError(f"override '{override}' must look like key.path=value")
    key, raw = override.split("=", 1)
    parts = key.strip().split(".")
    try:
        value = load_yaml(raw) if raw.strip() else None
    except yaml.YAMLError as error:
        raise ConfigError(f"override '{override}': the value is not valid YAML: {error}") from None
    node: Any = data
    for depth, part in enumerate(parts[:-1]):
        here = ".".join(parts[: depth + 1])
        if isinstance(node, list):
            node = node[_list_index(part, node, here)]
        else:
            node = node.setdefault(part, {})
        if not isinstance(node, (dict, list)):
            raise ConfigError(f"override '{override}': '{here}' is a value, not a section")
    last = parts[-1]
    if isinstance(node, list):
        node[_list_index(last, node, key)] = value
    else:
        node[last] = value


def _list_index(part: str, node: list, here: str) -> int:
    if not part.isdigit() or int(part) >= len(node):
        raise ConfigError(f"override key '{here}': index {part} out of range (list has {len(node)} items)")
    return int(part)


def build(cls: type, data: Any, where: str) -> Any:
    """Build dataclass `cls` from plain data, rejecting unknown keys and wrong types by dotted path."""
    if not isinstance(data, dict):
        raise ConfigError(f"{where or 'top level'}: expected a mapping, got {data!r}")
    hints = typing.get_type_hints(cls)
    names = {yaml_key(f) for f in dataclasses.fields(cls) if f.init}
    moved = [f"{_join(where, key)}: moved to {new}" for key, new in getattr(cls, "MOVED", {}).items() if key in data]
    if moved:
        raise ConfigError("; ".join(moved))
    unknown = sorted(set(data) - names)
    if unknown:
        raise ConfigError(f"unknown key(s) {[_join(where, k) for k in unknown]}; valid keys here: {sorted(names)}")
    kwargs = {}
    for f in dataclasses.fields(cls):
        key = yaml_key(f)
        if key not in data:
            if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
                raise ConfigError(f"missing required key '{_join(where, key)}'")
            continue
        kwargs[f.name] = _convert(hints[f.name], data[key], _join(where, key))
    try:
        return cls(**kwargs)
    except ConfigError as error:
        if where:
            raise
        raise ConfigError(str(error)) from None


def yaml_key(f: dataclasses.Field) -> str:
    """The key a field has in YAML: its name, or `metadata["key"]` where the name is a Python keyword
    (`rollout.async` is the field `async_`)."""
    return f.metadata.get("key", f.name)


def _convert(hint: Any, value: Any, where: str) -> Any:
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for option in (a for a in args if a is not type(None)):
            try:
                return _convert(option, value, where)
            except ConfigError as error:
                errors.append(str(error))
        raise ConfigError(errors[0] if len(errors) == 1 else f"{where}: {value!r} matches none of {hint}")
    if origin is dict:
        return _convert_mapping(args, value, where)
    if origin is Literal:
        if value not in args:
            raise ConfigError(f"{where}: {value!r} is not one of {list(args)}")
        return value
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where}: expected a list, got {value!r}")
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_convert(args[0], item, f"{where}.{i}") for i, item in enumerate(value))
        if len(value) != len(args):
            raise ConfigError(f"{where}: expected {len(args)} items, got {len(value)}")
        return tuple(_convert(a, item, f"{where}.{i}") for i, (a, item) in enumerate(zip(args, value, strict=True)))
    if dataclasses.is_dataclass(hint):
        return build(hint, value, where)
    if hint is float:
        # YAML 1.1 reads `1e-5` as a string; accept any string Python parses as a number.
        if isinstance(value, str):
            try:
                value = float(value)
            except ValueError:
                raise ConfigError(f"{where}: expected a number, got {value!r}") from None
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{where}: expected a number, got {value!r}")
        try:
            number = float(value)
        except OverflowError:  # an integer too large for a float
            number = math.inf
        if not math.isfinite(number):  # `inf` and `.nan` parse as numbers; no setting of opd means them
            raise ConfigError(f"{where}: must be finite, got {number}")
        return number
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{where}: expected an integer, got {value!r}")
        return value
    if hint is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{where}: expected true or false, got {value!r}")
        return value
    if hint is str:
        if not isinstance(value, str):
            raise ConfigError(f"{where}: expected a string, got {value!r}")
        return value
    raise ConfigError(f"{where}: unsupported config type {hint}")


def _convert_mapping(args: tuple, value: Any, where: str) -> dict:
    """A mapping with text keys (keyword arguments for a library call, e.g. a chat template's variables);
    values typed `Any` are kept as YAML gave them."""
    if not isinstance(value, dict):
        raise ConfigError(f"{where}: expected a mapping, got {value!r}")
    value_type = args[1] if args else Any
    converted = {}
    for key, item in value.items():
        if not isinstance(key, str):
            raise ConfigError(f"{where}: keys must be text, got {key!r}")
        converted[key] = item if value_type is Any else _convert(value_type, item, _join(where, key))
    return converted


def _join(where: str, key: str) -> str:
    return f"{where}.{key}" if where else key


def nonfinite_floats(tree: Any, where: str = "") -> list[str]:
    """`key: must be finite, got inf` for every non-finite float in a dataclass tree (one built in Python,
    not through `build`)."""
    if dataclasses.is_dataclass(tree):
        return [problem for f in dataclasses.fields(tree)
                for problem in nonfinite_floats(getattr(tree, f.name), _join(where, yaml_key(f)))]
    if isinstance(tree, tuple):
        return [problem for i, item in enumerate(tree) for problem in nonfinite_floats(item, _join(where, str(i)))]
    if isinstance(tree, float) and not math.isfinite(tree):
        return [f"{where}: must be finite, got {tree}"]
    return []


def to_dict(config: Any) -> Any:
    """Plain data (for YAML) from a config tree."""
    if dataclasses.is_dataclass(config):
        return {yaml_key(f): to_dict(getattr(config, f.name)) for f in dataclasses.fields(config)}
    if isinstance(config, tuple):
        return [to_dict(item) for item in config]
    if isinstance(config, dict):
        return {key: to_dict(value) for key, value in config.items()}
    return config
