"""Torch Datasets as data sources: real DataLoader workers, exact resume, clean RNGs."""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import yaml

from ptutils import registry
from ptutils.data import DataProvider
from ptutils.errors import ConfigError, DataError
from ptutils.model import Model
from ptutils.trainer import Evaluator
from tests.helpers import assert_bit_identical, digits_config, series

ROOT = Path(__file__).resolve().parent.parent
DATASETS = str(ROOT / "tests" / "torch_datasets.py")
KILLER = str(ROOT / "tests" / "killer.py")


def provider(datasets: dict[str, Any], **data: Any) -> DataProvider:
    """A provider built from its config, the test datasets' file listed under `imports:`."""
    with registry.isolated():
        registry.allow_imports([DATASETS])
        return DataProvider.from_config({"datasets": datasets, **data}, where="data")


def blobs(**kwargs: Any) -> dict[str, Any]:
    return {"type": "torch_datasets.Blobs", **kwargs}


def augmented(num_workers: int, **data: Any) -> DataProvider:
    """50 augmented samples (index column `i`), batches of 8: 6 batches an epoch."""
    return provider({"train": blobs(n=50, augment=0.5, dicts=True),
                     "test": blobs(n=21, seed=1, augment=0.5)},
                    batch_size=8, seed=5, num_workers=num_workers, **data)


def roundtrip(state: dict[str, Any]) -> dict[str, Any]:
    """The position as a fresh process gets it back: plain ints (JSON)."""
    return json.loads(json.dumps(state))


def assert_same_batches(a: list[dict[str, torch.Tensor]], b: list[dict[str, torch.Tensor]]) -> None:
    assert len(a) == len(b)
    for i, (x, y) in enumerate(zip(a, b)):
        assert x.keys() == y.keys(), i
        for key in x:
            assert x[key].dtype == y[key].dtype and torch.equal(x[key], y[key]), (i, key)


def rng_states() -> tuple[Any, ...]:
    return torch.get_rng_state(), random.getstate(), np.random.get_state()


def assert_rng_states(before: tuple[Any, ...]) -> None:
    torch_state, py_state, np_state = before
    assert torch.equal(torch.get_rng_state(), torch_state)
    assert random.getstate() == py_state
    after = np.random.get_state()
    assert after[0] == np_state[0] and np.array_equal(after[1], np_state[1])
    assert after[2:] == np_state[2:]


# --- exact resume ------------------------------------------------------------------------


@pytest.fixture(scope="module")
def reference() -> list[dict[str, torch.Tensor]]:
    """30 uninterrupted train batches (5 epochs) with two workers."""
    data = augmented(2)
    batches = [data.next_batch() for _ in range(30)]
    data.close()
    return batches


@pytest.mark.parametrize("cut", [0, 5, 6, 7, 12, 23])  # 6, 12: epoch boundaries
def test_restored_provider_yields_the_uninterrupted_batches(reference, cut: int) -> None:
    first = augmented(2)
    drawn = [first.next_batch() for _ in range(cut)]
    state = roundtrip(first.state_dict())
    first.close()
    assert state["sources"]["train"]["position"] <= 50 and state["drawn"] == cut
    restored = augmented(2)
    restored.load_state_dict(state)
    assert restored.epochs_completed() == cut // 6
    rest = [restored.next_batch() for _ in range(30 - cut)]
    restored.close()
    assert_same_batches(drawn + rest, reference)


def test_each_epoch_is_the_seeded_permutation_and_augmentation_differs_per_epoch(reference) -> None:
    data = augmented(0)
    for epoch in range(5):
        rows = torch.cat([b["i"] for b in reference[6 * epoch:6 * epoch + 6]])
        assert torch.equal(rows, data.order("train", epoch)[:48])
    # the same sample in two epochs gets different noise: seeds include the epoch
    first = {int(i): x for b in reference[:6] for i, x in zip(b["i"], b["x"])}
    second = {int(i): x for b in reference[6:12] for i, x in zip(b["i"], b["x"])}
    shared = sorted(set(first) & set(second))
    assert shared and not any(torch.equal(first[i], second[i]) for i in shared)


def test_batches_do_not_depend_on_the_number_of_workers(reference) -> None:
    data = augmented(0)
    assert_same_batches([data.next_batch() for _ in range(30)], reference)
    one = augmented(1, prefetch_factor=1)
    assert_same_batches([one.next_batch() for _ in range(30)], reference)
    one.close()


