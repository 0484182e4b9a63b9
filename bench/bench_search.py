"""Search: ASHA vs a full random search over the same trials; PBT vs the same members
without PBT. Digits MLP, 4-parameter space, all in-process (`ptutils search --local`).

Goals (issue 11): ASHA's best test accuracy within 0.5 points of the full search's,
with <= 40% of its training steps; PBT's best >= the best member trained without PBT;
PBT's exploits write no segment bytes.
"""

from __future__ import annotations

import tempfile
import time
from typing import Any

from bench.harness import Goal, report
from ptutils.search import Driver, SearchSpec, best_trial, create_search, steps_spent
from ptutils.search.local import LocalExecutor
from ptutils.store.local import LocalStore

SPACE = {
    "model.optimizer.lr": {"loguniform": [1.0e-4, 3.0e-2]},
    "model.network.hidden": {"choice": [[32], [64], [128]]},
    "model.network.dropout": {"uniform": [0.0, 0.5]},
    "data.batch_size": {"choice": [16, 32, 64]},
}


def _config(total: int, every: int) -> dict[str, Any]:
    return {
        "name": "bench",
        "session": {"total_steps": total, "chunk_steps": every, "eval_every": every,
                    "log_every": 10, "seed": 0, "retention": {"keep_last": 1}},
        "model": {
            "network": {"type": "ptutils.nets.MLP", "in_features": 64, "hidden": [64],
                        "out_features": 10, "dropout": 0.1},
            "optimizer": {"type": "torch.optim.Adam", "lr": 0.003},
        },
        "data": {"batch_size": 32, "seed": 1, "datasets": {
            "train": {"type": "ptutils.data.DigitsReader",
                      "split": {"fraction": 0.8, "part": "train"}},
            "test": {"type": "ptutils.data.DigitsReader",
                     "split": {"fraction": 0.8, "part": "test"}}}},
        "eval": {"targets": {"test": {"data": "test", "metrics": ["accuracy"]}}},
    }


def _search(folder: str, name: str, cfg: dict[str, Any], **kw: Any) -> dict[str, Any]:
    with LocalStore(folder) as store:
        create_search(store, SearchSpec(name=name, config=cfg, space=SPACE,
                                        metric="test/accuracy", mode="max", **kw))
        started = time.perf_counter()
        body = Driver(store, name, LocalExecutor(store)).run(poll=0.0)
        best = best_trial(body)
        return {"search": name, "trials": len(body["trials"]), "steps": steps_spent(body),
                "best": best["value"] if best else float("nan"),
                "seconds": round(time.perf_counter() - started, 1), "body": body}


def run(quick: bool = False) -> dict[str, Any]:
    trials, total, every = (8, 180, 20) if quick else (32, 540, 60)
    cfg = _config(total, every)
    with tempfile.TemporaryDirectory() as tmp:
        full = _search(tmp, "full", cfg, algo="random", scheduler="none", trials=trials,
                       parallel=4, seed=11)
        asha = _search(tmp, "asha", cfg, algo="random", scheduler="asha", trials=trials,
                       parallel=4, seed=11)
        pop = 8
        plain = _search(tmp, "plain8", cfg, algo="random", scheduler="none", trials=pop,
                        parallel=pop, seed=5)
        pbt = _search(tmp, "pbt8", cfg, algo="random", scheduler="pbt", trials=pop, seed=5)
    lineage = [e for t in pbt["body"]["trials"] for e in t["lineage"]]
    exploit_bytes = sum(e["bytes_written"] for e in lineage)
    rows = [{k: v for k, v in r.items() if k != "body"} for r in (full, asha, plain, pbt)]
    goals = [
        Goal("ASHA best - full best (accuracy points)", 100 * (asha["best"] - full["best"]),
             -0.5),
        Goal("ASHA steps / full steps", asha["steps"] / full["steps"], 0.40, "<="),
        Goal("PBT best - best member without PBT", pbt["best"] - plain["best"], 0.0),
        Goal("bytes written by PBT exploits", exploit_bytes, 0, "<="),
    ]
    return report("search", rows, goals, exploits=len(lineage), quick=quick)
