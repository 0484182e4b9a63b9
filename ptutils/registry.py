"""The type registry: config `type:` names resolve only through an allowlist.

A configuration is data, and data must never make a worker import or call something
that its operator did not allow (ptutils.policy). A name resolves when it is registered
(`@register`), when it is the short name of a torch.nn / torch.optim / lr_scheduler
class or of a registered class, or when it is a dotted path to a public class of an
allowed module: torch.nn, torch.optim, ptutils' component modules, modules declared
under the `ptutils.modules` entry point group, modules the operator allows
(`--allow-imports`), and the session's own `.py` files (ptutils.sources). A module
path is checked against the allowlist before anything is imported.

Building a session happens inside `session_scope()`: the session's files are loaded
there as modules of their own, and their registrations and modules are dropped on
exit, so the next session on the same worker never sees them.
"""

from __future__ import annotations

import difflib
import functools
import importlib
import inspect
import sys
import threading
import types
from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ptutils import policy as policies
from ptutils.errors import ConfigError, RegistryError
from ptutils.policy import ALLOW_ENV, ALLOW_FLAG, TRUST_ENV, TRUST_FLAG, Policy, is_stdlib
from ptutils.policy import is_dotted_identifier as _is_dotted_identifier
from ptutils.sources import SourceFile, is_reference, local, looks_like_path

LIBRARY_MODULES: tuple[str, ...] = (
    "torch.nn",
    "torch.optim",
    "ptutils.nets",
    "ptutils.data",
    "ptutils.callbacks",
    "ptutils.model",
)
"""Modules whose public classes are always allowed (torch.optim covers lr_scheduler).
Only ptutils' component modules: its store, engine and runner can write files."""

TORCH_NAMESPACES: tuple[str, ...] = ("torch.nn", "torch.optim", "torch.optim.lr_scheduler")
"""Namespaces whose public classes also resolve by their short name (`SGD`, `Linear`)."""

HOW_TO_ALLOW = (
    "To allow a type: list your own .py file under `imports:` (e.g. `./my_modules.py`; it "
    f"travels with the session, and workers load it when started with `{TRUST_FLAG}`); "
    "or declare the module of an installed package under the `ptutils.modules` entry point "
    f"group; or have the operator allow it with `{ALLOW_FLAG} MODULE` (or ${ALLOW_ENV}). "
    "`@ptutils.register` (optionally with name=) gives a class of such a module a short "
    "name or an alias."
)


def _under(module: str, prefixes: Iterable[str]) -> bool:
    """Whether `module` is one of `prefixes` or a submodule of one."""
    return any(module == p or module.startswith(p + ".") for p in prefixes)


def _full_name(obj: Any) -> str:
    return f"{obj.__module__}.{obj.__qualname__}"


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
                and _under(obj.__module__, TORCH_NAMESPACES)
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


@dataclass(frozen=True)
class _Code:
    """A session file loaded as a module."""

    source: SourceFile
    module: types.ModuleType


@dataclass(eq=False)
class _State:
    """What a Registry holds in one scope.

    A session scope (`session`) keeps the registrations of its session files to itself
    and passes every other registration up to its parent: a module imported by name
    runs its decorators once per process, so they must outlive the session.
    """

    by_name: dict[str, Any] = field(default_factory=dict)
    aliases: dict[str, str] = field(default_factory=dict)
    code: dict[str, _Code] = field(default_factory=dict)
    session: bool = False
    parent: _State | None = None

    def child(self, *, session: bool) -> _State:
        return _State(dict(self.by_name), dict(self.aliases), dict(self.code), session, self)

    def snapshot(self) -> _State:
        return _State(dict(self.by_name), dict(self.aliases), dict(self.code))


def _code_module_names(state: _State) -> dict[str, _Code]:
    """Session code by its config name and by the name it runs under."""
    table = dict(state.code)
    table.update({c.module.__name__: c for c in state.code.values()})
    return table