def test_a_warm_provider_keeps_its_iterator_and_a_restored_one_restarts() -> None:
    data = augmented(2)
    data.next_batch()
    source = data._torch["train"]
    iterator = source._train
    data.load_state_dict(data.state_dict())  # same position: nothing to restart
    data.next_batch()
    assert source._train is iterator
    data.load_state_dict({"drawn": 0, "sources": {"train": {"epoch": 0, "position": 0}}})
    data.next_batch()
    assert source._train is not iterator
    data.close()


def test_mixed_torch_and_reader_sources_resume_exactly() -> None:
    def make() -> DataProvider:
        return provider({"a": blobs(n=40, augment=1.0),
                         "b": {"type": "ptutils.data.SyntheticReader", "n": 30, "features": 4}},
                        train={"a": 2, "b": 1}, batch_size=8, num_workers=2, seed=2)

    data = make()
    reference = [data.next_batch() for _ in range(16)]
    data.close()
    first = make()
    head = [first.next_batch() for _ in range(7)]
    restored = make()
    restored.load_state_dict(roundtrip(first.state_dict()))
    first.close()
    assert_same_batches(head + [restored.next_batch() for _ in range(9)], reference)
    restored.close()


@pytest.mark.parametrize("workers", [0, 2])
def test_iterable_dataset_resumes_exactly(workers: int) -> None:
    def make() -> DataProvider:
        return provider({"train": {"type": "torch_datasets.Stream", "n": 40}},
                        batch_size=6, seed=4, num_workers=workers)

    per_epoch = 6  # 40 // 6 = 6 batches; two workers: 2 x (20 // 6) = 6
    data = make()
    reference = [data.next_batch() for _ in range(20)]
    data.close()
    epoch0 = torch.cat([b["i"] for b in reference[:per_epoch]])
    epoch1 = torch.cat([b["i"] for b in reference[per_epoch:2 * per_epoch]])
    assert len(set(epoch0.tolist())) == 36 and not torch.equal(epoch0, epoch1)  # set_epoch
    for cut in (0, 4, per_epoch, per_epoch + 1, 13):
        first = make()
        head = [first.next_batch() for _ in range(cut)]
        state = roundtrip(first.state_dict())
        first.close()
        restored = make()
        restored.load_state_dict(state)
        assert restored.epochs_completed() == state["sources"]["train"]["epoch"]
        assert_same_batches(head + [restored.next_batch() for _ in range(20 - cut)], reference)
        restored.close()


# --- the global RNGs ---------------------------------------------------------------------


@pytest.mark.parametrize("workers", [0, 2])
def test_loading_never_touches_the_global_rngs(workers: int) -> None:
    torch.manual_seed(11)
    random.seed(11)
    np.random.seed(11)
    before = rng_states()
    data = augmented(workers)
    for _ in range(8):  # across an epoch boundary
        data.next_batch()
    list(data.provide("test"))
    data.example_batch("train")
    data.load_state_dict({"drawn": 2, "sources": {"train": {"epoch": 1, "position": 16}}})
    data.next_batch()  # a fresh iterator at a restored position
    assert_rng_states(before)
    stream = provider({"s": {"type": "torch_datasets.Stream"}}, train="s", batch_size=5,
                      num_workers=workers)
    stream.next_batch()
    stream.example_batch("s")
    assert_rng_states(before)
    data.close()
    stream.close()


def test_example_batch_is_the_first_eval_batch_and_starts_no_worker() -> None:
    data = augmented(2)
    example = data.example_batch("test")
    assert data._torch["test"]._eval is None, "no DataLoader (and no worker) was made"
    assert_same_batches([example], [next(data.provide("test"))])
    assert data.sizes() == {"train": 50, "test": 21}
    data.check()
    data.close()


# --- eval --------------------------------------------------------------------------------


def test_eval_batches_and_metrics_do_not_depend_on_the_number_of_workers() -> None:
    torch.manual_seed(0)
    model = Model.from_config({"network": {"type": "torch.nn.Linear", "in_features": 4,
                                           "out_features": 3}}, where="model")
    evaluator = Evaluator({"test": {"data": "test", "metrics": ["loss", "accuracy"]}})
    results, batches = [], []
    for workers in (0, 2, 2):
        data = augmented(workers, eval_batch_size=5)
        batches.append(list(data.provide("test")))
        results.append(evaluator.evaluate(model, data))
        results.append(evaluator.evaluate(model, data))  # persistent workers, again
        data.close()
    assert [len(b["y"]) for b in batches[0]] == [5, 5, 5, 5, 1]
    assert_same_batches(batches[0], batches[1])
    assert all(r == results[0] for r in results), results


