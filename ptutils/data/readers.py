"""Data readers: each turns one source (a file, a bundled set, a generator) into columns.

A reader's action is `read() -> {name: numpy array}`: named columns of equal length N.
Every reader takes the same options, applied in this order after loading:
`keys` (select, and rename with a mapping), `scale` (multiply a column), `dtype` (cast
a column), then `split` (a deterministic held-out part). A custom reader subclasses
`DataReader`, overrides `load()` and is registered with `@ptutils.register`.
"""

from __future__ import annotations

import csv
import hashlib
import json
import os
import zipfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from ptutils.errors import ConfigError, DataError
from ptutils.module import Module

Columns = dict[str, np.ndarray]
SPLIT_KEYS = ("fraction", "part", "seed")
SPLIT_PARTS = ("train", "test")


class DataReader(Module):
    """Base reader: loads raw columns (`load`) and applies the common options (`read`).

    `keys`: a list of column names to keep, or a mapping {source name: new name}.
    `dtype`: {column: numpy dtype name}; `scale`: {column: factor};
    `split`: {"fraction": 0.8, "part": "train" | "test", "seed": 0}.
    `where` is the config location (`data.datasets.train`) used in error messages;
    the DataProvider sets it.
    """

    keys: dict[str, str] | None = None
    dtype: dict[str, np.dtype] | None = None
    scale: dict[str, float] | None = None
    split: dict[str, Any] | None = None
    where: str = ""

    def __init__(
        self,
        keys: Sequence[str] | Mapping[str, str] | None = None,
        dtype: Mapping[str, str] | None = None,
        scale: Mapping[str, float] | None = None,
        split: Mapping[str, Any] | None = None,
    ) -> None:
        self.keys = _check_keys(keys, type(self).__name__)
        self.dtype = _check_dtypes(dtype, type(self).__name__)
        self.scale = _check_scale(scale, type(self).__name__)
        self.split = _check_split(split, type(self).__name__)

    # --- the action ---------------------------------------------------------------------
    def read(self) -> Columns:
        """The columns after `keys`, `scale`, `dtype` and `split`; all of equal length."""
        columns = self.load()
        if not isinstance(columns, Mapping) or not columns:
            raise DataError(f"{self.describe()}: load() returned no columns")
        columns = self._select(columns)
        columns = {k: np.asarray(v) for k, v in columns.items()}
        self._check_lengths(columns)
        for name, factor in (self.scale or {}).items():
            columns[name] = _scaled(columns[self._known(name, columns)], factor)
        for name, dtype in (self.dtype or {}).items():
            columns[name] = columns[self._known(name, columns)].astype(dtype, copy=False)
        if self.split:
            idx = split_indices(len(next(iter(columns.values()))), **self.split)
            columns = {k: v[idx] for k, v in columns.items()}
        return columns

    def load(self) -> Columns:
        """Raw columns of the source. Override in a subclass."""
        raise NotImplementedError(f"{type(self).__name__} must override load()")

    def wanted(self) -> list[str] | None:
        """Source column names `keys` asks for (None: all); lets `load` read only those."""
        return list(self.keys) if self.keys is not None else None

    def describe(self) -> str:
        """How error messages name this source: config location and file."""
        where = f"{self.where}: " if self.where else ""
        return f"{where}{type(self).__name__}"

    def check(self) -> None:
        """Cheap early check (files exist) without reading the data. Override."""

    # --- helpers ------------------------------------------------------------------------
    def _select(self, columns: Mapping[str, Any]) -> dict[str, Any]:
        if self.keys is None:
            return dict(columns)
        missing = [k for k in self.keys if k not in columns]
        if missing:
            raise self.missing_keys(missing, list(columns))
        return {new: columns[old] for old, new in self.keys.items()}

    def missing_keys(self, missing: Sequence[str], available: Sequence[str]) -> DataError:
        """The error for requested keys the source lacks, listing the ones it has."""
        return DataError(
            f"{self.describe()}: no key {', '.join(repr(m) for m in missing)}; "
            f"it has: {', '.join(repr(a) for a in available) or '(nothing)'}. "
            "Fix `keys` (a list of names, or {source name: new name})."
        )

    def _known(self, name: str, columns: Mapping[str, Any]) -> str:
        if name not in columns:
            raise DataError(
                f"{self.describe()}: `dtype`/`scale` name column {name!r}, which is not among "
                f"the columns read ({', '.join(columns)}); use the names after renaming."
            )
        return name

    def _check_lengths(self, columns: Mapping[str, np.ndarray]) -> None:
        lengths = {k: (len(v) if v.ndim else None) for k, v in columns.items()}
        if None in lengths.values() or len(set(lengths.values())) > 1:
            shown = ", ".join(
                f"{k}: {n if n is not None else 'scalar'}" for k, n in lengths.items()
            )
            raise DataError(
                f"{self.describe()}: columns must have the same length (one row per sample); "
                f"got {shown}. Select matching columns with `keys`."
            )


