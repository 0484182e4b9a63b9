"""Sessions on several devices (DESIGN §9): one data-parallel session on N processes.

`supervisor.run_group` starts the N rank processes of a Train chunk (`python -m
ptutils.group.rank`), watches them and stops them all together; `rank` is what each
runs: the session built from its stored document, its network wrapped in
`DistributedDataParallel` (Gloo on CPU, NCCL on CUDA), the rank's part of every global
batch, and at the end one State for the group, written by rank 0.

The supervisor never imports torch.cuda: it may be a Celery worker that forks.
"""

from ptutils.group.files import GroupFiles
from ptutils.group.slots import LocalSlots, Slots
from ptutils.group.supervisor import GroupResult, run_group

__all__ = ["GroupFiles", "GroupResult", "LocalSlots", "Slots", "run_group"]
