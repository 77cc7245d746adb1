"""sparsity_report: per adapted layer, the measured sparsity of A's rows, B's columns and B @ A, next to
RoseLoRA's Proposition 1 lower bound  s(BA) ≥ max{0, 1 + Σᵢ (s(Aᵢ*) + s(B*ᵢ) − s(Aᵢ*)·s(B*ᵢ)) − r}."""

from dataclasses import dataclass
from typing import List

import torch
from torch import Tensor, nn

from ..adapters import adapter_sites


def zero_fraction(t: Tensor, dim: int) -> Tensor:
    """Fraction of zeros of each slice along dim (dim=1: rows, dim=0: columns)."""
    return (t == 0).float().mean(dim=dim)


def proposition1_bound(row_sparsity_A: Tensor, col_sparsity_B: Tensor) -> float:
    """The lower bound on s(B @ A) from the sparsity of A's rows and B's columns (rank-one terms B*ᵢ Aᵢ*)."""
    a, b = row_sparsity_A.double(), col_sparsity_B.double()
    return max(0.0, float(1 + (a + b - a * b).sum() - a.numel()))


@dataclass
class LayerSparsity:
    name: str
    rows_A: Tensor  # (r,) zero fraction of each row of lora_A
    cols_B: Tensor  # (r,) zero fraction of each column of lora_B
    delta: float    # zero fraction of B @ A
    bound: float    # Proposition 1

    @property
    def bound_holds(self) -> bool:
        return self.delta >= self.bound - 1e-12


class SparsityReport(List[LayerSparsity]):
    def to_markdown(self) -> str:
        lines = ["| layer | rows of A: sparsity (min / mean / max) | columns of B | s(B@A) | Prop. 1 bound |",
                 "|---|---|---|---:|---:|"]
        for row in self:
            lines.append(
                f"| {row.name} | {row.rows_A.min():.3f} / {row.rows_A.mean():.3f} / {row.rows_A.max():.3f} | "
                f"{row.cols_B.min():.3f} / {row.cols_B.mean():.3f} / {row.cols_B.max():.3f} | {row.delta:.4f} | "
                f"{row.bound:.4f} |")
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.to_markdown()


@torch.no_grad()
def sparsity_report(model: nn.Module) -> SparsityReport:
    """Measured sparsity of every adapter (B @ A is formed one layer at a time) and its Proposition 1 bound."""
    report = SparsityReport()
    for name, layer in adapter_sites(model):
        if not layer.record.lowrank_product:
            continue  # e.g. SPP's update is W ⊙ (repeat(A)·b): not a B @ A product
        A, B = layer.lora_A.float(), layer.lora_B.float()
        rows, cols = zero_fraction(A, 1), zero_fraction(B, 0)
        delta = float(((B @ A) == 0).float().mean())
        report.append(LayerSparsity(name, rows, cols, delta, proposition1_bound(rows, cols)))
    return report
