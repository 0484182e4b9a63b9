"""Trainer step loop vs a plain PyTorch loop on the same MLP and data, side by side.

The plain loop is the strongest hand-written baseline: in-memory tensors, a fresh
permutation per epoch, `index_select` batches, and `loss.item()` every `log_every`
steps (what people write to log). ptutils runs the same steps through
`Trainer.run`: DataProvider with a resumable position, callbacks (NaN detector),
History and Statistic records. Goal: ptutils / plain <= 1.03, the median ratio of blocks
run in lock step (`lock_step`).

A second row times a whole Engine chunk (the same steps plus statistics written to
the local store and a verified checkpoint) for reference.
"""

from __future__ import annotations

import gc
import statistics
import tempfile
import time
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from bench.harness import Goal, compare, report
from ptutils.engine import Engine
from ptutils.protocol import TRAIN, Task
from ptutils.session import Session
from ptutils.state import History
from ptutils.store.base import new_session_doc
from ptutils.store.local import LocalStore


def _config(steps: int) -> dict:
    return {
        "session": {"total_steps": steps, "chunk_steps": steps, "log_every": 10, "seed": 0},
        "model": {
            "network": {"type": "ptutils.nets.MLP", "in_features": 64, "hidden": [256, 256],
                        "out_features": 10},
            "optimizer": {"type": "torch.optim.SGD", "lr": 0.05, "momentum": 0.9},
        },
        "data": {"batch_size": 128, "seed": 0, "datasets": {
            "train": {"type": "ptutils.data.DigitsReader"}}},
    }


class PlainLoop:
    """The plain PyTorch loop, run `n` steps at a time (its state kept between calls)."""

    def __init__(self, x: torch.Tensor, y: torch.Tensor, model: Any = None) -> None:
        """`model`: a ptutils Model whose network, optimizer and criterion this loop
        steps instead of its own (the same tensors in memory as the loop it is compared
        with: two separately built networks differ by a few percent in speed, by where
        their tensors landed; see bench_trainer's control row)."""
        torch.manual_seed(0)
        if model is None:
            self.net = nn.Sequential(nn.Flatten(), nn.Linear(64, 256), nn.ReLU(),
                                     nn.Linear(256, 256), nn.ReLU(), nn.Linear(256, 10))
            self.opt = torch.optim.SGD(self.net.parameters(), lr=0.05, momentum=0.9)
            self.crit = nn.CrossEntropyLoss()
        else:
            self.net, self.opt, self.crit = model.network, model.optimizer, model.criterion
        self.gen = torch.Generator().manual_seed(0)
        self.x, self.y = x, y
        self.perm, self.pos, self.step, self.last = torch.randperm(x.shape[0], generator=self.gen), 0, 0, 0.0
        self.pending: list[torch.Tensor] = []

    def run(self, steps: int) -> float:
        net, opt, crit, x, y = self.net, self.opt, self.crit, self.x, self.y
        n, bs = x.shape[0], 128
        for _ in range(steps):
            if self.pos + bs > n:
                self.perm, self.pos = torch.randperm(n, generator=self.gen), 0
            idx = self.perm[self.pos:self.pos + bs]
            self.pos += bs
            xb, yb = x.index_select(0, idx), y.index_select(0, idx)
            opt.zero_grad(set_to_none=True)
            loss = crit(net(xb), yb)
            loss.backward()
            opt.step()
            self.pending.append(loss.detach())
            self.step += 1
            if self.step % 10 == 0:
                self.last = torch.stack(self.pending).tolist()[-1]
                self.pending.clear()
        return self.last


def session_data(session: Any) -> tuple[torch.Tensor, torch.Tensor]:
    """The train tensors a session's DataProvider indexes (loaded if not yet), for a
    plain loop that steps the same memory as the Trainer: two copies of the same data at
    different addresses index 1-2% faster or slower than each other on this machine, by
    where they landed (tests of 80 lock-step blocks), which is not ptutils' doing."""
    data = session.trainer.data
    stream = data._streams[0]
    if stream.columns is None:
        data._attach(stream)
    columns = dict(stream.columns)
    return columns["x"], columns["y"]


