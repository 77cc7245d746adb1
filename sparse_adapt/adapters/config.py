"""Adapter configurations: dataclasses whose fields carry their help text, as PEFT's do. What is specific to a
method (its inits, its config class, what its layers must satisfy) lives in its record (method.py)."""

import math
from dataclasses import asdict, dataclass, field, fields
from typing import Any, Dict, Optional, Sequence, Tuple, Union

from .method import INITS, get_method, method_names

CLIP_KINDS = ("frobenius", "elementwise")
# The expected norm of a row of LoRA's A at its kaiming-uniform init (a=sqrt(5): U(-1/sqrt(in), 1/sqrt(in))).
LORA_A_ROW_NORM = 3 ** -0.5


def _help(text: str) -> Dict[str, str]:
    return {"help": text}


@dataclass
class SparseLoraConfig:
    """How `sa.inject` adapts a model."""

    method: str = field(default="lors", metadata=_help(
        "The adaptation method, one of sa.method_names(): lora, sqft, sqft_gc, spp, spp_gc, lors, roselora (see "
        "each method's record, sparse_adapt/adapters/builtin_methods.py)."))
    r: int = field(default=16, metadata=_help("Adapter rank. For spp/spp_gc, out_features must be divisible by r."))
    alpha: float = field(default=16.0, metadata=_help(
        "Scale numerator: scale = alpha / r (alpha / sqrt(r) with rsLoRA)."))
    target_modules: Union[str, Sequence[str]] = field(default="all-linear", metadata=_help(
        "Which nn.Linear modules to adapt: a list of names (a module matches if its qualified name equals an entry "
        "or ends with '.' + entry), a regular expression matched against the whole qualified name, or 'all-linear' "
        "(every nn.Linear except the model's output embedding)."))
    dropout: float = field(default=0.0, metadata=_help(
        "Dropout probability. lora, roselora, spp, spp_gc: on the adapter branch's input, as in PEFT. sqft, sqft_gc, "
        "lors compute through the merged weight, so it applies to the layer's input, as SQFT's code does."))
    init: str = field(default="zeros_B", metadata=_help(
        "zeros_B: kaiming-uniform A, zero B (LoRA's default). gaussian: A ~ N(0, 1/r²), zero B (PEFT's 'gaussian'). "
        "gradient_svd (LoRS): A = top-r right singular vectors of each weight's estimated first-step gradient, zero "
        "B; needs calibration batches (sa.inject(..., calibration_batches=...)). A method's record says which of "
        "these it takes (spp/spp_gc: zeros_B only, SPP's own init)."))
    init_row_norm: float = field(default=LORA_A_ROW_NORM, metadata=_help(
        "gradient_svd: the norm given to each row of A (the singular vectors are unit rows). The default, 1/sqrt(3), "
        "is the expected row norm of LoRA's kaiming-uniform A, so that lr and alpha mean what they mean for LoRA; "
        "1.0 is the LoRS paper's unit rows (measured: they stall at the full demo budget on one seed of three, "
        "README, 'Recovery over seeds')."))
    use_rslora: bool = field(default=False, metadata=_help("rsLoRA: scale = alpha / sqrt(r)."))
    exact_grad: bool = field(default=False, metadata=_help(
        "lors only: exact masked adapter gradients (forms an out x in gradient in backward) instead of LoRS's "
        "straight-through estimate."))

    def __post_init__(self):
        record = get_method(self.method)
        if not isinstance(self.r, int) or isinstance(self.r, bool) or self.r < 1:
            raise ValueError(f"r must be a positive integer, got {self.r!r}")
        if not (isinstance(self.alpha, (int, float)) and math.isfinite(self.alpha) and self.alpha > 0):
            raise ValueError(f"alpha must be a positive finite number, got {self.alpha!r}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout!r}")
        if not (isinstance(self.init_row_norm, (int, float)) and math.isfinite(self.init_row_norm)
                and self.init_row_norm > 0):
            raise ValueError(f"init_row_norm must be a positive finite number, got {self.init_row_norm!r}")
        if self.init not in INITS:
            raise ValueError(f"init must be one of {INITS}, got {self.init!r}")
        if self.init not in record.inits:
            raise ValueError(f"init={self.init!r} is not one of method {self.method!r}'s inits {record.inits}"
                             + (f": {record.inits_note}" if record.inits_note else ""))
        if isinstance(self.target_modules, str):
            if not self.target_modules:
                raise ValueError("target_modules must not be empty")
        else:
            self.target_modules = list(self.target_modules)
            if not self.target_modules or not all(isinstance(t, str) and t for t in self.target_modules):
                raise ValueError(f"target_modules must be a non-empty list of names, got {self.target_modules!r}")
        if not isinstance(self, record.config_class):
            raise ValueError(f"method={self.method!r} needs a {record.config_class.__name__} "
                             f"(sa.config_for({self.method!r}, ...) makes one)")

    @property
    def scale(self) -> float:
        return self.alpha / (math.sqrt(self.r) if self.use_rslora else self.r)

    @property
    def preserves_sparsity(self) -> bool:
        return get_method(self.method).preserves_sparsity

    def to_dict(self) -> Dict[str, Any]:
        d = asdict(self)
        d["config_class"] = type(self).__name__
        return d

    @staticmethod
    def from_dict(d: Dict[str, Any]) -> "SparseLoraConfig":
        d = dict(d)
        name = d.pop("config_class", None)
        classes = {get_method(m).config_class.__name__: get_method(m).config_class for m in method_names()}
        cls = classes.get(name)
        if cls is None:
            raise ValueError(f"adapter_config.json names no known config_class ({name!r}; known: {sorted(classes)})")
        known = {f.name for f in fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise ValueError(f"adapter_config.json has unknown fields {sorted(unknown)}")
        if d.get("clip") is not None:
            d["clip"] = tuple(d["clip"])
        return cls(**d)


@dataclass
class RoseLoraConfig(SparseLoraConfig):
    """RoseLoRA: each row of lora_A and each column of lora_B keeps its top-k entries by an EMA of |w·∂L/∂w|."""

    method: str = field(default="roselora", metadata=_help("Always 'roselora'."))
    sparsity: float = field(default=0.9, metadata=_help(
        "Final fraction of zeros in each row of lora_A and each column of lora_B (the kept fraction "
        "τ = 1 − sparsity)."))
    beta: float = field(default=0.8, metadata=_help("EMA factor of the sensitivity score: s ← β·s + (1−β)·|w·g|."))
    t_init: int = field(default=0, metadata=_help("Steps of dense training before pruning starts."))
    t_final: Optional[int] = field(default=None, metadata=_help(
        "Step at which the kept fraction reaches τ (cubic schedule in between); None: the pruner's total_steps."))
    clip: Optional[Tuple[str, float]] = field(default=None, metadata=_help(
        "Clipping after each pruning step: ('frobenius', a) keeps ‖A‖²_F ≤ a and ‖B‖²_F ≤ a (the paper); "
        "('elementwise', c) clamps entries to [−c, c] (the authors' released code). None: no clipping."))

    def __post_init__(self):
        super().__post_init__()
        if not issubclass(get_method(self.method).config_class, RoseLoraConfig):
            raise ValueError(f"RoseLoraConfig is for method='roselora', got {self.method!r}")
        if not 0.0 <= self.sparsity < 1.0:
            raise ValueError(f"sparsity must be in [0, 1), got {self.sparsity!r}")
        if not 0.0 <= self.beta <= 1.0:
            raise ValueError(f"beta must be in [0, 1], got {self.beta!r}")
        if self.t_init < 0 or (self.t_final is not None and self.t_final < self.t_init):
            raise ValueError(f"need 0 <= t_init <= t_final, got t_init={self.t_init}, t_final={self.t_final}")
        if self.clip is not None:
            kind, value = self.clip
            if kind not in CLIP_KINDS or not (math.isfinite(value) and value > 0):
                raise ValueError(f"clip must be None or (kind, positive value) with kind in {CLIP_KINDS}, "
                                 f"got {self.clip!r}")
            self.clip = (kind, float(value))
