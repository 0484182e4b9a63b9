"""Config files, overrides, sweeps, hashes, key checks and the Configuration dict."""

from __future__ import annotations

import copy
import hashlib
import json
import re
from pathlib import Path

import msgpack
import pytest

from ptutils.config import (
    Configuration,
    apply_overrides,
    check_keys,
    config_hash,
    expand_sweep,
    load_config,
    parse_override,
)
from ptutils.errors import ConfigError

EXPERIMENT = {
    "name": "mnist",
    "model": {"network": {"type": "torch.nn.Linear", "in_features": 4, "out_features": 2}},
    "optimizer": {"type": "torch.optim.SGD", "lr": 0.1, "momentum": 0.9},
    "session": {"chunk_size": 100, "total_steps": 1000, "tags": ["a", "b"]},
}

EXPERIMENT_YAML = """\
name: mnist
model:
  network: {type: torch.nn.Linear, in_features: 4, out_features: 2}
optimizer:
  type: torch.optim.SGD
  lr: 0.1
  momentum: 0.9
session:
  chunk_size: 100
  total_steps: 1000
  tags: [a, b]
"""


# --- load_config ---------------------------------------------------------------------
@pytest.mark.parametrize("filename", ["exp.yaml", "exp.yml", "exp.cfg"])
def test_yaml_configs_load(tmp_path: Path, filename: str) -> None:
    path = tmp_path / filename
    path.write_text(EXPERIMENT_YAML)
    assert load_config(path) == EXPERIMENT


def test_json_configs_load(tmp_path: Path) -> None:
    path = tmp_path / "exp.json"
    path.write_text(json.dumps(EXPERIMENT, indent=2))
    assert load_config(path) == EXPERIMENT


def test_yaml_scientific_numbers_are_floats(tmp_path: Path) -> None:
    path = tmp_path / "exp.yaml"
    path.write_text("optimizer:\n  lr: 1e-3\n  eps: 1.0E+2\nname: e5x\n")
    assert load_config(path) == {"optimizer": {"lr": 0.001, "eps": 100.0}, "name": "e5x"}


def test_yaml_parse_error_names_file_line_and_column(tmp_path: Path) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text("model:\n  lr: 0.1\n  wd: [1, 2\nname: x\n")
    with pytest.raises(ConfigError) as info:
        load_config(path)
    location = str(info.value).split(": invalid YAML")[0]
    assert location.startswith(f"{path}:")
    line, column = map(int, location[len(str(path)) + 1 :].split(":"))
    assert 3 <= line <= 4 and column >= 1


def test_json_parse_error_names_file_line_and_column(tmp_path: Path) -> None:
    path = tmp_path / "bad.json"
    path.write_text('{\n  "a": 1,\n  "b": ,\n}\n')
    with pytest.raises(ConfigError, match=re.escape(f"{path}:3:8: invalid JSON")):
        load_config(path)


@pytest.mark.parametrize(
    "tag",
    [
        '!!python/object/apply:os.system ["touch {marker}"]',
        "!!python/name:os.system",
        '!!python/object/new:subprocess.Popen [["touch", "{marker}"]]',
    ],
)
def test_python_tags_are_refused_without_running_anything(tmp_path: Path, tag: str) -> None:
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.yaml"
    path.write_text("name: x\nmodel: " + tag.format(marker=marker) + "\n")
    with pytest.raises(ConfigError, match=re.escape(f"{path}:2:") + r"\d+: .*tag"):
        load_config(path)
    assert not marker.exists()


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("- a\n- b\n", "top level must be a mapping"),
        ("", "must be a mapping .*, but it is empty"),
        ("on: 1\n", "keys must be strings"),
        ("session:\n  start: 2024-01-01\n", "at `session.start`"),
        ("tags: !!set {a, b}\n", "configs hold only"),
    ],
)
def test_configs_must_be_plain_mappings(tmp_path: Path, text: str, message: str) -> None:
    path = tmp_path / "exp.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=message) as info:
        load_config(path)
    assert str(path) in str(info.value)


def test_missing_file_is_a_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "nope.yaml")


# --- overrides -----------------------------------------------------------------------
@pytest.mark.parametrize(
    ("text", "key", "value"),
    [
        ("a=1", ["a"], 1),
        ("a.b.c=-3", ["a", "b", "c"], -3),
        ("lr=0.1", ["lr"], 0.1),
        ("lr=1e-3", ["lr"], 0.001),
        ("lr=2E+2", ["lr"], 200.0),
        ("flag=true", ["flag"], True),
        ("flag=False", ["flag"], False),
        ("x=null", ["x"], None),
        ("sizes=[1, 2]", ["sizes"], [1, 2]),
        ("opt={type: SGD, lr: 0.1}", ["opt"], {"type": "SGD", "lr": 0.1}),
        ("name=resnet18", ["name"], "resnet18"),
        ('a.b="1"', ["a", "b"], "1"),
        ("a=x=y", ["a"], "x=y"),
        ("a=[1, 2", ["a"], "[1, 2"),
        ("when=2024-01-01", ["when"], "2024-01-01"),
        ("a=!!python/object/apply:os.system [ls]", ["a"], "!!python/object/apply:os.system [ls]"),
    ],
)
def test_override_values_are_typed(text: str, key: list[str], value: object) -> None:
    parsed_key, parsed_value = parse_override(text)
    assert parsed_key == key
    assert parsed_value == value and type(parsed_value) is type(value)


