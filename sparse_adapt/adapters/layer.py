"""SparseLoraLinear: one adapter module for every method, wrapping an existing nn.Linear."""

import math
from typing import Callable, Dict

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from .. import ops
from .config import SparseLoraConfig


# ------------------------------------------------------------------------------------------ per-method forward
# The baselines are written with plain PyTorch ops, as their papers and code define them, so that benchmarks
# compare against them and not against our kernels in disguise.


def _lora_branch(layer: "SparseLoraLinear", x: Tensor) -> Tensor:
    return F.linear(F.linear(layer.dropout(x), layer.lora_A), layer.lora_B)


def _lora_forward(layer: "SparseLoraLinear", x: Tensor) -> Tensor:
    return layer.base_layer(x) + layer.scale * _lora_branch(layer, x)


def _sqft_linear(x: Tensor, weight: Tensor, bias, lora_A: Tensor, lora_B: Tensor, scale: float) -> Tensor:
    # SQFT (SparsePEFT): the mask is the base weight's non-zeros, applied to the dense B @ A; autograd keeps the
    # merged (out, in) weight (and the mask) for backward.
    mask = (weight != 0).detach()
    return F.linear(x, weight + (lora_B @ lora_A) * scale * mask, bias)


def _sqft_forward(layer: "SparseLoraLinear", x: Tensor) -> Tensor:
    base = layer.base_layer
    return _sqft_linear(layer.dropout(x), base.weight, base.bias, layer.lora_A, layer.lora_B, layer.scale)


def _sqft_gc_forward(layer: "SparseLoraLinear", x: Tensor) -> Tensor:
    base = layer.base_layer
    return checkpoint(_sqft_linear, layer.dropout(x), base.weight, base.bias, layer.lora_A, layer.lora_B, layer.scale,
                      use_reentrant=False)


