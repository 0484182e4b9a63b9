"""Config files, command-line overrides, sweeps, hashes, and the `Configuration` dict.

Configs are plain data (mappings, lists, str, int, float, bool, None): they travel in
the store and in messages as msgpack/JSON, so anything else is refused at load time.
YAML is read with `yaml.safe_load` only: a tag such as `!!python/object` never runs.
"""

from __future__ import annotations

import copy
import difflib
import hashlib
import itertools
import json
import re
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from ptutils.errors import ConfigError

_SCI_FLOAT = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)[eE][-+]?\d+")
"""`1e-3`: a float in YAML 1.2 and JSON, but a string to PyYAML (YAML 1.1)."""

_OVERRIDE_FORM = "KEY.PATH=VALUE, e.g. model.optimizer.lr=0.1"


# --- files ---------------------------------------------------------------------------
def load_config(path: str | Path) -> dict[str, Any]:
    """Read a YAML (`.yaml`/`.yml`, or any other extension) or JSON (`.json`) config.

    Unquoted scientific numbers in YAML (`lr: 1e-3`) are read as floats, as in YAML 1.2.
    """
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(f"config file {path} does not exist") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"config file {path} cannot be read: {exc}") from exc
    data = _parse_json(text, path) if path.suffix.lower() == ".json" else _parse_yaml(text, path)
    if not isinstance(data, dict):
        kind = "empty" if data is None else f"a {type(data).__name__}"
        raise ConfigError(f"{path}: the top level must be a mapping (key: value), but it is {kind}")
    return _check_plain(data, str(path))


def _parse_json(text: str, path: Path) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise ConfigError(f"{path}:{exc.lineno}:{exc.colno}: invalid JSON: {exc.msg}") from None


def _parse_yaml(text: str, path: Path) -> Any:
    import yaml  # here, not at the top: `ptutils status` never reads YAML (~35 ms)

    try:
        return _yaml_floats(yaml.safe_load(text))
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"{path}:{mark.line + 1}:{mark.column + 1}" if mark else str(path)
        problem = getattr(exc, "problem", None) or str(exc)
        hint = " (tags that build Python objects are never allowed)" if "tag" in problem else ""
        raise ConfigError(f"{where}: invalid YAML: {problem}{hint}") from None


