"""Session code: the user's own `.py` files that travel with a session.

`ptutils run` and `ptutils submit` read each `.py` file listed under `imports:` once
(`SourceFile.read`), and the config they store names it by module name and content
hash (`{module: my_modules, sha256: ...}`), never by a path. The sources are stored
with the session (the session document's `code` field), so a worker loads exactly
the code that was submitted, from the store, whatever its own disk holds, and an
edited file is a new hash, hence a new config hash.

Each load executes the source as a fresh module named `<name>_<hash prefix>`, so two
sessions' `my_modules.py` never meet; the registry drops it when the session is built.
Files this process read from its own disk are remembered by hash (`local`): loading
them needs no trust, while a worker loads stored sources only when its operator opted
in (ptutils.policy).
"""

from __future__ import annotations

import hashlib
import linecache
import sys
import threading
import types
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ptutils.errors import ConfigError
from ptutils.policy import is_stdlib

CODE_LIMIT_BYTES = 2 * 1024 * 1024
"""Most source a session may carry: more belongs in an installed package."""

RESERVED_NAMES = ("ptutils", "torch")
"""File names that would read like the library's own modules in `type:` names."""

REFERENCE_KEYS = frozenset({"module", "sha256"})


def looks_like_path(entry: str) -> bool:
    """An `imports:` entry that names a file rather than a module."""
    return entry.endswith(".py") or "/" in entry or "\\" in entry


def is_reference(entry: Any) -> bool:
    """An `imports:` entry of a stored config: `{module: NAME, sha256: HEX}`."""
    return isinstance(entry, Mapping) and set(entry) == REFERENCE_KEYS


def check_name(name: str, what: str) -> None:
    """Refuse a file name that is no module name or reads like another module."""
    if not name.isidentifier() or name in RESERVED_NAMES:
        raise ConfigError(f"imports: {what}: {name!r} is not a valid module name; rename the file")
    if is_stdlib(name):
        raise ConfigError(
            f"imports: {what} would be module {name!r}, a module of the Python standard "
            "library; rename the file"
        )


def sha256(source: str) -> str:
    return hashlib.sha256(source.encode("utf-8")).hexdigest()


@dataclass(frozen=True)
class SourceFile:
    """One `.py` file: its module name, content hash and text (and where it was read)."""

    name: str
    sha256: str
    source: str
    path: str | None = None

    @classmethod
    def read(cls, entry: str, base_dir: str | Path | None = None) -> SourceFile:
        """Read `entry` (relative to `base_dir`, else the current directory) and remember it."""
        path = Path(entry).expanduser()
        if not path.is_absolute():
            path = Path(base_dir if base_dir is not None else Path.cwd()) / path
        path = path.resolve()
        if path.suffix != ".py" or not path.is_file():
            raise ConfigError(f"imports: {entry!r}: no such Python file (tried {path})")
        check_name(path.stem, f"{entry!r} ({path})")
        try:
            text = path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            raise ConfigError(f"imports: {entry!r}: cannot read {path}: {exc}") from exc
        found = cls(path.stem, sha256(text), text, str(path))
        _remember(found)
        return found

    @classmethod
    def from_doc(cls, doc: Any) -> SourceFile:
        """A source stored with a session, its hash checked."""
        if not isinstance(doc, Mapping) or not {"name", "sha256", "source"} <= set(doc):
            raise ConfigError("the session's `code` holds an entry without name/sha256/source")
        name, digest, text = str(doc["name"]), str(doc["sha256"]), doc["source"]
        check_name(name, f"session code {name}.py")
        if not isinstance(text, str) or sha256(text) != digest:
            raise ConfigError(
                f"the stored source of {name}.py does not match its sha256 {digest[:12]}: "
                "the session document was altered; submit the session again"
            )
        return cls(name, digest, text)

    def reference(self) -> dict[str, str]:
        """What the stored config's `imports:` holds in place of the path."""
        return {"module": self.name, "sha256": self.sha256}

    def to_doc(self) -> dict[str, str]:
        """The entry of the session document's `code` list."""
        return {"name": self.name, "sha256": self.sha256, "source": self.source}

    @property
    def module_name(self) -> str:
        """The name it runs under: unique per content, so sessions never share it."""
        return f"{self.name}_{self.sha256[:16]}"

    @property
    def filename(self) -> str:
        """Where tracebacks say the code is."""
        return self.path or f"<session code {self.name}.py sha256:{self.sha256[:16]}>"

    def load(self) -> types.ModuleType:
        """Execute the source as a new module, registered in sys.modules under `module_name`.

        The caller removes it from sys.modules when the session is built.
        """
        module = types.ModuleType(self.module_name)
        module.__file__ = self.filename
        if self.path is None:  # let tracebacks and inspect show the stored lines
            lines = self.source.splitlines(keepends=True)
            linecache.cache[self.filename] = (len(self.source), None, lines, self.filename)
        sys.modules[self.module_name] = module
        try:
            code = compile(self.source, self.filename, "exec", dont_inherit=True)
            exec(code, module.__dict__)  # noqa: S102 - the operator allowed this code
        except BaseException as exc:
            sys.modules.pop(self.module_name, None)
            if not isinstance(exc, Exception):
                raise
            raise ConfigError(f"imports: importing {self.name}.py ({self.filename}) failed: "
                              f"{exc!r}") from exc
        return module


_local: dict[str, SourceFile] = {}
_local_lock = threading.Lock()


def _remember(found: SourceFile) -> None:
    with _local_lock:
        _local[found.sha256] = found


def local(digest: str) -> SourceFile | None:
    """The file with this hash if this process read it from its own disk."""
    with _local_lock:
        return _local.get(digest)


def references(imports: Iterable[Any]) -> list[Mapping[str, Any]]:
    return [entry for entry in imports if is_reference(entry)]


def code_for(config: Mapping[str, Any]) -> list[dict[str, str]]:
    """The session document's `code`: the sources of the config's `imports:` references.

    Only files this process read (SourceFile.read) can be stored: a reference whose
    source is unknown here is a ConfigError, as is more than CODE_LIMIT_BYTES of code.
    """
    imports = config.get("imports") or []
    out: dict[str, dict[str, str]] = {}
    for ref in references(imports if isinstance(imports, list) else [imports]):
        found = local(str(ref["sha256"]))
        if found is None:
            raise ConfigError(
                f"imports: {ref['module']}.py (sha256 {str(ref['sha256'])[:16]}) was not read "
                "by this process; list the file by its path under `imports:`"
            )
        out[found.sha256] = found.to_doc()
    size = sum(len(doc["source"].encode("utf-8")) for doc in out.values())
    if size > CODE_LIMIT_BYTES:
        raise ConfigError(
            f"imports: the .py files come to {size} bytes, more than the {CODE_LIMIT_BYTES} "
            "a session can carry; install that code as a package that declares its modules "
            "under the `ptutils.modules` entry point group"
        )
    return list(out.values())