class FileReader(DataReader):
    """A reader of one file: resolves `path` (~ and $VARS expanded) and checks it exists."""

    path: str = ""
    format_name = "file"

    def __init__(
        self,
        path: str,
        keys: Sequence[str] | Mapping[str, str] | None = None,
        dtype: Mapping[str, str] | None = None,
        scale: Mapping[str, float] | None = None,
        split: Mapping[str, Any] | None = None,
    ) -> None:
        super().__init__(keys=keys, dtype=dtype, scale=scale, split=split)
        if not isinstance(path, str | os.PathLike) or not str(path):
            raise ConfigError(f"{type(self).__name__}.path: expected a file path, got {path!r}")
        self.path = str(path)

    def resolved(self) -> Path:
        """The path with `~` and environment variables expanded, made absolute."""
        return Path(os.path.expandvars(os.path.expanduser(self.path))).absolute()

    def describe(self) -> str:
        return f"{super().describe()} {self.path}"

    def check(self) -> None:
        """The file exists, or a DataError saying where it was looked for."""
        resolved = self.resolved()
        if not resolved.is_file():
            where = f"{self.where}.path: " if self.where else ""
            what = "is a directory, not a file" if resolved.is_dir() else "not found"
            raise DataError(
                f"{where}{type(self).__name__}: {self.format_name} {what}: {self.path} "
                f"(absolute: {resolved}; current directory: {Path.cwd()}). Check the path, "
                "or give an absolute one (~ and $VARIABLES are expanded)."
            )

    def open_error(self, exc: BaseException, expected: str) -> DataError:
        """The error for a file that exists but is not in this reader's format."""
        return DataError(
            f"{self.describe()} (absolute: {self.resolved()}): cannot read it as {expected}: "
            f"{type(exc).__name__}: {exc}. Check the file, or pick the reader for its format."
        )


class NpzReader(FileReader):
    """Arrays of a numpy `.npz` archive, one column per array (never unpickles objects)."""

    format_name = "npz file"

    def load(self) -> Columns:
        self.check()
        try:
            archive = np.load(self.resolved(), allow_pickle=False)
        except (OSError, ValueError, zipfile.BadZipFile, EOFError) as exc:
            raise self.open_error(exc, "a numpy .npz archive") from exc
        if not isinstance(archive, np.lib.npyio.NpzFile):
            raise self.open_error(
                TypeError("it holds a single array (.npy), not an archive"), "a numpy .npz archive"
            )
        with archive:
            names = self.wanted() or list(archive.files)
            missing = [n for n in names if n not in archive.files]
            if missing:
                raise self.missing_keys(missing, archive.files)
            try:
                return {name: archive[name] for name in names}
            except ValueError as exc:  # object arrays need pickle: refused
                raise self.open_error(
                    exc, "plain numeric arrays (object arrays are refused)"
                ) from exc


class HDF5Reader(FileReader):
    """Datasets of an HDF5 file by key (`images` or `group/images`); all top-level ones
    when no `keys` are given."""

    format_name = "HDF5 file"

    def load(self) -> Columns:
        import h5py

        self.check()
        try:
            handle = h5py.File(self.resolved(), "r")
        except OSError as exc:
            raise self.open_error(exc, "an HDF5 file") from exc
        with handle:
            available = _h5_datasets(handle, h5py)
            names = self.wanted() or [n for n in available if "/" not in n]
            missing = [n for n in names if n not in available]
            if missing:
                raise self.missing_keys(missing, available)
            return {name: handle[name][()] for name in names}


def _h5_datasets(handle: Any, h5py: Any) -> list[str]:
    found: list[str] = []
    handle.visititems(
        lambda name, obj: found.append(name) if isinstance(obj, h5py.Dataset) else None
    )
    return found


