"""Worker processes of test_distributed.py: train the toy model's adapters under DDP or FSDP2 (gloo, CPU) and save
them; the test compares the files with one process trained on the combined batch."""

import os

import torch
import torch.distributed as dist

import sparse_adapt as sa

from toy_models import make_model

STEPS = 3
METHODS = list(sa.METHODS)


# RoseLoRA prunes within the few steps: its schedule fields.
EXTRA = {"roselora": dict(sparsity=0.5, t_init=0, t_final=2)}


def config(method, init="zeros_B"):
    return sa.config_for(method, r=4, alpha=8, init=init, **EXTRA.get(method, {}))


def data():
    g = torch.Generator().manual_seed(123)
    return torch.randn(4, 5, 32, generator=g), torch.randn(4, 5, 32, generator=g)


def train(model, x, target, method):
    """STEPS of SGD on (x, target); RoseLoRA's pruner after every step. Works on wrapped or sharded models."""
    pruner = sa.RoseLoraPruner(model, total_steps=STEPS) if method in EXTRA else None
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    for _ in range(STEPS):
        opt.zero_grad()
        (model(x) - target).square().mean().backward()
        opt.step()
        if pruner:
            pruner.step()


def reference(method, out_dir, init="zeros_B"):
    """One process, the combined batch."""
    model, _ = make_model("attention")
    x, target = data()
    sa.inject(model, config(method, init), calibration_batches=[x],
              loss_fn=lambda m, b: (m(b) - target).square().mean())
    train(model, x, target, method)
    sa.save_adapter(model, out_dir)


def shard(model, mode, world):
    if mode == "ddp":
        return torch.nn.parallel.DistributedDataParallel(model)
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh("cpu", (world,))
    for _, layer in sa.adapter_layers(model):
        fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    return model


def worker(rank, world, mode, root, port):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    torch.set_num_threads(1)
    try:
        x, target = data()
        x, target = x.chunk(world)[rank], target.chunk(world)[rank]

        def loss_fn(m, b):
            return (m(b) - target).square().mean()

        for method in METHODS:
            model, _ = make_model("attention")
            sa.inject(model, config(method))
            model = shard(model, mode, world)
            train(model, x, target, method)
            sa.save_adapter(model, os.path.join(root, mode, method))
        # gradient-SVD init: before sharding (each rank its own batch), and after FSDP2 sharding
        model, _ = make_model("attention")
        sa.inject(model, config("lors", "gradient_svd"), calibration_batches=[x], loss_fn=loss_fn)
        sa.save_adapter(shard(model, mode, world), os.path.join(root, mode, "gradient_svd"))
        if mode == "fsdp":
            model, _ = make_model("attention")
            sa.inject(model, config("lors"))
            model = shard(model, mode, world)
            sa.gradient_svd_init_(model, [x], loss_fn)
            sa.save_adapter(model, os.path.join(root, mode, "gradient_svd_sharded"))
    finally:
        dist.destroy_process_group()
