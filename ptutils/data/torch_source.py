"""Torch `Dataset`s as data sources: loaded through a `DataLoader`, resumed exactly.

A `datasets:` entry whose `type:` builds a `torch.utils.data.Dataset` (map-style or
`IterableDataset`) becomes a `TorchSource`. Its samples are loaded by a DataLoader
(with `data.num_workers` worker processes, forked), collated with torch's
`default_collate` and named by `data.columns` (tuple samples) or their keys (dict ones).

Exact resume rests on three rules:

- the position is small ints: (epoch, samples drawn in it) for a map-style dataset,
  whose order is the permutation `stable_seed("order", seed, name, epoch)` (the same as
  an in-memory reader's), and (epoch, batches drawn in it) for an IterableDataset;
- every sample is loaded with the global RNGs (torch CPU, `random`, numpy) seeded from
  (seed, name, epoch, index) (an IterableDataset: (seed, name, epoch, worker, sample
  number)), so random augmentation depends neither on the worker nor on the time it
  runs; in the main process the RNG states are saved and restored around each sample,
  so the training RNGs (dropout) never see the data loading;
- the DataLoader draws its base seed from a generator of its own, never from the
  global one, and one iterator runs across epochs (an endless batch sampler over
  (epoch, index) pairs), so workers do not restart at epoch boundaries.

In a group session (ptutils.group) the batch sampler yields only the rank's part of
each global batch (`TorchSource.shard`); the position stays global.

Why not torchdata's `StatefulDataLoader`: its state snapshots the sampler, the fetcher
and every worker (RNG states, iterator internals): large, tied to library versions,
and taken while batches are in flight. Here the order and every sample's randomness
are pure functions of the position, so the state stays a few ints and a restored run
just starts a fresh iterator there.
"""

from __future__ import annotations

import random
import traceback
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, IterableDataset, Sampler, get_worker_info
from torch.utils.data._utils.collate import default_collate

from ptutils.data.readers import stable_seed
from ptutils.errors import ConfigError, DataError

Batch = dict[str, torch.Tensor]
DEFAULT_COLUMNS = ("x", "y")
_MASK32 = (1 << 32) - 1
_MASK64 = (1 << 64) - 1


@dataclass(frozen=True)
class LoaderOptions:
    """The `data:` keys of DataLoader loading (already checked)."""

    num_workers: int = 0
    persistent_workers: bool = False
    pin_memory: bool | None = None
    """None: automatic (on when batches go to a CUDA device)."""
    prefetch_factor: int | None = None
    columns: tuple[str, ...] = DEFAULT_COLUMNS


def loader_options(
    num_workers: Any,
    persistent_workers: Any,
    pin_memory: Any,
    prefetch_factor: Any,
    columns: Any,
    *,
    where: str = "data",
) -> LoaderOptions:
    """The checked options; ConfigError naming `data.<key>` for a bad value."""
    if isinstance(num_workers, bool) or not isinstance(num_workers, int) or num_workers < 0:
        raise ConfigError(
            f"{where}.num_workers: expected an integer >= 0 (0 loads in the training "
            f"process), got {num_workers!r}"
        )
    if persistent_workers is not None and not isinstance(persistent_workers, bool):
        raise ConfigError(f"{where}.persistent_workers: expected true or false, got {persistent_workers!r}")
    if persistent_workers and num_workers == 0:
        raise ConfigError(
            f"{where}.persistent_workers: true does nothing with num_workers: 0; set "
            f"{where}.num_workers, or drop persistent_workers"
        )
    if pin_memory == "auto":
        pin_memory = None
    if pin_memory is not None and not isinstance(pin_memory, bool):
        raise ConfigError(f"{where}.pin_memory: expected true, false or auto, got {pin_memory!r}")
    if pin_memory and not torch.cuda.is_available():
        raise ConfigError(
            f"{where}.pin_memory: true does nothing here: this torch sees no CUDA device; "
            "drop it (auto pins when batches go to a CUDA device)"
        )
    if prefetch_factor is not None:
        if isinstance(prefetch_factor, bool) or not isinstance(prefetch_factor, int) or prefetch_factor < 1:
            raise ConfigError(
                f"{where}.prefetch_factor: expected a positive integer (batches loaded ahead "
                f"per worker), got {prefetch_factor!r}"
            )
        if num_workers == 0:
            raise ConfigError(
                f"{where}.prefetch_factor: does nothing with num_workers: 0; set "
                f"{where}.num_workers, or drop prefetch_factor"
            )
    names = DEFAULT_COLUMNS if columns is None else columns
    if isinstance(names, str) or not isinstance(names, Sequence) or not names or not all(
        isinstance(n, str) and n for n in names
    ):
        raise ConfigError(
            f"{where}.columns: expected a list of names for the items of a tuple sample, "
            f"e.g. [x, y]; got {columns!r}"
        )
    if len(set(names)) != len(names):
        raise ConfigError(f"{where}.columns: names must differ, got {list(names)}")
    persistent = num_workers > 0 if persistent_workers is None else persistent_workers
    return LoaderOptions(num_workers, persistent, pin_memory, prefetch_factor, tuple(names))


