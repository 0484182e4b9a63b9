"""Precision and steps: `model.amp` (bf16/fp16), `model.accumulate`, gradient clipping and
LR schedules per step, per epoch or on an eval metric; each resumes bit-identical."""

from __future__ import annotations

import copy
import math
from typing import Any

import pytest
import torch
import yaml
from torch import nn

from ptutils.errors import ConfigError
from ptutils.model import Model
from ptutils.runner import run_session
from ptutils.session import Session
from ptutils.store import open_store
from ptutils.store.base import new_session_doc
from ptutils.store.local import LocalStore
from tests.helpers import assert_bit_identical, digits_config, run_cut, series
from tests.test_run import ptutils, write


def config(*, dropout: float = 0.2, **model: Any) -> dict[str, Any]:
    """The shared digits session (60 steps, chunks of 20, an eval every chunk) with
    `model` keys replaced."""
    cfg = digits_config(imports=[], callbacks=[], log_every=10)
    cfg["model"]["network"]["dropout"] = dropout
    cfg["model"].update(model)
    return cfg


def run_whole(store: LocalStore, cfg: dict[str, Any], name: str) -> dict:
    total = cfg["session"]["total_steps"]
    doc = store.create_session(new_session_doc(name, cfg, "h", total))
    run_session(store, doc)
    return doc


def final(store: LocalStore, doc: dict) -> tuple[dict, list]:
    sid = doc["_id"]
    return store.load_state(store.get_checkpoint(sid)), series(store.query_statistics(sid))


def lr_series(stats: list) -> list[tuple[int, float]]:
    return [(step, value) for phase, step, name, value in stats if name == "lr"]


SUM_LOSS = {"type": "torch.nn.CrossEntropyLoss", "reduction": "sum"}
"""A loss large enough that fp16 gradients at the GradScaler's initial scale overflow: the
scaler backs off in the first steps, so a resume that lost its state would differ."""

PLATEAU = {
    "type": "torch.optim.lr_scheduler.ReduceLROnPlateau",
    "monitor": "test/loss",
    "mode": "max",  # the loss falls, so it never "improves": every eval after the first
    "patience": 0,  # halves the lr, at a point fixed by the plan
    "factor": 0.5,
}


# --- exact resume ---------------------------------------------------------------------------


@pytest.mark.parametrize("model,session", [
    ({"amp": "bf16"}, {}),
    ({"amp": "fp16", "criterion": SUM_LOSS}, {}),
    ({"accumulate": 3, "clip_grad_norm": 0.5}, {}),
    ({"amp": "fp16", "criterion": SUM_LOSS, "accumulate": 2, "clip_grad_value": 0.05}, {}),
    ({"scheduler": {"type": "torch.optim.lr_scheduler.StepLR", "step_size": 1,
                    "gamma": 0.7, "interval": "epoch"}}, {"total_steps": 100}),
    ({"scheduler": PLATEAU}, {"total_steps": 100}),
], ids=["bf16", "fp16", "accumulate+clip_norm", "fp16+accumulate+clip_value", "epoch-lr",
        "plateau"])
def test_preempted_run_resumes_bit_identical(tmp_path, model, session):
    cfg = config(**model)
    cfg["session"].update(session, log_every=1)
    with LocalStore(tmp_path / "runs") as store:
        want_state, want_stats = final(store, run_whole(store, cfg, "ref"))
        # preempted mid-chunk, after the first delivered eval where there is one
        got_state, got_stats = final(store, run_cut(store, cfg, "cut", 47))
    assert_bit_identical(want_state, got_state)
    assert got_stats == want_stats
    model_state = got_state["trainer"]["model"]
    net = model_state["network"]
    assert all(t.dtype == torch.float32 for t in net.values()), "parameters stay fp32"
    if model.get("amp") == "fp16":
        scaler = model_state["scaler"]
        assert 1.0 < scaler["scale"] < 65536.0, "the scaler backed off from its initial scale"
        assert scaler["_growth_tracker"] > 0
    else:
        assert "scaler" not in model_state
    if model.get("scheduler") is PLATEAU:
        assert model_state["scheduler"]["last_epoch"] == 3  # Eval(20), (40), (60) delivered
        assert model_state["scheduler"]["_last_lr"] == [0.003 / 4]


