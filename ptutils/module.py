"""`Module`: the unit every ptutils component is made of (DESIGN §3).

A Module performs one action, exposes its state with `state_dict()` and restores it
with `load_state_dict()`. Children assigned as attributes are tracked automatically,
as `torch.nn.Module` does, and so are torch modules, optimizers and LR schedulers, so
a parent's state is its children's states plus its own.

`build(cfg)` turns a configuration (`{"type": "torch.optim.SGD", "lr": 0.1}`) into
objects through the allowlisted registry; `Module.to_config()` gives it back.
"""

from __future__ import annotations

import difflib
import fnmatch
import functools
import inspect
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

import torch

from ptutils.errors import BuildError, ConfigError, LoadError

CONFIG_ATTR = "_ptutils_config"
"""Attribute under which built non-ptutils objects (torch modules...) keep their config."""


@runtime_checkable
class Stateful(Protocol):
    """Anything with `state_dict()` and `load_state_dict(state)`."""

    def state_dict(self) -> Any: ...

    def load_state_dict(self, state: Any) -> Any: ...


def is_stateful(value: Any) -> bool:
    """True for objects that take part in a State: Modules, torch modules, optimizers..."""
    return not isinstance(value, type) and isinstance(value, Stateful)


@dataclass
class RestoreReport:
    """What a partial `load_state_dict` did, key by key (dotted paths)."""

    restored: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)
    renamed: dict[str, str] = field(default_factory=dict)

    def __str__(self) -> str:
        lines = [
            f"restored {len(self.restored)}, skipped {len(self.skipped)}, "
            f"missing {len(self.missing)}"
        ]
        for title, keys in (("skipped", self.skipped), ("missing", self.missing)):
            if keys:
                lines.append(
                    f"  {title}: " + ", ".join(keys[:20]) + (" ..." if len(keys) > 20 else "")
                )
        for old, new in list(self.renamed.items())[:20]:
            lines.append(f"  renamed: {old} -> {new}")
        return "\n".join(lines)


def _record_init(init: Any) -> Any:
    """Wrap `__init__` so the outermost call records its arguments for `to_config`."""

    sig = inspect.signature(init)

    @functools.wraps(init)
    def wrapper(self: Module, *args: Any, **kwargs: Any) -> None:
        outer = "_init_args" not in self.__dict__
        if outer:
            try:
                bound = sig.bind(self, *args, **kwargs)
                bound.apply_defaults()
            except TypeError:
                bound = None
            recorded: dict[str, Any] = {}
            if bound is not None:
                for name, value in list(bound.arguments.items())[1:]:
                    kind = sig.parameters[name].kind
                    if kind is inspect.Parameter.VAR_KEYWORD:
                        recorded.update(value)
                    elif kind is not inspect.Parameter.VAR_POSITIONAL:
                        recorded[name] = value
            object.__setattr__(self, "_init_args", recorded)
        init(self, *args, **kwargs)

    wrapper.__ptutils_wrapped__ = True  # type: ignore[attr-defined]
    return wrapper