def _plain_loop(steps: int, x: torch.Tensor, y: torch.Tensor) -> float:
    return PlainLoop(x, y).run(steps)


class TrainerLoop:
    """`Trainer.run` of a session built beforehand, `n` steps at a time."""

    def __init__(self, steps: int) -> None:
        self.session, self.history, self.step = Session.create(_config(steps)), History(), 0

    def run(self, steps: int) -> float:
        s = self.session
        self.step, stats = s.trainer.run(self.step, self.step + steps, callbacks=s.callbacks,
                                         history=self.history)
        return stats[-2].value


def lock_step(a: Callable[[int], Any], b: Callable[[int], Any], blocks: int,
              block: int) -> list[float]:
    """Ratios b/a of `blocks` blocks of `block` steps, run alternately (a, b, then b, a, ...)
    on loops that keep their state: the two see the same moments of a shared machine,
    so slow drifts and bursts of other work cancel out of each block's ratio."""
    ratios = []
    for i in range(blocks):
        times = {}
        for name, fn in ((("a", a), ("b", b)) if i % 2 == 0 else (("b", b), ("a", a))):
            gc.collect()
            start = time.perf_counter()
            fn(block)
            times[name] = time.perf_counter() - start
        ratios.append(times["b"] / times["a"])
    return ratios


def _engine_chunk(steps: int) -> float:
    with tempfile.TemporaryDirectory() as tmp:
        store = LocalStore(tmp)
        cfg = _config(steps)
        doc = store.create_session(new_session_doc("bench", cfg, "h", steps))
        out = Engine(store).train(Task(TRAIN, doc["_id"], doc["token"], 0, steps))
        assert out.ran, out.reason
        store.close()
    return 0.0


def run(quick: bool = False) -> dict:
    torch.set_num_threads(1)
    steps = 300 if quick else 1500
    from ptutils.data.readers import DigitsReader

    cols = DigitsReader().read()
    x, y = torch.from_numpy(cols["x"]), torch.from_numpy(cols["y"])
    repeat = 3 if quick else 9
    blocks, block, pairs = (10, 50, 2) if quick else (20, 100, 4)

    def pooled(shared: bool) -> list[float]:
        """Block ratios pooled over `pairs` fresh pairs of loops. `shared`: the plain loop
        steps the Trainer's own network, optimizer and data tensors (the two differ only
        in the code around the step); else a second plain loop, built apart (the control)."""
        out = []
        for _ in range(pairs):
            trainer = TrainerLoop(blocks * block + 100)
            model = trainer.session.trainer.model
            a = PlainLoop(*session_data(trainer.session), model).run
            b = trainer.run if shared else PlainLoop(x, y).run
            a(100), b(100)  # warm-up
            out += lock_step(a, b, blocks, block)
        return out

    ratios = pooled(True)
    control = pooled(False)
    t = compare({"plain PyTorch loop": lambda: _plain_loop(steps, x, y),
                 "ptutils Engine chunk (+store, checkpoint)": lambda: _engine_chunk(steps)},
                repeat=max(2, repeat // 3), warmup=0)
    base = t["plain PyTorch loop"].median
    rows = [{"loop": name, "steps": steps, "median s": round(v.median, 4),
             "best s": round(v.best, 4), "steps/s": round(steps / v.median),
             "ratio vs plain": round(v.median / base, 3)} for name, v in t.items()]
    ratio = statistics.median(ratios)
    for i, (name, rs) in enumerate((
            ("ptutils Trainer.run (the plain loop steps its network)", ratios),
            ("control: a plain loop of its own network (built apart)", control))):
        rows.insert(1 + i, {"loop": f"{name}, {pairs}x{blocks} blocks of {block} steps in "
                            "lock step", "steps": pairs * blocks * block,
                            "ratio vs plain": round(statistics.median(rs), 3),
                            "ratio quartiles": [round(q, 3) for q in statistics.quantiles(rs, n=4)]})
    goals = [Goal("Trainer.run / plain loop (median of lock-step blocks)", round(ratio, 3),
                  1.03, "<=")]
    return report("trainer", rows, goals)
