"""GPU path: a session with `session.device: cuda` trains, checkpoints from CPU copies, and
resumes bit-identically (deterministic mode). Skipped where no CUDA device is present."""

from __future__ import annotations

import pytest
import torch

from ptutils.engine import Engine
from ptutils.plan import train_task
from ptutils.protocol import TRAIN
from ptutils.store.base import new_session_doc
from ptutils.store.local import LocalStore

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]


def _cfg(amp: str | bool) -> dict:
    return {
        "session": {"total_steps": 40, "chunk_steps": 10, "seed": 0, "device": "cuda",
                    "log_every": 5},
        "model": {"network": {"type": "ptutils.nets.MLP", "in_features": 64, "hidden": [64],
                              "out_features": 10}, "amp": amp,
                  "optimizer": {"type": "torch.optim.Adam", "lr": 0.001}},
        "data": {"batch_size": 32, "datasets": {"train": {"type": "ptutils.data.DigitsReader"}}},
    }


def _run(store: LocalStore, name: str, cfg: dict, cold_every_chunk: bool) -> dict:
    doc = store.create_session(new_session_doc(name, cfg, name, 40))
    engine = Engine(store)
    task = train_task(doc)
    while task is not None:
        if cold_every_chunk:
            engine = Engine(store)  # nothing warm: rebuild and load the checkpoint each chunk
        out = engine.train(task)
        assert out.ran, out.reason
        task = next((t for t in out.successors if t.kind == TRAIN), None)
    return store.load_state(store.get_checkpoint(doc["_id"]))


@pytest.mark.parametrize("amp", [False, "fp16", "bf16"])
def test_cuda_session_resumes_bit_identical(tmp_path, amp):
    if amp == "bf16" and not torch.cuda.is_bf16_supported(including_emulation=False):
        pytest.skip("this GPU has no native bfloat16 (model.amp: bf16 is refused on it)")
    store = LocalStore(tmp_path)
    warm = _run(store, "warm", _cfg(amp), cold_every_chunk=False)
    cold = _run(store, "cold", _cfg(amp), cold_every_chunk=True)
    net_w, net_c = warm["trainer"]["model"]["network"], cold["trainer"]["model"]["network"]
    assert all(t.device.type == "cpu" for t in net_w.values()), "checkpoints hold CPU copies"
    for k in net_w:
        assert torch.equal(net_w[k], net_c[k]), k
