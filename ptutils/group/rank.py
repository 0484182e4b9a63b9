"""One rank of a group session: `python -m ptutils.group.rank SPEC` (see supervisor.py).

Builds the session from its stored document as the Engine does (same registry scope
and code policy, inherited from the supervisor's environment), loads the checkpoint at
the chunk's start, wraps the network in DistributedDataParallel, trains on this rank's
part of every global batch, and agrees with the other ranks on every step whether to
stop. At the end rank 0 writes the statistics and one State for the group: rank 0's
Session State (parameters, optimizer, scheduler, data position, callbacks, history:
replicated, once) plus `group: {world_size, rng: [the RNG state of every rank]}`.

RNG of the ranks: rank 0 continues the session's generators (a fresh session's are
those right after the seeded build), rank r > 0 starts from its own seed
(`stable_seed("rank", session.seed, r, step)`), so dropout masks differ between ranks
and do not depend on timing; a resumed rank restores its own saved state, and a rank
the saved State does not have (a resize to more ranks) is seeded the same way.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import traceback
from datetime import timedelta
from typing import Any


class GroupAbort(RuntimeError):
    """This rank cannot take part (a stale task, a missing eval result): a failure of
    the group, retried, not an error of the session."""


def main(argv: list[str]) -> int:
    from ptutils.group.files import GroupFiles

    logging.basicConfig(level=logging.WARNING, stream=sys.stderr,
                        format="%(asctime)s rank%(rank)s %(levelname)s %(name)s: %(message)s"
                        .replace("%(rank)s", os.environ.get("RANK", "?")))
    spec_path = argv[0]
    files = GroupFiles(os.path.dirname(spec_path))
    rank = int(os.environ["RANK"])
    try:
        spec = json.loads(open(spec_path).read())
        die_with_parent(int(spec["parent"]))
        result = _run(spec, files, rank)
    except BaseException as exc:  # noqa: BLE001 - reported to the supervisor, then exit 1
        files.write_result(rank, {"error": {
            "type": type(exc).__name__, "message": str(exc),
            "traceback": "".join(traceback.format_exception(exc)),
        }, "group_error": _is_group_error(exc)})
        traceback.print_exc()
        return 1
    files.write_result(rank, result)
    return 0


def _exit(code: int) -> None:
    """Leave without the interpreter's shutdown (native threads of the process group
    or the store can hang it); the result is written and the streams flushed."""
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def die_with_parent(parent: int) -> None:
    """SIGKILL this process when its supervisor dies (Linux: PR_SET_PDEATHSIG), so a
    killed supervisor leaves no rank behind; a supervisor already gone: exit now. (Set
    here, not in a preexec_fn, which can deadlock a supervisor that runs threads.)"""
    if sys.platform.startswith("linux"):
        import ctypes
        import signal

        ctypes.CDLL(None, use_errno=True).prctl(1, int(signal.SIGKILL), 0, 0, 0)
    if os.getppid() != parent:
        raise GroupAbort(f"the supervisor (pid {parent}) is gone")


def _is_group_error(exc: BaseException) -> bool:
    """A failure of the group (a peer gone, a collective timed out), not of the session."""
    import torch.distributed as dist

    if isinstance(exc, GroupAbort | getattr(dist, "DistError", GroupAbort)):
        return True
    text = str(exc)
    return isinstance(exc, RuntimeError) and any(
        s in text for s in ("Gloo", "gloo", "NCCL", "Connection closed", "Connection reset",
                            "Timed out", "timed out", "Broken pipe", "ProcessGroup"))


def _run(spec: dict[str, Any], files: Any, rank: int) -> dict[str, Any]:
    import torch.distributed as dist

    from ptutils.data.readers import stable_seed
    from ptutils.engine import build_session, check_resize, deliver_evals, stat_points
    from ptutils.group.files import Beat
    from ptutils.plan import plan_of
    from ptutils.rng import get_rng_state, isolate_library_rngs, seed_all, set_rng_state
    from ptutils.session import apply_determinism
    from ptutils.store import open_store

    world = int(os.environ["WORLD_SIZE"])
    beat = Beat(files.beat_path(rank))
    beat("start")
    parent = int(spec["parent"])
    task = spec["task"]
    start, stop = int(task["start"]), int(task["stop"])
    store = open_store(os.environ["PTUTILS_STORE"], create=False)
    isolate_library_rngs()
    doc = store.get_session(spec["session"])
    if doc["token"] != task["token"] or int(doc["step"]) != start:
        raise GroupAbort(f"stale task: session is at step {doc['step']}")
    plan = plan_of(doc)
    if plan.world_size != world:
        raise GroupAbort(f"session.world_size={plan.world_size}, {world} ranks")
    session = build_session(doc["config"], doc.get("code"))
    if start > 0 or doc.get("checkpoint"):
        state = store.load_state(store.get_checkpoint(doc["_id"], start))
        session.load_state_dict(state)
        del state
        check_resize(session, doc, start)
    session.step = start
    after_load = get_rng_state()
    beat("start")

    device = session.model.device
    backend = "nccl" if device.type == "cuda" else "gloo"
    dist.init_process_group(backend, init_method="env://", rank=rank, world_size=world,
                            timeout=timedelta(seconds=float(spec["collective_timeout"])))
    try:
        from torch.nn.parallel import DistributedDataParallel

        model = session.model
        ddp = DistributedDataParallel(
            model.network, device_ids=[device.index or 0] if device.type == "cuda" else None)
        # Forward and backward go through DDP; the Module tree (and so the State) keeps
        # the plain network: no `module.` prefix, the State loads into any Session.
        model.__dict__["network"] = ddp
        session.data.shard(rank, world)
        session.trainer.reduce_losses_with(lambda t: _mean(t, world, device, backend))
        wait = deliver_evals(store, doc, session, start)
        if wait is not None:
            raise GroupAbort(f"the result of Eval({wait}) is not in yet")
        reason = session.callbacks.stop_reason
        if reason:
            return {"reached": start, "stop_reason": reason}
        saved = (session.group or {}).get("rng") or []
        if rank < len(saved):
            set_rng_state(saved[rank])
        elif rank == 0:
            set_rng_state(after_load)
        else:
            seed_all(stable_seed("rank", plan.seed, rank, start))
        apply_determinism(session.plan)
        agree = _Agreement(files, beat, parent, device, backend)
        progress = _progress_writer(files) if rank == 0 else None
        reached, stats = session.trainer.run(
            start, stop, callbacks=session.callbacks, history=session.history,
            stop_flag=agree, progress=progress)
        session.step = reached
        if reached == start:
            return {"reached": start}
        beat("save")
        session.callbacks.fire("on_chunk_end", reached)
        state = session.state_dict()  # every rank: the pending losses are reduced here
        rngs = _gather_rng(state["rng"], world, device, backend)
        if rank == 0:
            state["group"] = {"world_size": world, "rng": rngs}
            store.write_statistics(doc["_id"], stat_points(stats))
            store.put_checkpoint(doc["_id"], reached, str(plan.checkpoint_kind(reached, stop)),
                                 state, metrics={"loss": session.history.last("loss")})
        beat("done")
        return {"reached": reached}
    finally:
        # No destroy_process_group: it can wait for a peer that already left. The
        # process ends with os._exit right after its result; the group dies with it.
        session.data.close()


class _Agreement:
    """The trainer's stop flag in a group: asked once per step by every rank, it beats
    the heartbeat and returns whether ANY rank saw a stop request (the stop file, or its
    supervisor gone): an all_reduce(MAX), so all stop at the same step boundary."""

    def __init__(self, files: Any, beat: Any, parent: int, device: Any, backend: str) -> None:
        import torch

        self.files, self.beat, self.parent = files, beat, parent
        self.flag = torch.zeros(1, dtype=torch.int32,
                                device=device if backend == "nccl" else "cpu")

    def is_set(self) -> bool:
        import torch.distributed as dist

        self.beat("train")
        local = os.path.exists(self.files.stop) or os.getppid() != self.parent
        self.flag.fill_(1 if local else 0)
        dist.all_reduce(self.flag, op=dist.ReduceOp.MAX)
        return bool(self.flag.item())


def _mean(losses: Any, world: int, device: Any, backend: str) -> Any:
    """The mean over the ranks of a 1-D float tensor (each rank's shard losses)."""
    import torch.distributed as dist

    t = losses.detach().float()
    t = t.to(device) if backend == "nccl" else t.cpu()
    t = t.clone()
    dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return (t / world).cpu()


def _gather_rng(rng: dict[str, Any], world: int, device: Any, backend: str) -> list[Any]:
    """Every rank's RNG state, in rank order (encoded by the State codec, gathered as
    bytes: no pickle between the ranks either)."""
    import torch
    import torch.distributed as dist

    from ptutils import codec

    where = device if backend == "nccl" else "cpu"
    data = codec.dumps(rng)
    size = torch.tensor([len(data)], dtype=torch.int64, device=where)
    sizes = [torch.zeros(1, dtype=torch.int64, device=where) for _ in range(world)]
    dist.all_gather(sizes, size)
    longest = int(max(int(s.item()) for s in sizes))
    buf = torch.zeros(longest, dtype=torch.uint8)
    buf[: len(data)] = torch.frombuffer(bytearray(data), dtype=torch.uint8)
    bufs = [torch.zeros(longest, dtype=torch.uint8, device=where) for _ in range(world)]
    dist.all_gather(bufs, buf.to(where))
    return [codec.loads(b.cpu().numpy().tobytes()[: int(s.item())]) for b, s in zip(bufs, sizes)]


def _progress_writer(files: Any) -> Any:
    f = open(files.progress, "a")

    def progress(step: int, loss: float) -> None:
        f.write(f"{step} {loss!r}\n")
        f.flush()

    return progress


if __name__ == "__main__":
    _exit(main(sys.argv[1:]))