# --- errors ------------------------------------------------------------------------------


@pytest.mark.parametrize(("data", "message"), [
    ({"num_workers": -1}, "data.num_workers: expected an integer >= 0"),
    ({"num_workers": "2"}, "data.num_workers"),
    ({"num_workers": 2, "persistent_workers": "yes"}, "data.persistent_workers: expected true"),
    ({"persistent_workers": True}, "data.persistent_workers: true does nothing"),
    ({"num_workers": 2, "prefetch_factor": 0}, "data.prefetch_factor: expected a positive"),
    ({"prefetch_factor": 2}, "data.prefetch_factor: does nothing with num_workers: 0"),
    ({"pin_memory": "sometimes"}, "data.pin_memory: expected true, false or auto"),
    ({"columns": "x"}, "data.columns: expected a list of names"),
    ({"columns": ["x", "x"]}, "data.columns: names must differ"),
    ({"colums": ["x"]}, "colums: unknown key for DataProvider. Did you mean 'columns'"),
])
def test_bad_loader_keys_are_config_errors_naming_the_key(data: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigError, match=message.replace(".", r"\.").replace("'", "'?")):
        provider({"train": blobs()}, **data)


@pytest.mark.skipif(torch.cuda.is_available(), reason="pinning works with CUDA")
def test_pin_memory_on_a_cpu_only_machine_is_an_error() -> None:
    with pytest.raises(ConfigError, match=r"data\.pin_memory: true does nothing here"):
        provider({"train": blobs()}, pin_memory=True)
    data = provider({"train": blobs()}, pin_memory="auto")
    data.pin_for("cpu")
    assert data._torch["train"].pin is False


@pytest.mark.parametrize("key", ["num_workers", "columns"])
def test_loader_keys_without_a_torch_dataset_are_refused(key: str) -> None:
    value = 2 if key == "num_workers" else ["a", "b"]
    with pytest.raises(ConfigError, match=rf"data\.{key}: .* has none .*drop it"):
        provider({"train": {"type": "ptutils.data.SyntheticReader", "n": 10}}, **{key: value})


def test_a_type_that_is_neither_reader_nor_dataset_is_refused() -> None:
    with pytest.raises(ConfigError, match=r"data\.datasets\.train\.type: torch\.nn\.Linear is a "
                       r"Linear, neither a DataReader nor a torch\.utils\.data\.Dataset"):
        provider({"train": {"type": "torch.nn.Linear", "in_features": 1, "out_features": 1}})


@pytest.mark.parametrize("workers", [0, 2])
@pytest.mark.parametrize(("kind", "message"), [
    ("text", r"a sample is a tuple whose item 'x' is a builtins\.str"),
    ("object", r"a sample is a builtins\.object"),
    ("short", r"a sample is a tuple of 3 items, but data\.columns names 2 \(x, y\)"),
    ("raises", r"dataset\[\d+\] raised ValueError: cannot read sample"),
])
def test_a_bad_sample_is_a_data_error_naming_the_dataset(workers: int, kind: str, message: str) -> None:
    data = provider({"train": {"type": "torch_datasets.Bad", "kind": kind}}, batch_size=4,
                    num_workers=workers)
    pattern = r"data\.datasets\.train \(Bad\): " + message
    with pytest.raises(DataError, match=pattern):
        data.next_batch()
    with pytest.raises(DataError, match=pattern):
        data.example_batch("train")
    with pytest.raises(DataError, match=pattern):
        list(data.provide("train"))
    data.close()


@pytest.mark.parametrize("workers", [0, 2])
def test_an_iterable_dataset_that_raises_is_a_data_error_and_leaves_the_rngs(workers: int) -> None:
    data = provider({"train": {"type": "torch_datasets.Stream", "fail_at": 3}}, batch_size=4,
                    num_workers=workers)
    before = rng_states()
    pattern = (r"data\.datasets\.train \(Stream\): sample 3 of worker 0 raised OSError: lost "
               r"the connection at sample 3")
    with pytest.raises(DataError, match=pattern):
        data.next_batch()
    with pytest.raises(DataError, match=pattern):
        data.example_batch("train")
    assert_rng_states(before)
    data.close()