def _yaml_floats(value: Any) -> Any:
    """Turn the strings PyYAML leaves for `1e-3`-style numbers into floats."""
    if isinstance(value, str) and _SCI_FLOAT.fullmatch(value):
        return float(value)
    if isinstance(value, dict):
        return {k: _yaml_floats(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_yaml_floats(v) for v in value]
    return value


def _check_plain(value: Any, source: str, at: str = "") -> Any:
    """Refuse anything a msgpack/JSON config cannot hold (dates, sets, non-string keys)."""
    where = f"{source}: at `{at}`" if at else source
    if isinstance(value, dict):
        for key, item in value.items():
            if not isinstance(key, str):
                raise ConfigError(
                    f"{where}: key {key!r} is a {type(key).__name__}; keys must be strings "
                    "(quote it: YAML reads on/off/yes/no as booleans and 1 as a number)"
                )
            _check_plain(item, source, f"{at}.{key}" if at else key)
    elif isinstance(value, list):
        for i, item in enumerate(value):
            _check_plain(item, source, f"{at}[{i}]")
    elif value is not None and not isinstance(value, str | int | float | bool):
        raise ConfigError(
            f"{where}: {value!r} is a {type(value).__name__}; configs hold only mappings, lists, "
            "strings, numbers, booleans and null (quote it to keep it as a string)"
        )
    return value


# --- overrides and sweeps ------------------------------------------------------------
def parse_value(raw: str) -> Any:
    """The typed value of an override's right-hand side (YAML scalar rules, else a string)."""
    import yaml

    try:
        value = _yaml_floats(yaml.safe_load(raw))
        _check_plain(value, "value")
    except (yaml.YAMLError, ConfigError):
        return raw
    return value


def parse_override(text: str) -> tuple[list[str], Any]:
    """`a.b.c=value` -> (["a", "b", "c"], typed value)."""
    key, sep, raw = text.partition("=")
    if not sep:
        raise ConfigError(f"override {text!r} has no '='; expected {_OVERRIDE_FORM}")
    parts = key.strip().split(".")
    if not all(parts):
        raise ConfigError(f"override {text!r} has an empty key part; expected {_OVERRIDE_FORM}")
    return parts, parse_value(raw)


def apply_overrides(cfg: Mapping[str, Any], overrides: Sequence[str]) -> dict[str, Any]:
    """A copy of `cfg` with each `a.b.c=value` applied in order; `cfg` is left untouched.

    Missing intermediate mappings are created; a key under a non-mapping is an error.
    """
    out = _to_plain(cfg)
    for text in overrides:
        parts, value = parse_override(text)
        node = out
        for i, key in enumerate(parts[:-1]):
            child = node.setdefault(key, {})
            if not isinstance(child, dict):
                above = ".".join(parts[: i + 1])
                raise ConfigError(
                    f"override {text!r}: cannot set {'.'.join(parts)} because {above} is "
                    f"{child!r} (type {type(child).__name__}), not a mapping"
                )
            node = child
        node[parts[-1]] = value
    return out


def _split_values(text: str, raw: str) -> list[str]:
    """Split on commas outside brackets, braces and quotes."""
    pieces, depth, quote, current = [], 0, "", []
    for char in raw:
        if quote:
            quote = "" if char == quote else quote
        elif char in "'\"":
            quote = char
        elif char in "[{(":
            depth += 1
        elif char in "]})":
            depth -= 1
        elif char == "," and depth == 0:
            pieces.append("".join(current))
            current = []
            continue
        current.append(char)
    pieces.append("".join(current))
    if depth or quote:
        raise ConfigError(f"sweep {text!r}: unbalanced brackets or quotes")
    if not all(p.strip() for p in pieces):
        raise ConfigError(
            f"sweep {text!r}: empty value; expected KEY=V1,V2,... e.g. optimizer.lr=0.1,0.01"
        )
    return [p.strip() for p in pieces]


def expand_sweep(sweeps: Sequence[str]) -> list[list[str]]:
    """Each `k=v1,v2` -> the grid of override lists; the first sweep varies slowest."""
    axes, seen = [], set()
    for text in sweeps:
        key, sep, raw = text.partition("=")
        key = key.strip()
        if not sep or not key:
            raise ConfigError(f"sweep {text!r}: expected KEY=V1,V2,... e.g. optimizer.lr=0.1,0.01")
        if key in seen:
            raise ConfigError(f"sweep key {key!r} is given twice; list all its values in one sweep")
        seen.add(key)
        axes.append([f"{key}={value}" for value in _split_values(text, raw)])
    return [list(combo) for combo in itertools.product(*axes)]


# --- identity and validation ---------------------------------------------------------
def _canonical(value: Any) -> str:
    """Canonical JSON: sorted keys, no spaces, floats by repr (so 1 and 1.0 differ)."""
    if value is None or isinstance(value, bool | str):
        return json.dumps(value, ensure_ascii=False)
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        return repr(value)  # nan/inf stay unquoted, so never equal to the strings "nan"/"inf"
    if isinstance(value, Mapping):
        if not all(isinstance(k, str) for k in value):
            raise ConfigError(f"cannot hash a mapping with non-string keys: {list(value)!r}")
        items = sorted(value.items())
        return (
            "{"
            + ",".join(f"{json.dumps(k, ensure_ascii=False)}:{_canonical(v)}" for k, v in items)
            + "}"
        )
    if isinstance(value, list | tuple):
        return "[" + ",".join(_canonical(v) for v in value) + "]"
    raise ConfigError(f"cannot hash {value!r}: a {type(value).__name__} is not config data")


def config_hash(cfg: Mapping[str, Any]) -> str:
    """A stable 16-hex-digit id of a config: key order does not matter, list order does."""
    return hashlib.sha256(_canonical(cfg).encode("utf-8")).hexdigest()[:16]


def check_keys(section: Mapping[str, Any], allowed: Iterable[str], where: str) -> None:
    """Refuse unknown keys in one error naming each, the nearest valid key, and all valid keys."""
    valid = sorted(allowed)
    unknown = [k for k in section if k not in valid]
    if not unknown:
        return
    prefix = f"{where}." if where else ""
    lines = []
    for key in unknown:
        near = difflib.get_close_matches(str(key), valid, n=1, cutoff=0.6)
        hint = f" (did you mean `{near[0]}`?)" if near else ""
        lines.append(f"unknown key `{prefix}{key}`{hint}")
    lines.append(f"valid keys for `{where or 'the top level'}`: {', '.join(valid) or '(none)'}")
    raise ConfigError("\n".join(lines))


# --- the Configuration metamodule ----------------------------------------------------
def _to_plain(value: Any) -> Any:
    """A deep copy made of plain dicts and lists."""
    if isinstance(value, Mapping):
        return {k: _to_plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_to_plain(v) for v in value]
    return copy.deepcopy(value)


def _wrap(value: Any) -> Any:
    if isinstance(value, Mapping) and not isinstance(value, Configuration):
        return Configuration(value)
    if isinstance(value, list):
        return [_wrap(v) for v in value]
    return value


class Configuration(dict):
    """A config: a plain dict (it serialises as one) with dot access for reading.

    `cfg.model.optimizer.lr` reads nested keys; keys shadowed by dict methods
    (`items`, `keys`, `get`, ...) are read with `cfg["items"]`.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        for key, value in self.items():
            dict.__setitem__(self, key, _wrap(value))

    def __setitem__(self, key: str, value: Any) -> None:
        super().__setitem__(key, _wrap(value))

    def __getattr__(self, name: str) -> Any:
        if name.startswith("__"):
            raise AttributeError(name)
        try:
            value = self[name]
        except KeyError:
            keys = ", ".join(map(str, self)) or "(none)"
            raise AttributeError(f"configuration has no key {name!r}; keys: {keys}") from None
        if isinstance(value, Mapping) and not isinstance(value, Configuration):
            value = self[name] = Configuration(value)  # a plain dict put in by update()
        return value

    def __setattr__(self, name: str, value: Any) -> None:
        raise AttributeError(
            f"configurations are read by attribute; set a key with cfg[{name!r}] = ..."
        )

    def __dir__(self) -> list[str]:
        return sorted(
            set(super().__dir__()) | {k for k in self if isinstance(k, str) and k.isidentifier()}
        )

    def __repr__(self) -> str:
        return f"Configuration({self.to_dict()!r})"

    @classmethod
    def load(cls, path: str | Path, overrides: Sequence[str] = ()) -> Configuration:
        """Read a config file and apply `a.b=value` overrides."""
        return cls(apply_overrides(load_config(path), overrides))

    def hash(self) -> str:
        """The stable id of this config (see `config_hash`)."""
        return config_hash(self)

    def to_dict(self) -> dict[str, Any]:
        """A deep copy as plain nested dicts and lists."""
        return _to_plain(self)

    def get_path(self, path: str, default: Any = None) -> Any:
        """The value at dotted `path` (`"model.optimizer.lr"`), or `default` if absent."""
        node: Any = self
        for key in path.split("."):
            if not isinstance(node, Mapping) or key not in node:
                return default
            node = node[key]
        return node