class RecordReader(FileReader):
    """Shared part of readers of records (one sample per line): fields become columns."""

    def records_to_columns(self, records: list[tuple[int, Mapping[str, Any]]]) -> Columns:
        """Columns from (line number, record) pairs; list-valued fields become 2-D columns."""
        if not records:
            raise DataError(f"{self.describe()}: the file holds no records")
        names = self.wanted() or list(records[0][1])
        columns: Columns = {}
        for name in names:
            values = []
            for line, record in records:
                if name not in record:
                    raise DataError(
                        f"{self.describe()}, line {line}: no field {name!r}; this record has: "
                        f"{', '.join(repr(k) for k in record)}."
                    )
                values.append(record[name])
            columns[name] = self._column(name, values)
        return columns

    def _column(self, name: str, values: list[Any]) -> np.ndarray:
        try:
            return np.asarray(values)
        except ValueError as exc:
            raise DataError(
                f"{self.describe()}: field {name!r} does not form a regular array (lists of "
                f"different lengths?): {exc}"
            ) from exc


class JsonLinesReader(RecordReader):
    """One JSON object per line; `fields` picks (a list) or renames (a mapping) them."""

    format_name = "JSON lines file"

    def __init__(
        self,
        path: str,
        fields: Sequence[str] | Mapping[str, str] | None = None,
        dtype: Mapping[str, str] | None = None,
        scale: Mapping[str, float] | None = None,
        split: Mapping[str, Any] | None = None,
    ) -> None:
        super().__init__(path, keys=fields, dtype=dtype, scale=scale, split=split)

    def load(self) -> Columns:
        self.check()
        records = []
        try:
            with open(self.resolved(), encoding="utf-8") as handle:
                for number, line in enumerate(handle, start=1):
                    if line.strip():
                        records.append((number, self._parse(number, line)))
        except UnicodeDecodeError as exc:
            raise self.open_error(exc, "JSON lines (UTF-8 text)") from exc
        return self.records_to_columns(records)

    def _parse(self, number: int, line: str) -> Mapping[str, Any]:
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            raise self.open_error(exc, f"JSON lines (line {number} is not JSON)") from exc
        if not isinstance(record, dict):
            raise self.open_error(
                TypeError(f"line {number} is a {type(record).__name__}"), "JSON lines of objects"
            )
        return record


class CsvReader(RecordReader):
    """A CSV file with a header row; `columns` picks (a list) or renames (a mapping) them.

    Numbers are parsed (int64 if every value is an integer, else float64); a cell that
    holds a JSON list (`"[0.1, 0.2]"`) makes a 2-D column. `stack: {x: [a, b, c]}` joins
    the columns a, b, c into one 2-D column x (named before `columns` selects).
    """

    format_name = "CSV file"

    def __init__(
        self,
        path: str,
        columns: Sequence[str] | Mapping[str, str] | None = None,
        dtype: Mapping[str, str] | None = None,
        scale: Mapping[str, float] | None = None,
        split: Mapping[str, Any] | None = None,
        stack: Mapping[str, Sequence[str]] | None = None,
        delimiter: str = ",",
    ) -> None:
        super().__init__(path, keys=columns, dtype=dtype, scale=scale, split=split)
        if stack is not None and not (
            isinstance(stack, Mapping)
            and all(isinstance(v, list | tuple) and v for v in stack.values())
        ):
            raise ConfigError(f"CsvReader.stack: expected {{name: [column, ...]}}, got {stack!r}")
        self.stack = {str(k): [str(c) for c in v] for k, v in (stack or {}).items()}
        self.delimiter = delimiter

    def load(self) -> Columns:
        self.check()
        try:
            with open(self.resolved(), encoding="utf-8", newline="") as handle:
                reader = csv.DictReader(handle, delimiter=self.delimiter)
                header = list(reader.fieldnames or [])
                rows = [(i, row) for i, row in enumerate(reader, start=2)]
        except (UnicodeDecodeError, csv.Error) as exc:
            raise self.open_error(exc, "CSV text") from exc
        if not header:
            raise DataError(f"{self.describe()}: the file is empty (a header row is required)")
        self._check_rows(rows, header)
        return self._stacked(header, rows)

    def _check_rows(self, rows: list[tuple[int, dict[str, Any]]], header: list[str]) -> None:
        for line, row in rows:
            if None in row or None in row.values():
                raise DataError(
                    f"{self.describe()}, line {line}: {len(row) - (None in row)} cells where "
                    f"the header has {len(header)} ({', '.join(header)})."
                )

    def _stacked(self, header: list[str], rows: list[tuple[int, dict[str, Any]]]) -> Columns:
        raw = {name: [row[name] for _, row in rows] for name in header}
        for parts in self.stack.values():
            missing = [p for p in parts if p not in raw]
            if missing:
                raise self.missing_keys(missing, header)
        used = {p for parts in self.stack.values() for p in parts}
        columns = {
            name: self._parse(name, values)
            for name, values in raw.items()
            if name not in used or (self.keys and name in self.keys)
        }
        for name, parts in self.stack.items():
            columns[name] = np.stack([self._parse(p, raw[p]) for p in parts], axis=1)
        return columns

    def _parse(self, name: str, values: list[str]) -> np.ndarray:
        if values and all(v.lstrip().startswith("[") for v in values):
            try:
                return self._column(name, [json.loads(v) for v in values])
            except json.JSONDecodeError:
                pass
        for dtype in (np.int64, np.float64):
            try:
                return np.array(values, dtype=dtype)
            except (ValueError, OverflowError):
                continue
        return np.array(values)


