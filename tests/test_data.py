"""The data layer: readers on real files, splits, errors, and the resumable train stream."""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
from pathlib import Path
from typing import Any

import h5py
import numpy as np
import pytest
import torch

from ptutils import registry
from ptutils.data import (
    CsvReader,
    DataProvider,
    DataReader,
    DigitsReader,
    HDF5Reader,
    JsonLinesReader,
    NpzReader,
    SyntheticReader,
    split_indices,
)
from ptutils.errors import ConfigError, DataError, LoadError, RegistryError

ROOT = Path(__file__).resolve().parent.parent


def roundtrip(state: dict[str, Any]) -> dict[str, Any]:
    """A state as a fresh process would get it back: through the codec when it exists."""
    plain = json.loads(json.dumps(state))  # the position is plain ints and strings
    try:
        from ptutils.codec import dumps, loads
    except ImportError:
        return plain
    return loads(dumps(state))


def write_indexed_npz(path: Path, n: int) -> Path:
    """An npz whose column `i` is the row number, so a batch shows which rows it holds."""
    np.savez(path, i=np.arange(n, dtype=np.int64), x=np.arange(2 * n, dtype=np.float32).reshape(n, 2))
    return path


def npz_config(path: Path, **extra: Any) -> dict[str, Any]:
    return {"type": "ptutils.data.NpzReader", "path": str(path), **extra}


def draw(provider: DataProvider, count: int) -> list[list[int]]:
    return [provider.next_batch()["i"].tolist() for _ in range(count)]


# --- readers ----------------------------------------------------------------------------


def test_npz_reader_selects_renames_scales_and_casts(tmp_path: Path) -> None:
    images = np.arange(5 * 2 * 2, dtype=np.uint8).reshape(5, 2, 2)
    labels = np.array([3, 1, 4, 1, 5], dtype=np.int32)
    np.savez(tmp_path / "d.npz", images=images, labels=labels, extra=np.zeros(5))
    reader = NpzReader(
        str(tmp_path / "d.npz"),
        keys={"images": "x", "labels": "y"},
        dtype={"x": "float32", "y": "int64"},
        scale={"x": 0.5},
    )
    cols = reader.read()
    assert sorted(cols) == ["x", "y"]
    assert cols["x"].dtype == np.float32 and cols["x"].shape == (5, 2, 2)
    np.testing.assert_array_equal(cols["x"], images.astype(np.float32) * 0.5)
    assert cols["y"].dtype == np.int64 and cols["y"].tolist() == [3, 1, 4, 1, 5]
    assert sorted(NpzReader(str(tmp_path / "d.npz")).read()) == ["extra", "images", "labels"]


def test_hdf5_reader_reads_top_level_and_nested_datasets(tmp_path: Path) -> None:
    path = tmp_path / "d.h5"
    with h5py.File(path, "w") as f:
        f["labels"] = np.arange(4)
        f.create_group("train")["images"] = np.ones((4, 3), dtype=np.float32)
    cols = HDF5Reader(str(path), keys={"train/images": "x", "labels": "y"}).read()
    assert cols["x"].shape == (4, 3) and cols["y"].tolist() == [0, 1, 2, 3]
    assert list(HDF5Reader(str(path)).read()) == ["labels"]  # groups are not columns


def test_jsonl_reader_list_fields_become_2d_columns(tmp_path: Path) -> None:
    path = tmp_path / "d.jsonl"
    rows = [{"features": [i, i + 0.5, -i], "label": i % 2, "note": "x"} for i in range(6)]
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n\n")
    cols = JsonLinesReader(str(path), fields={"features": "x", "label": "y"},
                           dtype={"x": "float32"}).read()
    assert cols["x"].shape == (6, 3) and cols["x"].dtype == np.float32
    assert cols["x"][2].tolist() == [2.0, 2.5, -2.0]
    assert cols["y"].tolist() == [0, 1, 0, 1, 0, 1]


def test_csv_reader_parses_numbers_lists_and_stacks_columns(tmp_path: Path) -> None:
    path = tmp_path / "d.csv"
    path.write_text(
        "a;b;emb;label\n"
        "1.5;2;[1, 2];0\n"
        "3.0;4;[3, 4];1\n"
        "5.5;6;[5, 6];1\n"
    )
    cols = CsvReader(str(path), delimiter=";", columns=["emb", "label"]).read()
    assert cols["emb"].shape == (3, 2) and cols["emb"][1].tolist() == [3, 4]
    assert cols["label"].dtype == np.int64
    stacked = CsvReader(str(path), delimiter=";", stack={"x": ["a", "b"]},
                        columns={"x": "features", "label": "y"}, dtype={"features": "float32"}).read()
    assert stacked["features"].tolist() == [[1.5, 2.0], [3.0, 4.0], [5.5, 6.0]]
    assert stacked["y"].tolist() == [0, 1, 1]


