"""Config loading: typed dataclass fields, YAML and dotted ``key=value`` overrides, clear errors.

This module holds the mechanics; the trees themselves live in ``rlhf_ray.config``. A run is
configured by

    defaults (in code)  <-  YAML file (overrides only)  <-  ``key.sub=value`` arguments

Unknown keys and wrong types raise :class:`ConfigError`, which names the dotted key and
the valid choices or the closest match. Validation never rewrites a value silently.
"""

from __future__ import annotations

import dataclasses
import difflib
import re
import types
import typing
from pathlib import Path
from typing import Any, Literal, get_args, get_origin

import yaml

from rlhf_ray.errors import UserError
from rlhf_ray.files import writable_dir, write_atomic

_FLOAT_RE = re.compile(r"^[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?$")


class ConfigError(UserError, ValueError):
    """A configuration key or value is invalid; the message names the key."""


def option(default: Any, doc: str) -> Any:
    """A dataclass field with a default and a one-line doc (shown by ``rlhf-ray config --doc``)."""
    if isinstance(default, (list, dict)):
        return dataclasses.field(default_factory=lambda d=default: type(d)(d), metadata={"doc": doc})
    if dataclasses.is_dataclass(default):
        return dataclasses.field(default_factory=lambda d=default: dataclasses.replace(d),
                                 metadata={"doc": doc})
    return dataclasses.field(default=default, metadata={"doc": doc})


def section(cls: type, doc: str) -> Any:
    """A nested sub-config field."""
    return dataclasses.field(default_factory=cls, metadata={"doc": doc})


# --------------------------------------------------------------------------- parsing


def _closest(key: str, choices: list[str], prefix: str = "") -> str:
    match = difflib.get_close_matches(key, choices, n=1, cutoff=0.5)
    hint = f" Did you mean '{prefix}{match[0]}'?" if match else ""
    return f"{hint} Valid keys: {', '.join(sorted(choices))}."


def _type_name(tp: Any) -> str:
    origin = get_origin(tp)
    if origin is Literal:
        return " | ".join(repr(a) for a in get_args(tp))
    if origin in (typing.Union, types.UnionType):
        return " | ".join(_type_name(a) for a in get_args(tp))
    if origin is list:
        return f"list[{_type_name(get_args(tp)[0])}]"
    if tp is type(None):
        return "null"
    return getattr(tp, "__name__", str(tp))


def _coerce(value: Any, tp: Any, key: str, base: Any = None) -> Any:
    """Check ``value`` against the annotation ``tp``; only widen int -> float.

    ``base`` is the default of a nested section: a partial mapping overrides its fields.
    """
    origin = get_origin(tp)
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping of {tp.__name__} fields, got {value!r}")
        return _build(tp, value, key, base)
    if origin is Literal:
        if value not in get_args(tp):
            raise ConfigError(f"{key}: {value!r} is not one of {_type_name(tp)}")
        return value
    if origin in (typing.Union, types.UnionType):
        errors = []
        for arm in get_args(tp):
            try:
                return _coerce(value, arm, key)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(f"{key}: expected {_type_name(tp)}, got {value!r}")
    if origin is list:
        if not isinstance(value, list):
            raise ConfigError(f"{key}: expected {_type_name(tp)}, got {value!r}")
        return [_coerce(v, get_args(tp)[0], f"{key}[{i}]") for i, v in enumerate(value)]
    if tp is type(None):
        if value is not None:
            raise ConfigError(f"{key}: expected null, got {value!r}")
        return None
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{key}: expected true or false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{key}: expected an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, str) and _FLOAT_RE.match(value.strip()):
            return float(value)  # YAML 1.1 reads '1e-5' (no dot) as a string
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{key}: expected a number, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{key}: expected a string, got {value!r}")
        return value
    if tp is dict or origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping, got {value!r}")
        return value
    raise ConfigError(f"{key}: unsupported annotation {tp!r}")


def _build(cls: type, data: dict, prefix: str = "", base: Any = None) -> Any:
    """``data`` applied over ``base`` (default: the class defaults), validated."""
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    base = cls() if base is None else base
    kwargs = {}
    for key, value in data.items():
        dotted = f"{prefix}.{key}" if prefix else str(key)
        if key not in names:
            raise ConfigError(f"unknown key '{dotted}'.{_closest(str(key), names, prefix + '.' if prefix else '')}")
        kwargs[key] = _coerce(value, hints[key], dotted, getattr(base, key))
    obj = dataclasses.replace(base, **kwargs)
    check = getattr(obj, "validate", None)
    if check is not None:
        check()
    return obj


def set_dotted(tree: dict, dotted: str, value: Any) -> None:
    """Set ``tree[a][b][c] = value`` for ``dotted == 'a.b.c'``, creating mappings as needed."""
    parts = dotted.split(".")
    node = tree
    for i, part in enumerate(parts[:-1]):
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"'{'.'.join(parts[: i + 1])}' is a value, not a section; "
                              f"cannot set '{dotted}'")
        node = child
    node[parts[-1]] = value


def parse_override(arg: str) -> tuple[str, Any]:
    """Parse ``key.sub=value``; the value is read as YAML (``3`` is an int, ``null`` is None)."""
    if "=" not in arg:
        raise ConfigError(f"override '{arg}' must look like key.sub=value")
    key, raw = arg.split("=", 1)
    key = key.strip()
    if not key:
        raise ConfigError(f"override '{arg}' has an empty key")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    return key, value


def load_yaml(path: str | Path) -> dict:
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"config file {p} does not exist")
    try:
        data = yaml.safe_load(p.read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"{p}: not valid YAML: {e}") from e
    if not isinstance(data, dict):
        raise ConfigError(f"{p}: the top level must be a mapping of keys, got {type(data).__name__}")
    return data


def build_config(cls: type, yaml_path: str | Path | None = None,
                 overrides: list[str] | tuple[str, ...] = ()) -> Any:
    """Defaults, then the YAML file, then dotted overrides; validated into ``cls``."""
    data: dict = load_yaml(yaml_path) if yaml_path else {}
    for arg in overrides:
        key, value = parse_override(arg)
        set_dotted(data, key, value)
    try:
        return _build(cls, data)
    except ConfigError as e:
        where = f" (from {yaml_path})" if yaml_path else ""
        raise ConfigError(f"{e}{where}") from None


# --------------------------------------------------------------------------- output


def to_dict(cfg: Any) -> dict:
    return dataclasses.asdict(cfg)


def to_yaml(cfg: Any) -> str:
    return yaml.safe_dump(to_dict(cfg), sort_keys=False)


def describe(cls: type, prefix: str = "") -> list[tuple[str, str, Any, str]]:
    """(dotted key, type, default, doc) for every leaf field, for ``config --doc``."""
    rows = []
    hints = typing.get_type_hints(cls)
    default = cls()
    for f in dataclasses.fields(cls):
        key = f"{prefix}{f.name}"
        tp = hints[f.name]
        if dataclasses.is_dataclass(tp):
            rows += describe(tp, key + ".")
        else:
            rows.append((key, _type_name(tp), getattr(default, f.name), f.metadata.get("doc", "")))
    return rows


def save_config(cfg: Any, run_dir: str | Path) -> Path:
    """Write the resolved config to ``run_dir/config.yaml`` (atomically)."""
    run_dir = writable_dir(run_dir, "run_dir")
    return write_atomic(run_dir / "config.yaml", to_yaml(cfg))