class Registry:
    """The allowlist: registered objects and aliases, session code, and the policy's modules."""

    def __init__(self) -> None:
        self._base = _State()
        self._scope: ContextVar[_State | None] = ContextVar(f"registry-{id(self)}", default=None)
        self._lock = threading.RLock()
        self._loading: set[str] = set()

    def _current(self) -> _State:
        return self._scope.get() or self._base

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
            targets = self._targets(obj)
            for state in targets:
                bound = state.aliases.get(name) if name else None
                if bound is not None and bound != full:
                    raise RegistryError(
                        f"register(name={name!r}) for {full}: the alias is already bound to {bound}"
                    )
            for state in targets:
                state.by_name[full] = obj
                if name:
                    state.aliases[name] = full
        return obj

    def _targets(self, obj: Any) -> list[_State]:
        """The scopes a registration of `obj` goes to (see _State)."""
        state = self._current()
        targets = [state]
        owner = getattr(obj, "__module__", "") or ""
        if owner not in self._loading and owner not in _code_module_names(state):
            while state.session and state.parent is not None:
                state = state.parent
                targets.append(state)
        if _under(owner, ["ptutils"]) and self._base not in targets:
            targets.append(self._base)  # ptutils' own modules register once per process
        return targets

    def allow_imports(
        self,
        modules: Iterable[Any] | str,
        *,
        base_dir: str | Path | None = None,
        code: Iterable[Mapping[str, Any]] | None = None,
        policy: Policy | None = None,
        from_disk: bool = True,
    ) -> list[str]:
        """Load a config's `imports:` entries under the operator's policy; their names.

        An entry is a module name (`mylab.models`: imported if the policy allows it), a
        path to a `.py` file (relative to `base_dir`, else the current directory: read
        from this machine's disk), or a stored reference `{module, sha256}` whose source
        is this process's own read of the file or, if the policy trusts session code,
        the matching entry of `code` (the session document's `code`). A stored config
        is built with `from_disk=False`: a path in it is refused, never read.
        """
        entries = [modules] if isinstance(modules, str | Mapping) else list(modules)
        pol = policy or policies.current()
        shipped = _shipped(code)
        names: list[str] = []
        seen: dict[str, str] = {}
        for entry in entries:
            if is_reference(entry):
                found = _stored_source(entry, shipped, pol)
            elif not isinstance(entry, str) or not entry.strip():
                raise ConfigError(
                    f"imports: each entry must be a module name or a .py path, got {entry!r}"
                )
            elif looks_like_path(entry):
                if not from_disk:
                    raise ConfigError(
                        f"imports: {entry!r} is a path, and a stored config never makes a "
                        "machine load a file from its own disk: `ptutils submit` and `ptutils "
                        "run` store the file with the session and name it by content "
                        "({module, sha256}); submit the config with them"
                    )
                found = SourceFile.read(entry, base_dir)
            else:
                names.append(self._import_module(entry, pol))
                continue
            if seen.setdefault(found.name, found.sha256) != found.sha256:
                raise ConfigError(
                    f"imports: two different files are named {found.name}.py; rename one"
                )
            names.append(self._load(found))
        return names

    def _load(self, found: SourceFile) -> str:
        """Run a session file as a module of this scope (once per content)."""
        with self._lock:
            state = self._current()
            loaded = state.code.get(found.name)
            if loaded is not None and loaded.source.sha256 == found.sha256:
                return found.name
            self._loading.add(found.module_name)
            try:
                module = found.load()
            finally:
                self._loading.discard(found.module_name)
            if loaded is not None and state.parent is None:
                _unload([loaded])  # an edited file, loaded again outside any scope
            state.code[found.name] = _Code(found, module)
        return found.name

    def _import_module(self, entry: str, pol: Policy) -> str:
        if not _is_dotted_identifier(entry):
            raise ConfigError(
                f"imports: {entry!r} is neither a module name nor a path to a .py file"
            )
        if is_stdlib(entry):
            raise ConfigError(
                f"imports: {entry!r} is part of the Python standard library; `imports:` is for "
                "your own code (a module name like `mypkg.models` or a file like `./my_modules.py`)"
            )
        if not self._module_allowed(entry, pol):
            raise ConfigError(
                f"imports: module {entry!r} is not allowed on this machine. Its operator allows "
                f"it with `{ALLOW_FLAG} {entry}` (on `ptutils worker`, `run` and `submit`) or "
                f"{ALLOW_ENV}={entry}; a package allows its own modules by declaring them under "
                "the `ptutils.modules` entry point group; your own file can be listed by its "
                "path (`./file.py`) instead"
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

    def _module_allowed(self, module: str, pol: Policy) -> bool:
        declared = policies.declared()
        return _under(module, allowed_modules(pol)) or any(
            module == owner for _, owner, _ in declared.classes
        )

    # --- resolving -------------------------------------------------------------------
    def resolve(self, name: str, *, where: str = "type") -> type | Callable[..., Any]:
        """The class (or registered function) that the config name `name` stands for.

        `where` says where the name was found (e.g. `model.optimizer.type`) for the error.
        """
        if not isinstance(name, str) or not name:
            raise self._refuse(repr(name), where, "a type name must be a non-empty string")
        with self._lock:
            state = self._current().snapshot()
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
        return self._resolve_dotted(name, where, state, policies.current())

    def _resolve_short(self, name: str, where: str, state: _State) -> type | Callable[..., Any]:
        matches = {id(obj): (full, obj) for full, obj in self._short_names(state).get(name, [])}
        if len(matches) > 1:
            choices = ", ".join(sorted(full for full, _ in matches.values()))
            raise self._refuse(name, where, f"the short name is ambiguous; write one of: {choices}")
        if not matches:
            reason = "no registered class nor torch.nn / torch.optim class has this name"
            raise self._refuse(name, where, reason)
        return next(iter(matches.values()))[1]

    def _resolve_dotted(
        self, name: str, where: str, state: _State, pol: Policy
    ) -> type | Callable[..., Any]:
        parts = name.split(".")
        code = _code_module_names(state)
        prefixes = allowed_modules(pol)
        declared = {full: (module, attr) for full, module, attr in policies.declared().classes}
        if parts[0] in code:
            module: Any = code[parts[0]].module
            rest = parts[1:]
        elif name in declared:
            return self._declared_class(name, where, *declared[name])
        else:
            module, rest = self._import_allowed(name, parts, where, prefixes)
        obj = self._walk(name, parts, module, rest, where)
        registered = any(obj is r for r in state.by_name.values())
        if not registered and not isinstance(obj, type):
            raise self._refuse(name, where, f"it is a {type(obj).__name__}, not a class")
        owner = getattr(obj, "__module__", None) or "?"
        if not registered and not _under(owner, prefixes) and owner not in code:
            raise self._refuse(
                name, where, f"it is defined in module {owner}, outside the allowlist"
            )
        return obj

    def _walk(self, name: str, parts: list[str], module: Any, rest: list[str], where: str) -> Any:
        """Follow the attribute path `rest` from `module`: only classes on the way."""
        obj = module
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
        return obj

    def _declared_class(self, name: str, where: str, module_name: str, attr: str) -> type:
        """A class a package declared by itself (`module:Class` entry point)."""
        try:
            module = importlib.import_module(module_name)
        except Exception as exc:
            raise self._refuse(name, where, f"importing {module_name} failed: {exc!r}") from exc
        parts = name.split(".")
        obj = self._walk(name, parts, module, attr.split("."), where)
        if not isinstance(obj, type):
            raise self._refuse(name, where, f"it is a {type(obj).__name__}, not a class")
        return obj

    def _import_allowed(
        self, name: str, parts: list[str], where: str, prefixes: tuple[str, ...]
    ) -> tuple[Any, list[str]]:
        """The longest allowed module prefix of `parts`, imported; never imports one outside."""
        for cut in range(len(parts) - 1, 0, -1):
            module_name = ".".join(parts[:cut])
            if not _under(module_name, prefixes):
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
        public classes of allowed modules already imported and of the session's files."""
        with self._lock:
            state = self._current().snapshot()
        prefixes = allowed_modules(policies.current())
        names = {full for full, _ in _torch_classes()}
        names.update(state.by_name, state.aliases)
        names.update(n for n, objs in self._short_names(state).items() if len(objs) == 1)
        names.update(full for full, _, _ in policies.declared().classes)
        for module_name, module in list(sys.modules.items()):
            if (
                module is not None
                and _under(module_name, prefixes)
                and not _under(module_name, TORCH_NAMESPACES)
            ):
                names.update(_public_classes(module_name, module, prefixes))
        for plain, loaded in state.code.items():
            names.update(_public_classes(plain, loaded.module, [loaded.module.__name__]))
        return sorted(n for n in names if "<" not in n)

    def prefixes(self) -> list[str]:
        """The allowed modules: the library's, the policy's, the declared, the session's."""
        with self._lock:
            code = list(self._current().code)
        return [*allowed_modules(policies.current()), *code]

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

    # --- scopes ----------------------------------------------------------------------
    @contextmanager
    def session_scope(self) -> Iterator[Registry]:
        """Build one session: its files and their registrations are dropped on exit."""
        with self._scoped(session=True):
            yield self

    @contextmanager
    def isolated(self) -> Iterator[Registry]:
        """Undo, on exit, everything registered or loaded inside the block (for tests).

        Registrations made by ptutils' own modules (imported for the first time inside
        the block) are kept: those modules will not run their decorators again.
        """
        with self._scoped(session=False):
            yield self

    @contextmanager
    def _scoped(self, *, session: bool) -> Iterator[None]:
        with self._lock:
            parent = self._current()
            state = parent.child(session=session)
        token = self._scope.set(state)
        try:
            yield
        finally:
            self._scope.reset(token)
            with self._lock:
                _unload(c for n, c in state.code.items() if parent.code.get(n) is not c)

    def reset(self) -> None:
        """Back to the defaults in the current scope, keeping ptutils' own registrations.

        Session files loaded in it are dropped from `sys.modules`.
        """
        with self._lock:
            state = self._current()
            _unload(state.code.values())
            state.code.clear()
            state.by_name = {
                full: obj
                for full, obj in state.by_name.items()
                if _under(obj.__module__, ["ptutils"])
            }
            state.aliases = {a: f for a, f in state.aliases.items() if f in state.by_name}


def allowed_modules(pol: Policy) -> tuple[str, ...]:
    """The module prefixes whose classes `pol` allows: library, declared, operator's."""
    out = [*LIBRARY_MODULES, *policies.declared().modules, *pol.allow]
    return tuple(dict.fromkeys(out))


def _public_classes(module_name: str, module: Any, owners: Iterable[str]) -> Iterator[str]:
    if any(part.startswith("_") for part in module_name.split(".")):
        return
    for attr, obj in list(vars(module).items()):
        public = not attr.startswith("_") and isinstance(obj, type)
        if public and not issubclass(obj, BaseException) and _under(obj.__module__, owners):
            yield f"{module_name}.{attr}"


def _shipped(code: Iterable[Mapping[str, Any]] | None) -> dict[str, Mapping[str, Any]]:
    """The session's stored sources by sha256."""
    if code is None:
        return {}
    if not isinstance(code, list | tuple):
        raise ConfigError("the session's `code` must be a list of {name, sha256, source}")
    return {str(doc.get("sha256")): doc for doc in code if isinstance(doc, Mapping)}


def _stored_source(
    ref: Mapping[str, Any], shipped: Mapping[str, Mapping[str, Any]], pol: Policy
) -> SourceFile:
    """The source a stored reference names: read here, or stored and trusted."""
    name, digest = str(ref["module"]), str(ref["sha256"])
    found = local(digest)
    if found is not None:
        return found
    if not pol.trust_session_code:
        raise ConfigError(
            f"imports: {name}.py is session code (stored with the session, sha256 "
            f"{digest[:16]}) and this machine does not run session code. Its operator allows "
            f"it by starting the worker with `ptutils worker {TRUST_FLAG}` (or {TRUST_ENV}=1); "
            "or install the code as a package on the workers and allow its module with "
            f"`{ALLOW_FLAG}` or a `ptutils.modules` entry point"
        )
    doc = shipped.get(digest)
    if doc is None:
        raise ConfigError(
            f"imports: {name}.py (sha256 {digest[:16]}) is not stored with the session (its "
            "`code` lacks it); submit the session again with `ptutils submit`"
        )
    found = SourceFile.from_doc(doc)
    if found.name != name:
        raise ConfigError(
            f"imports: the stored source with sha256 {digest[:16]} is {found.name}.py, "
            f"not {name}.py; submit the session again"
        )
    return found


def _unload(loaded: Iterable[_Code]) -> None:
    for item in loaded:
        if sys.modules.get(item.module.__name__) is item.module:
            del sys.modules[item.module.__name__]


default_registry = Registry()
"""The process-wide registry that `@ptutils.register` and config building use."""

register = default_registry.register
resolve = default_registry.resolve
allow_imports = default_registry.allow_imports
known_types = default_registry.known_types
reset = default_registry.reset
isolated = default_registry.isolated
session_scope = default_registry.session_scope
