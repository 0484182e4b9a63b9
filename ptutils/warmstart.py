"""Warm starts: `init: {from: SESSION[@STEP] | FILE, only: [...], rename: {...}}`.

A new session starts from its seeded build with some or all of its network's tensors
taken from another session's checkpoint or a state_dict file (like tfutils'
load_param_dict). The result, the whole State of the session at step 0, is stored as its
checkpoint at step 0 of kind `init` when the session is created (`create_session`), and
the session document records where it came from (field `init`). Every later task loads
that checkpoint as it loads any other: workers never read the source, nor the file.

Names are the network's own state_dict names (`fc1.weight`), in the source and in the
target. `only` selects source tensors (globs, exact names or dotted prefixes), `rename`
maps a source prefix to a target prefix; every selected tensor must exist in the target
network with the same shape. Without `only`, every source tensor is loaded (strict).
"""

from __future__ import annotations

import fnmatch
import hashlib
import io
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ptutils.config import check_keys
from ptutils.errors import (
    CheckpointCorrupt,
    CheckpointNotFound,
    ConfigError,
    SessionNotFound,
    StoreError,
)
from ptutils.store.base import CheckpointKind, SessionStatus, Store, event, with_event

if TYPE_CHECKING:
    import torch

    from ptutils.session import Session

INIT_KEYS = ("from", "only", "rename")
"""Keys of the `init:` section."""

FILE_SUFFIXES = (".pt", ".pth", ".safetensors")
"""A `from:` ending in one of these is a state_dict file; anything else names a session."""

NETWORK = ("trainer", "model", "network")
"""Where a session's State holds the network's state_dict."""

INIT_CHECKPOINT = {"step": 0, "kind": str(CheckpointKind.INIT)}
"""The `checkpoint` field of a warm-started session before its first chunk."""


@dataclass(frozen=True)
class InitSpec:
    """A parsed `init:` section."""

    given: str
    """`from:` as written in the config."""
    only: tuple[str, ...] | None = None
    rename: dict[str, str] = field(default_factory=dict)
    file: Path | None = None
    """The state_dict file (absolute), when `from:` names one."""
    session: str | None = None
    """The source session's name or id, when `from:` names one."""
    step: int | None = None
    """`@STEP` of `from: SESSION@STEP`; None: the session's latest checkpoint."""

    @classmethod
    def parse(cls, value: Any, base_dir: str | os.PathLike[str] | None = None) -> InitSpec:
        """Check an `init:` section; a relative file is relative to `base_dir` (the
        config's folder), else to the current directory."""
        if not isinstance(value, Mapping):
            raise ConfigError(
                f"init: expected a mapping with keys {', '.join(INIT_KEYS)}, got "
                f"{type(value).__name__} (e.g. init: {{from: my-session@1000}})")
        check_keys(value, INIT_KEYS, "init")
        given = value.get("from")
        if not isinstance(given, str) or not given.strip():
            raise ConfigError(
                "init.from: required, a session (NAME, ID, NAME@STEP) or a state_dict file "
                f"({', '.join(FILE_SUFFIXES)}); got {given!r}")
        only = _only(value.get("only"))
        rename = _rename(value.get("rename"))
        if given.endswith(FILE_SUFFIXES):
            path = Path(given).expanduser()
            if not path.is_absolute():
                path = Path(base_dir if base_dir is not None else Path.cwd()) / path
            return cls(given, only, rename, file=path.resolve())
        name, sep, step = given.rpartition("@")
        if not sep:
            return cls(given, only, rename, session=given)
        if not name or not step.isdigit():
            raise ConfigError(
                f"init.from: {given!r}: expected SESSION@STEP with a step number (e.g. "
                f"my-session@1000), SESSION alone for its latest checkpoint, or a file "
                f"ending in {', '.join(FILE_SUFFIXES)}")
        return cls(given, only, rename, session=name, step=int(step))


def _only(value: Any) -> tuple[str, ...] | None:
    if value is None:
        return None
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, list) or not value or not all(
            isinstance(p, str) and p for p in value):
        raise ConfigError(
            "init.only: expected a non-empty list of tensor names or glob patterns "
            f"(e.g. [fc1.*, fc2.weight]), got {value!r}")
    return tuple(value)


