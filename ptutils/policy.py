"""The operator's code policy: which code a config may make this machine load.

A config is data written by whoever submits it; the code it names runs on machines
run by someone else. So what may be loaded is decided on the machine, by its operator:

- torch.nn, torch.optim (with lr_scheduler) and ptutils' component modules, always;
- when torchvision is installed: its transforms (`torchvision.transforms`, with `.v2`)
  and its local-file datasets `ImageFolder` and `DatasetFolder` (not the ones that
  download);
- modules declared by installed packages under the `ptutils.modules` entry point
  group (installing the package is the consent): a value `mylab.models` allows that
  module and its submodules, `mylab.models:ResNet` allows that one class;
- modules the operator names: `--allow-imports mylab.models,other` on `ptutils
  worker` / `run` / `submit`, or $PTUTILS_ALLOW_IMPORTS;
- the user's own `.py` files that travel with a session, on a worker only when its
  operator opted in (`--trust-session-code`, $PTUTILS_TRUST_SESSION_CODE=1).
  `ptutils run` and `submit` load the files they read from their own disk.

The Python standard library can never be allowed.
"""

from __future__ import annotations

import functools
import importlib.util
import keyword
import logging
import os
import sys
import threading
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from ptutils.errors import ConfigError

log = logging.getLogger("ptutils.policy")

ENTRY_POINT_GROUP = "ptutils.modules"
"""Entry point group under which an installed package declares its Module classes."""

ALLOW_ENV = "PTUTILS_ALLOW_IMPORTS"
"""Comma-separated modules the operator allows (as `--allow-imports`)."""

TRUST_ENV = "PTUTILS_TRUST_SESSION_CODE"
"""`1`: this machine loads the .py files stored with a session (as `--trust-session-code`)."""

ALLOW_FLAG = "--allow-imports"
TRUST_FLAG = "--trust-session-code"

_TRUE = ("1", "true", "yes", "on")
_FALSE = ("", "0", "false", "no", "off")


def is_dotted_identifier(name: str) -> bool:
    """`a.b.c` where every part is a Python identifier and no keyword."""
    return bool(name) and all(
        p.isidentifier() and not keyword.iskeyword(p) for p in name.split(".")
    )


def is_stdlib(name: str) -> bool:
    """Whether the top-level package of `name` belongs to the Python standard library."""
    top = name.split(".")[0]
    return top in sys.stdlib_module_names or top == "builtins"


def parse_allow(value: str | Iterable[str] | None, source: str = ALLOW_FLAG) -> tuple[str, ...]:
    """The module names of an `--allow-imports` value; ConfigError naming `source`."""
    if value is None:
        return ()
    parts = value.split(",") if isinstance(value, str) else list(value)
    names: list[str] = []
    for raw in parts:
        name = str(raw).strip()
        if not name:
            continue
        if not is_dotted_identifier(name):
            raise ConfigError(
                f"{source}: {name!r} is not a module name; expected comma-separated dotted "
                "names like mylab.models,other"
            )
        if is_stdlib(name):
            raise ConfigError(
                f"{source}: {name!r} is part of the Python standard library, which configs may "
                "never load; allow the module that holds your classes (e.g. mylab.models)"
            )
        if name not in names:
            names.append(name)
    return tuple(names)


def parse_trust(value: str | None, source: str = f"${TRUST_ENV}") -> bool:
    """`1`/`true`/`yes`/`on` -> True; empty, `0`/`false`/`no`/`off` -> False."""
    text = (value or "").strip().lower()
    if text in _TRUE:
        return True
    if text in _FALSE:
        return False
    raise ConfigError(f"{source}={value!r}: expected 1 (trust session code) or 0")


OPTIONAL_MODULES: dict[str, tuple[str, ...]] = {"torchvision": ("torchvision.transforms",)}
"""Modules of optional libraries allowed whenever the library is installed."""

OPTIONAL_CLASSES: dict[str, tuple[tuple[str, str], ...]] = {
    "torchvision": (("torchvision.datasets", "ImageFolder"), ("torchvision.datasets", "DatasetFolder")),
}
"""(module, class) of optional libraries allowed whenever the library is installed."""


def _installed(package: str) -> bool:
    """Whether a top-level package can be imported (found without importing it)."""
    try:
        return importlib.util.find_spec(package) is not None
    except (ImportError, ValueError):
        return False


@dataclass(frozen=True)
class Declared:
    """What installed packages declare under the `ptutils.modules` entry point group."""

    modules: tuple[str, ...] = ()
    classes: tuple[tuple[str, str, str], ...] = ()
    """(dotted name `module.Attr`, module, attribute path) of each declared class."""


@functools.lru_cache(maxsize=8)
def _declared(path_key: tuple[str, ...]) -> Declared:
    modules: list[str] = []
    classes: list[tuple[str, str, str]] = []
    for package, names in OPTIONAL_MODULES.items():
        if _installed(package):
            modules.extend(names)
            classes.extend((f"{m}.{a}", m, a) for m, a in OPTIONAL_CLASSES.get(package, ()))
    import importlib.metadata  # here: `ptutils status` never reads entry points (~35 ms)

    for ep in importlib.metadata.entry_points(group=ENTRY_POINT_GROUP):
        module, attr = (ep.module or "").strip(), (ep.attr or "").strip()
        if not is_dotted_identifier(module) or (attr and not is_dotted_identifier(attr)):
            log.warning("entry point %s = %s: not `module` or `module:Class`; ignored",
                        ep.name, ep.value)
        elif is_stdlib(module):
            log.warning("entry point %s = %s names the standard library; ignored",
                        ep.name, ep.value)
        elif attr:
            classes.append((f"{module}.{attr}", module, attr))
        elif module not in modules:
            modules.append(module)
    return Declared(tuple(modules), tuple(classes))


def declared() -> Declared:
    """The entry points of the packages importable now (read from metadata, nothing runs),
    and the allowed parts of optional libraries installed (OPTIONAL_MODULES, _CLASSES)."""
    return _declared(tuple(sys.path))


@dataclass(frozen=True)
class Policy:
    """What this machine's operator allows beyond the library (see the module docstring)."""

    allow: tuple[str, ...] = ()
    trust_session_code: bool = False

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> Policy:
        """The policy of $PTUTILS_ALLOW_IMPORTS and $PTUTILS_TRUST_SESSION_CODE."""
        env = os.environ if environ is None else environ
        return cls(
            parse_allow(env.get(ALLOW_ENV), f"${ALLOW_ENV}"),
            parse_trust(env.get(TRUST_ENV)),
        )

    def describe(self) -> str:
        """One line for a worker's log."""
        allowed = ", ".join(self.allow) or "none"
        code = "trusted" if self.trust_session_code else f"refused (no {TRUST_FLAG})"
        return f"--allow-imports: {allowed}; session code: {code}"


_current: Policy | None = None
_lock = threading.Lock()


def current() -> Policy:
    """This process's policy: the one `configure`d, else read from the environment."""
    global _current
    with _lock:
        if _current is None:
            _current = Policy.from_env()
        return _current


def configure(policy: Policy | None) -> Policy | None:
    """Set this process's policy (None: read the environment again); the previous one."""
    global _current
    with _lock:
        previous, _current = _current, policy
    return previous
