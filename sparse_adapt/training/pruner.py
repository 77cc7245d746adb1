"""RoseLoRA's pruner: after every optimizer step, each row of lora_A and each column of lora_B keeps its top-k
entries by an EMA of the sensitivity |w · ∂L/∂w|, with the kept fraction lowered on a cubic schedule."""

import math
from typing import List, Optional, Tuple

import torch
from torch import nn

from .. import ops
from ..adapters.config import RoseLoraConfig
from ..adapters.layer import SparseLoraLinear
from ..adapters.model import adapter_layers
from ..distributed import assign_, full, is_sharded


def kept_fraction(step: int, t_init: int, t_final: int, sparsity: float) -> float:
    """τ(t): 1 until t_init; τ + (1 − τ)(1 − (t − t_init)/(t_final − t_init))³ until t_final; then τ = 1 − sparsity."""
    tau = 1.0 - sparsity
    if step <= t_init:
        return 1.0
    if step >= t_final:
        return tau
    progress = (step - t_init) / (t_final - t_init)
    return tau + (1.0 - tau) * (1.0 - progress) ** 3


def kept_count(fraction: float, n: int) -> int:
    """Entries kept of a slice of n: round(fraction · n), at least one (τ > 0 always keeps something)."""
    return min(n, max(1, round(fraction * n)))


class RoseLoraPruner:
    """Call :meth:`step` after ``optimizer.step()`` and before ``optimizer.zero_grad()``: it needs the gradients.
    Under DDP or FSDP2 call it on every rank: every rank ends with the mask one process would compute.

    ``total_steps`` is the length of training; the schedule's ``t_final`` defaults to it. The step count and the
    scores live in the adapter layers (``rose_step``, ``rose_score_A``, ``rose_score_B``), so they are saved and
    restored with the adapter and training resumes where it stopped.
    """

    def __init__(self, model: nn.Module, total_steps: Optional[int] = None):
        self.layers: List[Tuple[str, SparseLoraLinear]] = [
            (n, m) for n, m in adapter_layers(model) if m.method == "roselora"]
        if not self.layers:
            raise ValueError("the model has no roselora adapters (inject with sa.RoseLoraConfig)")
        config = self.layers[0][1].config
        if not isinstance(config, RoseLoraConfig):
            raise TypeError("roselora adapters need a RoseLoraConfig")
        self.config = config
        if total_steps is not None and total_steps < 1:
            raise ValueError(f"total_steps must be >= 1, got {total_steps}")
        self.total_steps = total_steps

    @property
    def t_final(self) -> int:
        if self.config.t_final is not None:
            return self.config.t_final
        if self.total_steps is None:
            raise ValueError("RoseLoraConfig.t_final is None, so the pruner needs total_steps")
        return self.total_steps

    @property
    def step_count(self) -> int:
        return int(self.layers[0][1].rose_step)

    def kept_fraction(self, step: Optional[int] = None) -> float:
        step = self.step_count if step is None else step
        return kept_fraction(step, self.config.t_init, self.t_final, self.config.sparsity)

    @torch.no_grad()
    def step(self) -> float:
        """Advance the schedule one step and prune every adapter; returns the kept fraction used."""
        t = self.step_count + 1
        fraction = self.kept_fraction(t)
        for name, layer in self.layers:
            A, B = layer.lora_A, layer.lora_B
            if A.grad is None or B.grad is None:
                raise RuntimeError(f"{name}: lora_A/lora_B have no gradient; call pruner.step() after "
                                   f"optimizer.step() and before optimizer.zero_grad()")
            for param, score, dim in ((A, layer.rose_score_A, 1), (B, layer.rose_score_B, 0)):
                # A column of B (a row of A) may be split across FSDP2 ranks: prune the whole tensor, the same
                # way on every rank (scores are replicated buffers, gradients already averaged), then keep the
                # local shard. Unsharded parameters are pruned in place.
                value = full(param.detach()) if is_sharded(param) else param
                ops.ema_topk_(value, full(param.grad), score, self.config.beta,
                              kept_count(fraction, param.shape[dim]), dim)
                self._clip(value)
                if is_sharded(param):
                    assign_(param, value)
            layer.rose_step.fill_(t)
        return fraction

    def _clip(self, p: torch.Tensor) -> None:
        if self.config.clip is None:
            return
        kind, value = self.config.clip
        if kind == "elementwise":
            p.clamp_(-value, value)
        else:  # frobenius: ‖p‖²_F ≤ value, by rescaling (zeros stay zeros)
            sq = p.float().square().sum().item()
            if sq > value:
                p.mul_(math.sqrt(value / sq))

    def trainer_callback(self):
        """A ``transformers.TrainerCallback`` that runs this pruner after every optimizer step, so RoseLoRA
        trains with ``Trainer`` unchanged; it takes total_steps from the Trainer when none was given."""
        from transformers import TrainerCallback

        pruner = self

        class RoseLoraCallback(TrainerCallback):
            def on_train_begin(self, args, state, control, **kwargs):
                if pruner.total_steps is None:
                    pruner.total_steps = state.max_steps

            def on_optimizer_step(self, args, state, control, **kwargs):
                pruner.step()

        return RoseLoraCallback()
