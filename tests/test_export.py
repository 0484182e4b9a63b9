"""`ptutils export` (safetensors / pt) and `ptutils export-stats` (TensorBoard, CSV,
Parquet), run as real subprocesses on one finished session shared by the module."""

from __future__ import annotations

import csv
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from ptutils.store import open_store
from tests.helpers import digits_config

ROOT = Path(__file__).resolve().parents[1]


def ptutils(*args: str, check: bool = True, path: str = "") -> subprocess.CompletedProcess[str]:
    """`python -m orchestrator.cli ARGS`; `path` goes first on PYTHONPATH."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [path, str(ROOT)]))}
    proc = subprocess.run([sys.executable, "-m", "orchestrator.cli", *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=300)
    if check and proc.returncode != 0:
        raise AssertionError(f"ptutils {' '.join(args)} failed ({proc.returncode}):\n"
                             f"{proc.stdout}\n{proc.stderr}")
    return proc


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> Path:
    """A store holding the completed session `small` (40 steps, checkpoints at 20 and 40)."""
    tmp = tmp_path_factory.mktemp("export")
    cfg = digits_config(imports=[], callbacks=[], total_steps=40)
    (tmp / "exp.yaml").write_text(yaml.safe_dump(cfg))
    ptutils("run", str(tmp / "exp.yaml"), "--store", str(tmp / "runs"), "-q")
    return tmp / "runs"


def stored(runs: Path, step: int | None = None) -> tuple[dict, dict, dict, list[dict]]:
    """(session doc, checkpoint, network state, statistics) straight from the store."""
    with open_store(runs) as store:
        doc = store.get_session("small")
        ckpt = store.get_checkpoint(doc["_id"], step)
        state = store.load_state(ckpt)["trainer"]["model"]["network"]
        return doc, ckpt, state, store.query_statistics(doc["_id"])


# --- weights ---------------------------------------------------------------------------
@pytest.mark.parametrize("step", [None, 20])
def test_safetensors_export_loads_into_the_network_bit_exactly(tmp_path, runs, step):
    from safetensors import safe_open
    from safetensors.torch import load_file

    from ptutils.nets import MLP

    out = tmp_path / "net.safetensors"
    args = ["--step", str(step)] if step else []
    ptutils("export", "small", "-o", str(out), "--store", str(runs), *args)
    doc, ckpt, state, _ = stored(runs, step)
    weights = load_file(out)
    assert weights.keys() == state.keys()
    for k in state:
        assert weights[k].dtype == state[k].dtype and torch.equal(weights[k], state[k]), k
    with safe_open(out, "pt") as f:
        meta = f.metadata()
    assert meta["ptutils.session"] == "small" and meta["ptutils.session_id"] == doc["_id"]
    assert meta["ptutils.step"] == str(ckpt["step"]) == str(step or 40)
    assert meta["torch"] == torch.__version__

    net_cfg = {k: v for k, v in digits_config(imports=[], callbacks=[])["model"]["network"]
               .items() if k != "type"}
    exported, reference = MLP(**net_cfg), MLP(**net_cfg)
    exported.load_state_dict(weights)
    reference.load_state_dict(state)
    x = torch.randn(16, 64, generator=torch.Generator().manual_seed(0))
    assert torch.equal(exported.eval()(x), reference.eval()(x))


def test_format_flag_overrides_the_suffix(tmp_path, runs):
    from safetensors.torch import load_file

    as_st = tmp_path / "net.bin"
    ptutils("export", "small", "-o", str(as_st), "--format", "safetensors", "--store", str(runs))
    as_pt = tmp_path / "net.weights"  # any suffix but .safetensors: pt
    ptutils("export", "small", "-o", str(as_pt), "--store", str(runs))
    _, _, state, _ = stored(runs)
    for weights in (torch.load(as_pt, weights_only=True), load_file(as_st)):
        assert weights.keys() == state.keys()
        assert all(torch.equal(weights[k], state[k]) for k in state)

    # torch.load picks its reader by the suffix: a pickle named .safetensors is refused.
    trap = tmp_path / "net.safetensors"
    proc = ptutils("export", "small", "-o", str(trap), "--format", "pt", "--store", str(runs),
                   check=False)
    assert proc.returncode == 2 and "name it .pt" in proc.stderr
    assert not trap.exists()


def test_tied_and_strided_weights_are_written_as_standalone_tensors(tmp_path):
    from safetensors.torch import load_file

    from ptutils.weights import save_weights

    base = torch.arange(12, dtype=torch.float32).reshape(3, 4)
    weights = {"embed.weight": base, "head.weight": base, "proj.weight": base.t(),
               "row": base[1]}
    save_weights(weights, tmp_path / "w.safetensors", "safetensors", {"k": "v"})
    loaded = load_file(tmp_path / "w.safetensors")
    assert loaded.keys() == weights.keys()
    for k, v in weights.items():
        assert torch.equal(loaded[k], v) and loaded[k].is_contiguous(), k
    assert not (tmp_path / "w.safetensors.tmp").exists()


@pytest.mark.parametrize(("package", "args"), [
    ("safetensors", ["export", "small", "-o", "OUT.safetensors"]),
    ("tensorboardX", ["export-stats", "small", "--tensorboard", "OUT"]),
    ("pyarrow", ["export-stats", "small", "--parquet", "OUT.parquet"]),
])
def test_a_missing_package_names_the_export_extra(tmp_path, runs, package, args):
    hidden = tmp_path / "site" / package
    hidden.mkdir(parents=True)
    (hidden / "__init__.py").write_text(
        f"raise ImportError(\"No module named '{package}'\")\n")  # a user without the extra
    out = str(tmp_path / "out")
    args = [a.replace("OUT", out) for a in args]
    proc = ptutils(*args, "--store", str(runs), check=False, path=str(tmp_path / "site"))
    assert proc.returncode == 2, proc.stderr
    assert "pip install 'ptutils[export]'" in proc.stderr and package in proc.stderr
    assert "Traceback" not in proc.stderr and not list(tmp_path.glob("out*"))


def test_export_commands_do_not_create_a_missing_store_folder(tmp_path):
    missing = tmp_path / "no-such-runs"
    for args in (["export", "small", "-o", str(tmp_path / "w.pt")],
                 ["export-stats", "small", "--csv", str(tmp_path / "s.csv")]):
        proc = ptutils(*args, "--store", str(missing), check=False)
        assert proc.returncode == 2 and str(missing) in proc.stderr, proc.stderr
    assert not missing.exists() and not (tmp_path / "w.pt").exists()


# --- statistics ------------------------------------------------------------------------
def test_tensorboard_export_holds_every_point(tmp_path, runs):
    from tensorboard.backend.event_processing import event_accumulator as ea

    ptutils("export-stats", "small", "--tensorboard", str(tmp_path / "tb"), "--store", str(runs))
    _, _, _, points = stored(runs)
    acc = ea.EventAccumulator(str(tmp_path / "tb" / "small"), size_guidance={ea.SCALARS: 0})
    acc.Reload()
    tags = {f"{p['phase']}/{p['name']}" for p in points}
    assert {"train/loss", "eval/test/accuracy"} <= tags
    assert set(acc.Tags()["scalars"]) == tags
    read = sorted((e.step, tag, e.value, e.wall_time)
                  for tag in tags for e in acc.Scalars(tag))
    want = sorted((p["step"], f"{p['phase']}/{p['name']}", float(np.float32(p["value"])),
                   p["time"]) for p in points)
    assert len(read) == len(points) == len(want)
    assert read == want

    again = ptutils("export-stats", "small", "--tensorboard", str(tmp_path / "tb"),
                    "--store", str(runs), check=False)
    assert again.returncode == 2 and "--force" in again.stderr


def test_csv_and_parquet_read_back_equal_to_the_store(tmp_path, runs):
    import pyarrow.parquet as pq

    ptutils("export-stats", "small", "--csv", str(tmp_path / "s.csv"), "--store", str(runs))
    ptutils("export-stats", "small", "--parquet", str(tmp_path / "s.parquet"),
            "--store", str(runs))
    _, _, _, points = stored(runs)
    want = [("small", p["name"], p["phase"], p["step"], p["value"], p["time"]) for p in points]
    with open(tmp_path / "s.csv", newline="") as f:
        reader = csv.reader(f)
        assert next(reader) == ["session", "name", "phase", "step", "value", "time"]
        from_csv = [(s, n, ph, int(st), float(v), float(t)) for s, n, ph, st, v, t in reader]
    table = pq.read_table(tmp_path / "s.parquet")
    assert table.column_names == ["session", "name", "phase", "step", "value", "time"]
    from_parquet = [tuple(r.values()) for r in table.to_pylist()]
    assert from_csv == want and from_parquet == want
    assert all(not math.isnan(v) for *_, v, _ in want)


def test_phase_and_name_filter_the_export(tmp_path, runs):
    out = tmp_path / "loss.csv"
    ptutils("export-stats", "small", "--csv", str(out), "--phase", "train", "--name", "loss",
            "--store", str(runs))
    with open(out, newline="") as f:
        got = list(csv.DictReader(f))
    want = [p for p in stored(runs)[3] if p["phase"] == "train" and p["name"] == "loss"]
    assert [int(r["step"]) for r in got] == [p["step"] for p in want] and len(want) == 40


def test_export_stats_needs_exactly_one_target(runs):
    proc = ptutils("export-stats", "small", "--store", str(runs), check=False)
    assert proc.returncode == 2 and "exactly one of" in proc.stderr
