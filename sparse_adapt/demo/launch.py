"""The demo's data-parallel glue: it joins the process group torchrun or accelerate launch made, splits each batch
across the ranks, and wraps the adapted model in DDP. A single process needs none of it."""

import os
from typing import Dict

import torch
import torch.distributed as dist
from torch import nn

from .. import distributed


def init_distributed(device: str) -> None:
    """Join the process group when launched by torchrun or accelerate launch (WORLD_SIZE > 1 in the environment):
    gloo on the CPU, NCCL on GPUs, one GPU per local rank."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1 or dist.is_initialized():
        return
    if device.startswith("cuda"):
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group("nccl" if device.startswith("cuda") else "gloo")


def local_rows(batch: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    """This rank's share of a batch (data parallel); the whole batch in a single process."""
    world = distributed.world_size()
    if world == 1:
        return batch
    n = batch["input_ids"].shape[0]
    if n % world:
        raise ValueError(f"batch size {n} is not divisible by the {world} processes")
    return {k: v.chunk(world)[distributed.rank()] for k, v in batch.items()}


def data_parallel(model: nn.Module, device: str) -> nn.Module:
    """DistributedDataParallel around the adapted model when running in a process group; else the model."""
    if distributed.world_size() == 1:
        return model
    ids = [torch.cuda.current_device()] if device.startswith("cuda") else None
    return nn.parallel.DistributedDataParallel(model, device_ids=ids)