class DigitsReader(DataReader):
    """scikit-learn's bundled digits (1,797 8x8 images, no download).

    x: float32 in [0, 1], (N, 64), or (N, 1, 8, 8) with `image: true` (for a CNN);
    y: int64 class labels 0-9.
    """

    def __init__(
        self,
        image: bool = False,
        keys: Sequence[str] | Mapping[str, str] | None = None,
        dtype: Mapping[str, str] | None = None,
        scale: Mapping[str, float] | None = None,
        split: Mapping[str, Any] | None = None,
    ) -> None:
        super().__init__(keys=keys, dtype=dtype, scale=scale, split=split)
        self.image = bool(image)

    def load(self) -> Columns:
        data, target = _digits_arrays(self.describe())
        x = (data / 16.0).astype(np.float32)
        if self.image:
            x = x.reshape(-1, 1, 8, 8)
        return {"x": x, "y": target.astype(np.int64)}


def _digits_arrays(where: str) -> tuple[np.ndarray, np.ndarray]:
    """scikit-learn's bundled digits.csv.gz, read without importing scikit-learn (~2 s)."""
    import importlib.util

    spec = importlib.util.find_spec("sklearn")
    if spec is None or spec.origin is None:
        raise DataError(f"{where}: needs scikit-learn; run `pip install scikit-learn`")
    path = Path(spec.origin).parent / "datasets" / "data" / "digits.csv.gz"
    if path.exists():
        table = np.loadtxt(path, delimiter=",", dtype=np.float64)
        return table[:, :-1], table[:, -1]
    from sklearn.datasets import load_digits  # layout changed: take the slow path

    digits = load_digits()
    return digits.data, digits.target


class SyntheticReader(DataReader):
    """Generated classification data: Gaussian clusters around per-class centres.

    The same (n, features, classes, seed, noise) always gives the same arrays, so it
    serves tests and benchmarks. x: float32 (n, features); y: int64 (n,).
    """

    def __init__(
        self,
        n: int = 1000,
        features: int = 16,
        classes: int = 2,
        seed: int = 0,
        noise: float = 1.0,
        keys: Sequence[str] | Mapping[str, str] | None = None,
        dtype: Mapping[str, str] | None = None,
        scale: Mapping[str, float] | None = None,
        split: Mapping[str, Any] | None = None,
    ) -> None:
        super().__init__(keys=keys, dtype=dtype, scale=scale, split=split)
        for name, value, low in (("n", n, 1), ("features", features, 1), ("classes", classes, 1)):
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ConfigError(
                    f"SyntheticReader.{name}: expected an integer >= {low}, got {value!r}"
                )
        self.n, self.features, self.classes = n, features, classes
        self.seed, self.noise = int(seed), float(noise)

    def load(self) -> Columns:
        rng = np.random.Generator(np.random.PCG64(self.seed))
        centres = rng.normal(0.0, 2.0, size=(self.classes, self.features))
        y = rng.integers(0, self.classes, size=self.n)
        x = centres[y] + rng.normal(0.0, self.noise, size=(self.n, self.features))
        return {"x": x.astype(np.float32), "y": y.astype(np.int64)}


# --- the held-out split ---------------------------------------------------------------

_MASK64 = (1 << 64) - 1


def stable_seed(*parts: Any) -> int:
    """A 63-bit seed from values, the same in every process (unlike the salted `hash()`)."""
    text = "\x1f".join(f"{type(p).__name__}:{p}" for p in parts)
    return int.from_bytes(hashlib.blake2b(text.encode(), digest_size=8).digest(), "little") >> 1