def is_torch_dataset(obj: Any) -> bool:
    """Whether `obj` is a torch Dataset (map-style or iterable)."""
    return isinstance(obj, Dataset)


# --- per-sample seeds --------------------------------------------------------------------


def _seed_all(seed: int) -> None:
    torch.default_generator.manual_seed(seed)  # the CPU generator only: CUDA's is training's
    random.seed(seed)
    np.random.seed(seed & _MASK32)


class _Seeded:
    """Seed the global RNGs for one sample; in the main process, restore them after."""

    __slots__ = ("seed", "saved")

    def __init__(self, seed: int) -> None:
        self.seed = seed
        self.saved: tuple[Any, ...] | None = None

    def __enter__(self) -> None:
        if get_worker_info() is None:
            self.saved = (torch.default_generator.get_state(), random.getstate(),
                          np.random.get_state())
        _seed_all(self.seed)

    def __exit__(self, *exc: object) -> None:
        if self.saved is not None:
            torch_state, py_state, np_state = self.saved
            torch.default_generator.set_state(torch_state)
            random.setstate(py_state)
            np.random.set_state(np_state)


class _Failure:
    """A sample or batch that could not be made; the main process raises its message."""

    __slots__ = ("message",)

    def __init__(self, message: str) -> None:
        self.message = message


def _raised(what: str, exc: BaseException) -> _Failure:
    tb = "".join(traceback.format_exception(type(exc), exc, exc.__traceback__)[-6:])
    return _Failure(f"{what} raised {type(exc).__name__}: {exc}\n{tb.rstrip()}")


_END = object()
"""The end of an IterableDataset's pass."""


def _mix(base: int, index: int) -> int:
    """A 63-bit seed for sample `index` of a pass whose seed is `base` (SplitMix64's
    finaliser over base + (index + 1) * golden ratio: cheap, and a bijection of index)."""
    x = (base + (index + 1) * 0x9E3779B97F4A7C15) & _MASK64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK64
    return (x ^ (x >> 31)) >> 1


class _Indexed(Dataset):  # type: ignore[type-arg]
    """A map-style dataset read by (epoch or "eval", index) keys, each sample seeded from
    (seed, name, epoch or "eval", index)."""

    def __init__(self, dataset: Any, seed: int, name: str) -> None:
        self.dataset, self.seed, self.name = dataset, seed, name
        self._bases: dict[int | str, int] = {}

    def __len__(self) -> int:
        return len(self.dataset)

    def sample_seed(self, tag: int | str, index: int) -> int:
        base = self._bases.get(tag)
        if base is None:
            if len(self._bases) > 64:
                self._bases.clear()
            base = self._bases[tag] = stable_seed("sample", self.seed, self.name, tag)
        return _mix(base, index)

    def __getitem__(self, key: tuple[int | str, int]) -> Any:
        tag, index = key
        seed = self.sample_seed(tag, index)
        if get_worker_info() is None:  # the training process: keep its RNGs as they were
            with _Seeded(seed):
                return self._get(index)
        _seed_all(seed)  # a loader worker: nothing else draws from its RNGs
        return self._get(index)

    def _get(self, index: int) -> Any:
        try:
            return self.dataset[index]
        except Exception as exc:  # noqa: BLE001 - reported in the main process
            return _raised(f"dataset[{index}]", exc)