def test_fp16_scaler_state_round_trips(tmp_path):
    cfg = config(amp="fp16", dropout=0.0)  # no dropout: the two sessions share the RNGs
    session = Session.create(cfg)
    for _ in range(7):
        session.trainer.step()
    scaler = session.model.scaler
    scaler.update(1024.0)  # a non-default scale (as after overflows), and a growth count
    state = session.state_dict()
    saved = state["trainer"]["model"]["scaler"]
    assert saved == {"scale": 1024.0, "growth_factor": 2.0, "backoff_factor": 0.5,
                     "growth_interval": 2000, "_growth_tracker": 7}
    with LocalStore(tmp_path / "runs") as store:  # through the codec and the store
        doc = store.create_session(new_session_doc("s", cfg, "h", 60))
        store.put_checkpoint(doc["_id"], 7, "chunk", state, metrics={})
        loaded = store.load_state(store.get_checkpoint(doc["_id"], 7))
    fresh = Session.create(cfg)
    assert fresh.model.scaler.get_scale() == 65536.0
    fresh.load_state_dict(loaded)
    assert fresh.model.scaler.state_dict() == saved
    assert fresh.model.scaler.get_scale() == 1024.0
    session.trainer.step()
    fresh.trainer.step()
    for (k, a), b in zip(session.model.network.state_dict().items(),
                         fresh.model.network.state_dict().values()):
        assert torch.equal(a, b), k


# --- amp ------------------------------------------------------------------------------------


def _amp_steps(amp: str, dtype: torch.dtype) -> Session:
    """60 steps under `amp`: the first layer's outputs are `dtype` and the loss falls."""
    session = Session.create(config(amp=amp, dropout=0.0))
    seen: list[torch.dtype] = []
    first = next(m for m in session.model.network.modules() if isinstance(m, nn.Linear))
    first.register_forward_hook(lambda mod, inp, out: seen.append(out.dtype))
    losses = [float(session.trainer.step()) for _ in range(60)]
    assert set(seen) == {dtype}
    assert sum(losses[-10:]) < 0.8 * sum(losses[:10]), losses
    return session


def test_bf16_on_cpu_runs_the_forward_in_bf16_and_learns():
    session = _amp_steps("bf16", torch.bfloat16)
    for name, p in session.model.network.named_parameters():
        assert p.dtype == torch.float32, name
    assert "scaler" not in session.model.state_dict()


def test_fp16_on_cpu_runs_the_forward_in_fp16_with_a_grad_scaler():
    session = _amp_steps("fp16", torch.float16)
    assert session.model.scaler.state_dict()["_growth_tracker"] == 60


@pytest.mark.parametrize("amp,expect", [
    (True, "choose `bf16`"),
    ("fp32", "unknown value 'fp32'"),
])
def test_ptutils_run_refuses_a_bad_amp_before_storing_anything(tmp_path, amp, expect):
    cfg = config(amp=amp)
    proc = ptutils("run", str(write(tmp_path, cfg)), "--store", str(tmp_path / "runs"), "-q")
    assert proc.returncode == 2, proc.stderr
    assert "model.amp" in proc.stderr and expect in proc.stderr, proc.stderr
    assert "Traceback" not in proc.stderr
    with open_store(tmp_path / "runs") as store:
        assert store.find_sessions() == []


def test_amp_that_cannot_run_on_the_session_device_is_a_config_error():
    cfg = config(amp="bf16")
    cfg["session"]["device"] = "meta"  # a device type without autocast
    with pytest.raises(ConfigError, match="model.amp: bf16 cannot run on session.device 'meta'"):
        Session.create(cfg)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks what a CPU-only machine can")