def _rename(value: Any) -> dict[str, str]:
    if value is None:
        return {}
    if not isinstance(value, Mapping) or not all(
            isinstance(k, str) and isinstance(v, str) for k, v in value.items()):
        raise ConfigError(
            "init.rename: expected a mapping of source prefix to target prefix "
            f"(e.g. {{encoder: backbone}}), got {value!r}")
    return dict(value)


@dataclass
class Source:
    """The tensors a warm start reads, and what they are (for the session's record)."""

    tensors: dict[str, torch.Tensor]
    record: dict[str, Any]


def read_source(spec: InitSpec, store: Store | None = None) -> Source:
    """The source's network state_dict: a file's (`store` not needed) or a session's
    checkpoint in `store`. Every problem is a ConfigError naming `init.from`."""
    if spec.file is not None:
        return read_file(spec.file, spec.given)
    if store is None:
        raise ConfigError(f"init.from: {spec.given!r} names a session: it needs a store")
    return read_session(store, spec)


def read_file(path: Path, given: str) -> Source:
    """A state_dict file: `.safetensors`, or a `.pt`/`.pth` loaded with weights_only."""
    where = f"init.from: {given!r} ({path})"
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise ConfigError(f"{where}: no such file (a relative path is relative to the "
                          "config file's folder)") from None
    except OSError as exc:
        raise ConfigError(f"{where}: cannot read it: {exc}") from exc
    if path.suffix == ".safetensors":
        tensors = _load_safetensors(data, where)
    else:
        tensors = _load_pt(data, where)
    return Source(tensors, {"file": str(path), "sha256": hashlib.sha256(data).hexdigest()})


def _load_safetensors(data: bytes, where: str) -> dict[str, torch.Tensor]:
    try:
        from safetensors.torch import load
    except ImportError as exc:
        raise ConfigError(f"{where}: reading .safetensors needs the safetensors package "
                          f"({exc}); pip install 'ptutils[export]'") from None
    try:
        return dict(load(data))
    except Exception as exc:  # noqa: BLE001 - safetensors raises its own error types
        raise ConfigError(f"{where}: not a readable safetensors file: {exc}") from None


def _load_pt(data: bytes, where: str) -> dict[str, torch.Tensor]:
    import torch

    try:
        obj = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - torch raises RuntimeError, EOFError, ...
        # weights_only refusals are pickle.UnpicklingError; matched by name, so this
        # module needs no pickle import at all (DESIGN: no pickle in ptutils' code paths)
        if type(exc).__name__ != "UnpicklingError":
            raise ConfigError(f"{where}: not a readable torch file: "
                              f"{type(exc).__name__}: {exc}") from None
        detail = _unpickler_reason(str(exc))
        if "global" not in detail.lower():
            raise ConfigError(f"{where}: not a readable torch file ({detail})") from None
        raise ConfigError(
            f"{where}: the file holds Python objects that torch.load(weights_only=True) "
            f"refuses ({detail}); ptutils never unpickles them. Save a plain state_dict "
            "(torch.save(model.state_dict(), FILE)) or a .safetensors file.") from None
    if isinstance(obj, Mapping) and isinstance(obj.get("state_dict"), Mapping):
        obj = obj["state_dict"]
    if not isinstance(obj, Mapping):
        raise ConfigError(f"{where}: holds a {type(obj).__name__}, not a state_dict (a "
                          "mapping of tensor names to tensors)")
    bad = sorted(str(k) for k, v in obj.items() if not isinstance(v, torch.Tensor))
    if bad:
        raise ConfigError(f"{where}: entries {', '.join(bad[:10])} are not tensors; give a "
                          "plain state_dict (or {state_dict: ...})")
    return {str(k): v for k, v in obj.items()}


def _unpickler_reason(message: str) -> str:
    """What torch's weights_only unpickler refused (`Unsupported global: GLOBAL m.C was
    not an allowed global by default`), else the message's first line."""
    marker = "WeightsUnpickler error:"
    at = message.find(marker)
    if at < 0:
        return message.strip().splitlines()[0] if message.strip() else "unpickling failed"
    reason = message[at + len(marker):].strip().splitlines()[0]
    return reason.split(". ")[0].rstrip(".")


