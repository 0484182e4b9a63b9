"""The real-work examples, end to end with `ptutils run`: killed with SIGKILL at a random
step and resumed, each ends bit-identical to its uninterrupted run (CPU), with 2 loader
workers and random augmentation on.

- examples/imagefolder: a CNN on a tree of PNG files this test writes;
- examples/lm: a byte-level transformer LM on the standard library's sources, in bf16;
- examples/finetune: warm-starts from the imagefolder session (`init` with only/rename).
"""

from __future__ import annotations

import os
import random
from pathlib import Path

import pytest
import torch
import yaml

from tests.helpers import assert_bit_identical, series
from tests.test_run import KILLER, ROOT, final_state, ptutils

EXAMPLES = ROOT / "examples"


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> Path:
    """An ImageFolder tree of PNG files (digits, 16x16), written by the example's script."""
    root = tmp_path_factory.mktemp("images") / "data"
    proc = ptutils_script("imagefolder/make_images.py", str(root), "--per-class", "60")
    assert "PNG files" in proc, proc
    return root


def ptutils_script(script: str, *args: str) -> str:
    import subprocess
    import sys

    return subprocess.run([sys.executable, str(EXAMPLES / script), *args], check=True,
                          capture_output=True, text=True, timeout=120).stdout


def example_config(example: str, tmp: Path, kill_step: int, steps: int, chunk: int,
                   images: Path | None = None) -> Path:
    """The example's YAML, shortened to `steps`, with a KillAt callback at `kill_step`
    (fires once per marker file) and `.py` imports made absolute."""
    src = EXAMPLES / example
    cfg = yaml.safe_load(src.read_text())
    cfg["imports"] = [str((src.parent / p).resolve()) if p.endswith(".py") else p
                      for p in cfg.get("imports", [])] + [KILLER]
    cfg["session"].update(total_steps=steps, chunk_steps=chunk, eval_every=chunk, log_every=1)
    cfg.setdefault("callbacks", []).append(
        {"type": "killer.KillAt", "step": kill_step, "marker": str(tmp / f"{cfg['name']}.killed")})
    assert cfg["data"]["num_workers"] == 2, "the examples read with 2 loader workers"
    for spec in cfg["data"]["datasets"].values():
        if "root" in spec:
            spec["root"] = str(images)
        if spec.get("split") == "train":
            assert spec.get("augment") is True, "random augmentation is on when training"
    path = tmp / f"{cfg['name']}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def kill_resume_compare(path: Path, name: str, tmp: Path) -> dict:
    """Run `path` killed (store b, then --resume) and uninterrupted (store a); the two
    final states and statistics must be bit-identical. Returns store a's final state."""
    store_a, store_b = str(tmp / "runs-a"), str(tmp / "runs-b")
    killed = ptutils("run", str(path), "--store", store_b, "-q")
    assert killed.returncode == -9, killed.stderr[-3000:]
    ptutils("run", str(path), "--store", store_b, "-q", "--resume", check=True)
    ptutils("run", str(path), "--store", store_a, "-q", check=True)  # marker exists now
    doc_a, ckpt_a, state_a, stats_a = final_state(store_a, name)
    doc_b, ckpt_b, state_b, stats_b = final_state(store_b, name)
    assert doc_a["status"] == doc_b["status"] == "completed"
    assert ckpt_a["step"] == ckpt_b["step"] == doc_a["total_steps"]
    assert_bit_identical(state_a, state_b)
    assert series(stats_a) == series(stats_b)
    return state_a


def test_imagefolder_then_finetune_resume_bit_identical(tmp_path, images):
    rng = random.Random(os.getpid())
    steps, chunk = 24, 8
    path = example_config("imagefolder/imagefolder.yaml", tmp_path, rng.randint(2, steps - 1),
                          steps, chunk, images)
    source = kill_resume_compare(path, "imagefolder", tmp_path)

    path = example_config("finetune/finetune.yaml", tmp_path, rng.randint(2, steps - 1),
                          steps, chunk, images)
    kill_resume_compare(path, "finetune", tmp_path)
    # The warm start put the source's final convolutions into the backbone, renamed.
    with_init = final_state_at(tmp_path / "runs-a", "finetune", 0)
    src_net = source["trainer"]["model"]["network"]
    net = with_init["trainer"]["model"]["network"]
    loaded = [k for k in src_net if k.startswith("features.")]
    assert loaded
    for key in loaded:
        assert torch.equal(net["backbone." + key.removeprefix("features.")], src_net[key])


def final_state_at(store_dir: Path, name: str, step: int) -> dict:
    from ptutils.store import open_store

    with open_store(store_dir) as store:
        doc = store.get_session(name)
        return store.load_state(store.get_checkpoint(doc["_id"], step))


def test_stdlib_language_model_in_bf16_resumes_bit_identical(tmp_path):
    rng = random.Random(os.getpid() + 1)
    steps, chunk = 16, 6
    path = example_config("lm/lm.yaml", tmp_path, rng.randint(2, steps - 1), steps, chunk)
    state = kill_resume_compare(path, "stdlib-lm", tmp_path)
    _, _, _, stats = final_state(tmp_path / "runs-a", "stdlib-lm")
    losses = [p["value"] for p in stats if p["name"] == "loss" and p["phase"] == "train"]
    assert len(losses) == steps and losses[-1] < losses[0], losses
    assert all(v.dtype == torch.float32 for v in state["trainer"]["model"]["network"].values()
               if v.is_floating_point()), "bf16 autocast keeps fp32 weights"
