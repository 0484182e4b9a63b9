"""The device slots a group session takes: the interface, and the trivial local default."""

from __future__ import annotations

from typing import Protocol, runtime_checkable


@runtime_checkable
class Slots(Protocol):
    """Devices of this node, handed to sessions (ptutils.slots implements the node's)."""

    def acquire(self, n: int, owner: str) -> list[str] | None:
        """`n` device ids for `owner` ("" a CPU slot, "0", "1"... a GPU, for
        CUDA_VISIBLE_DEVICES), or None if not enough are free now."""
        ...

    def release(self, owner: str) -> None:
        """Give back every device `owner` holds (a no-op if it holds none)."""
        ...


class LocalSlots:
    """CPU slots without a limit: `acquire(n)` is n x "" and never refuses. The Engine's
    default when it is given no `slots` (`ptutils run` on this machine's CPUs)."""

    def acquire(self, n: int, owner: str) -> list[str] | None:
        return [""] * n

    def release(self, owner: str) -> None:
        return None