def test_override_without_equals_shows_the_expected_form() -> None:
    with pytest.raises(ConfigError, match="KEY.PATH=VALUE"):
        parse_override("optimizer.lr")
    with pytest.raises(ConfigError, match="empty key part"):
        parse_override("optimizer..lr=1")


def test_apply_overrides_returns_a_new_dict_and_creates_mappings() -> None:
    before = copy.deepcopy(EXPERIMENT)
    out = apply_overrides(
        EXPERIMENT, ["optimizer.lr=0.01", "model.init.seed=7", "session.tags=[c]"]
    )
    assert EXPERIMENT == before
    assert out["optimizer"] == {"type": "torch.optim.SGD", "lr": 0.01, "momentum": 0.9}
    assert out["model"]["init"] == {"seed": 7}
    assert out["session"]["tags"] == ["c"]
    out["model"]["network"]["in_features"] = 99
    assert EXPERIMENT["model"]["network"]["in_features"] == 4


def test_overrides_apply_in_order() -> None:
    assert apply_overrides({}, ["a=1", "a=2"]) == {"a": 2}
    assert apply_overrides({}, ["a={b: 1}", "a.c=2"]) == {"a": {"b": 1, "c": 2}}


def test_override_under_a_non_mapping_names_the_key_path() -> None:
    with pytest.raises(
        ConfigError, match="cannot set optimizer.lr.value because optimizer.lr is 0.1"
    ):
        apply_overrides(EXPERIMENT, ["optimizer.lr.value=3"])
    with pytest.raises(ConfigError, match="session.tags is"):
        apply_overrides(EXPERIMENT, ["session.tags.x=1"])


# --- sweeps --------------------------------------------------------------------------
def test_sweep_expands_to_the_grid_in_order() -> None:
    grid = expand_sweep(["optimizer.lr=0.1,0.01,0.001", "seed=1,2"])
    assert grid == [
        ["optimizer.lr=0.1", "seed=1"],
        ["optimizer.lr=0.1", "seed=2"],
        ["optimizer.lr=0.01", "seed=1"],
        ["optimizer.lr=0.01", "seed=2"],
        ["optimizer.lr=0.001", "seed=1"],
        ["optimizer.lr=0.001", "seed=2"],
    ]
    configs = [apply_overrides(EXPERIMENT, overrides) for overrides in grid]
    assert len({config_hash(c) for c in configs}) == 6


def test_sweep_values_keep_commas_inside_brackets_and_quotes() -> None:
    grid = expand_sweep(["sizes=[1, 2],[3,4]", 'opt={a: 1, b: 2},"x,y"'])
    assert [o[0] for o in grid[::2]] == ["sizes=[1, 2]", "sizes=[3,4]"]
    assert [parse_override(o)[1] for o in grid[0]] == [[1, 2], {"a": 1, "b": 2}]
    assert parse_override(grid[1][1])[1] == "x,y"


def test_no_sweep_is_one_run() -> None:
    assert expand_sweep([]) == [[]]


