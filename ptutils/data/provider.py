"""`DataProvider`: named in-memory datasets, eval batches, and a resumable train stream.

Every reader's dataset is read once, lazily, and held as torch tensors; a torch
`Dataset` is loaded through a DataLoader instead (ptutils.data.torch_source). The train stream's
order is a pure function of (seed, source, epoch) and, with several weighted sources,
the source of each batch is a pure function of (seed, batch number); the position
(epoch and offset per source, batches drawn) is the provider's state, made of ints
only, so a run restored in a fresh process draws exactly the batches an uninterrupted
run would have drawn (DESIGN §4.4).
"""

from __future__ import annotations

import bisect
import math
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import numpy as np
import torch

from ptutils.data.readers import DataReader, stable_seed
from ptutils.data.torch_source import TorchSource, is_torch_dataset, loader_options
from ptutils.errors import ConfigError, DataError, LoadError
from ptutils.module import Module, build, is_type_config

Batch = dict[str, torch.Tensor]
_MASK64 = (1 << 64) - 1
_GOLDEN = 0x9E3779B97F4A7C15
_SUFFIX_TYPES = {".npz": "NpzReader", ".h5": "HDF5Reader", ".hdf5": "HDF5Reader",
                 ".jsonl": "JsonLinesReader", ".csv": "CsvReader"}


class _Stream:
    """One train source's cursor: epoch, samples consumed in it, and its permutation."""

    __slots__ = ("name", "epoch", "position", "perm", "columns", "limit", "size")

    def __init__(self, name: str) -> None:
        self.name = name
        self.epoch = 0
        self.position = 0
        self.perm: torch.Tensor | None = None
        self.columns: tuple[tuple[str, torch.Tensor], ...] | None = None
        self.limit = 0
        self.size = 0


class _Counter:
    """Batches drawn so far; a plain slot keeps `next_batch` clear of Module.__setattr__."""

    __slots__ = ("drawn",)

    def __init__(self) -> None:
        self.drawn = 0