def test_cuda_amp_is_left_to_the_worker_on_a_cpu_only_machine():
    from ptutils.model import amp_problem

    assert amp_problem("bf16", "cuda") is None and amp_problem("fp16", "cuda:1") is None


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_bf16_check_on_a_cuda_device_matches_its_native_support():
    from ptutils.model import amp_problem

    native = torch.cuda.is_bf16_supported(including_emulation=False)
    assert (amp_problem("bf16", "cuda") is None) == native
    assert amp_problem("fp16", "cuda") is None


# --- accumulation ---------------------------------------------------------------------------


def _plain(batch_size: int, accumulate: int, **model: Any) -> Session:
    cfg = config(dropout=0.0, accumulate=accumulate, scheduler=None,
                 optimizer={"type": "torch.optim.SGD", "lr": 0.5, "momentum": 0.9}, **model)
    cfg["data"]["batch_size"] = batch_size
    return Session.create(cfg)


def test_accumulating_4_batches_of_16_is_one_step_on_a_batch_of_64():
    big, micro, small = _plain(64, 1), _plain(16, 4), _plain(16, 1)
    for step in range(10):
        loss_big, loss_micro = big.trainer.step(), micro.trainer.step()
        small.trainer.step()
        assert torch.allclose(loss_big, loss_micro, atol=1e-6), step
    assert micro.data.position() == {
        "drawn": 40, "sources": {"train": {"epoch": 0, "position": 640}}}
    assert big.data.position() == {
        "drawn": 10, "sources": {"train": {"epoch": 0, "position": 640}}}
    for (k, a), b, c in zip(big.model.network.state_dict().items(),
                            micro.model.network.state_dict().values(),
                            small.model.network.state_dict().values()):
        assert torch.allclose(a, b, atol=1e-5), k
        assert not torch.allclose(a, c, atol=1e-3), "batch 16 without accumulation differs"


def test_accumulated_step_logs_the_mean_of_its_micro_batch_losses():
    session = _plain(16, 4)
    model = session.model
    batches = [session.data.next_batch() for _ in range(4)]
    with torch.no_grad():
        losses = [model.loss(b)[0] for b in batches]
    assert torch.equal(model.train_step(batches), torch.stack(losses).mean())


# --- clipping -------------------------------------------------------------------------------


def _manual_step(net: nn.Module, batches: list[dict], lr: float, clip: Any,
                 scaler: torch.amp.GradScaler | None = None) -> None:
    """The textbook torch loop the Model must reproduce bit for bit."""
    opt = torch.optim.SGD(net.parameters(), lr=lr)
    opt.zero_grad(set_to_none=True)
    for b in batches:
        ctx = (torch.autocast("cpu", dtype=torch.float16) if scaler is not None
               else torch.autocast("cpu", enabled=False))
        with ctx:
            loss = nn.functional.cross_entropy(net(b["x"]), b["y"])
        loss = loss / len(batches) if len(batches) > 1 else loss
        (scaler.scale(loss) if scaler is not None else loss).backward()
    if scaler is not None:
        scaler.unscale_(opt)
    clip(list(net.parameters()))
    if scaler is not None:
        scaler.step(opt)
        scaler.update()
    else:
        opt.step()


@pytest.mark.parametrize("key,value,clip", [
    ("clip_grad_norm", 0.05, lambda ps: nn.utils.clip_grad_norm_(ps, 0.05)),
    ("clip_grad_value", 0.002, lambda ps: nn.utils.clip_grad_value_(ps, 0.002)),
])
@pytest.mark.parametrize("accumulate,amp", [(1, None), (2, None), (2, "fp16")])
def test_clipping_matches_a_manual_torch_loop_bit_for_bit(key, value, clip, accumulate, amp):
    lr = 10.0  # a huge step: what clipping lets through is all that moves the weights
    session = _plain(16, accumulate, amp=amp, **{key: value})
    model = session.model
    model.optimizer.param_groups[0].update(lr=lr, momentum=0.0)
    net = copy.deepcopy(model.network)
    unclipped = copy.deepcopy(model.network)
    before = {k: v.clone() for k, v in net.state_dict().items()}
    batches = [session.data.next_batch() for _ in range(accumulate)]
    model.train_step(batches)
    scaler = torch.amp.GradScaler("cpu") if amp else None
    _manual_step(net, batches, lr, clip, scaler)
    _manual_step(unclipped, batches, lr, lambda ps: None,
                 torch.amp.GradScaler("cpu") if amp else None)
    got = model.network.state_dict()
    for k, v in net.state_dict().items():
        assert torch.equal(got[k], v), k
    moved = max(float((got[k] - before[k]).abs().max()) for k in got)
    free = max(float((unclipped.state_dict()[k] - before[k]).abs().max()) for k in got)
    assert moved < free / 5, "the clip bites: the update is far smaller than unclipped"
    if key == "clip_grad_value":
        assert moved <= lr * value * (1 + 1e-6)