class Module:
    """Base class of ptutils components: nested state, config round trip, child tracking.

    Subclasses override `extra_state` / `load_extra_state` for state that is their own
    (not held by a child), and list in `lazy_config` the constructor arguments that
    must stay configurations (an optimizer needs the network's parameters first).
    """

    lazy_config: tuple[str, ...] = ()

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        init = cls.__dict__.get("__init__")
        if init is not None and not getattr(init, "__ptutils_wrapped__", False):
            cls.__init__ = _record_init(init)  # type: ignore[method-assign]

    # --- children -------------------------------------------------------------------
    def __setattr__(self, name: str, value: Any) -> None:
        children = self.__dict__.get("_children")
        if children is None:
            children = {}
            object.__setattr__(self, "_children", children)
        if not name.startswith("_") and is_stateful(value):
            children[name] = value
        else:
            children.pop(name, None)
        object.__setattr__(self, name, value)

    def __delattr__(self, name: str) -> None:
        self.__dict__.get("_children", {}).pop(name, None)
        object.__delattr__(self, name)

    def children(self) -> dict[str, Any]:
        """Stateful children by attribute name, in assignment order."""
        return dict(self.__dict__.get("_children", {}))

    def modules(self, prefix: str = "") -> Iterable[tuple[str, Module]]:
        """This Module and every Module below it, with dotted paths."""
        yield prefix, self
        for name, child in self.children().items():
            if isinstance(child, Module):
                yield from child.modules(f"{prefix}.{name}" if prefix else name)

    # --- state ----------------------------------------------------------------------
    def extra_state(self) -> dict[str, Any]:
        """State held by this Module itself (not by a child). Override."""
        return {}

    def load_extra_state(self, state: dict[str, Any]) -> None:
        """Restore what `extra_state` returned. Override."""

    def state_dict(self) -> dict[str, Any]:
        """Children's states by name, plus this Module's own `extra_state`."""
        out: dict[str, Any] = {name: child.state_dict() for name, child in self.children().items()}
        for key, value in self.extra_state().items():
            if key in out:
                raise LoadError(
                    f"{type(self).__name__}: own state key {key!r} clashes with a child"
                )
            out[key] = value
        return out

    def load_state_dict(
        self,
        state: Mapping[str, Any],
        *,
        only: Iterable[str] | None = None,
        rename: Mapping[str, str] | None = None,
        strict: bool | None = None,
    ) -> RestoreReport:
        """Restore a State; with `only`/`rename`, restore part of it and report what.

        `only` holds glob patterns over dotted paths (`network.*`, `model.network.fc1.*`);
        `rename` maps a prefix in the saved state to a prefix here (`{"encoder": "net"}`).
        Without them every entry must be restored (strict). With them, entries that do
        not match are skipped and reported, and nothing raises for a missing entry.
        """
        partial = only is not None or bool(rename)
        strict = (not partial) if strict is None else strict
        flat_state = _flatten_state(self, state)
        report = RestoreReport()
        if rename:
            flat_state = _apply_rename(flat_state, rename, report)
        targets = _flatten_targets(self)
        patterns = list(only) if only is not None else None
        chosen: dict[str, Any] = {}
        for key, value in flat_state.items():
            if patterns is not None and not _matches(key, patterns):
                report.skipped.append(key)
            elif key not in targets:
                report.skipped.append(key)
            else:
                chosen[key] = value
        for key in targets:
            if key not in chosen and (patterns is None or _matches(key, patterns)):
                report.missing.append(key)
        if strict and (report.missing or report.skipped):
            raise LoadError(
                f"State does not match {type(self).__name__}:\n{report}\n"
                "Pass only=[patterns] / rename={old: new} to restore part of it."
            )
        _load_flat(self, chosen, report)
        return report

    # --- config ---------------------------------------------------------------------
    @classmethod
    def from_config(cls, cfg: Mapping[str, Any], *, where: str = "") -> Any:
        """Build a Module (tree) from a configuration; `type:` defaults to this class."""
        if not isinstance(cfg, Mapping):
            raise ConfigError(f"{where or 'config'}: expected a mapping, got {type(cfg).__name__}")
        if "type" not in cfg and cls is not Module:
            check_types(cfg, where)
            return build_object(cls, {k: v for k, v in cfg.items()}, where=where, config=dict(cfg))
        return build(cfg, where=where)

    def to_config(self) -> dict[str, Any]:
        """A configuration that builds an equal tree (same structure and settings)."""
        cfg: dict[str, Any] = {"type": type_name(type(self))}
        for name, value in self.__dict__.get("_init_args", {}).items():
            cfg[name] = _value_to_config(value, f"{type(self).__name__}.{name}")
        return cfg

    def __repr__(self) -> str:
        kids = ", ".join(self.children())
        return f"{type(self).__name__}({kids})"


# --- build ----------------------------------------------------------------------------


def type_name(obj_type: type) -> str:
    """The dotted name a config uses for a class."""
    return f"{obj_type.__module__}.{obj_type.__qualname__}"


def _value_to_config(value: Any, where: str) -> Any:
    if isinstance(value, Module):
        return value.to_config()
    cfg = getattr(value, CONFIG_ATTR, None)
    if cfg is not None:
        return _plain(cfg)
    if isinstance(value, Mapping):
        return {k: _value_to_config(v, f"{where}.{k}") for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_value_to_config(v, f"{where}[{i}]") for i, v in enumerate(value)]
    if value is None or isinstance(value, str | int | float | bool):
        return value
    raise ConfigError(
        f"{where}: a {type(value).__name__} built outside a config cannot be written back "
        "to a config; build it from a config (or pass plain values)."
    )