class DataProvider(Module):
    """Datasets by name; `provide(name)` gives eval batches, `next_batch()` train ones.

    `datasets`: {name: reader config (`{type: ptutils.data.DigitsReader, ...}`),
    DataReader, or the config of a torch Dataset}. `train`: the dataset the train stream
    draws from, or {name: weight} to mix several (each batch from one source). Eval
    batches of readers are views of the held tensors: do not modify them in place.
    `num_workers`, `persistent_workers`, `pin_memory`, `prefetch_factor` and `columns`
    configure the DataLoader of torch Datasets (ptutils.data.torch_source).
    """

    config_path = "data"
    """Where a session's config holds the provider; prefixes config locations in errors."""

    def __init__(
        self,
        datasets: Mapping[str, Mapping[str, Any] | DataReader],
        batch_size: int = 64,
        seed: int = 0,
        train: str | Sequence[str] | Mapping[str, float] = "train",
        eval_batch_size: int | None = None,
        drop_last: bool = True,
        device: str = "cpu",
        num_workers: int = 0,
        persistent_workers: bool | None = None,
        pin_memory: bool | str | None = None,
        prefetch_factor: int | None = None,
        columns: Sequence[str] | None = None,
    ) -> None:
        self.batch_size = _positive_int(batch_size, "batch_size")
        self.eval_batch_size = (self.batch_size if eval_batch_size is None
                                else _positive_int(eval_batch_size, "eval_batch_size"))
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise ConfigError(f"{self.config_path}.seed: expected an integer, got {seed!r}")
        self.seed = seed
        self.drop_last = bool(drop_last)
        self.device = _device(device, f"{self.config_path}.device")
        self._options = loader_options(num_workers, persistent_workers, pin_memory,
                                       prefetch_factor, columns, where=self.config_path)
        self._torch: dict[str, TorchSource] = {}
        self._readers = self._build_readers(datasets)
        self._names = [str(name) for name in datasets]
        self._check_loader_keys(num_workers, persistent_workers, pin_memory,
                                prefetch_factor, columns)
        weights = self._train_weights(train)
        self._sources = list(weights)
        total = sum(weights.values())
        self._cumulative = [float(c) for c in np.cumsum([w / total for w in weights.values()])]
        self._mix_key = stable_seed("mix", seed)
        self._streams = [_Stream(name) for name in self._sources]
        self._counter = _Counter()
        self._columns: dict[str, tuple[tuple[str, torch.Tensor], ...]] = {}
        self._shard: tuple[int, int] | None = None

    # --- configuration ------------------------------------------------------------------
    def _build_readers(self, datasets: Any) -> dict[str, DataReader]:
        root = f"{self.config_path}.datasets"
        if not isinstance(datasets, Mapping) or not datasets:
            raise ConfigError(
                f"{root}: expected {{name: reader config}}, e.g. "
                "{train: {type: ptutils.data.NpzReader, path: train.npz}}"
            )
        readers: dict[str, DataReader] = {}
        for name, spec in datasets.items():
            built = self._reader(f"{root}.{name}", spec)
            if isinstance(built, DataReader):
                readers[str(name)] = built
            else:
                self._torch[str(name)] = TorchSource(
                    built, name=str(name), where=f"{root}.{name}", seed=self.seed,
                    batch_size=self.batch_size, eval_batch_size=self.eval_batch_size,
                    drop_last=self.drop_last, options=self._options)
        return readers

    def _check_loader_keys(self, *values: Any) -> None:
        """DataLoader keys set without a torch Dataset do nothing: an error."""
        if self._torch:
            self._pin_for(self.device)
            return
        keys = ("num_workers", "persistent_workers", "pin_memory", "prefetch_factor", "columns")
        for key, value in zip(keys, values):
            if value not in (None, 0, "auto"):
                raise ConfigError(
                    f"{self.config_path}.{key}: configures the DataLoader of torch Dataset "
                    f"sources, and {self.config_path}.datasets has none (readers are held in "
                    "memory); drop it"
                )

    def pin_for(self, device: str | torch.device) -> None:
        """Say where batches will go (the plan's device): with `pin_memory` auto, torch
        Dataset batches are pinned when that is a CUDA device. Call before the first batch."""
        self._pin_for(_device(device, "session.device"), known=True)

    def _pin_for(self, device: torch.device, *, known: bool = False) -> None:
        pin = self._options.pin_memory
        cuda = device.type == "cuda" or self.device.type == "cuda"
        if pin and self._torch and not cuda and known:
            raise ConfigError(
                f"{self.config_path}.pin_memory: true does nothing: batches stay on the CPU "
                f"(session.device: {device}); drop it (auto pins for a CUDA device)"
            )
        auto = cuda and torch.cuda.is_available()
        for source in self._torch.values():
            source.pin = auto if pin is None else pin

    @staticmethod
    def _reader(where: str, spec: Any) -> Any:
        if isinstance(spec, DataReader) or is_torch_dataset(spec):
            reader = spec
        elif is_type_config(spec):
            try:
                reader = build(spec, where=where)
            except ConfigError as exc:
                if where in str(exc):
                    raise
                raise type(exc)(f"{where}: {exc}") from exc
            if not isinstance(reader, DataReader) and not is_torch_dataset(reader):
                raise ConfigError(
                    f"{where}.type: {spec['type']} is a {type(reader).__name__}, neither a "
                    "DataReader nor a torch.utils.data.Dataset"
                )
        else:
            raise ConfigError(f"{where}: expected a reader config with `type:`{_type_hint(spec)}")
        if isinstance(reader, DataReader):
            reader.where = where
        return reader

    def _train_weights(self, train: Any) -> dict[str, float]:
        where = f"{self.config_path}.train"
        if isinstance(train, str):
            weights = {train: 1.0}
        elif isinstance(train, Mapping):
            weights = dict(train)
        elif isinstance(train, Sequence) and train:
            weights = {name: 1.0 for name in train}
        else:
            raise ConfigError(f"{where}: expected a dataset name or {{name: weight}}, got {train!r}")
        for name, weight in weights.items():
            if name not in self._names:
                raise ConfigError(
                    f"{where}: no dataset {name!r}; {self.config_path}.datasets has "
                    f"{', '.join(repr(n) for n in self._names)}"
                )
            if isinstance(weight, bool) or not isinstance(weight, int | float) or not (
                math.isfinite(weight) and weight > 0
            ):
                raise ConfigError(f"{where}.{name}: a weight must be a positive number, got {weight!r}")
        return {str(k): float(v) for k, v in weights.items()}

    def check_world_size(self, world_size: int) -> None:
        """ConfigError unless every global batch splits evenly over `world_size` ranks."""
        if world_size == 1:
            return
        if self.batch_size % world_size:
            raise ConfigError(
                f"{self.config_path}.batch_size: {self.batch_size} is the global batch, split "
                f"evenly over session.world_size={world_size} ranks; make batch_size a "
                f"multiple of {world_size} (or change session.world_size)"
            )
        if not self.drop_last:
            raise ConfigError(
                f"{self.config_path}.drop_last: false with session.world_size={world_size}: an "
                "epoch's last, partial batch cannot be split evenly over the ranks; set "
                f"{self.config_path}.drop_last: true (or session.world_size: 1)"
            )

    def shard(self, rank: int, world_size: int) -> None:
        """Make the train stream give rank `rank`'s part of every global batch: samples
        `[rank*b, (rank+1)*b)` of it, b = batch_size / world_size, chosen before loading.
        The order and the position stay global (every rank advances the same position),
        so the union of the ranks' parts is the world_size=1 batch. Eval batches are
        unchanged. Call before the first batch."""
        self.check_world_size(world_size)
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is not in [0, {world_size})")
        self._shard = None if world_size == 1 else (rank, world_size)
        for source in self._torch.values():
            source.shard = self._shard

    # --- reading ------------------------------------------------------------------------
    def dataset_names(self) -> list[str]:
        """The configured dataset names, in config order."""
        return list(self._names)

    def train_sources(self) -> list[str]:
        """The datasets the train stream draws from."""
        return list(self._sources)

    def columns(self, name: str) -> dict[str, torch.Tensor]:
        """The whole dataset `name` as tensors on the provider's device (read on first use;
        a torch Dataset is loaded whole, in eval order, each time)."""
        if name in self._torch:
            batches = list(self.provide(name))
            if not batches:
                raise DataError(f"{self._torch[name].describe()}: the dataset is empty")
            return {key: torch.cat([b[key] for b in batches]) for key in batches[0]}
        return dict(self._load(name))

    def sizes(self) -> dict[str, int]:
        """Number of samples of every dataset: readers are read, torch Datasets give their
        `len()` (an IterableDataset without one is left out)."""
        out: dict[str, int] = {}
        for name in self._names:
            source = self._torch.get(name)
            size = _length(self._load(name)) if source is None else source.size()
            if size is not None:
                out[name] = size
        return out

    def check(self) -> None:
        """Cheap early check that every reader's files exist, without reading them (a
        map-style torch Dataset: that it has samples)."""
        for name in self._names:
            source = self._torch.get(name)
            if source is None:
                self._readers[name].check()
            else:
                source.check()

    def close(self) -> None:
        """Stop the DataLoader workers of torch Dataset sources (they also stop when the
        provider is garbage collected)."""
        for source in self._torch.values():
            source.close()

    def _load(self, name: str) -> tuple[tuple[str, torch.Tensor], ...]:
        columns = self._columns.get(name)
        if columns is None:
            columns = self._columns[name] = self._read(name)
        return columns

    def _read(self, name: str) -> tuple[tuple[str, torch.Tensor], ...]:
        reader = self._readers.get(name)
        if reader is None:
            raise DataError(
                f"no dataset {name!r}; {self.config_path}.datasets has "
                f"{', '.join(repr(n) for n in self._names)}"
            )
        try:
            arrays = reader.read()
        except DataError:
            raise
        except Exception as exc:  # noqa: BLE001 - a custom reader's failure, with its location
            raise DataError(f"{reader.describe()}: reading failed: {type(exc).__name__}: {exc}") from exc
        return tuple((key, _tensor(value, key, reader).to(self.device)) for key, value in arrays.items())

    # --- eval batches -------------------------------------------------------------------
    def provide(self, name: str) -> Iterator[Batch]:
        """Batches of dataset `name` in its fixed order, each sample once, last partial one
        included. The data is read when this is called, not when iteration starts."""
        source = self._torch.get(name)
        if source is not None:
            return (self._to_device(b) for b in source.provide())
        columns = self._load(name)
        size, step = _length(columns), self.eval_batch_size
        return ({key: t[start:start + step] for key, t in columns} for start in range(0, size, step))

    def example_batch(self, name: str) -> Batch:
        """The first eval batch of `name`: shapes and dtypes to check a network against
        (a torch Dataset's is loaded in this process, the global RNGs untouched)."""
        source = self._torch.get(name)
        if source is not None:
            return self._to_device(source.example_batch())
        batch = next(self.provide(name), None)
        if batch is None:
            raise DataError(f"{self._readers[name].describe()}: the dataset is empty")
        return batch

    # --- the train stream ---------------------------------------------------------------
    def next_batch(self) -> Batch:
        """The next train batch; an endless stream whose position is this Module's state."""
        streams = self._streams
        counter = self._counter
        stream = streams[0] if len(streams) == 1 else streams[self._choose(counter.drawn)]
        source = self._torch.get(stream.name)
        if source is not None:
            batch, stream.epoch, stream.position = source.next_batch(stream.epoch, stream.position)
            counter.drawn += 1
            return self._to_device(batch)
        if stream.perm is None or stream.position >= stream.limit:
            self._advance(stream)
        start = stream.position
        idx = stream.perm[start:start + self.batch_size]  # type: ignore[index]
        stream.position = start + idx.shape[0]
        counter.drawn += 1
        if self._shard is not None:
            rank, world = self._shard
            part = idx.shape[0] // world
            idx = idx[rank * part:(rank + 1) * part]
        return {key: torch.index_select(t, 0, idx) for key, t in stream.columns}  # type: ignore[union-attr]

    def epochs_completed(self) -> int:
        """Whole epochs of the first train source used up so far: a pure function of the
        position (the State), so per-epoch schedules step at the same step on resume."""
        stream = self._streams[0]
        source = self._torch.get(stream.name)
        if source is not None:
            return source.epochs_completed(stream.epoch, stream.position)
        if stream.columns is None:
            self._attach(stream)
        return stream.epoch + (1 if stream.position >= stream.limit else 0)

    def _choose(self, drawn: int) -> int:
        """Index of the source of batch number `drawn`: a counter-based draw (SplitMix64)."""
        x = (self._mix_key + (drawn + 1) * _GOLDEN) & _MASK64
        x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
        x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK64
        unit = ((x ^ (x >> 31)) >> 11) * (1.0 / (1 << 53))
        return min(bisect.bisect_right(self._cumulative, unit), len(self._cumulative) - 1)

    def _advance(self, stream: _Stream) -> None:
        """Load the source if needed, and start its next epoch once this one is used up."""
        if stream.columns is None:
            self._attach(stream)
        if stream.position >= stream.limit:
            stream.epoch += 1
            stream.position = 0
            stream.perm = None
        if stream.perm is None:
            stream.perm = self.order(stream.name, stream.epoch)

    def _attach(self, stream: _Stream) -> None:
        columns = self._load(stream.name)
        size = _length(columns)
        if size == 0 or (self.drop_last and size < self.batch_size):
            raise DataError(
                f"{self._readers[stream.name].describe()}: {size} samples, fewer than "
                f"{self.config_path}.batch_size ({self.batch_size}); lower batch_size, or set "
                f"{self.config_path}.drop_last: false to train on partial batches."
            )
        stream.columns, stream.size = columns, size
        stream.limit = size - self.batch_size + 1 if self.drop_last else size

    def order(self, name: str, epoch: int) -> torch.Tensor:
        """The sample order of `name` in `epoch`: a pure function of (seed, name, epoch)."""
        source = self._torch.get(name)
        if source is not None:
            return source.order(epoch).to(self.device)
        generator = torch.Generator()
        generator.manual_seed(stable_seed("order", self.seed, name, epoch))
        return torch.randperm(_length(self._load(name)), generator=generator).to(self.device)

    def _to_device(self, batch: Batch) -> Batch:
        if self.device.type == "cpu":
            return batch
        return {k: v.to(self.device, non_blocking=v.is_pinned()) for k, v in batch.items()}

    # --- state --------------------------------------------------------------------------
    def extra_state(self) -> dict[str, Any]:
        return {
            "drawn": self._counter.drawn,
            "sources": {s.name: {"epoch": s.epoch, "position": s.position} for s in self._streams},
        }

    def load_extra_state(self, state: dict[str, Any]) -> None:
        sources = state.get("sources")
        if not isinstance(sources, Mapping) or set(sources) != set(self._sources):
            saved = sorted(sources) if isinstance(sources, Mapping) else sources
            raise LoadError(
                f"{self.config_path}: the saved train position is for sources {saved}, this "
                f"provider trains on {sorted(self._sources)}; restore with only=[...] to skip "
                "the data position (the stream then starts from the beginning)."
            )
        for stream in self._streams:
            saved = sources[stream.name]
            stream.epoch, stream.position = int(saved["epoch"]), int(saved["position"])
            stream.perm = None
        self._counter.drawn = int(state["drawn"])

    def position(self) -> dict[str, Any]:
        """Where the train stream stands (the same ints as the state), for progress logs."""
        return self.extra_state()