class _Iterated(IterableDataset):  # type: ignore[type-arg]
    """An IterableDataset's pass `tag` (an epoch, or "eval"), each sample seeded."""

    def __init__(self, dataset: Any, seed: int, name: str) -> None:
        self.dataset, self.seed, self.name = dataset, seed, name
        self.tag: int | str = "eval"

    def __iter__(self) -> Iterator[Any]:
        info = get_worker_info()
        worker = info.id if info is not None else 0
        iterator: Iterator[Any] | None = None
        number = 0
        while True:  # never yield inside `_Seeded`: the caller would run with its seeds
            with _Seeded(stable_seed("sample", self.seed, self.name, self.tag, worker, number)):
                try:
                    if iterator is None:
                        iterator = iter(self.dataset)
                    sample = next(iterator)
                except StopIteration:
                    sample = _END
                except Exception as exc:  # noqa: BLE001 - reported in the main process
                    sample = _raised(f"sample {number} of worker {worker}", exc)
            if sample is _END:
                return
            yield sample
            if isinstance(sample, _Failure):
                return
            number += 1


# --- collation ---------------------------------------------------------------------------


def _item_problem(value: Any) -> str | None:
    if isinstance(value, torch.Tensor):
        return None
    if isinstance(value, np.ndarray):
        return None if value.dtype.kind in "biuf" else f"a numpy array of {value.dtype}"
    if isinstance(value, bool | int | float | np.number):
        return None
    return f"a {type(value).__module__}.{type(value).__qualname__}"


def _sample_problem(sample: Any, columns: Sequence[str]) -> str | None:
    """What is wrong with one sample, or None."""
    if isinstance(sample, Mapping):
        items = list(sample.items())
        if not items:
            return "an empty dict"
        for key, value in items:
            if not isinstance(key, str):
                return f"a dict with the non-string key {key!r}"
            problem = _item_problem(value)
            if problem:
                return f"a dict whose {key!r} is {problem}"
        return None
    if isinstance(sample, tuple | list):
        if len(sample) != len(columns):
            return (f"a {type(sample).__name__} of {len(sample)} items, but data.columns names "
                    f"{len(columns)} ({', '.join(columns)})")
        for name, value in zip(columns, sample):
            problem = _item_problem(value)
            if problem:
                return f"a {type(sample).__name__} whose item {name!r} is {problem}"
        return None
    return f"a {type(sample).__module__}.{type(sample).__qualname__}"


class _Collate:
    """default_collate, then named columns; a bad sample becomes a `_Failure`."""

    def __init__(self, columns: tuple[str, ...]) -> None:
        self.columns = columns

    def __call__(self, samples: list[Any]) -> Any:
        for sample in samples:
            if isinstance(sample, _Failure):
                return sample
            problem = _sample_problem(sample, self.columns)
            if problem:
                return _Failure(
                    f"a sample is {problem}; a sample must be a tuple (named by data.columns) "
                    "or a dict of tensors, numeric numpy arrays or numbers (convert images "
                    "with a ToTensor transform)"
                )
        try:
            batch = default_collate(samples)
        except Exception as exc:  # noqa: BLE001 - samples that do not stack
            return _raised("collating the samples (default_collate)", exc)
        if isinstance(batch, Mapping):
            return dict(batch)
        return dict(zip(self.columns, batch))


# --- samplers ----------------------------------------------------------------------------


class _TrainBatches(Sampler):  # type: ignore[type-arg]
    """Endless batches of (epoch, index) keys from a position on, epoch after epoch."""

    def __init__(self, order: Callable[[int], torch.Tensor], size: int, batch_size: int,
                 limit: int, epoch: int, position: int,
                 shard: tuple[int, int] | None = None) -> None:
        self.order, self.size, self.batch_size, self.limit = order, size, batch_size, limit
        self.epoch, self.position = epoch, position
        self.shard = shard

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        epoch, position = self.epoch, self.position
        perm: list[int] | None = None
        while True:
            if position >= self.limit:
                epoch, position, perm = epoch + 1, 0, None
            if perm is None:
                perm = self.order(epoch).tolist()
            chunk = perm[position:position + self.batch_size]
            position += len(chunk)
            if self.shard is not None:  # this rank's part of the global batch, unloaded
                rank, world = self.shard
                part = len(chunk) // world
                chunk = chunk[rank * part:(rank + 1) * part]
            yield [(epoch, i) for i in chunk]