def _plain(cfg: Any) -> Any:
    if isinstance(cfg, Mapping):
        return {str(k): _plain(v) for k, v in cfg.items()}
    if isinstance(cfg, list | tuple):
        return [_plain(v) for v in cfg]
    return cfg


def is_type_config(value: Any) -> bool:
    """True for a mapping with a `type:` key: something `build` constructs."""
    return isinstance(value, Mapping) and "type" in value


def check_types(cfg: Any, where: str = "") -> None:
    """Resolve every `type:` in `cfg`, at any depth, against the allowlist; build nothing.

    A config is refused as a whole before its first object is built, so an allowed
    constructor with side effects never runs when another part is not allowed.
    """
    from ptutils import registry

    stack: list[tuple[Any, str]] = [(cfg, where)]
    while stack:
        value, at = stack.pop()
        if isinstance(value, Mapping):
            if "type" in value:
                registry.resolve(str(value["type"]), where=f"{at}.type" if at else "type")
            items = [(v, f"{at}.{k}" if at else str(k)) for k, v in value.items() if k != "type"]
        elif isinstance(value, list):
            items = [(v, f"{at}[{i}]") for i, v in enumerate(value)]
        else:
            continue
        stack.extend(reversed(items))  # depth first, in the order the config lists them


def build(cfg: Mapping[str, Any], *, where: str = "", **extra: Any) -> Any:
    """Construct the object a `{"type": ..., **kwargs}` configuration describes.

    Every `type:` in `cfg` is resolved first (`check_types`). Nested configurations
    with a `type:` are built first (depth first), except the arguments a Module lists
    in `lazy_config`. `extra` adds arguments that are not part of the config (an
    optimizer's `params`).
    """
    check_types(cfg, where)
    return _build(cfg, where, extra)


def _build(cfg: Mapping[str, Any], where: str, extra: Mapping[str, Any]) -> Any:
    from ptutils import registry

    if not is_type_config(cfg):
        raise ConfigError(f"{where or 'config'}: expected a mapping with a `type:` key")
    type_where = f"{where}.type" if where else "type"
    target = registry.resolve(str(cfg["type"]), where=type_where)
    kwargs = {k: v for k, v in cfg.items() if k != "type"}
    return build_object(target, kwargs, where=where, config=dict(cfg), extra=extra)


def build_object(
    target: Any,
    kwargs: dict[str, Any],
    *,
    where: str,
    config: dict[str, Any],
    extra: Mapping[str, Any] | None = None,
) -> Any:
    """Call `target(**kwargs, **extra)` after building nested configs and checking keys."""
    lazy = getattr(target, "lazy_config", ()) if isinstance(target, type) else ()
    built = {}
    for key, value in kwargs.items():
        sub = f"{where}.{key}" if where else key
        built[key] = value if key in lazy else _build_value(value, sub)
    _check_arguments(target, built, where)
    try:
        obj = target(**built, **(extra or {}))
    except (ConfigError, LoadError):
        raise
    except Exception as exc:  # noqa: BLE001 - any constructor failure becomes a BuildError
        raise BuildError(
            f"{where or 'config'}: building {getattr(target, '__name__', target)} failed: "
            f"{type(exc).__name__}: {exc}"
        ) from exc
    if not isinstance(obj, Module):
        try:
            object.__setattr__(obj, CONFIG_ATTR, config)
        except (AttributeError, TypeError):
            pass
    return obj


def _build_value(value: Any, where: str) -> Any:
    if is_type_config(value):
        return _build(value, where, {})
    if isinstance(value, list):
        return [_build_value(v, f"{where}[{i}]") for i, v in enumerate(value)]
    return value