def _length(columns: tuple[tuple[str, torch.Tensor], ...]) -> int:
    return int(columns[0][1].shape[0]) if columns else 0


def _tensor(value: np.ndarray, key: str, reader: DataReader) -> torch.Tensor:
    """A numpy column as a tensor (shared memory where possible); text columns refused."""
    if value.dtype.kind not in "biuf":
        raise DataError(
            f"{reader.describe()}: column {key!r} holds {value.dtype} values, which cannot "
            "become a tensor; drop it with `keys`, or convert it in a custom reader."
        )
    if not value.flags.writeable or not value.flags.c_contiguous:
        value = np.array(value, order="C")
    try:
        return torch.from_numpy(value)
    except TypeError as exc:
        raise DataError(f"{reader.describe()}: column {key!r}: {exc}; cast it with `dtype`") from exc


def _positive_int(value: Any, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ConfigError(f"{DataProvider.config_path}.{name}: expected a positive integer, got {value!r}")
    return value


def _device(device: Any, where: str) -> torch.device:
    try:
        return torch.device(device)
    except (RuntimeError, TypeError) as exc:
        raise ConfigError(f"{where}: {device!r} is not a torch device (cpu, cuda, cuda:1, ...)") from exc


def _type_hint(spec: Any) -> str:
    """` (e.g. type: ptutils.data.NpzReader)` guessed from a `path:` suffix, if any."""
    if isinstance(spec, Mapping) and isinstance(spec.get("path"), str):
        for suffix, reader in _SUFFIX_TYPES.items():
            if spec["path"].lower().endswith(suffix):
                return f"; add `type: ptutils.data.{reader}` for {spec['path']}"
    return ", e.g. {type: ptutils.data.NpzReader, path: train.npz}"
