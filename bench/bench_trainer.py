"""Trainer step loop vs a plain PyTorch loop on the same MLP and data, side by side.

The plain loop is the strongest hand-written baseline: in-memory tensors, a fresh
permutation per epoch, `index_select` batches, and `loss.item()` every `log_every`
steps (what people write to log). ptutils runs the same steps through
`Trainer.run`: DataProvider with a resumable position, callbacks (NaN detector),
History and Statistic records. Goal: ptutils / plain <= 1.05.

A second row times a whole Engine chunk (the same steps plus statistics written to
the local store and a verified checkpoint) for reference.
"""

from __future__ import annotations

import statistics
import tempfile

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


def _plain_loop(steps: int, x: torch.Tensor, y: torch.Tensor) -> float:
    torch.manual_seed(0)
    net = nn.Sequential(nn.Flatten(), nn.Linear(64, 256), nn.ReLU(), nn.Linear(256, 256),
                        nn.ReLU(), nn.Linear(256, 10))
    opt = torch.optim.SGD(net.parameters(), lr=0.05, momentum=0.9)
    crit = nn.CrossEntropyLoss()
    gen = torch.Generator().manual_seed(0)
    n, bs = x.shape[0], 128
    perm, pos, last = torch.randperm(n, generator=gen), 0, 0.0
    pending = []
    for step in range(1, steps + 1):
        if pos + bs > n:
            perm, pos = torch.randperm(n, generator=gen), 0
        idx = perm[pos:pos + bs]
        pos += bs
        xb, yb = x.index_select(0, idx), y.index_select(0, idx)
        opt.zero_grad(set_to_none=True)
        loss = crit(net(xb), yb)
        loss.backward()
        opt.step()
        pending.append(loss.detach())
        if step % 10 == 0:
            last = torch.stack(pending).tolist()[-1]
            pending.clear()
    return last


def _ptutils_loop(steps: int, sessions: list[Session]) -> float:
    session = sessions.pop()  # built beforehand: building is not part of the step loop
    _, stats = session.trainer.run(0, steps, callbacks=session.callbacks, history=History())
    return stats[-2].value


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
    sessions = [Session.create(_config(steps)) for _ in range(repeat + 1)]
    fns = {
        "plain PyTorch loop": lambda: _plain_loop(steps, x, y),
        "ptutils Trainer.run": lambda: _ptutils_loop(steps, sessions),
    }
    # Paired rounds (plain, then ptutils, back to back): the ratio of each pair is
    # robust to the slow drifts of a shared machine; the goal uses their median.
    ratios, samples = [], {k: [] for k in fns}
    fns["plain PyTorch loop"]()  # warm-up
    for _round in range(repeat):
        t = compare(fns, repeat=1, warmup=0)
        for k in fns:
            samples[k].append(t[k].median)
        ratios.append(t["ptutils Trainer.run"].median / t["plain PyTorch loop"].median)
    engine = compare({"e": lambda: _engine_chunk(steps)}, repeat=max(2, repeat // 3), warmup=0)
    samples["ptutils Engine chunk (+store, checkpoint)"] = [engine["e"].median]
    base = statistics.median(samples["plain PyTorch loop"])
    rows = [{"loop": name, "steps": steps, "median s": round(statistics.median(v), 4),
             "best s": round(min(v), 4), "steps/s": round(steps / statistics.median(v)),
             "ratio vs plain": round(statistics.median(v) / base, 3)}
            for name, v in samples.items()]
    ratio = statistics.median(ratios)
    goals = [Goal("Trainer.run / plain loop (median of paired rounds)", round(ratio, 3), 1.05,
                  "<=")]
    return report("trainer", rows, goals)