def mix64(x: np.ndarray) -> np.ndarray:
    """SplitMix64's finaliser over uint64 values: a fixed, version-independent bijection."""
    x = x.astype(np.uint64, copy=True)
    x ^= x >> np.uint64(30)
    x *= np.uint64(0xBF58476D1CE4E5B9)
    x ^= x >> np.uint64(27)
    x *= np.uint64(0x94D049BB133111EB)
    x ^= x >> np.uint64(31)
    return x


def split_indices(n: int, fraction: float, part: str, seed: int = 0) -> np.ndarray:
    """Sorted row indices of one part of a deterministic train/test split of `n` rows.

    The permutation comes from a fixed hash of (seed, row), not from numpy's generators,
    so the same seed splits the same way on every machine and numpy version: a test set
    never leaks into training after an upgrade.
    """
    keys = mix64(np.arange(n, dtype=np.uint64) + np.uint64(stable_seed("split", seed)))
    order = np.argsort(keys, kind="stable")
    cut = int(round(fraction * n))
    chosen = order[:cut] if part == "train" else order[cut:]
    return np.sort(chosen)


# --- option checks --------------------------------------------------------------------


def _check_keys(keys: Any, owner: str) -> dict[str, str] | None:
    if keys is None:
        return None
    if isinstance(keys, str):
        keys = [keys]
    if isinstance(keys, Mapping):
        pairs = list(keys.items())
    elif isinstance(keys, Sequence):
        pairs = [(k, k) for k in keys]
    else:
        raise ConfigError(
            f"{owner}.keys: expected a list of names or {{source: new name}}, got {keys!r}"
        )
    if not pairs or not all(isinstance(a, str) and isinstance(b, str) for a, b in pairs):
        raise ConfigError(f"{owner}.keys: expected non-empty names, got {keys!r}")
    out = dict(pairs)
    if len(set(out.values())) != len(out):
        raise ConfigError(f"{owner}.keys: two columns renamed to the same name: {keys!r}")
    return out


def _check_dtypes(dtype: Any, owner: str) -> dict[str, np.dtype] | None:
    if dtype is None:
        return None
    if not isinstance(dtype, Mapping):
        raise ConfigError(
            f"{owner}.dtype: expected {{column: dtype}}, e.g. {{x: float32}}, got {dtype!r}"
        )
    out = {}
    for name, value in dtype.items():
        try:
            out[str(name)] = np.dtype(value)
        except TypeError as exc:
            raise ConfigError(
                f"{owner}.dtype.{name}: {value!r} is not a dtype; use e.g. float32, int64, uint8"
            ) from exc
        if out[str(name)].kind not in "biuf":
            raise ConfigError(f"{owner}.dtype.{name}: {value!r} is not numeric (bool, int, float)")
    return out


def _check_scale(scale: Any, owner: str) -> dict[str, float] | None:
    if scale is None:
        return None
    if not isinstance(scale, Mapping) or not all(
        isinstance(v, int | float) and not isinstance(v, bool) for v in scale.values()
    ):
        raise ConfigError(
            f"{owner}.scale: expected {{column: number}}, e.g. {{x: 0.0625}}, got {scale!r}"
        )
    return {str(k): float(v) for k, v in scale.items()}


def _check_split(split: Any, owner: str) -> dict[str, Any] | None:
    if split is None:
        return None
    example = "e.g. {fraction: 0.8, part: train, seed: 0}"
    if not isinstance(split, Mapping):
        raise ConfigError(f"{owner}.split: expected a mapping, {example}; got {split!r}")
    unknown = sorted(set(split) - set(SPLIT_KEYS))
    if unknown:
        raise ConfigError(
            f"{owner}.split: unknown key(s) {unknown}; valid keys: {', '.join(SPLIT_KEYS)}"
        )
    fraction, part, seed = split.get("fraction"), split.get("part"), split.get("seed", 0)
    if isinstance(fraction, bool) or not isinstance(fraction, int | float) or not 0 < fraction < 1:
        raise ConfigError(
            f"{owner}.split.fraction: expected a number between 0 and 1, got {fraction!r}"
        )
    if part not in SPLIT_PARTS:
        raise ConfigError(f"{owner}.split.part: expected 'train' or 'test', got {part!r}")
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise ConfigError(f"{owner}.split.seed: expected an integer, got {seed!r}")
    return {"fraction": float(fraction), "part": part, "seed": seed}


def _scaled(column: np.ndarray, factor: float) -> np.ndarray:
    """`column * factor`, keeping a float column's dtype (an integer one becomes float32)."""
    dtype = column.dtype if column.dtype.kind == "f" else np.dtype(np.float32)
    return column.astype(dtype, copy=False) * dtype.type(factor)
