"""`ptutils worker`'s plan of child processes: one per GPU, pinned; CPU workers otherwise.

The worker processes themselves run in tests/test_workers.py; here, what the launcher
would start on machines this test machine is not (GPU boxes, SLURM allocations).
"""

from __future__ import annotations

import pytest

from workers.launcher import WorkerOptions, child_command, child_env, parse_gpus, plan_slots


def test_one_pinned_worker_per_visible_gpu(monkeypatch):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "2,3")  # e.g. what SLURM allocated
    slots = plan_slots(WorkerOptions(name="box"))
    assert [(s.name, s.cuda_visible_devices) for s in slots] == [("box-gpu2", "2"),
                                                                 ("box-gpu3", "3")]
    envs = [child_env(WorkerOptions(name="box", reconcile_every=5), s) for s in slots]
    assert [e["CUDA_VISIBLE_DEVICES"] for e in envs] == ["2", "3"]
    assert [e["PTUTILS_WORKER_RECONCILE"] for e in envs] == ["5", "0"], "one reconciler"
    cmd = child_command(WorkerOptions(queues=["train", "eval"]), slots[0])
    assert cmd[cmd.index("--queues") + 1] == "train,eval"
    assert cmd[cmd.index("--concurrency") + 1] == "1"
    assert cmd[cmd.index("--hostname") + 1] == "box-gpu2@%h"


def test_explicit_gpus_and_processes_per_gpu():
    slots = plan_slots(WorkerOptions(gpus="0,1", concurrency=2, name="w"))
    assert [(s.name, s.cuda_visible_devices) for s in slots] == [
        ("w-gpu0-0", "0"), ("w-gpu0-1", "0"), ("w-gpu1-0", "1"), ("w-gpu1-1", "1")]


@pytest.mark.parametrize("visible", ["", "-1"])
def test_no_gpu_means_cpu_workers_that_see_no_gpu(monkeypatch, visible):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", visible)
    slots = plan_slots(WorkerOptions(concurrency=3, name="c"))
    assert [(s.name, s.cuda_visible_devices) for s in slots] == [
        ("c-cpu0", ""), ("c-cpu1", ""), ("c-cpu2", "")]
    none = plan_slots(WorkerOptions(gpus="none", concurrency=1, name="c"))
    assert child_env(WorkerOptions(store="mongodb://db/x"), none[0])["CUDA_VISIBLE_DEVICES"] == ""


def test_bad_gpu_spec_is_refused():
    with pytest.raises(ValueError, match="--gpus"):
        parse_gpus("first")
    with pytest.raises(ValueError, match="--concurrency"):
        plan_slots(WorkerOptions(gpus="none", concurrency=0))