def test_a_dataset_smaller_than_a_batch_is_refused_for_training() -> None:
    data = provider({"train": blobs(n=5)}, batch_size=8)
    with pytest.raises(DataError, match=r"data\.datasets\.train \(Blobs\): 5 samples, fewer than "
                       r"data\.batch_size \(8\)"):
        data.next_batch()


# --- a whole run -------------------------------------------------------------------------


def run_config(tmp_path: Path, kill_step: int) -> dict[str, Any]:
    cfg = digits_config(imports=[KILLER, DATASETS], callbacks=[
        {"type": "killer.KillAt", "step": kill_step, "marker": str(tmp_path / "killed")}])
    cfg["data"] = {"batch_size": 16, "seed": 1, "num_workers": 2, "datasets": {
        "train": blobs(n=200, features=64, classes=10, augment=0.3),
        "test": blobs(n=50, features=64, classes=10, seed=1, augment=0.3)}}
    return cfg


def test_a_killed_run_with_workers_resumes_bit_identical(tmp_path: Path) -> None:
    from tests.test_run import final_state, ptutils

    path = tmp_path / "exp.yaml"
    path.write_text(yaml.safe_dump(run_config(tmp_path, kill_step=27)))
    store_a, store_b = tmp_path / "runs-a", tmp_path / "runs-b"
    killed = ptutils("run", str(path), "--store", str(store_b), "-q")
    assert killed.returncode == -9, killed.stderr
    ptutils("run", str(path), "--store", str(store_b), "-q", "--resume", check=True)
    ptutils("run", str(path), "--store", str(store_a), "-q", check=True)  # marker exists now
    doc_a, ckpt_a, state_a, stats_a = final_state(store_a, "small")
    doc_b, ckpt_b, state_b, stats_b = final_state(store_b, "small")
    assert doc_a["status"] == doc_b["status"] == "completed"
    assert ckpt_a["step"] == ckpt_b["step"] == 60
    assert state_b["trainer"]["data"]["sources"]["train"] == {"epoch": 4, "position": 192}
    assert_bit_identical(state_a, state_b)
    assert series(stats_a) == series(stats_b)
    assert any(p["name"] == "test/accuracy" for p in stats_b)


# --- torchvision ---------------------------------------------------------------------------


def test_torchvision_image_folder_with_random_transforms_builds_and_resumes(tmp_path: Path) -> None:
    pytest.importorskip("torchvision")
    from PIL import Image

    for label in ("cat", "dog"):
        (tmp_path / label).mkdir()
        for i in range(6):
            pixels = np.full((10, 10, 3), 20 * i + (100 if label == "dog" else 0), dtype=np.uint8)
            Image.fromarray(pixels).save(tmp_path / label / f"{i}.png")
    folder = {
        "type": "torchvision.datasets.ImageFolder", "root": str(tmp_path),
        "transform": {"type": "torchvision.transforms.Compose", "transforms": [
            {"type": "torchvision.transforms.RandomCrop", "size": 8},
            {"type": "torchvision.transforms.ToTensor"}]},
    }

    def make() -> DataProvider:
        return provider({"train": folder}, batch_size=4, num_workers=2, columns=["image", "label"])

    data = make()
    reference = [data.next_batch() for _ in range(7)]
    assert reference[0]["image"].shape == (4, 3, 8, 8) and reference[0]["label"].dtype == torch.int64
    first = make()
    head = [first.next_batch() for _ in range(3)]
    restored = make()
    restored.load_state_dict(roundtrip(first.state_dict()))
    assert_same_batches(head + [restored.next_batch() for _ in range(4)], reference)
    for p in (data, first, restored):
        p.close()


def test_torchvision_downloading_datasets_stay_refused() -> None:
    pytest.importorskip("torchvision")
    from ptutils.errors import RegistryError

    with pytest.raises(RegistryError, match="not allowed"):
        provider({"train": {"type": "torchvision.datasets.MNIST", "root": "x", "download": True}})


def test_torchvision_is_allowed_exactly_when_installed() -> None:
    import importlib.util

    from ptutils import policy

    installed = importlib.util.find_spec("torchvision") is not None
    declared = policy.declared()
    assert ("torchvision.transforms" in declared.modules) == installed
    assert ("torchvision.datasets.ImageFolder" in [c[0] for c in declared.classes]) == installed
