"""Module: child tracking, nested state round trips, config round trip, partial restore."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from ptutils.callbacks import BestCheckpoint, Callbacks, EarlyStopping, NanDetector
from ptutils.errors import ConfigError, LoadError, NanLossError, RegistryError
from ptutils.model import Model
from ptutils.module import Module, build
from ptutils.state import History, State

MODEL_CFG = {
    "network": {"type": "ptutils.nets.MLP", "in_features": 8, "hidden": [16], "out_features": 3},
    "criterion": {"type": "torch.nn.CrossEntropyLoss"},
    "optimizer": {"type": "torch.optim.SGD", "lr": 0.1, "momentum": 0.9},
    "scheduler": {"type": "torch.optim.lr_scheduler.StepLR", "step_size": 3, "gamma": 0.5},
}


def _train(model: Model, steps: int, seed: int = 0) -> None:
    g = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        batch = {"x": torch.randn(4, 8, generator=g), "y": torch.randint(0, 3, (4,), generator=g)}
        model.train_step(batch)


def _equal_states(a, b) -> None:
    assert type(a) is type(b) or (isinstance(a, dict) and isinstance(b, dict))
    if isinstance(a, dict):
        assert a.keys() == b.keys()
        for k in a:
            _equal_states(a[k], b[k])
    elif isinstance(a, list | tuple):
        assert len(a) == len(b)
        for x, y in zip(a, b):
            _equal_states(x, y)
    elif isinstance(a, torch.Tensor):
        assert a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b)
    else:
        assert a == b


def test_children_are_tracked_including_torch_objects():
    model = Model.from_config(MODEL_CFG, where="model")
    kids = model.children()
    assert isinstance(kids["network"], nn.Module)
    assert isinstance(kids["optimizer"], torch.optim.SGD)
    assert isinstance(kids["scheduler"], torch.optim.lr_scheduler.StepLR)
    assert set(model.state_dict()) == {"network", "criterion", "optimizer", "scheduler"}


def test_nested_state_round_trip_restores_momentum_and_scheduler():
    torch.manual_seed(0)
    a = Model.from_config(MODEL_CFG)
    _train(a, 5)
    state = copy.deepcopy(a.state_dict())  # torch shares optimizer buffers on load
    assert state["optimizer"]["state"], "momentum buffers exist after training"
    assert state["scheduler"]["last_epoch"] == 5
    torch.manual_seed(1)
    b = Model.from_config(MODEL_CFG)
    b.load_state_dict(state)
    _equal_states(b.state_dict(), state)
    _train(a, 4, seed=7)
    _train(b, 4, seed=7)
    for pa, pb in zip(a.network.parameters(), b.network.parameters()):
        assert torch.equal(pa, pb), "continuing from a restored state is bit-identical"
    assert b.lr() == a.lr() == pytest.approx(0.1 * 0.5**3)


def test_to_config_round_trip_builds_an_equal_tree():
    model = Model.from_config(MODEL_CFG)
    cfg = model.to_config()
    assert cfg["type"] == "ptutils.model.Model"
    assert cfg["optimizer"] == MODEL_CFG["optimizer"]
    rebuilt = build(cfg)
    assert rebuilt.to_config() == cfg
    assert [p.shape for p in rebuilt.network.parameters()] == [
        p.shape for p in model.network.parameters()]
    assert rebuilt.optimizer.defaults["momentum"] == 0.9


def test_module_subclass_records_its_own_config():
    class Scaler(Module):
        def __init__(self, factor: float = 2.0, name: str = "s") -> None:
            self.factor = factor
            self.count = 0

        def __call__(self, x):
            self.count += 1
            return x * self.factor

        def extra_state(self):
            return {"count": self.count}

        def load_extra_state(self, state):
            self.count = state["count"]

    s = Scaler(factor=3.0)
    s(1)
    s(2)
    assert s.to_config()["factor"] == 3.0 and s.to_config()["name"] == "s"
    t = Scaler()
    t.load_state_dict(s.state_dict())
    assert t.count == 2


def test_partial_restore_with_rename_reports_restored_skipped_missing():
    class Old(Module):
        def __init__(self):
            self.encoder = nn.Linear(4, 4)
            self.head = nn.Linear(4, 2)

    class New(Module):
        def __init__(self):
            self.net = nn.Linear(4, 4)
            self.classifier = nn.Linear(4, 5)

    old, new = Old(), New()
    before_cls = new.classifier.weight.clone()
    with pytest.raises(LoadError, match="only="):
        new.load_state_dict(old.state_dict())
    report = new.load_state_dict(old.state_dict(), only=["net.*"], rename={"encoder": "net"})
    assert torch.equal(new.net.weight, old.encoder.weight)
    assert torch.equal(new.classifier.weight, before_cls), "classifier untouched"
    assert sorted(report.restored) == ["net.bias", "net.weight"]
    assert set(report.skipped) == {"head.weight", "head.bias"}
    assert report.renamed["encoder.weight"] == "net.weight"
    assert "restored 2" in str(report)


def test_partial_restore_refuses_a_shape_mismatch_with_a_clear_error():
    class A(Module):
        def __init__(self, n):
            self.net = nn.Linear(4, n)

    with pytest.raises(LoadError, match=r"net.weight.*\(3, 4\).*\(5, 4\)"):
        A(5).load_state_dict(A(3).state_dict(), only=["net.*"])


def test_unknown_key_names_the_nearest_valid_choice():
    cfg = {**MODEL_CFG, "optimizer": {"type": "torch.optim.SGD", "lr": 0.1, "momentun": 0.9}}
    with pytest.raises(ConfigError, match="model.optimizer.momentun.*momentum"):
        Model.from_config(cfg, where="model")
    with pytest.raises(ConfigError, match="clip_grad_nrom.*clip_grad_norm"):
        Model.from_config({**MODEL_CFG, "clip_grad_nrom": 1.0}, where="model")


@pytest.mark.parametrize("bad", ["os.system", "subprocess.Popen", "builtins.eval"])
def test_disallowed_types_are_refused_before_building(bad):
    cfg = {**MODEL_CFG, "network": {"type": bad, "command": "touch /tmp/pwned"}}
    with pytest.raises(RegistryError, match="allow"):
        Model.from_config(cfg, where="model")


def test_state_is_a_dict_with_dot_access_and_identity():
    s = State(a=1, b={"c": 2})
    assert State(s) is s
    assert s.a == 1 and s.b.c == 2
    s.d = 3
    assert s["d"] == 3


def test_callbacks_state_is_part_of_the_state():
    cbs = Callbacks([NanDetector(), EarlyStopping("test/loss", mode="min", patience=2),
                     BestCheckpoint("test/acc", mode="max")])
    for step, (loss, acc) in enumerate([(1.0, 0.5), (0.9, 0.7), (0.95, 0.6), (0.96, 0.65)], 1):
        cbs.fire("on_eval_end", step * 10, {"test/loss": loss, "test/acc": acc})
    assert cbs.stop_reason and "did not improve for 2" in cbs.stop_reason
    state = cbs.state_dict()
    fresh = Callbacks([NanDetector(), EarlyStopping("test/loss", mode="min", patience=2),
                       BestCheckpoint("test/acc", mode="max")])
    fresh.load_state_dict(state)
    assert fresh.stop_reason == cbs.stop_reason
    best = list(fresh)[2]
    assert (best.best, best.best_step) == (0.7, 20)


def test_nan_detector_raises_nan_loss_error_naming_the_step():
    with pytest.raises(NanLossError, match="(?i)step 7.*lower the learning rate"):
        Callbacks([NanDetector()]).fire("on_log", 7, [(6, 0.5), (7, float("nan"))])


def test_history_round_trip_and_truncate():
    h = History()
    for s in range(1, 6):
        h.add("loss", 1.0 / s, s)
    h2 = History()
    h2.load_state_dict(h.state_dict())
    assert h2.series("loss") == h.series("loss")
    h2.truncate(3)
    assert h2.series("loss")[0] == [1, 2, 3]