def read_session(store: Store, spec: InitSpec) -> Source:
    """The network state_dict of a stored session's checkpoint (its latest, or @STEP)."""
    ref = str(spec.session)
    try:
        doc = store.get_session(ref)
    except SessionNotFound:
        raise ConfigError(
            f"init.from: no session named (or with id) {ref!r} in {store.url}. "
            f"`ptutils status --store {store.url}` lists them; a state_dict file must end "
            f"in {', '.join(FILE_SUFFIXES)}.") from None
    ckpts = [c for c in store.list_checkpoints(doc["_id"]) if not c.get("corrupt")]
    steps = sorted({int(c["step"]) for c in ckpts})
    listed = ", ".join(map(str, steps)) or "none"
    if spec.step is None:
        latest = doc.get("checkpoint")
        if not latest:
            raise ConfigError(f"init.from: session {doc['name']!r} has no checkpoint yet "
                              f"(status {doc['status']}, step {doc['step']})")
        step, kind = int(latest["step"]), str(latest["kind"])
    else:
        at = [c for c in ckpts if int(c["step"]) == spec.step]
        if not at:
            raise ConfigError(
                f"init.from: session {doc['name']!r} has no checkpoint at step {spec.step}; "
                f"its checkpoints are at steps: {listed}")
        step, kind = spec.step, str(at[0]["kind"])
    where = f"init.from: the checkpoint of session {doc['name']!r} at step {step} ({kind})"
    try:
        state = store.load_state(store.get_checkpoint(doc["_id"], step, kind))
    except CheckpointNotFound:
        raise ConfigError(f"{where} is gone (retention?); its checkpoints are at steps: "
                          f"{listed}") from None
    except CheckpointCorrupt as exc:
        raise ConfigError(f"{where} is corrupt: {exc}. Pick another one with "
                          f"{doc['name']}@STEP (steps: {listed}).") from None
    net: Any = state
    for key in NETWORK:
        net = net.get(key) if isinstance(net, Mapping) else None
    if not isinstance(net, Mapping):
        raise ConfigError(f"{where} holds no network state ({'.'.join(NETWORK)})")
    record = {"session": doc["_id"], "name": doc["name"], "step": step, "kind": kind}
    return Source(dict(net), record)


def select(
    spec: InitSpec, source: Mapping[str, Any], target: Mapping[str, Any]
) -> tuple[dict[str, torch.Tensor], list[str]]:
    """({target name: source tensor}, skipped source names): `only`, then `rename`;
    ConfigError unless each chosen tensor fits a target tensor of the same shape."""
    import torch

    names = list(source)
    if spec.only is None:
        chosen, skipped = names, []
    else:
        unmatched = [p for p in spec.only if not any(_matches(n, p) for n in names)]
        if unmatched:
            raise ConfigError(
                f"init.only: {', '.join(map(repr, unmatched))} match(es) no tensor of "
                f"{spec.given!r}; its tensors: {_listing(source)}")
        chosen = [n for n in names if any(_matches(n, p) for p in spec.only)]
        skipped = [n for n in names if n not in chosen]
    unused = [p for p in spec.rename if not any(_has_prefix(n, p) for n in chosen)]
    if unused:
        raise ConfigError(
            f"init.rename: {', '.join(map(repr, unused))} is no prefix of a selected "
            f"tensor; selected: {', '.join(chosen)}")
    out: dict[str, torch.Tensor] = {}
    problems: list[str] = []
    for name in chosen:
        new = _renamed(name, spec.rename)
        value, tgt = source[name], target.get(new)
        label = name if new == name else f"{name} -> {new}"
        if not isinstance(value, torch.Tensor):
            problems.append(f"{label}: not a tensor ({type(value).__name__})")
        elif new in out:
            problems.append(f"{label}: a second source tensor for {new}")
        elif not isinstance(tgt, torch.Tensor):
            problems.append(f"{label}: the network has no tensor {new}")
        elif tuple(value.shape) != tuple(tgt.shape):
            problems.append(f"{label}: shape {tuple(value.shape)}, the network's "
                            f"{tuple(tgt.shape)}")
        elif value.dtype.is_floating_point != tgt.dtype.is_floating_point:
            problems.append(f"{label}: dtype {value.dtype}, the network's {tgt.dtype}")
        else:
            out[new] = value
    if problems:
        hint = "" if spec.only is not None else " (init.only: [...] loads part of it)"
        raise ConfigError(
            f"init: {len(problems)} tensor(s) of {spec.given!r} do not fit the network"
            f"{hint}:\n  " + "\n  ".join(problems) + f"\nthe network's tensors: "
            f"{_listing(target)}")
    return out, skipped