class TorchSource:
    """One torch Dataset: its train stream at a position, its eval batches, an example."""

    def __init__(self, dataset: Any, *, name: str, where: str, seed: int, batch_size: int,
                 eval_batch_size: int, drop_last: bool, options: LoaderOptions) -> None:
        self.dataset, self.name, self.where, self.seed = dataset, name, where, seed
        self.batch_size, self.eval_batch_size, self.drop_last = batch_size, eval_batch_size, drop_last
        self.options = options
        self.iterable = isinstance(dataset, IterableDataset)
        self.pin = False
        self.shard: tuple[int, int] | None = None
        """(rank, world_size): the train stream gives this rank's part of each batch."""
        self._train: Iterator[Any] | None = None
        self._train_at: tuple[int, int] | None = None
        self._eval: DataLoader | None = None  # type: ignore[type-arg]

    def describe(self) -> str:
        return f"{self.where} ({type(self.dataset).__name__})"

    # --- sizes ------------------------------------------------------------------------
    def size(self) -> int | None:
        """Number of samples (`len()`); None for an IterableDataset without `__len__`."""
        try:
            return int(len(self.dataset))
        except TypeError:
            if self.iterable:
                return None
            raise DataError(f"{self.describe()}: a map-style Dataset must define __len__") from None

    def check(self) -> None:
        """A map-style dataset has a length and samples; nothing is loaded."""
        size = self.size()
        if size == 0:
            raise DataError(f"{self.describe()}: the dataset is empty (len() is 0)")

    def limit(self) -> int:
        """Positions from which a train batch still starts in an epoch (map-style)."""
        size = self.size() or 0
        if size == 0 or (self.drop_last and size < self.batch_size):
            raise DataError(
                f"{self.describe()}: {size} samples, fewer than data.batch_size "
                f"({self.batch_size}); lower batch_size, or set data.drop_last: false to "
                "train on partial batches."
            )
        return size - self.batch_size + 1 if self.drop_last else size

    def order(self, epoch: int) -> torch.Tensor:
        """The sample order in `epoch`: a pure function of (seed, name, epoch)."""
        generator = torch.Generator()
        generator.manual_seed(stable_seed("order", self.seed, self.name, epoch))
        return torch.randperm(self.size() or 0, generator=generator)

    def epochs_completed(self, epoch: int, position: int) -> int:
        """Whole epochs used up at this position (an IterableDataset: `epoch`; its end
        shows only when the next batch is asked for)."""
        if self.iterable:
            return epoch
        return epoch + (1 if position >= self.limit() else 0)

    # --- loaders ----------------------------------------------------------------------
    def _loader(self, dataset: Any, *, persistent: bool, **kwargs: Any) -> DataLoader:  # type: ignore[type-arg]
        opts = self.options
        workers = opts.num_workers
        generator = torch.Generator()
        generator.manual_seed(stable_seed("loader", self.seed, self.name))
        extra: dict[str, Any] = {}
        if workers > 0:
            extra["multiprocessing_context"] = "fork"
            extra["persistent_workers"] = persistent
            if opts.prefetch_factor is not None:
                extra["prefetch_factor"] = opts.prefetch_factor
        return DataLoader(dataset, num_workers=workers, collate_fn=_Collate(opts.columns),
                          pin_memory=self.pin, generator=generator, **extra, **kwargs)

    def _checked(self, batch: Any) -> Batch:
        if isinstance(batch, _Failure):
            raise DataError(f"{self.describe()}: {batch.message}")
        return batch  # type: ignore[no-any-return]

    def _fetch(self, iterator: Iterator[Any]) -> Any:
        try:
            return next(iterator)
        except StopIteration:
            raise
        except Exception:
            self.close_train()
            raise

    # --- the train stream -------------------------------------------------------------
    def next_batch(self, epoch: int, position: int) -> tuple[Batch, int, int]:
        """The train batch at (epoch, position), and the position after it. The running
        iterator is kept when it stands there; otherwise a fresh one starts there."""
        if self.iterable:
            return self._next_iterable(epoch, position)
        limit = self.limit()
        if self._train is None or self._train_at != (epoch, position):
            self.close_train()
            sampler = _TrainBatches(self.order, self.size() or 0, self.batch_size, limit,
                                    epoch, position, self.shard)
            self._train = iter(self._loader(_Indexed(self.dataset, self.seed, self.name),
                                            persistent=False, batch_sampler=sampler))
        if position >= limit:
            epoch, position = epoch + 1, 0
        batch = self._checked(self._fetch(self._train))
        position += min(self.batch_size, (self.size() or 0) - position)
        self._train_at = (epoch, position)
        return batch, epoch, position

    def _next_iterable(self, epoch: int, position: int) -> tuple[Batch, int, int]:
        if self._train is None or self._train_at != (epoch, position):
            self._start_epoch(epoch, skip=position)
        assert self._train is not None
        try:
            batch = self._fetch(self._train)
        except StopIteration:
            if position == 0:
                self.close_train()
                raise DataError(
                    f"{self.describe()}: epoch {epoch} gave no batch of data.batch_size "
                    f"({self.batch_size}); check the dataset, or set data.drop_last: false"
                ) from None
            epoch, position = epoch + 1, 0
            self._start_epoch(epoch, skip=0)
            return self._next_iterable(epoch, position)
        batch = self._checked(batch)
        self._train_at = (epoch, position + 1)
        if self.shard is not None:  # an IterableDataset has no keys to split: load, slice
            rank, world = self.shard
            part = self.batch_size // world
            batch = {k: v[rank * part:(rank + 1) * part] for k, v in batch.items()}
        return batch, epoch, position + 1

    def _start_epoch(self, epoch: int, skip: int) -> None:
        """A fresh pass over the IterableDataset for `epoch`, `skip` batches replayed."""
        self.close_train()
        set_epoch = getattr(self.dataset, "set_epoch", None)
        if callable(set_epoch):
            set_epoch(epoch)
        wrapper = _Iterated(self.dataset, self.seed, self.name)
        wrapper.tag = epoch
        loader = self._loader(wrapper, persistent=False, batch_size=self.batch_size,
                              drop_last=self.drop_last)
        iterator = iter(loader)
        for done in range(skip):
            try:
                self._checked(self._fetch(iterator))
            except StopIteration:
                raise DataError(
                    f"{self.describe()}: cannot resume at batch {skip} of epoch {epoch}: this "
                    f"pass ends after {done} batches; the dataset changed since the checkpoint"
                ) from None
        self._train, self._train_at = iterator, (epoch, skip)

    def close_train(self) -> None:
        """Drop the train iterator (its workers stop)."""
        iterator, self._train, self._train_at = self._train, None, None
        shutdown = getattr(iterator, "_shutdown_workers", None)
        if callable(shutdown):
            shutdown()

    # --- eval -------------------------------------------------------------------------
    def provide(self) -> Iterator[Batch]:
        """Eval batches: index order (or the dataset's own), each sample once."""
        if self._eval is None:
            step = self.eval_batch_size
            persistent = self.options.persistent_workers
            if self.iterable:
                self._eval = self._loader(_Iterated(self.dataset, self.seed, self.name),
                                          persistent=persistent, batch_size=step)
            else:
                size = self.size() or 0
                batches = [[("eval", i) for i in range(start, min(start + step, size))]
                           for start in range(0, size, step)]
                self._eval = self._loader(_Indexed(self.dataset, self.seed, self.name),
                                          persistent=persistent, batch_sampler=batches)
        return (self._checked(batch) for batch in self._eval)

    def example_batch(self) -> Batch:
        """The first eval batch, loaded in this process without touching its RNGs."""
        collate = _Collate(self.options.columns)
        if self.iterable:
            wrapper = _Iterated(self.dataset, self.seed, self.name)
            samples = []
            for sample in wrapper:
                samples.append(sample)
                if isinstance(sample, _Failure) or len(samples) == self.eval_batch_size:
                    break
        else:
            indexed = _Indexed(self.dataset, self.seed, self.name)
            count = min(self.eval_batch_size, self.size() or 0)
            samples = [indexed[("eval", i)] for i in range(count)]
        if not samples:
            raise DataError(f"{self.describe()}: the dataset is empty")
        return self._checked(collate(samples))

    def close(self) -> None:
        """Stop every worker of this source."""
        self.close_train()
        loader, self._eval = self._eval, None
        iterator = getattr(loader, "_iterator", None)
        shutdown = getattr(iterator, "_shutdown_workers", None)
        if callable(shutdown):
            shutdown()
