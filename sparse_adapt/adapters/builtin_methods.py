"""The seven methods, one record each. The baselines are written with plain PyTorch ops, as their papers and code
define them, so that benchmarks compare against them and not against our kernels in disguise."""

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.checkpoint import checkpoint

from .. import ops
from .config import RoseLoraConfig, SparseLoraConfig
from .method import Method, register_method


class Lora(Method):
    name = "lora"
    help = "plain LoRA: W + s·B@A, unmasked (its merged weight is dense again)"
    config_class = SparseLoraConfig
    exports_to_peft = True


class RoseLora(Lora):
    """LoRA whose rows of A and columns of B are pruned by the pruner (training.roselora); the forward is LoRA's."""

    name = "roselora"
    help = "RoseLoRA: LoRA with row-sparse A and column-sparse B, pruned by sensitivity (RoseLoraPruner)"
    config_class = RoseLoraConfig
    state_names = ("rose_score_A", "rose_score_B", "rose_step")

    def init_state(self, layer):
        device = layer.lora_A.device
        # float32 EMA scores of |w·g| for each entry of A and B, and the pruning step (saved: training resumes)
        layer.register_buffer("rose_score_A", torch.zeros(layer.lora_A.shape, device=device))
        layer.register_buffer("rose_score_B", torch.zeros(layer.lora_B.shape, device=device))
        layer.register_buffer("rose_step", torch.zeros((), dtype=torch.long, device=device))


# ------------------------------------------------------------------------------------- the masked update: M ⊙ BA


class _MaskedUpdate(Method):
    """Methods whose update is s · (B @ A) ⊙ M with M = W != 0: the merged weight keeps W's zeros exactly."""

    preserves_sparsity = True

    def delta_weight(self, layer):
        w = layer.base_layer.weight
        return layer.scale * (layer.lora_B @ layer.lora_A) * (w != 0)

    @torch.no_grad()
    def fold(self, layer, sign):
        ops.masked_merge_(layer.base_layer.weight, layer.lora_A, layer.lora_B, sign * layer.scale)


def _sqft_linear(x: Tensor, weight: Tensor, bias, lora_A: Tensor, lora_B: Tensor, scale: float) -> Tensor:
    # SQFT (SparsePEFT): the mask is the base weight's non-zeros, applied to the dense B @ A; autograd keeps the
    # merged (out, in) weight (and the mask) for backward.
    mask = (weight != 0).detach()
    return F.linear(x, weight + (lora_B @ lora_A) * scale * mask, bias)


class Sqft(_MaskedUpdate):
    name = "sqft"
    help = "SQFT: autograd through W + s(BA)⊙M (keeps the merged weight for backward)"
    config_class = SparseLoraConfig

    def forward(self, layer, x):
        base = layer.base_layer
        return _sqft_linear(layer.dropout(x), base.weight, base.bias, layer.lora_A, layer.lora_B, layer.scale)


class SqftGc(Sqft):
    name = "sqft_gc"
    help = "SQFT under activation checkpointing of the adapted linear"

    def forward(self, layer, x):
        base = layer.base_layer
        return checkpoint(_sqft_linear, layer.dropout(x), base.weight, base.bias, layer.lora_A, layer.lora_B,
                          layer.scale, use_reentrant=False)


class Lors(_MaskedUpdate):
    name = "lors"
    help = "LoRS: the recompute op masked_lora_linear (LoRA's activation memory, sparsity kept), gradient-SVD init"
    config_class = SparseLoraConfig
    preferred_init = "gradient_svd"

    def forward(self, layer, x):
        base = layer.base_layer
        return ops.masked_lora_linear(layer.dropout(x), base.weight, base.bias, layer.lora_A, layer.lora_B,
                                      layer.scale, None, layer.config.exact_grad)


# ----------------------------------------------------------------------------------------- SPP: W ⊙ (repeat(A)·b)


def _spp_rows(lora_A: Tensor, out_features: int) -> Tensor:
    """repeat_interleave(A, out / r, dim=0): each row of A scales out/r consecutive rows of W."""
    return torch.repeat_interleave(lora_A, out_features // lora_A.shape[0], dim=0)


def _spp_branch(x: Tensor, weight: Tensor, spp_A: Tensor, spp_b: Tensor) -> Tensor:
    # SPP: ΔW/s = repeat_interleave(A, out / r, dim=0) ⊙ b ⊙ W, zero wherever W is.
    return F.linear(x, _spp_rows(spp_A, weight.shape[0]) * spp_b * weight)


class Spp(Method):
    """SPP's form (its official code): trainable A (r, in) and a column b (out, 1);
    ΔW = s · W ⊙ (repeat_interleave(A, out/r, dim=0) ⊙ b), zero wherever W is. Its lora_B is that column."""

    name = "spp"
    help = "SPP: ΔW = s·W ⊙ (repeat(A)·b), its official form"
    config_class = SparseLoraConfig
    preserves_sparsity = True
    lowrank_product = False
    inits = ("zeros_B",)  # SPP's own init: kaiming A, zero b
    inits_note = "SPP's A is a row scaling, not a direction, so spp/spp_gc take init='zeros_B'"

    def factor_shapes(self, out_features, in_features, r):
        return (r, in_features), (out_features, 1)

    def check_layer(self, name, out_features, in_features, r):
        if out_features % r:
            raise ValueError(f"{name}: SPP repeats each row of A out/r times, but out_features={out_features} is not "
                             f"divisible by r={r}")

    def forward(self, layer, x):
        base = layer.base_layer
        return base(x) + layer.scale * _spp_branch(layer.dropout(x), base.weight, layer.lora_A, layer.lora_B)

    def _factor(self, layer):
        return layer.scale * _spp_rows(layer.lora_A, layer.out_features) * layer.lora_B

    def delta_weight(self, layer):
        return self._factor(layer) * layer.base_layer.weight

    @torch.no_grad()
    def check_merge(self, layer):
        # The merge multiplies W by 1 + f and the unmerge divides by it: where a non-zero weight would become 0
        # the zero pattern changes and the unmerge cannot restore it.
        w = layer.base_layer.weight
        lost = int(((w * (1 + self._factor(layer)) == 0) & (w != 0)).sum())
        if lost:
            raise ValueError(f"cannot merge {layer.name or 'an spp adapter'}: its factor 1 + s·A·b makes {lost} "
                             f"non-zero weight(s) exactly 0, which would change the zero pattern and could not be "
                             f"unmerged; keep the adapter unmerged or retrain it")

    @torch.no_grad()
    def fold(self, layer, sign):
        factor = 1 + self._factor(layer)
        w = layer.base_layer.weight
        if sign > 0:
            w.mul_(factor)
        else:  # check_merge saw to it that the factor is 0 only where the weight is: divide those by 1, not 0
            w.div_(torch.where(factor == 0, torch.ones_like(factor), factor))


class SppGc(Spp):
    name = "spp_gc"
    help = "SPP with its adapter branch checkpointed, as SPP's code does by default"

    def forward(self, layer, x):
        base = layer.base_layer
        branch = checkpoint(_spp_branch, layer.dropout(x), base.weight, layer.lora_A, layer.lora_B,
                            use_reentrant=False)
        return base(x) + layer.scale * branch


for _method in (Lora(), Sqft(), SqftGc(), Spp(), SppGc(), Lors(), RoseLora()):
    register_method(_method)