def _check_arguments(target: Any, kwargs: Mapping[str, Any], where: str) -> None:
    try:
        sig = inspect.signature(target)
    except (TypeError, ValueError):
        return
    params = sig.parameters
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        return
    valid = [
        n
        for n, p in params.items()
        if p.kind in (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
    ]
    name = getattr(target, "__name__", str(target))
    for key in kwargs:
        if key not in valid:
            near = difflib.get_close_matches(key, valid, n=3)
            hint = f" Did you mean {', '.join(repr(n) for n in near)}?" if near else ""
            raise ConfigError(
                f"{where + '.' if where else ''}{key}: unknown key for {name}.{hint} "
                f"Valid keys: {', '.join(valid) or '(none)'}."
            )


# --- flat views for partial restore ---------------------------------------------------


def _flatten_state(root: Module, state: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """Dotted keys down to torch-module tensors; other children's states stay whole."""
    out: dict[str, Any] = {}
    children = root.children()
    for key, value in state.items():
        path = f"{prefix}{key}"
        child = children.get(key)
        if isinstance(child, Module) and isinstance(value, Mapping):
            out.update(_flatten_state(child, value, path + "."))
        elif isinstance(child, torch.nn.Module) and isinstance(value, Mapping):
            for k, v in value.items():
                out[f"{path}.{k}"] = v
        elif child is None and _looks_like_tensor_dict(value):
            for k, v in value.items():
                out[f"{path}.{k}"] = v
        else:
            out[path] = value
    return out


def _looks_like_tensor_dict(value: Any) -> bool:
    return (
        isinstance(value, Mapping)
        and bool(value)
        and all(isinstance(v, torch.Tensor) for v in value.values())
    )


def _flatten_targets(root: Module, prefix: str = "") -> dict[str, Any]:
    """Every restorable entry of `root` as dotted path -> owner."""
    out: dict[str, Any] = {}
    for name, child in root.children().items():
        path = f"{prefix}{name}"
        if isinstance(child, Module):
            out.update(_flatten_targets(child, path + "."))
        elif isinstance(child, torch.nn.Module):
            for k in child.state_dict():
                out[f"{path}.{k}"] = child
        else:
            out[path] = child
    for key in root.extra_state():
        out[f"{prefix}{key}"] = root
    return out


def _apply_rename(
    flat: dict[str, Any], rename: Mapping[str, str], report: RestoreReport
) -> dict[str, Any]:
    out = {}
    for key, value in flat.items():
        new = key
        for old_prefix, new_prefix in rename.items():
            if key == old_prefix or key.startswith(old_prefix + "."):
                new = new_prefix + key[len(old_prefix) :]
                report.renamed[key] = new
                break
        out[new] = value
    return out


def _matches(key: str, patterns: list[str]) -> bool:
    return any(
        fnmatch.fnmatchcase(key, p) or key.startswith(p.rstrip(".*") + ".") or key == p
        for p in patterns
    )


def _load_flat(root: Module, flat: dict[str, Any], report: RestoreReport, prefix: str = "") -> None:
    for name, child in root.children().items():
        path = f"{prefix}{name}"
        if isinstance(child, Module):
            _load_flat(child, flat, report, path + ".")
        elif isinstance(child, torch.nn.Module):
            sub = {k[len(path) + 1 :]: v for k, v in flat.items() if k.startswith(path + ".")}
            if sub:
                _load_torch_module(child, sub, path)
                report.restored.extend(f"{path}.{k}" for k in sub)
        elif path in flat:
            try:
                child.load_state_dict(flat[path])
            except Exception as exc:  # noqa: BLE001
                raise LoadError(f"restoring {path}: {type(exc).__name__}: {exc}") from exc
            report.restored.append(path)
    own = {
        k[len(prefix) :]: v
        for k, v in flat.items()
        if k.startswith(prefix) and k[len(prefix) :] in root.extra_state()
    }
    if own:
        root.load_extra_state(own)
        report.restored.extend(prefix + k for k in own)


def _load_torch_module(module: torch.nn.Module, sub: dict[str, Any], path: str) -> None:
    current = module.state_dict()
    for key, value in sub.items():
        if key in current and isinstance(value, torch.Tensor) and value.shape != current[key].shape:
            raise LoadError(
                f"restoring {path}.{key}: saved shape {tuple(value.shape)} does not match "
                f"the network's {tuple(current[key].shape)}"
            )
    try:
        module.load_state_dict(sub, strict=False)
    except Exception as exc:  # noqa: BLE001
        raise LoadError(f"restoring {path}: {type(exc).__name__}: {exc}") from exc
