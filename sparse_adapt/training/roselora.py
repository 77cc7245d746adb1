"""RoseLoRA's pruner: after every optimizer step, each row of lora_A and each column of lora_B keeps its top-k
entries by an EMA of the sensitivity |w · ∂L/∂w|, with the kept fraction lowered on a cubic schedule."""

import math
import warnings
from typing import List, Optional, Tuple

import torch
from torch import nn

from .. import ops
from ..adapters import RoseLoraConfig, adapter_sites
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
    restored with the adapter and training resumes where it stopped: the pruner reads the step when it is created
    (create it after ``sa.load_adapter``, or call :meth:`sync_step`; its Trainer callback does when training
    begins, after a resume loaded the checkpoint), and from then on never waits for the GPU -- one
    ``ema_topk_multi_`` call prunes every matrix, and clipping runs as foreach ops.
    """

    def __init__(self, model: nn.Module, total_steps: Optional[int] = None):
        # SparseLoraLinear layers, or the adapters of sparse_adapt.peft's PEFT layers (adapter_sites)
        self.layers: List[Tuple[str, object]] = [
            (n, m) for n, m in adapter_sites(model) if isinstance(m.config, RoseLoraConfig)]
        if not self.layers:
            raise ValueError("the model has no roselora adapters (inject with sa.RoseLoraConfig)")
        config = self.layers[0][1].config
        if not isinstance(config, RoseLoraConfig):
            raise TypeError("roselora adapters need a RoseLoraConfig")
        self.config = config
        self.total_steps = total_steps
        self.sync_step()

    def sync_step(self) -> int:
        """Read the pruning step from the layers again (a wait for the GPU): needed when their state was loaded
        from a checkpoint after this pruner was made, as Trainer's resume does after the pruner's callback was
        made -- so the callback calls this when training begins."""
        steps = torch.stack([layer.rose_step.detach().cpu() for _, layer in self.layers])
        if not bool((steps == steps[0]).all()):
            raise ValueError(f"the roselora adapters are at different pruning steps ({sorted(set(steps.tolist()))}); "
                             f"were they loaded from different checkpoints?")
        self._step = int(steps[0])
        return self._step

    def _matrices(self) -> List[Tuple[str, torch.Tensor, torch.Tensor, int]]:
        """(layer name, param, score, dim) per matrix: what every step passes to ema_topk_multi_. Read from the
        layers at each step, never kept: moving the model (``model.to``, or a Trainer placing it on the GPU after
        the pruner was made) replaces its buffers, and kept references would go on pruning with stale CPU scores."""
        return [(name, param, score, dim) for name, layer in self.layers
                for param, score, dim in ((layer.lora_A, layer.rose_score_A, 1), (layer.lora_B, layer.rose_score_B, 0))]

    @property
    def total_steps(self) -> Optional[int]:
        return self._total_steps

    @total_steps.setter
    def total_steps(self, total_steps: Optional[int]) -> None:
        """Checks the schedule against the length of training: one that would never prune is refused, one that
        would not reach its sparsity in time is warned about."""
        if total_steps is not None:
            if isinstance(total_steps, bool) or not isinstance(total_steps, int) or total_steps < 1:
                raise ValueError(f"total_steps must be an integer >= 1, got {total_steps!r}")
            t_init, t_final = self.config.t_init, self.config.t_final
            if t_init >= total_steps:
                raise ValueError(f"RoseLoraConfig.t_init={t_init} >= total_steps={total_steps}: pruning starts after "
                                 f"step t_init, so this run would never prune (lower t_init)")
            if t_final is not None and t_final > total_steps:
                warnings.warn(f"RoseLoraConfig.t_final={t_final} > total_steps={total_steps}: training ends at "
                              f"kept fraction {kept_fraction(total_steps, t_init, t_final, self.config.sparsity):.3f}"
                              f", before the target sparsity {self.config.sparsity} is reached", stacklevel=3)
        self._total_steps = total_steps

    @property
    def t_final(self) -> int:
        if self.config.t_final is not None:
            return self.config.t_final
        if self.total_steps is None:
            raise ValueError("RoseLoraConfig.t_final is None, so the pruner needs total_steps")
        return self.total_steps

    @property
    def step_count(self) -> int:
        return self._step

    def kept_fraction(self, step: Optional[int] = None) -> float:
        step = self.step_count if step is None else step
        return kept_fraction(step, self.config.t_init, self.t_final, self.config.sparsity)

    @torch.no_grad()
    def step(self) -> float:
        """Advance the schedule one step and prune every adapter; returns the kept fraction used."""
        matrices = self._matrices()
        grads = [param.grad for _, param, _, _ in matrices]
        if any(g is None for g in grads):
            missing = sorted({name for (name, _, _, _), g in zip(matrices, grads) if g is None})
            raise RuntimeError(f"{missing[:3]}: lora_A/lora_B have no gradient; call pruner.step() after "
                               f"optimizer.step() and before optimizer.zero_grad()")
        t = self._step + 1
        fraction = self.kept_fraction(t)
        counts = {}  # k per slice length
        params, scores, ks, dims, sharded = [], [], [], [], []
        for (_, param, score, dim), grad in zip(matrices, grads):
            n = param.shape[dim]
            if n not in counts:
                counts[n] = kept_count(fraction, n)
            if is_sharded(param):
                # A column of B (a row of A) may be split across FSDP2 ranks: prune the whole tensor, the same way
                # on every rank (scores are replicated buffers, gradients already averaged), then keep the local
                # shard. Unsharded parameters are pruned in place.
                value = full(param.detach())
                sharded.append((param, value))
                params.append(value)
                grads[len(params) - 1] = full(grad)
            else:
                params.append(param)
            scores.append(score)
            ks.append(counts[n])
            dims.append(dim)
        ops.ema_topk_multi_(params, grads, scores, self.config.beta, ks, dims)
        self._clip(params)
        for param, value in sharded:
            assign_(param, value)
        torch._foreach_add_([layer.rose_step for _, layer in self.layers], 1)
        self._step = t
        return fraction

    def _clip(self, params: List[torch.Tensor]) -> None:
        """The configured clipping of every pruned matrix, as foreach ops: no per-matrix wait for the GPU."""
        if self.config.clip is None:
            return
        kind, value = self.config.clip
        if kind == "elementwise":
            torch._foreach_clamp_min_(params, -value)
            torch._foreach_clamp_max_(params, value)
        else:  # frobenius: ‖p‖²_F ≤ value, by rescaling (zeros stay zeros)
            scales = torch._foreach_reciprocal(torch._foreach_norm(params, 2, dtype=torch.float32))
            torch._foreach_mul_(scales, math.sqrt(value))
            torch._foreach_clamp_max_(scales, 1.0)  # min(1, sqrt(value) / ‖p‖); a zero matrix gets inf -> 1
            torch._foreach_mul_(params, scales)

    def trainer_callback(self):
        """A ``transformers.TrainerCallback`` that runs this pruner after every optimizer step, so RoseLoRA
        trains with ``Trainer`` unchanged; it takes total_steps from the Trainer when none was given."""
        from transformers import TrainerCallback

        pruner = self

        class RoseLoraCallback(TrainerCallback):
            def on_train_begin(self, args, state, control, **kwargs):
                if pruner.total_steps is None:
                    pruner.total_steps = state.max_steps
                pruner.sync_step()  # a resumed run has just loaded the checkpoint's step into the layers

            def on_optimizer_step(self, args, state, control, **kwargs):
                pruner.step()

        return RoseLoraCallback()


def pruner_for(model: nn.Module, total_steps: Optional[int] = None) -> Optional[RoseLoraPruner]:
    """A RoseLoraPruner for the model's roselora adapters, or None when it has none: what a training loop that
    takes any method calls once, before its first step (then ``pruner.step()`` after each optimizer step)."""
    if not any(isinstance(layer.config, RoseLoraConfig) for _, layer in adapter_sites(model)):
        return None
    return RoseLoraPruner(model, total_steps)

