"""What sparse_adapt needs to work inside PyTorch's own data-parallel engines (DDP, FSDP2), unchanged.

The adapters themselves need nothing: DDP hands the custom ops ordinary tensors, and FSDP2 all-gathers the
parameters before each forward. What needs care is code that reads or writes whole parameters outside forward and
backward -- RoseLoRA's pruner (a column of lora_B is split across ranks), the gradient-SVD init, save and load.
Those go through :func:`full` (the whole tensor on every rank) and :func:`assign_` (write a whole value back into
a possibly sharded parameter), and average over ranks with :func:`all_reduce_mean_`.
"""

from typing import Optional

import torch
import torch.distributed as dist
from torch import Tensor, nn

try:
    from torch.distributed.tensor import DTensor, distribute_tensor
except ImportError:  # pragma: no cover - torch without distributed support
    DTensor = None
    distribute_tensor = None


def is_sharded(t: Tensor) -> bool:
    return DTensor is not None and isinstance(t, DTensor)


def full(t: Optional[Tensor]) -> Optional[Tensor]:
    """The whole tensor, gathered if it is a DTensor (a collective: every rank must call it)."""
    if t is None or not is_sharded(t):
        return t
    return t.full_tensor()


@torch.no_grad()
def assign_(param: Tensor, value: Tensor) -> None:
    """param ← value, where value is the whole tensor (identical on every rank) and param may be sharded."""
    if is_sharded(param):
        local = distribute_tensor(value.to(param.dtype), param.device_mesh, param.placements).to_local()
        param.to_local().copy_(local)
    else:
        param.copy_(value)


def world_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def all_reduce_mean_(t: Tensor) -> Tensor:
    """Average t over the ranks of the default process group, in place (no-op in a single process)."""
    if world_size() > 1:
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
        t.div_(world_size())
    return t


def barrier() -> None:
    if world_size() > 1:
        dist.barrier()


def unwrap(model: nn.Module) -> nn.Module:
    """The model inside DistributedDataParallel / DataParallel / torch.compile wrappers (FSDP2 wraps nothing)."""
    while True:
        if isinstance(model, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
            model = model.module
        elif hasattr(model, "_orig_mod") and isinstance(model._orig_mod, nn.Module):
            model = model._orig_mod
        else:
            return model