@pytest.mark.parametrize("image, shape", [(False, (64,)), (True, (1, 8, 8))])
def test_digits_reader_flat_and_image_layouts(image: bool, shape: tuple[int, ...]) -> None:
    cols = DigitsReader(image=image).read()
    assert cols["x"].shape == (1797, *shape) and cols["x"].dtype == np.float32
    assert 0.0 <= cols["x"].min() and cols["x"].max() == 1.0
    assert cols["y"].dtype == np.int64 and set(cols["y"].tolist()) == set(range(10))


def test_synthetic_reader_is_a_function_of_its_settings() -> None:
    a, b = SyntheticReader(n=50, features=3, classes=4, seed=1).read(), SyntheticReader(
        n=50, features=3, classes=4, seed=1).read()
    np.testing.assert_array_equal(a["x"], b["x"])
    assert a["x"].shape == (50, 3) and a["y"].max() < 4
    assert not np.array_equal(a["x"], SyntheticReader(n=50, features=3, classes=4, seed=2).read()["x"])


class RangeReader(DataReader):
    """A user's reader: `i` counts rows, `sq` holds their squares."""

    def __init__(self, n: int = 10, split: dict[str, Any] | None = None) -> None:
        super().__init__(split=split)
        self.n = n

    def load(self) -> dict[str, np.ndarray]:
        i = np.arange(self.n)
        return {"i": i, "sq": i * i}


def test_custom_reader_is_used_by_type_once_registered() -> None:
    config = {"datasets": {"train": {"type": "tests.test_data.RangeReader", "n": 7}}, "batch_size": 7}
    with registry.isolated():
        with pytest.raises(RegistryError):
            DataProvider.from_config(config)
        registry.register(RangeReader)
        provider = DataProvider.from_config(config)
        batch = provider.example_batch("train")
    assert batch["i"].tolist() == list(range(7)) and batch["sq"].tolist()[3] == 9
    assert provider.to_config()["datasets"]["train"]["n"] == 7


# --- the held-out split -----------------------------------------------------------------


def test_split_parts_are_disjoint_cover_the_set_and_depend_only_on_seed() -> None:
    train = RangeReader(n=101, split={"fraction": 0.8, "part": "train", "seed": 3}).read()["i"]
    test = RangeReader(n=101, split={"fraction": 0.8, "part": "test", "seed": 3}).read()["i"]
    assert len(train) == 81 and len(test) == 20
    assert not set(train) & set(test) and sorted([*train, *test]) == list(range(101))
    assert list(train) == sorted(train)  # file order within a part
    np.testing.assert_array_equal(split_indices(101, 0.8, "test", 3), test)
    assert not np.array_equal(split_indices(101, 0.8, "test", 4), test)
    # a fixed hash, not numpy's generator: pinned so an upgrade cannot move rows across
    assert split_indices(10, 0.5, "test", 0).tolist() == PINNED_TEST_PART


PINNED_TEST_PART = [0, 2, 5, 6, 9]


def test_split_options_are_checked_when_built() -> None:
    with pytest.raises(ConfigError, match="valid keys: fraction, part, seed"):
        RangeReader(split={"fraction": 0.8, "part": "train", "sed": 1})
    with pytest.raises(ConfigError, match="fraction"):
        RangeReader(split={"fraction": 1.5, "part": "train"})
    with pytest.raises(ConfigError, match="'train' or 'test'"):
        RangeReader(split={"fraction": 0.5, "part": "val"})


# --- errors -----------------------------------------------------------------------------


