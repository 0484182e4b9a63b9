"""The type registry: config `type:` names resolve only through an allowlist.

A configuration is data, and data must never make a worker import or call something
that was not allowed. A name resolves when it is registered (`@register`), when it is
the short name of a torch.nn / torch.optim / lr_scheduler class or of a registered
class, or when it is a dotted path to a public class whose module lies under an
allowed prefix (torch.nn, torch.optim, ptutils, plus the config's `imports:`). The
module path is checked against the allowlist before anything is imported.
"""

from __future__ import annotations

import difflib
import functools
import importlib
import importlib.util
import inspect
import keyword
import sys
import threading
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ptutils.errors import ConfigError, RegistryError

DEFAULT_PREFIXES: tuple[str, ...] = ("torch.nn", "torch.optim", "ptutils")
"""Module prefixes allowed without registration (torch.optim covers lr_scheduler)."""

TORCH_NAMESPACES: tuple[str, ...] = ("torch.nn", "torch.optim", "torch.optim.lr_scheduler")
"""Namespaces whose public classes also resolve by their short name (`SGD`, `Linear`)."""

HOW_TO_ALLOW = (
    "To allow a type, register it with `@ptutils.register` (optionally "
    '`@ptutils.register(name="Alias")`) or list its module under `imports:` in the '
    "config (a module name like `mypkg.models` or a file like `./my_modules.py`)."
)


def _under(module: str, prefixes: Iterable[str]) -> bool:
    """Whether `module` is one of `prefixes` or a submodule of one."""
    return any(module == p or module.startswith(p + ".") for p in prefixes)


def _full_name(obj: Any) -> str:
    return f"{obj.__module__}.{obj.__qualname__}"


def _is_dotted_identifier(name: str) -> bool:
    return bool(name) and all(
        p.isidentifier() and not keyword.iskeyword(p) for p in name.split(".")
    )


@functools.cache
def _torch_classes() -> tuple[tuple[str, type], ...]:
    """Public classes of the torch namespaces, as (`namespace.Name`, class), scanned once."""
    found: list[tuple[str, type]] = []
    for namespace in TORCH_NAMESPACES:
        module = importlib.import_module(namespace)
        for attr in sorted(dir(module)):
            obj = getattr(module, attr, None)
            if (
                not attr.startswith("_")
                and isinstance(obj, type)
                and _under(obj.__module__, DEFAULT_PREFIXES)
            ):
                found.append((f"{namespace}.{attr}", obj))
    return tuple(found)


def _nearest(name: str, known: list[str]) -> list[str]:
    """Up to five known names closest to `name`: whole names first, then by last part."""
    pool = known if "." in name else [k for k in known if "." not in k]
    near = difflib.get_close_matches(name, pool, n=5, cutoff=0.8 if "." in name else 0.6)
    if near or "." not in name:
        return near
    by_tail: dict[str, list[str]] = {}
    for k in known:
        by_tail.setdefault(k.rsplit(".", 1)[-1], []).append(k)
    tails = difflib.get_close_matches(name.rsplit(".", 1)[1], list(by_tail), n=3, cutoff=0.75)
    return [k for t in tails for k in by_tail[t]][:5]


@dataclass
class _State:
    """What a Registry holds; copied whole to snapshot and restore."""

    prefixes: list[str] = field(default_factory=lambda: list(DEFAULT_PREFIXES))
    by_name: dict[str, Any] = field(default_factory=dict)
    aliases: dict[str, str] = field(default_factory=dict)
    loaded_files: dict[str, Path] = field(default_factory=dict)

    def copy(self) -> _State:
        return _State(
            list(self.prefixes), dict(self.by_name), dict(self.aliases), dict(self.loaded_files)
        )


def _library_entries(current: _State, base: _State) -> _State:
    """`base` plus the registrations and aliases of ptutils' own objects in `current`."""
    out = base.copy()
    for full, obj in current.by_name.items():
        if _under(obj.__module__, ["ptutils"]):
            out.by_name.setdefault(full, obj)
    for alias, full in current.aliases.items():
        if full in out.by_name and _under(out.by_name[full].__module__, ["ptutils"]):
            out.aliases.setdefault(alias, full)
    return out


