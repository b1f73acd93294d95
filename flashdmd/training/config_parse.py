"""Reading a config's sources: the YAML file as a mapping, and each value coerced to its field's type (one
FlashDMDError line naming the field otherwise). :mod:`flashdmd.training.config` resolves the sources in order."""
from __future__ import annotations

import dataclasses
import difflib
import math
import types
import typing
from pathlib import Path

import yaml

from flashdmd import FlashDMDError


def load_yaml(path: Path) -> dict:
    if not path.is_file():
        raise FlashDMDError(f"config file {path} not found")
    try:
        data = yaml.safe_load(path.read_text())
    except (yaml.YAMLError, UnicodeDecodeError) as e:
        first = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise FlashDMDError(f"config file {path} is not valid YAML: {first}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise FlashDMDError(f"config file {path} must be a mapping of key: value, got {type(data).__name__}")
    return data


def coerce_all(cls, raw: dict, renamed: dict) -> dict:
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    out = {}
    for k, v in raw.items():
        if k not in names:
            close = difflib.get_close_matches(str(k), names + list(renamed), n=1)  # YAML keys may be ints / bools
            hint = f" (did you mean {renamed.get(close[0], close[0])}?)" if close else ""
            raise FlashDMDError(f"config: unknown key {k!r}{hint}")
        out[k] = _coerce(k, v, hints[k])
    return out


def _coerce(name, value, tp):
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if value is None:
        if type(None) in args:
            return None
        raise FlashDMDError(f"config: {name} must not be null")
    if origin in (typing.Union, types.UnionType):
        inner = [a for a in args if a is not type(None)]
        return _coerce(name, value, inner[0])
    if origin is list:
        if not isinstance(value, (list, tuple)):
            raise FlashDMDError(f"config: {name} must be a list, got {value!r}")
        return [_coerce(name, v, args[0]) for v in value]
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise FlashDMDError(f"config: {name} must be true or false, got {value!r}")
    if tp is int:
        if isinstance(value, bool) or not (isinstance(value, int) or (isinstance(value, float) and value.is_integer())):
            raise FlashDMDError(f"config: {name} must be an integer, got {value!r}")
        return int(value)
    if tp is float:
        if isinstance(value, str):  # YAML 1.1 reads 1e-4 (no dot) as a string; accept what float() accepts
            try:
                value = float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise FlashDMDError(f"config: {name} must be a finite number, got {value!r}")
        return float(value)
    if tp is str:
        if isinstance(value, bool):
            raise FlashDMDError(f"config: {name} must be a string, got {value!r} (YAML reads no / yes / on / off as "
                                f"booleans: quote the value, e.g. {name}: \"no\")")
        if not isinstance(value, str):
            raise FlashDMDError(f"config: {name} must be a string, got {value!r}")
        return value
    return value