def test_missing_file_names_path_absolute_path_and_config_location(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    provider = DataProvider({"train": npz_config(Path("nowhere/train.npz"))})  # lazy: no error yet
    with pytest.raises(DataError) as info:
        provider.check()
    message = str(info.value)
    assert "data.datasets.train.path" in message and "nowhere/train.npz" in message
    assert str(tmp_path / "nowhere" / "train.npz") in message and "Check the path" in message
    with pytest.raises(DataError, match="nowhere/train.npz"):
        provider.next_batch()


@pytest.mark.parametrize("kind", ["npz", "h5", "jsonl"])
def test_missing_key_lists_the_keys_the_file_has(tmp_path: Path, kind: str) -> None:
    if kind == "npz":
        path = tmp_path / "d.npz"
        np.savez(path, images=np.zeros(3), labels=np.zeros(3))
        reader: DataReader = NpzReader(str(path), keys=["images", "targets"])
    elif kind == "h5":
        path = tmp_path / "d.h5"
        with h5py.File(path, "w") as f:
            f["images"], f["labels"] = np.zeros(3), np.zeros(3)
        reader = HDF5Reader(str(path), keys=["targets"])
    else:
        path = tmp_path / "d.jsonl"
        path.write_text('{"images": 1, "labels": 2}\n{"images": 1}\n')
        reader = JsonLinesReader(str(path), fields=["images", "labels"])
    with pytest.raises(DataError) as info:
        reader.read()
    message = str(info.value)
    assert str(path) in message and "'images'" in message
    assert ("line 2" in message) if kind == "jsonl" else ("'targets'" in message and "'labels'" in message)


TEXT, BINARY = b"\x00\x01 this is not data {", b"\xff\xfe\x93binary"


@pytest.mark.parametrize("reader_type, content", [
    (NpzReader, TEXT), (NpzReader, BINARY), (HDF5Reader, TEXT), (HDF5Reader, BINARY),
    (JsonLinesReader, TEXT), (JsonLinesReader, BINARY), (CsvReader, BINARY),
])
def test_file_of_the_wrong_format_names_the_file(
    tmp_path: Path, reader_type: type, content: bytes
) -> None:
    path = tmp_path / "notes.bin"
    path.write_bytes(content)
    with pytest.raises(DataError, match="cannot read it as") as info:
        reader_type(str(path)).read()
    assert str(path) in str(info.value)


def test_npz_with_object_arrays_is_refused_without_unpickling(tmp_path: Path) -> None:
    path = tmp_path / "objects.npz"
    np.savez(path, x=np.array([{"a": 1}, None], dtype=object))
    with pytest.raises(DataError, match="object arrays are refused"):
        NpzReader(str(path)).read()


def test_columns_of_unequal_length_are_refused(tmp_path: Path) -> None:
    np.savez(tmp_path / "d.npz", x=np.zeros((5, 2)), y=np.zeros(4))
    with pytest.raises(DataError, match="same length.*x: 5, y: 4"):
        NpzReader(str(tmp_path / "d.npz")).read()


def test_config_mistakes_are_config_errors_with_locations(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="pathh: unknown key"):
        DataProvider({"train": {"type": "ptutils.data.NpzReader", "pathh": "a.npz"}})
    with pytest.raises(ConfigError, match=r"type: ptutils.data.NpzReader"):
        DataProvider({"train": {"path": "a.npz"}})
    with pytest.raises(ConfigError, match="data.train: no dataset 'trian'"):
        DataProvider({"train": {"type": "ptutils.data.DigitsReader"}}, train="trian")
    with pytest.raises(ConfigError, match="not a dtype"):
        DigitsReader(dtype={"x": "float33"})


def test_text_column_cannot_become_a_tensor(tmp_path: Path) -> None:
    path = tmp_path / "d.csv"
    path.write_text("name,label\nada,1\nbob,0\n")
    provider = DataProvider({"train": CsvReader(str(path))}, batch_size=2)
    with pytest.raises(DataError, match="column 'name'.*drop it with `keys`"):
        provider.example_batch("train")


def test_dataset_smaller_than_a_batch_is_refused_for_training(tmp_path: Path) -> None:
    provider = DataProvider({"train": RangeReader(n=5)}, batch_size=8)
    with pytest.raises(DataError, match="5 samples, fewer than data.batch_size"):
        provider.next_batch()
    partial = DataProvider({"train": RangeReader(n=5)}, batch_size=8, drop_last=False)
    assert partial.next_batch()["i"].shape == (5,)


# --- eval batches -----------------------------------------------------------------------


def test_eval_batches_cover_the_set_once_in_order_with_the_last_partial_batch(tmp_path: Path) -> None:
    provider = DataProvider({"test": npz_config(write_indexed_npz(tmp_path / "t.npz", 23))},
                            batch_size=4, eval_batch_size=5, train="test")
    batches = list(provider.provide("test"))
    assert [len(b["i"]) for b in batches] == [5, 5, 5, 5, 3]
    assert torch.cat([b["i"] for b in batches]).tolist() == list(range(23))
    assert batches[1]["x"].tolist()[0] == [10.0, 11.0]
    assert [b["i"].tolist() for b in provider.provide("test")] == [b["i"].tolist() for b in batches]
    assert provider.sizes() == {"test": 23}
    assert provider.example_batch("test")["i"].tolist() == [0, 1, 2, 3, 4]


def test_provide_unknown_dataset_lists_the_known_ones() -> None:
    provider = DataProvider({"train": RangeReader()})
    with pytest.raises(DataError, match="no dataset 'val'.*'train'"):
        provider.provide("val")


# --- the train stream -------------------------------------------------------------------


def test_each_epoch_is_a_permutation_and_full_batches_with_drop_last() -> None:
    provider = DataProvider({"train": RangeReader(n=10)}, batch_size=3, drop_last=False)
    epoch = draw(provider, 4)
    assert [len(b) for b in epoch] == [3, 3, 3, 1]
    assert sorted(sum(epoch, [])) == list(range(10))
    second = draw(provider, 4)
    assert sorted(sum(second, [])) == list(range(10)) and second != epoch
    dropping = DataProvider({"train": RangeReader(n=10)}, batch_size=3)
    assert [len(b) for b in draw(dropping, 7)] == [3] * 7
    assert dropping.state_dict()["sources"]["train"] == {"epoch": 2, "position": 3}


def test_order_depends_on_seed_only_not_on_the_global_rngs() -> None:
    def stream(seed: int, disturb: bool) -> list[list[int]]:
        provider = DataProvider({"train": RangeReader(n=50)}, batch_size=8, seed=seed)
        out = []
        for _ in range(15):
            if disturb:
                torch.manual_seed(random.randrange(1000))
                np.random.seed(7)
            out.append(provider.next_batch()["i"].tolist())
        return out

    assert stream(1, disturb=False) == stream(1, disturb=True)
    assert stream(1, disturb=False) != stream(2, disturb=False)
    before = torch.get_rng_state()
    stream(1, disturb=False)
    assert torch.equal(before, torch.get_rng_state())  # draws do not consume the global RNG


@pytest.mark.parametrize("drawn_before", [3, 6, 7])  # 6 batches per epoch: before, at, after
def test_resume_continues_the_uninterrupted_stream(tmp_path: Path, drawn_before: int) -> None:
    config = {"datasets": {"train": npz_config(write_indexed_npz(tmp_path / "d.npz", 20))},
              "batch_size": 3, "seed": 5}
    uninterrupted = draw(DataProvider.from_config(config), drawn_before + 10)
    first = DataProvider.from_config(config)
    assert draw(first, drawn_before) == uninterrupted[:drawn_before]
    state = roundtrip(first.state_dict())
    resumed = DataProvider.from_config(config)
    resumed.load_state_dict(state)
    assert draw(resumed, 10) == uninterrupted[drawn_before:]


def mixed_config(tmp_path: Path) -> dict[str, Any]:
    np.savez(tmp_path / "a.npz", i=np.arange(0, 10))
    np.savez(tmp_path / "b.npz", i=np.arange(100, 130))
    return {"datasets": {"a": npz_config(tmp_path / "a.npz"), "b": npz_config(tmp_path / "b.npz")},
            "batch_size": 4, "seed": 9, "train": {"a": 1.0, "b": 3.0}}


def test_weighted_mixing_draws_sources_by_weight_and_resumes_exactly(tmp_path: Path) -> None:
    config = mixed_config(tmp_path)
    uninterrupted = draw(DataProvider.from_config(config), 200)
    from_b = sum(b[0] >= 100 for b in uninterrupted)
    assert 125 <= from_b <= 175  # weight 3 of 4: about 150 of 200
    assert all(len({x >= 100 for x in b}) == 1 for b in uninterrupted)  # one source per batch
    first = DataProvider.from_config(config)
    draw(first, 37)  # source a (2 batches an epoch) and b (7) are both past epoch boundaries
    state = roundtrip(first.state_dict())
    assert state["sources"]["a"]["epoch"] > 0 and state["sources"]["b"]["epoch"] > 0
    resumed = DataProvider.from_config(config)
    resumed.load_state_dict(state)
    assert draw(resumed, 163) == uninterrupted[37:]


def test_state_for_other_sources_is_refused(tmp_path: Path) -> None:
    provider = DataProvider.from_config(mixed_config(tmp_path))
    state = {"drawn": 3, "sources": {"train": {"epoch": 0, "position": 4}}}
    with pytest.raises(LoadError, match="sources \\['train'\\].*\\['a', 'b'\\]"):
        provider.load_state_dict(state)


RESUME_SCRIPT = """
import json, sys
from ptutils.data import DataProvider
config, state = json.loads(sys.argv[1]), json.loads(sys.argv[2])
provider = DataProvider.from_config(config)
provider.load_state_dict(state)
print(json.dumps([provider.next_batch()["i"].tolist() for _ in range(12)]))
"""


def test_resume_in_a_fresh_process_with_another_hash_seed(tmp_path: Path) -> None:
    config = mixed_config(tmp_path)
    uninterrupted = draw(DataProvider.from_config(config), 20)
    first = DataProvider.from_config(config)
    draw(first, 8)
    env = {**os.environ, "PYTHONHASHSEED": "12345", "PYTHONPATH": str(ROOT)}
    result = subprocess.run(
        [sys.executable, "-c", RESUME_SCRIPT, json.dumps(config), json.dumps(first.state_dict())],
        env=env, capture_output=True, text=True, check=True, timeout=120,
    )
    assert json.loads(result.stdout) == uninterrupted[8:]
