"""Images/s of the ImageFolder example: ptutils vs the same plain PyTorch loop.

Both read the same PNG tree (scikit-learn's digits written by
examples/imagefolder/make_images.py) through a `torch.utils.data.DataLoader` with the
example's settings: batch 32, 2 loader workers (persistent), shuffled, random
augmentation; both train the example's ConvNet with Adam, a cosine schedule and gradient
clipping, fetching the loss every 10 steps, on one torch thread. The plain loop is what
people write; ptutils adds what makes it resumable: a per-sample seed from
(seed, epoch, index) in the loader worker, an order that is a pure function of
(seed, epoch), a position counted in the State, callbacks and History.
Each timing includes starting the loader's workers. Goal: ptutils / plain <= 1.05.

A reference row runs the whole `ptutils run` path in-process (the session built, a
local store created, statistics and a verified checkpoint written).
"""

from __future__ import annotations

import statistics
import sys
import tempfile
from pathlib import Path

import torch
from torch import nn

from bench.harness import Goal, compare, report
from ptutils.state import History

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "examples" / "imagefolder"
BATCH = 32


def _plain_loop(steps: int, root: Path) -> float:
    from imagefolder import ConvNet, PngFolder  # examples/imagefolder, on sys.path

    torch.manual_seed(0)
    data = PngFolder(str(root), "train", augment=True)
    loader = torch.utils.data.DataLoader(
        data, batch_size=BATCH, shuffle=True, drop_last=True, num_workers=2,
        persistent_workers=True, generator=torch.Generator().manual_seed(0),
    )
    net = ConvNet(in_channels=1, classes=10, width=16, image_size=16)
    opt = torch.optim.Adam(net.parameters(), lr=0.003)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=400)
    crit = nn.CrossEntropyLoss()
    net.train()
    pending, last, step = [], 0.0, 0
    it = iter(loader)
    while step < steps:
        try:
            x, y = next(it)
        except StopIteration:
            it = iter(loader)
            continue
        opt.zero_grad(set_to_none=True)
        loss = crit(net(x), y)
        loss.backward()
        nn.utils.clip_grad_norm_(net.parameters(), 5.0)
        opt.step()
        sched.step()
        step += 1
        pending.append(loss.detach())
        if step % 10 == 0:
            last = torch.stack(pending).tolist()[-1]
            pending.clear()
    del it, loader
    return last


def _config(steps: int, root: Path) -> dict:
    from ptutils.runner import load_experiment

    return load_experiment(EXAMPLE / "imagefolder.yaml", [
        f"data.datasets.train.root={root}", f"data.datasets.test.root={root}",
        f"session.total_steps={steps}", f"session.chunk_steps={steps}", "session.eval_every=0",
    ])


def _ptutils_loop(steps: int, sessions: list) -> float:
    session = sessions.pop()  # built beforehand, like the plain loop's objects below
    try:
        _, stats = session.trainer.run(0, steps, callbacks=session.callbacks,
                                       history=History())
    finally:
        session.data.close()
    return stats[-2].value


def _ptutils_run(steps: int, root: Path) -> float:
    from ptutils.runner import prepare_session, run_session
    from ptutils.store.local import LocalStore

    with tempfile.TemporaryDirectory() as tmp:
        store = LocalStore(tmp)
        try:
            doc, warm = prepare_session(store, _config(steps, root), "bench")
            summary = run_session(store, doc, warm=warm)
            assert summary.status == "completed", summary
        finally:
            store.close()
    return 0.0


def run(quick: bool = False) -> dict:
    from ptutils.runner import validate

    sys.path.insert(0, str(EXAMPLE))
    from make_images import make_images

    torch.set_num_threads(1)
    steps = 60 if quick else 240
    repeat = 3 if quick else 9
    with tempfile.TemporaryDirectory() as tmp:
        root = make_images(Path(tmp) / "data")
        cfg = _config(steps, root)
        sessions = [validate(cfg) for _ in range(repeat + 1)]
        fns = {
            "plain PyTorch loop + DataLoader": lambda: _plain_loop(steps, root),
            "ptutils Trainer.run": lambda: _ptutils_loop(steps, sessions),
        }
        ratios, samples = [], {k: [] for k in fns}
        _plain_loop(steps // 4, root)  # warm-up: page cache, imports
        for _round in range(repeat):  # paired rounds: robust to a shared machine's drift
            t = compare(fns, repeat=1, warmup=0)
            for k in fns:
                samples[k].append(t[k].median)
            ratios.append(t["ptutils Trainer.run"].median
                          / t["plain PyTorch loop + DataLoader"].median)
        whole = compare({"r": lambda: _ptutils_run(steps, root)}, repeat=max(2, repeat // 3),
                        warmup=0)
        samples["ptutils run (build, store, checkpoint)"] = [whole["r"].median]
    base = statistics.median(samples["plain PyTorch loop + DataLoader"])
    rows = [{"loop": name, "steps": steps, "batch": BATCH,
             "median s": round(statistics.median(v), 3), "best s": round(min(v), 3),
             "images/s": round(steps * BATCH / statistics.median(v)),
             "ratio vs plain": round(statistics.median(v) / base, 3)}
            for name, v in samples.items()]
    ratio = statistics.median(ratios)
    goals = [Goal("ptutils / plain loop, images/s of the ImageFolder example "
                  "(median of paired rounds)", round(ratio, 3), 1.05, "<=")]
    return report("loader", rows, goals)
