"""Data-parallel sessions on CPU (Gloo): steps/s of 1 vs 2 ranks, and what the
supervisor costs per chunk against a plain `torchrun` of the same training.

Rows (whole commands, timed as processes, paired in rounds):
- `ptutils run`, world_size 1 and 2: the digits MLP (hidden 256, 256), global batch 128,
  one chunk of STEPS steps, a checkpoint at the end. The 2-rank run includes what the
  supervisor does: starting the rank processes, the rendezvous, building the session in
  each rank, gathering the ranks' RNG states into the one group checkpoint.
- `torchrun --nproc_per_node 2 bench/ddp_plain.py`: the same network, batch and steps in
  a hand-written DDP script (no store, no checkpoint).

Goals: the supervisor's overhead per chunk (2-rank `ptutils run` minus `torchrun`, in
seconds, and as a ratio); steps/s of 1 and 2 ranks are reported (on a 2-core machine,
2 ranks do not run faster than 1: the figure is there to be compared on real nodes).
"""

from __future__ import annotations

import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import yaml

from bench.bench_trainer import _config as trainer_config
from bench.harness import Goal, report

ROOT = Path(__file__).resolve().parents[1]


def _config(steps: int, world: int) -> dict:
    cfg = trainer_config(steps)  # the same model and data as bench_trainer
    cfg["name"] = f"bench-w{world}"
    cfg["session"]["world_size"] = world
    return cfg


def _timed(cmd: list[str], env: dict[str, str]) -> float:
    start = time.perf_counter()
    proc = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True, timeout=600)
    took = time.perf_counter() - start
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    return took


def run(quick: bool = False) -> dict:
    steps = 200 if quick else 1000
    repeat = 2 if quick else 3
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    samples: dict[str, list[float]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        configs = {}
        for world in (1, 2):
            for n in (steps, 3 * steps):
                path = Path(tmp) / f"w{world}-{n}.yaml"
                path.write_text(yaml.safe_dump(_config(n, world)))
                configs[world, n] = path

        def ptutils_run(world: int, n: int) -> Callable[[int], list[str]]:
            return lambda i: [sys.executable, "-m", "orchestrator.cli", "run",
                              str(configs[world, n]), "-q", "--store",
                              f"{tmp}/runs-{world}-{n}-{i}"]

        cmds = {
            "ptutils run, 1 rank": ptutils_run(1, steps),
            "ptutils run, 2 ranks (supervised)": ptutils_run(2, steps),
            "torchrun, 2 ranks (plain DDP script)": lambda i: [
                sys.executable, "-m", "torch.distributed.run", "--standalone",
                "--nproc_per_node", "2", str(ROOT / "bench" / "ddp_plain.py"),
                "--steps", str(steps)],
            "ptutils run, 1 rank, 3x steps": ptutils_run(1, 3 * steps),
            "ptutils run, 2 ranks, 3x steps": ptutils_run(2, 3 * steps),
        }
        for name in cmds:
            samples[name] = []
        for i in range(repeat):  # paired rounds: each round runs them all back to back
            for name, cmd in cmds.items():
                samples[name].append(_timed(cmd(i), env))
    med = {k: statistics.median(v) for k, v in samples.items()}
    base = med["torchrun, 2 ranks (plain DDP script)"]
    rows = [{"command": name, "steps": 3 * steps if "3x" in name else steps,
             "median s": round(m, 2), "best s": round(min(samples[name]), 2),
             "steps/s (whole command)": round((3 * steps if "3x" in name else steps) / m),
             "ratio vs torchrun": round(m / base, 3) if "3x" not in name else None}
            for name, m in med.items()]
    # Training speed without start-up: the extra 2*steps of the 3x runs over their time.
    for world, short, long in ((1, "ptutils run, 1 rank", "ptutils run, 1 rank, 3x steps"),
                               (2, "ptutils run, 2 ranks (supervised)",
                                "ptutils run, 2 ranks, 3x steps")):
        rows.append({"command": f"training steps/s, {world} rank(s) (3x minus 1x runs)",
                     "steps": 2 * steps,
                     "median s": round(med[long] - med[short], 2), "best s": None,
                     "steps/s (whole command)": round(2 * steps / max(med[long] - med[short], 1e-9)),
                     "ratio vs torchrun": None})
    sup = med["ptutils run, 2 ranks (supervised)"]
    overhead = [a - b for a, b in zip(samples["ptutils run, 2 ranks (supervised)"],
                                      samples["torchrun, 2 ranks (plain DDP script)"])]
    goals = [
        Goal("supervisor overhead per chunk vs torchrun (s, median of paired rounds)",
             round(statistics.median(overhead), 2), 5.0, "<="),
        Goal("2-rank ptutils run / torchrun, same steps", round(sup / base, 3), 1.5, "<="),
    ]
    return report("group", rows, goals)