def _spp_branch(x: Tensor, weight: Tensor, spp_A: Tensor, spp_b: Tensor) -> Tensor:
    # SPP: ΔW/s = repeat_interleave(A, out / r, dim=0) ⊙ b ⊙ W, zero wherever W is.
    rows = torch.repeat_interleave(spp_A, weight.shape[0] // spp_A.shape[0], dim=0)
    return F.linear(x, rows * spp_b * weight)


def _spp_forward(layer: "SparseLoraLinear", x: Tensor) -> Tensor:
    base = layer.base_layer
    return base(x) + layer.scale * _spp_branch(layer.dropout(x), base.weight, layer.lora_A, layer.lora_B)


def _spp_gc_forward(layer: "SparseLoraLinear", x: Tensor) -> Tensor:
    base = layer.base_layer
    branch = checkpoint(_spp_branch, layer.dropout(x), base.weight, layer.lora_A, layer.lora_B, use_reentrant=False)
    return base(x) + layer.scale * branch


def _lors_forward(layer: "SparseLoraLinear", x: Tensor) -> Tensor:
    base = layer.base_layer
    return ops.masked_lora_linear(layer.dropout(x), base.weight, base.bias, layer.lora_A, layer.lora_B, layer.scale,
                                  None, layer.exact_grad)


_FORWARD: Dict[str, Callable[["SparseLoraLinear", Tensor], Tensor]] = {
    "lora": _lora_forward,
    "roselora": _lora_forward,
    "sqft": _sqft_forward,
    "sqft_gc": _sqft_gc_forward,
    "spp": _spp_forward,
    "spp_gc": _spp_gc_forward,
    "lors": _lors_forward,
}


class SparseLoraLinear(nn.Module):
    """A frozen ``nn.Linear`` plus a low-rank adapter whose method (config.method) picks forward and merge.

    ``lora_A`` is ``(r, in)``. ``lora_B`` is ``(out, r)``, except for SPP, where it is SPP's column ``b`` of
    shape ``(out, 1)``. RoseLoRA layers also carry their float32 sensitivity scores (``rose_score_A``,
    ``rose_score_B``) and the pruning step (``rose_step``), saved with the adapter so training can resume.
    """

    def __init__(self, base_layer: nn.Linear, config: SparseLoraConfig):
        super().__init__()
        if not isinstance(base_layer, nn.Linear):
            raise TypeError(f"SparseLoraLinear wraps an nn.Linear, got {type(base_layer).__name__}")
        out_features, in_features = base_layer.weight.shape
        if config.method in ("spp", "spp_gc") and out_features % config.r:
            raise ValueError(f"SPP repeats each row of A out/r times: out_features={out_features} is not divisible "
                             f"by r={config.r}")
        self.base_layer = base_layer
        self.config = config
        self.method = config.method
        self.r = config.r
        self.scale = config.scale
        self.exact_grad = config.exact_grad
        self.dropout = nn.Dropout(config.dropout) if config.dropout > 0 else nn.Identity()
        self.merged = False
        factory = dict(device=base_layer.weight.device, dtype=base_layer.weight.dtype)
        b_cols = 1 if self.method in ("spp", "spp_gc") else config.r
        self.lora_A = nn.Parameter(torch.empty(config.r, in_features, **factory))
        self.lora_B = nn.Parameter(torch.zeros(out_features, b_cols, **factory))
        if self.method == "roselora":
            self.register_buffer("rose_score_A", torch.zeros(config.r, in_features, device=factory["device"]))
            self.register_buffer("rose_score_B", torch.zeros(out_features, config.r, device=factory["device"]))
            self.register_buffer("rose_step", torch.zeros((), dtype=torch.long, device=factory["device"]))
        self.reset_adapter(config.init)

    @property
    def in_features(self) -> int:
        return self.base_layer.in_features

    @property
    def out_features(self) -> int:
        return self.base_layer.out_features

    @torch.no_grad()
    def reset_adapter(self, init: str = "zeros_B") -> None:
        """B (or SPP's b) to zero, so the layer starts as the base layer; A as `init` says. gradient_svd sets A
        later (sparse_adapt.training.init); until then A is initialised as for zeros_B."""
        if init == "gaussian" and self.method not in ("spp", "spp_gc"):
            nn.init.normal_(self.lora_A, std=1.0 / self.r)
        else:
            nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
        nn.init.zeros_(self.lora_B)

    def forward(self, x: Tensor) -> Tensor:
        if self.merged:
            return self.base_layer(x)
        return _FORWARD[self.method](self, x)

    def get_delta_weight(self) -> Tensor:
        """The dense (out, in) update this adapter adds to the base weight (what merge folds in)."""
        w = self.base_layer.weight
        if self.method in ("spp", "spp_gc"):
            return self.scale * torch.repeat_interleave(self.lora_A, self.out_features // self.r, dim=0) * self.lora_B * w
        delta = self.scale * (self.lora_B @ self.lora_A)
        return delta * (w != 0) if self.method in ("sqft", "sqft_gc", "lors") else delta

    @torch.no_grad()
    def merge(self) -> None:
        """Fold the adapter into the base weight; for the sparsity-preserving methods the zeros stay exactly."""
        if self.merged:
            raise RuntimeError("adapter is already merged")
        self._fold(+1)
        self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        if not self.merged:
            raise RuntimeError("adapter is not merged")
        self._fold(-1)
        self.merged = False

    def _fold(self, sign: int) -> None:
        w = self.base_layer.weight
        if self.method in ("sqft", "sqft_gc", "lors"):
            ops.masked_merge_(w, self.lora_A, self.lora_B, sign * self.scale)
        elif self.method in ("spp", "spp_gc"):
            factor = 1 + self.scale * torch.repeat_interleave(self.lora_A, self.out_features // self.r, dim=0) * self.lora_B
            if sign > 0:
                w.mul_(factor)
            else:
                w.div_(factor)
        else:
            w.addmm_(self.lora_B, self.lora_A, alpha=sign * self.scale)

    def extra_repr(self) -> str:
        return f"method={self.method}, r={self.r}, scale={self.scale:g}, merged={self.merged}"
