"""LoRS's gradient-SVD initialisation: each lora_A from the top-r right singular vectors of its weight's
estimated first-step gradient (each row scaled to the adapter config's ``init_row_norm``), lora_B = 0 (so the
model is unchanged at step 0 and the first step moves each weight along the best rank-r approximation of its
gradient). A data-driven init, so it sits beside the adapters it initialises (as PEFT's LoRA-GA and EVA do) and
inject calls it for init='gradient_svd'."""

from typing import Callable, Dict, Iterable, List, Optional, Union

import torch
from torch import Tensor, nn

from ..distributed import all_reduce_mean_, assign_, full
from .layer import adapter_sites

Batch = Union[Tensor, Dict[str, Tensor]]


def _default_loss(model: nn.Module, batch: Batch) -> Tensor:
    if not isinstance(batch, dict):
        raise TypeError("calibration batches that are not dicts need a loss_fn(model, batch)")
    out = model(**batch)
    loss = getattr(out, "loss", None)
    if loss is None:
        raise ValueError("the model returned no .loss for the calibration batch: pass labels, or a loss_fn")
    return loss


def _concat(batches: Union[Batch, Iterable[Batch]]) -> Batch:
    """The few calibration batches as one batch: one forward/backward then estimates the summed gradient."""
    if isinstance(batches, (Tensor, dict)):
        return batches
    batches: List[Batch] = list(batches)
    if not batches:
        raise ValueError("calibration_batches is empty")
    if isinstance(batches[0], dict):
        keys = batches[0].keys()
        return {k: torch.cat([b[k] for b in batches]) for k in keys}
    return torch.cat(batches)


def _top_right_singular_vectors(dW: Tensor, r: int, niter: int, oversample: int = 10) -> Tensor:
    """(k, in) with k = min(r, out, in): the top right singular vectors of dW (out, in), as rows. The randomized
    SVD sketches r + oversample directions, so that the top r are accurate even when the spectrum has no gap at r."""
    k = min(r, *dW.shape)
    with torch.random.fork_rng(devices=[dW.device] if dW.is_cuda else []):
        torch.manual_seed(0)  # the same sketch on every rank and in every run
        _, _, V = torch.svd_lowrank(dW, q=min(r + oversample, *dW.shape), niter=niter)
    return V[:, :k].T


def gradient_svd_init_(model: nn.Module, calibration_batches, loss_fn: Optional[Callable] = None,
                       niter: int = 4) -> nn.Module:
    """Set every adapter's lora_A from its weight's gradient and lora_B to zero, in place.

    A's rows are the top-r right singular vectors scaled to the adapter's ``config.init_row_norm`` (default: the
    row norm LoRA's A starts with, so that a learning rate tuned for LoRA suits LoRS too; 1.0 for the paper's unit
    rows).

    One forward and backward over the calibration batches (concatenated). Each layer's gradient
    ``dW = gyᵀ x`` (out, in) is formed inside its backward hook, reduced to its top-r right singular vectors
    (``torch.svd_lowrank``) and freed before the next layer's is formed: one dW is alive at a time.
    Under DDP or FSDP2 (where forward gathers one layer's weights at a time) call it on every rank with that
    rank's batches: each dW is averaged over the ranks, so all of them set the same A.
    """
    layers = dict(adapter_sites(model))
    if not layers:
        raise ValueError("the model has no adapters to initialise")
    loss_fn = loss_fn or _default_loss
    inputs: Dict[str, Tensor] = {}
    new_A: Dict[str, Tensor] = {}
    handles = []

    def on_forward(name, layer):
        def hook(module, args, output):
            inputs[name] = args[0].detach()

            def on_grad(grad_out):
                x = inputs.pop(name).reshape(-1, layer.in_features).float()
                g = grad_out.reshape(-1, layer.out_features).float()
                dW = all_reduce_mean_(g.T @ x)  # the true weight gradient, for this layer only (over all ranks)
                new_A[name] = _top_right_singular_vectors(dW, layer.r, niter)
                del dW

            if output.requires_grad:
                output.register_hook(on_grad)
        return hook

    for name, layer in layers.items():
        handles.append(layer.register_forward_hook(on_forward(name, layer)))
    try:
        loss = loss_fn(model, _concat(calibration_batches))
        if not isinstance(loss, Tensor) or loss.numel() != 1:
            raise TypeError(f"the calibration loss must be a scalar tensor, got {loss!r:.80}")
        if not bool(torch.isfinite(loss.detach())):
            raise ValueError(f"the calibration loss is {loss.item()}: gradient_svd cannot initialise from it")
        # A layer's A is saved for its own backward, so the new values are applied after the pass.
        loss.backward()
    finally:
        for h in handles:
            h.remove()
        inputs.clear()
    missing = sorted(set(layers) - set(new_A))
    if missing:
        raise RuntimeError(f"no gradient reached {missing[:5]}: are they used by the loss?")
    not_finite = [name for name, A in new_A.items() if not bool(torch.isfinite(A).all())]
    if not_finite:
        raise ValueError(f"the calibration gradient of {not_finite[:5]} is not finite (inf or NaN activations?)")
    with torch.no_grad():
        for name, layer in layers.items():
            A = full(layer.lora_A.detach()).clone()
            A[: new_A[name].shape[0]] = new_A[name] * layer.config.init_row_norm
            assign_(layer.lora_A, A)  # the local shard, under FSDP2
            layer.lora_B.zero_()
            layer.lora_A.grad = None
            layer.lora_B.grad = None
    return model