@pytest.mark.parametrize(
    ("sweeps", "message"),
    [
        (["lr"], "expected KEY=V1,V2"),
        (["lr=0.1,,0.2"], "empty value"),
        (["lr=[0.1,0.2"], "unbalanced"),
        (["lr=0.1", "lr=0.2"], "given twice"),
    ],
)
def test_bad_sweeps_are_config_errors(sweeps: list[str], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        expand_sweep(sweeps)


# --- hash ----------------------------------------------------------------------------
def test_hash_ignores_key_order_at_every_level() -> None:
    reordered = {
        "session": {"tags": ["a", "b"], "total_steps": 1000, "chunk_size": 100},
        "optimizer": {"momentum": 0.9, "lr": 0.1, "type": "torch.optim.SGD"},
        "model": {"network": {"out_features": 2, "in_features": 4, "type": "torch.nn.Linear"}},
        "name": "mnist",
    }
    assert config_hash(reordered) == config_hash(EXPERIMENT)
    assert config_hash(Configuration(reordered)) == Configuration(EXPERIMENT).hash()


@pytest.mark.parametrize(
    "override",
    [
        "optimizer.lr=0.1000001",
        "session.tags=[b, a]",
        "model.network.in_features=4.0",
        "extra=null",
    ],
)
def test_hash_changes_with_values_and_list_order(override: str) -> None:
    assert config_hash(apply_overrides(EXPERIMENT, [override])) != config_hash(EXPERIMENT)


def test_hash_format_is_fixed() -> None:
    """Stored hashes must stay valid across versions: pin the canonical form."""
    canonical = '{"a":1,"b":[0.1,"x",true,null],"c":{"d":1e-05}}'
    expected = hashlib.sha256(canonical.encode()).hexdigest()[:16]
    assert config_hash({"c": {"d": 1e-5}, "b": [0.1, "x", True, None], "a": 1}) == expected
    assert len(expected) == 16


def test_hash_refuses_non_config_values() -> None:
    with pytest.raises(ConfigError, match="not config data"):
        config_hash({"a": object()})


# --- check_keys ----------------------------------------------------------------------
def test_check_keys_names_unknown_keys_nearest_and_valid_ones() -> None:
    allowed = ["chunk_size", "total_steps", "eval_every", "name"]
    with pytest.raises(ConfigError) as info:
        check_keys({"chunk_sise": 10, "total_steps": 5, "zzz": 1}, allowed, "session")
    message = str(info.value)
    assert "unknown key `session.chunk_sise` (did you mean `chunk_size`?)" in message
    assert "unknown key `session.zzz`\n" in message
    assert "valid keys for `session`: chunk_size, eval_every, name, total_steps" in message


def test_check_keys_accepts_known_keys() -> None:
    check_keys({"chunk_size": 1}, ["chunk_size", "name"], "session")
    check_keys({}, [], "session")


# --- Configuration -------------------------------------------------------------------
def test_configuration_reads_by_attribute() -> None:
    cfg = Configuration(EXPERIMENT)
    assert cfg.optimizer.lr == 0.1
    assert isinstance(cfg.model.network, Configuration)
    assert cfg.model.network is cfg.model.network
    assert cfg.session.tags == ["a", "b"]
    assert Configuration({"layers": [{"width": 3}]}).layers[0].width == 3
    with pytest.raises(AttributeError, match="no key 'optimiser'; keys: name, model"):
        _ = cfg.optimiser
    with pytest.raises(AttributeError, match="set a key with"):
        cfg.name = "other"


def test_configuration_serialises_as_a_plain_dict() -> None:
    cfg = Configuration(EXPERIMENT)
    assert isinstance(cfg, dict) and cfg == EXPERIMENT
    assert json.loads(json.dumps(cfg)) == EXPERIMENT
    assert msgpack.unpackb(msgpack.packb(cfg)) == EXPERIMENT
    plain = cfg.to_dict()
    assert type(plain) is dict and type(plain["model"]["network"]) is dict
    plain["optimizer"]["lr"] = 5
    assert cfg.optimizer.lr == 0.1


def test_configuration_load_and_get_path(tmp_path: Path) -> None:
    path = tmp_path / "exp.yaml"
    path.write_text(EXPERIMENT_YAML)
    cfg = Configuration.load(path, overrides=["optimizer.lr=0.5"])
    assert cfg.optimizer.lr == 0.5
    assert cfg.get_path("model.network.in_features") == 4
    assert cfg.get_path("model.network.nope", "fallback") == "fallback"
    assert cfg.get_path("name.deeper", 0) == 0
    assert cfg.hash() == config_hash(apply_overrides(EXPERIMENT, ["optimizer.lr=0.5"]))


# --- `imports:` files become content references ---------------------------------------
def test_imports_files_are_stored_by_content_not_by_path(tmp_path: Path) -> None:
    """The stored config names a .py file by module name and hash; the source goes with the
    session; an edited file is another config (another hash)."""
    from ptutils.runner import load_experiment
    from ptutils.sources import code_for

    (tmp_path / "conf").mkdir()
    module = tmp_path / "conf" / "my_modules.py"
    module.write_text("class Net:\n    pass\n")
    path = tmp_path / "conf" / "exp.yaml"
    path.write_text("imports: [./my_modules.py, ptutils.nets]\nname: x\n")

    cfg = load_experiment(path)
    digest = hashlib.sha256(module.read_bytes()).hexdigest()
    assert cfg["imports"] == [{"module": "my_modules", "sha256": digest}, "ptutils.nets"]
    assert str(tmp_path) not in json.dumps(cfg), "no path of the submitting machine is stored"
    assert code_for(cfg) == [{"name": "my_modules", "sha256": digest,
                              "source": module.read_text()}]
    again = load_experiment(path, ["imports=[my_modules.py]"])
    assert again["imports"] == [cfg["imports"][0]]

    module.write_text("class Net:\n    width = 2\n")
    edited = load_experiment(path)
    assert edited["imports"][0]["sha256"] != digest
    assert config_hash(edited) != config_hash(cfg)


def test_imports_that_are_not_files_or_modules_are_refused(tmp_path: Path) -> None:
    from ptutils.runner import load_experiment

    path = tmp_path / "exp.yaml"
    path.write_text("imports: [./missing.py]\n")
    with pytest.raises(ConfigError, match=r"'./missing.py': no such Python file"):
        load_experiment(path)
    path.write_text("imports: {a: 1}\n")
    with pytest.raises(ConfigError, match="imports: must be a list"):
        load_experiment(path)
