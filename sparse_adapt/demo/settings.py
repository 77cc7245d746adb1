"""The demo's settings."""

from dataclasses import dataclass
from typing import Optional, Sequence, Union


@dataclass
class DemoSettings:
    steps: int = 40
    batch_size: int = 4
    seq_len: int = 128
    eval_texts: int = 48
    eval_every: int = 10
    calibration_texts: int = 32
    layers: Optional[int] = None  # keep only the first n decoder layers
    sparsity: Union[str, float] = "2:4"  # 'N:M' or a fraction
    pruner: str = "wanda"
    methods: Sequence[str] = ("lors",)
    r: int = 16
    alpha: float = 32.0
    lr: float = 1e-3
    seed: int = 0
    threads: int = 2
    device: str = "cpu"
    out_dir: str = "out/demo"
    progress: bool = True
    # write the first method's merged model, when it keeps 2:4 zeros, as a compressed-tensors 2:4 checkpoint
    # (bf16, with the tokenizer) under out_dir/merged-2of4, the format a sparse server reads
    save_merged: bool = True

    def __post_init__(self):
        for name in ("steps", "batch_size", "seq_len", "eval_texts", "eval_every", "calibration_texts", "r", "threads"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"DemoSettings.{name} must be a positive integer, got {value!r}")
        if self.layers is not None and (isinstance(self.layers, bool) or not isinstance(self.layers, int)
                                        or self.layers < 1):
            raise ValueError(f"DemoSettings.layers must be None or a positive integer, got {self.layers!r}")
        if not (self.lr > 0 and self.alpha > 0):
            raise ValueError(f"DemoSettings.lr and alpha must be positive, got {self.lr!r} and {self.alpha!r}")
        if not self.methods:
            raise ValueError("DemoSettings.methods is empty")
        from ..adapters import get_method
        from ..prune import parse_sparsity

        for method in self.methods:
            get_method(method)  # a clear error for an unknown one
        parse_sparsity(self.sparsity)
        if self.pruner not in ("wanda", "magnitude"):
            raise ValueError(f"DemoSettings.pruner must be 'wanda' or 'magnitude', got {self.pruner!r}")

    @staticmethod
    def quick(**overrides) -> "DemoSettings":
        """A few minutes on a 2-core CPU: the whole model, 64-token sequences, 8 steps, 16 held-out texts (pass
        layers=n to keep only the first n decoder layers and go faster still)."""
        base = dict(steps=8, seq_len=64, eval_texts=16, eval_every=4, calibration_texts=8)
        base.update(overrides)
        return DemoSettings(**base)