@pytest.mark.parametrize("key,value", [("clip_grad_norm", 0), ("clip_grad_value", -1.0),
                                       ("clip_grad_norm", "big"), ("accumulate", 0),
                                       ("accumulate", 2.5)])
def test_bad_clip_or_accumulate_values_are_config_errors(key, value):
    with pytest.raises(ConfigError, match=f"model.{key}"):
        Session.create(config(**{key: value}))


# --- LR schedules ---------------------------------------------------------------------------


def test_epoch_scheduler_steps_exactly_when_the_train_stream_ends_an_epoch():
    cfg = config(scheduler={"type": "torch.optim.lr_scheduler.StepLR", "step_size": 1,
                            "gamma": 0.5, "interval": "epoch"},
                 optimizer={"type": "torch.optim.SGD", "lr": 0.1})
    session = Session.create(cfg)
    per_epoch = session.data.sizes()["train"] // cfg["data"]["batch_size"]  # drop_last
    assert per_epoch == 44
    lrs = []
    for _ in range(3 * per_epoch + 5):
        session.trainer.step()
        lrs.append(session.model.lr())
    want = [0.1 * 0.5 ** (step // per_epoch) for step in range(1, len(lrs) + 1)]
    assert lrs == pytest.approx(want, rel=1e-12)
    assert session.model.state_dict()["scheduler"]["last_epoch"] == 3


def test_step_scheduler_steps_after_every_training_step_by_default():
    cfg = config(scheduler={"type": "torch.optim.lr_scheduler.StepLR", "step_size": 1,
                            "gamma": 0.5}, accumulate=2)
    session = Session.create(cfg)
    for _ in range(3):
        session.trainer.step()
    assert session.model.state_dict()["scheduler"]["last_epoch"] == 3


def test_reduce_on_plateau_lowers_the_lr_at_the_plans_fixed_eval_points(tmp_path):
    cfg = config(scheduler=PLATEAU)
    cfg["session"].update(total_steps=100, log_every=1)
    with LocalStore(tmp_path / "runs") as store:
        _, stats = final(store, run_whole(store, cfg, "plateau"))
    lrs = dict(lr_series(stats))
    lr0 = cfg["model"]["optimizer"]["lr"]
    # Eval(n) reaches the scheduler at the start of Train[n + 20, ...): Eval(20) sets
    # the best value, Eval(40) (at step 60) and Eval(60) (at step 80) each halve the lr.
    want = {s: lr0 * (1 if s <= 60 else 0.5 if s <= 80 else 0.25) for s in range(1, 101)}
    assert lrs == pytest.approx(want, rel=1e-12)


@pytest.mark.parametrize("scheduler,session,expect", [
    ({**PLATEAU, "monitor": None}, {}, "ReduceLROnPlateau steps on an eval metric"),
    ({**PLATEAU, "monitor": "test/top5"}, {}, "no eval produces 'test/top5'"),
    ({**PLATEAU, "monitor": "loss"}, {}, "`target/metric`"),
    (PLATEAU, {"eval_every": 0}, "no eval result arrives before the end"),
    (PLATEAU, {"eval_every": 40}, "no eval result arrives before the end"),
    ({**PLATEAU, "interval": "epoch"}, {}, "remove `interval`"),
    ({"type": "torch.optim.lr_scheduler.StepLR", "step_size": 5, "monitor": "test/loss"}, {},
     "only ReduceLROnPlateau steps on a metric"),
    ({"type": "torch.optim.lr_scheduler.StepLR", "step_size": 5, "interval": "batch"}, {},
     "valid: step"),
])
def test_bad_scheduler_settings_are_config_errors(scheduler, session, expect):
    cfg = config(scheduler=scheduler)
    cfg["session"].update(session)
    with pytest.raises(ConfigError, match="model.scheduler") as info:
        Session.create(cfg)
    assert expect in str(info.value)


def test_model_to_config_keeps_the_ptutils_scheduler_keys():
    cfg = config(scheduler=PLATEAU)
    model = Session.create(cfg).model
    assert model.to_config()["scheduler"] == PLATEAU
    rebuilt = Model.from_config({k: v for k, v in model.to_config().items() if k != "type"},
                                where="model")
    assert rebuilt.monitor == "test/loss" and rebuilt.interval == "step"


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks a machine without a GPU")
def test_submit_checks_a_cuda_session_on_a_machine_without_a_gpu(tmp_path):
    """`submit` builds every config dry before storing it; a `device: cuda` session is
    checked on the CPU (the workers have the GPUs), with its amp checked for CUDA."""
    from orchestrator.submit import prepare

    cfg = digits_config(imports=[], callbacks=[], device="cuda", total_steps=20, chunk_steps=10)
    cfg["model"]["amp"] = "fp16"
    path = tmp_path / "cuda.yaml"
    path.write_text(yaml.safe_dump(cfg))
    [prepared] = prepare(path)
    assert prepared.config["session"]["device"] == "cuda"
    assert prepared.config["model"]["amp"] == "fp16"


def test_a_step_the_fp16_scaler_skips_does_not_advance_a_step_scheduler():
    """inf/NaN gradients: the GradScaler skips optimizer.step() and halves its scale; the
    per-step schedule then counts only the optimizer steps that happened."""
    cfg = config(amp="fp16", dropout=0.0, criterion=SUM_LOSS,
                 scheduler={"type": "torch.optim.lr_scheduler.StepLR", "step_size": 1,
                            "gamma": 0.9})
    session = Session.create(cfg)
    steps = 12
    for _ in range(steps):
        session.trainer.step()
    scale = session.model.scaler.get_scale()
    skipped = round(math.log2(65536.0 / scale))  # no growth within 2000 steps: only backoffs
    assert skipped >= 1, "the summed loss must overflow fp16 at the initial scale"
    state = session.model.state_dict()
    assert state["scheduler"]["last_epoch"] == steps - skipped
    assert state["optimizer"]["state"][0]["step"].item() == steps - skipped


def test_an_accumulated_step_under_ddp_all_reduces_once(tmp_path):
    """K micro-batches under DistributedDataParallel: the first K-1 backwards keep their
    gradients local (`no_sync`), so a step costs one all-reduce, not K; the step equals
    the one without DDP."""
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    ddp_run, plain_run = _plain(16, 3), _plain(16, 3)
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'rendezvous'}",
                            rank=0, world_size=1)
    try:
        reduced: list[int] = []

        def count(state, bucket):  # type: ignore[no-untyped-def]  # DDP reads no strings
            reduced.append(bucket.index())
            fut = torch.futures.Future()
            fut.set_result(bucket.buffer())
            return fut

        ddp = DistributedDataParallel(ddp_run.model.network)
        ddp.register_comm_hook(None, count)
        ddp_run.model.__dict__["network"] = ddp
        for _ in range(4):
            ddp_run.trainer.step()
            plain_run.trainer.step()
        assert len(reduced) == 4 * len(set(reduced)), reduced  # each bucket once a step
        for (k, a), b in zip(ddp.module.state_dict().items(),
                             plain_run.model.network.state_dict().values()):
            assert torch.allclose(a, b, atol=1e-6), k
    finally:
        dist.destroy_process_group()