def _matches(name: str, pattern: str) -> bool:
    """A glob, an exact name, or a dotted prefix (`fc1` selects `fc1.weight`)."""
    return fnmatch.fnmatchcase(name, pattern) or _has_prefix(name, pattern)


def _has_prefix(name: str, prefix: str) -> bool:
    return prefix == "" or name == prefix or name.startswith(prefix + ".")


def _renamed(name: str, rename: Mapping[str, str]) -> str:
    """`name` with its longest matching source prefix replaced by the target prefix."""
    hits = [p for p in rename if _has_prefix(name, p)]
    if not hits:
        return name
    old = max(hits, key=len)
    rest = name[len(old):].lstrip(".") if old else name
    new = rename[old]
    return f"{new}.{rest}" if new and rest else (new or rest)


def _listing(tensors: Mapping[str, Any]) -> str:
    return ", ".join(f"{k} {tuple(getattr(v, 'shape', ()))}" for k, v in tensors.items())


@dataclass
class WarmStart:
    """A new session's step-0 State with the source's tensors in it, and its record."""

    state: dict[str, Any]
    record: dict[str, Any]


def initial_state(session: Session) -> dict[str, Any]:
    """The State of a dry-built session at step 0, with the RNG state of right after its
    build (`runner.validate` keeps it): what a worker's own build would start from."""
    from ptutils.rng import get_rng_state

    state = session.state_dict()
    state["rng"] = getattr(session, "_rng_at_build", None) or get_rng_state()
    return state


def apply(spec: InitSpec, state: dict[str, Any], source: Source) -> WarmStart:
    """Put the selected source tensors into `state`'s network (new tensors of the
    target's dtype and device; `state` is changed in place)."""
    net: dict[str, Any] = state
    for key in NETWORK:
        net = net[key]
    chosen, skipped = select(spec, source.tensors, net)
    for name, value in chosen.items():
        tgt = net[name]
        net[name] = value.detach().to(device=tgt.device, dtype=tgt.dtype, copy=True)
    record = {
        "from": spec.given,
        "source": source.record,
        "only": list(spec.only) if spec.only is not None else None,
        "rename": dict(spec.rename),
        "loaded": list(chosen),
        "skipped": skipped,
    }
    return WarmStart(state, record)


def warm_start(
    session: Session, config: Mapping[str, Any], store: Store | None,
    base_dir: str | os.PathLike[str] | None = None,
) -> WarmStart | None:
    """The warm start of a dry-built `session` (None if its config has no `init:`)."""
    if config.get("init") is None:
        return None
    spec = InitSpec.parse(config["init"], base_dir)
    return apply(spec, initial_state(session), read_source(spec, store))


def create_session(
    store: Store, doc: dict[str, Any], warm: WarmStart, status: SessionStatus
) -> dict[str, Any]:
    """Create the session with its `init` checkpoint; the stored document, at `status`.

    A checkpoint needs its session, so the document is created first, paused (no
    worker, reconciler or `run` takes a paused session up), then the checkpoint is
    written, then the status set. A failure deletes the session again.
    """
    created = store.create_session({
        **doc, "status": str(SessionStatus.PAUSED), "checkpoint": dict(INIT_CHECKPOINT),
        "init": warm.record})
    sid = created["_id"]
    try:
        store.put_checkpoint(sid, 0, str(CheckpointKind.INIT), warm.state)
        new = store.cas_session(
            sid, {"token": created["token"], "status": str(SessionStatus.PAUSED)},
            {"status": str(status),
             "events": with_event(created, event("init", describe(warm.record), store.now()))})
        if new is None:
            raise StoreError(f"session {created['name']!r} changed while it was created")
    except BaseException:
        try:
            store.delete_session(sid)
        except StoreError:
            pass  # the original error matters more; the session stays paused
        raise
    return new


def describe(record: Mapping[str, Any]) -> str:
    """One line: what a warm start loaded, from where."""
    src = record.get("source") or {}
    where = (f"session {src.get('name')} step {src.get('step')}" if "session" in src
             else f"{src.get('file')} (sha256 {str(src.get('sha256'))[:12]})")
    return (f"warm start from {where}: loaded {len(record.get('loaded') or [])} tensor(s), "
            f"skipped {len(record.get('skipped') or [])}")