class Registry:
    """The allowlist: allowed module prefixes, registered objects and their aliases."""

    def __init__(self) -> None:
        self._state = _State()
        self._lock = threading.RLock()

    # --- adding to the allowlist -----------------------------------------------------
    def register(self, obj: Any = None, *, name: str | None = None) -> Any:
        """Allow a class (or function) under `module.QualName`, its short name and `name`.

        Usable as `@register` or `@register(name="MyNet")`. An explicit alias already
        bound to a different object is an error: configs using it would change meaning.
        """
        if obj is None:
            return lambda target: self.register(target, name=name)
        if not (isinstance(obj, type) or inspect.isfunction(obj)):
            raise RegistryError(f"register() takes a class or a function, got {obj!r}")
        if name is not None and not _is_dotted_identifier(name):
            raise RegistryError(f"register(name={name!r}): an alias must be a (dotted) identifier")
        full = _full_name(obj)
        with self._lock:
            bound = self._state.aliases.get(name) if name else None
            if bound is not None and bound != full:
                raise RegistryError(
                    f"register(name={name!r}) for {full}: the alias is already bound to {bound}"
                )
            self._state.by_name[full] = obj
            if name:
                self._state.aliases[name] = full
        return obj

    def allow_imports(
        self, modules: Iterable[str] | str, *, base_dir: str | Path | None = None
    ) -> list[str]:
        """Import the config's `imports:` entries and allow their modules; return their names.

        An entry is a module name (`mypkg.models`) or a path to a `.py` file, relative to
        `base_dir` (the config file's folder; the current directory when None).
        """
        entries = [modules] if isinstance(modules, str) else list(modules)
        names = []
        for entry in entries:
            if not isinstance(entry, str) or not entry.strip():
                raise ConfigError(
                    f"imports: each entry must be a module name or a .py path, got {entry!r}"
                )
            if entry.endswith(".py") or "/" in entry or "\\" in entry:
                name = self._import_file(entry, base_dir)
            else:
                name = self._import_module(entry)
            with self._lock:
                if name not in self._state.prefixes:
                    self._state.prefixes.append(name)
            names.append(name)
        return names

    def _import_module(self, entry: str) -> str:
        if not _is_dotted_identifier(entry):
            raise ConfigError(
                f"imports: {entry!r} is neither a module name nor a path to a .py file"
            )
        top = entry.split(".")[0]
        if top in sys.stdlib_module_names or top == "builtins":
            raise ConfigError(
                f"imports: {entry!r} is part of the Python standard library; `imports:` is for "
                "your own code (a module name like `mypkg.models` or a file like `./my_modules.py`)"
            )
        try:
            importlib.import_module(entry)
        except ModuleNotFoundError as exc:
            raise ConfigError(
                f"imports: cannot import module {entry!r} ({exc}); searched sys.path: "
                f"{', '.join(p or '.' for p in sys.path)}. Install the package, or give a path "
                "to a .py file (e.g. `./my_modules.py`)"
            ) from exc
        except Exception as exc:
            raise ConfigError(f"imports: importing module {entry!r} failed: {exc!r}") from exc
        return entry

    def _import_file(self, entry: str, base_dir: str | Path | None) -> str:
        path = Path(entry).expanduser()
        if not path.is_absolute():
            path = Path(base_dir if base_dir is not None else Path.cwd()) / path
        path = path.resolve()
        if path.suffix != ".py" or not path.is_file():
            raise ConfigError(f"imports: {entry!r}: no such Python file (tried {path})")
        name = path.stem
        if not _is_dotted_identifier(name) or "." in name:
            raise ConfigError(
                f"imports: {entry!r}: {name!r} is not a valid module name; rename {path}"
            )
        with self._lock:
            if self._state.loaded_files.get(name) == path and name in sys.modules:
                return name
            self._check_free_name(name, path, entry)
            self._exec_file(name, path, entry)
            self._state.loaded_files[name] = path
        return name

    @staticmethod
    def _check_free_name(name: str, path: Path, entry: str) -> None:
        """Refuse a file whose module name would shadow another module."""
        existing = sys.modules.get(name)
        origin = getattr(existing, "__file__", None) if existing else None
        if existing is None:
            spec = importlib.util.find_spec(name)
            origin = spec.origin if spec else None
            if spec is None:
                return
        if origin is None or Path(origin).resolve() != path:
            raise ConfigError(
                f"imports: {entry!r} ({path}) would be module {name!r}, which is already "
                f"{origin or 'a built-in module'}; rename the file"
            )

    @staticmethod
    def _exec_file(name: str, path: Path, entry: str) -> None:
        spec = importlib.util.spec_from_file_location(name, path)
        if spec is None or spec.loader is None:
            raise ConfigError(f"imports: {entry!r}: cannot load {path}")
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        try:
            spec.loader.exec_module(module)
        except BaseException as exc:
            del sys.modules[name]
            if not isinstance(exc, Exception):
                raise
            raise ConfigError(f"imports: importing {entry!r} ({path}) failed: {exc!r}") from exc

    # --- resolving -------------------------------------------------------------------
    def resolve(self, name: str, *, where: str = "type") -> type | Callable[..., Any]:
        """The class (or registered function) that the config name `name` stands for.

        `where` says where the name was found (e.g. `model.optimizer.type`) for the error.
        """
        if not isinstance(name, str) or not name:
            raise self._refuse(repr(name), where, "a type name must be a non-empty string")
        with self._lock:
            state = self._state.copy()
        if name in state.by_name:
            return state.by_name[name]
        if name in state.aliases:
            return state.by_name[state.aliases[name]]
        if not _is_dotted_identifier(name):
            raise self._refuse(name, where, "it is not a dotted Python name")
        if any(part.startswith("_") for part in name.split(".")):
            raise self._refuse(
                name, where, "private names (with a leading underscore) are never allowed"
            )
        if "." not in name:
            return self._resolve_short(name, where, state)
        return self._resolve_dotted(name, where, state)

    def _resolve_short(self, name: str, where: str, state: _State) -> type | Callable[..., Any]:
        matches = {id(obj): (full, obj) for full, obj in self._short_names(state).get(name, [])}
        if len(matches) > 1:
            choices = ", ".join(sorted(full for full, _ in matches.values()))
            raise self._refuse(name, where, f"the short name is ambiguous; write one of: {choices}")
        if not matches:
            reason = "no registered class nor torch.nn / torch.optim class has this name"
            raise self._refuse(name, where, reason)
        return next(iter(matches.values()))[1]

    def _resolve_dotted(self, name: str, where: str, state: _State) -> type | Callable[..., Any]:
        parts = name.split(".")
        module, rest = self._import_allowed(name, parts, where, state)
        obj: Any = module
        for i, attr in enumerate(rest):
            try:
                obj = getattr(obj, attr)
            except AttributeError:
                owner = ".".join(parts[: len(parts) - len(rest) + i])
                raise self._refuse(
                    name, where, f"{owner} has no public attribute {attr!r}"
                ) from None
            if i < len(rest) - 1 and not isinstance(obj, type):
                inner = ".".join(parts[: len(parts) - len(rest) + i + 1])
                raise self._refuse(name, where, f"{inner} is a {type(obj).__name__}, not a class")
        registered = any(obj is r for r in state.by_name.values())
        if not registered and not isinstance(obj, type):
            raise self._refuse(name, where, f"it is a {type(obj).__name__}, not a class")
        owner_module = getattr(obj, "__module__", None) or "?"
        if not registered and not _under(owner_module, state.prefixes):
            raise self._refuse(
                name, where, f"it is defined in module {owner_module}, outside the allowlist"
            )
        return obj

    def _import_allowed(
        self, name: str, parts: list[str], where: str, state: _State
    ) -> tuple[Any, list[str]]:
        """The longest allowed module prefix of `parts`, imported; never imports one outside."""
        for cut in range(len(parts) - 1, 0, -1):
            module_name = ".".join(parts[:cut])
            if not _under(module_name, state.prefixes):
                continue
            module = sys.modules.get(module_name)
            if module is None:
                try:
                    module = importlib.import_module(module_name)
                except ModuleNotFoundError as exc:
                    if exc.name and _under(module_name, [exc.name]):
                        continue  # no such submodule: the rest is an attribute path
                    raise self._refuse(
                        name, where, f"importing {module_name} failed: {exc}"
                    ) from exc
                except Exception as exc:
                    raise self._refuse(
                        name, where, f"importing {module_name} failed: {exc!r}"
                    ) from exc
            return module, parts[cut:]
        raise self._refuse(name, where, f"module {'.'.join(parts[:-1])} is not in the allowlist")

    # --- listing and errors ----------------------------------------------------------
    def _short_names(self, state: _State) -> dict[str, list[tuple[str, Any]]]:
        table: dict[str, list[tuple[str, Any]]] = {}
        for full, obj in _torch_classes():
            table.setdefault(full.rsplit(".", 1)[1], []).append((full, obj))
        for full, obj in state.by_name.items():
            if isinstance(obj, type):
                table.setdefault(obj.__name__, []).append((full, obj))
        return table

    def known_types(self) -> list[str]:
        """Every name that resolves: torch classes, registered names and aliases, and the
        public classes of allowed modules already imported (ptutils, `imports:`)."""
        with self._lock:
            state = self._state.copy()
        names = {full for full, _ in _torch_classes()}
        names.update(state.by_name, state.aliases)
        names.update(n for n, objs in self._short_names(state).items() if len(objs) == 1)
        for module_name, module in list(sys.modules.items()):
            if (
                module is not None
                and _under(module_name, state.prefixes)
                and not _under(module_name, TORCH_NAMESPACES)
            ):
                names.update(self._public_classes(module_name, module, state))
        return sorted(n for n in names if "<" not in n)

    @staticmethod
    def _public_classes(module_name: str, module: Any, state: _State) -> Iterator[str]:
        if any(part.startswith("_") for part in module_name.split(".")):
            return
        for attr, obj in list(vars(module).items()):
            public = not attr.startswith("_") and isinstance(obj, type)
            if (
                public
                and not issubclass(obj, BaseException)
                and _under(obj.__module__, state.prefixes)
            ):
                yield f"{module_name}.{attr}"

    def prefixes(self) -> list[str]:
        """The allowed module prefixes, defaults first."""
        with self._lock:
            return list(self._state.prefixes)

    def _refuse(self, name: str, where: str, reason: str) -> RegistryError:
        """One error that says what, where, what is allowed, what was meant, and how to fix."""
        lines = [
            f"type {name!r} at `{where}` is not allowed: {reason}.",
            f"  Allowed modules: {', '.join(self.prefixes())}.",
        ]
        near = _nearest(name, self.known_types())
        if near:
            lines.append(f"  Did you mean: {', '.join(near)}?")
        lines.append(f"  {HOW_TO_ALLOW}")
        return RegistryError("\n".join(lines))

    # --- isolation for tests ---------------------------------------------------------
    def reset(self) -> None:
        """Back to the defaults, keeping registrations made by ptutils itself.

        Modules loaded from files by `allow_imports` are dropped from `sys.modules`.
        """
        with self._lock:
            self._unload_files(self._state.loaded_files)
            self._state = _library_entries(self._state, _State())

    @contextmanager
    def isolated(self) -> Iterator[Registry]:
        """Undo, on exit, everything registered or allowed inside the block.

        Registrations made by ptutils' own modules (imported for the first time inside
        the block) are kept: those modules will not run their decorators again.
        """
        with self._lock:
            saved = self._state.copy()
        try:
            yield self
        finally:
            with self._lock:
                added = {
                    k: v
                    for k, v in self._state.loaded_files.items()
                    if saved.loaded_files.get(k) != v
                }
                self._unload_files(added)
                self._state = _library_entries(self._state, saved)

    @staticmethod
    def _unload_files(loaded: dict[str, Path]) -> None:
        for name, path in loaded.items():
            module = sys.modules.get(name)
            if module is not None and Path(getattr(module, "__file__", "") or "").resolve() == path:
                del sys.modules[name]


default_registry = Registry()
"""The process-wide registry that `@ptutils.register` and config building use."""

register = default_registry.register
resolve = default_registry.resolve
allow_imports = default_registry.allow_imports
known_types = default_registry.known_types
reset = default_registry.reset
isolated = default_registry.isolated
