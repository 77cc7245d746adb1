"""The demo's settings."""

from dataclasses import dataclass
from typing import Optional, Sequence


@dataclass
class DemoSettings:
    steps: int = 40
    batch_size: int = 4
    seq_len: int = 128
    eval_texts: int = 48
    eval_every: int = 10
    calibration_texts: int = 32
    layers: Optional[int] = None  # keep only the first n decoder layers
    sparsity: str = "2:4"
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

    @staticmethod
    def quick(**overrides) -> "DemoSettings":
        """A few minutes on a 2-core CPU: the whole model, 64-token sequences, 8 steps, 16 held-out texts (pass
        layers=n to keep only the first n decoder layers and go faster still)."""
        base = dict(steps=8, seq_len=64, eval_texts=16, eval_every=4, calibration_texts=8)
        base.update(overrides)
        return DemoSettings(**base)
