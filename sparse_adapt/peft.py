"""PEFT, unchanged, running sparse_adapt's methods.

A PEFT user changes three lines::

    import sparse_adapt.peft as sap
    model = sap.get_peft_model(model, lora_config, method="lors")   # was peft.get_peft_model(model, lora_config)
    model = sap.from_pretrained(base_model, "adapter-dir")          # was peft.PeftModel.from_pretrained(...)

What comes back is PEFT's own ``PeftModel`` -- its LoraModel, state-dict names, ``print_trainable_parameters``,
``save_pretrained``, ``merge_and_unload`` -- whose targeted ``nn.Linear`` layers are :class:`SparseLoraPeftLinear`,
a subclass of PEFT's ``lora.Linear``. Each adapter of such a layer runs the method it was created with, through
the same method record (``sparse_adapt/adapters/builtin_methods.py``) that ``sa.inject``'s layers use:

- ``lors``: the ``masked_lora_linear`` op -- LoRA's activation memory, the merged weight keeps every zero;
- ``sqft`` / ``sqft_gc``: SQFT's autograd through ``W + s(BA)⊙M``;
- ``roselora``: LoRA's forward; ``sa.RoseLoraPruner(peft_model)`` prunes its A rows and B columns;
- ``lora``: PEFT's own path, untouched.

The method goes into ``adapter_config.json`` (a ``sparse_adapt`` entry), which is where :func:`from_pretrained`
finds it. The adapter weights file is PEFT's, tensor for tensor, plus a method's state (RoseLoRA's scores and
pruning step, under the layer's ``lora_sparse_adapt_state``), which :func:`from_pretrained` and Trainer's resume
restore. Plain ``peft.PeftModel.from_pretrained`` still
reads the directory (it warns that it ignores the ``sparse_adapt`` entry) but computes LoRA's unmasked function:
for LoRS and SQFT that is a different model. Ship the merged model (``merge_and_unload()``), which is exact.

Built on PEFT's custom-module dispatch (``LoraConfig._register_custom_module``, PEFT's documented extension
point for LoRA layers of new kinds); the method is bound to each adapter after PEFT created it, so the layer does
not depend on PEFT's private ``update_layer`` signature, which changes between versions.
"""

import copy
import json
import os
import warnings
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any, Dict, List, Optional, Union

import peft
import torch
from peft.tuners.lora import Linear as _PeftLoraLinear
from peft.tuners.lora import LoraLayer
from peft.tuners.tuners_utils import check_adapters_to_merge
from torch import Tensor, nn

from .adapters import Method, SparseLoraConfig, config_for, get_method, gradient_svd_init_, method_names
from .adapters.method import keep_state_float32

#: The PEFT versions this module is tested with (tests/test_peft.py); older ones are refused.
PEFT_MIN_VERSION = "0.18.0"
TESTED_PEFT_VERSIONS = ("0.18.0", "0.19.1", "0.20.0", "0.21.2")

#: What each saved adapter_config.json carries under "sparse_adapt" (bumped when its meaning changes).
FORMAT = 1

# The layer attribute (a ModuleDict keyed by adapter) holding each adapter's method state, e.g. RoseLoRA's scores
# and step. Its "lora_" prefix is PEFT's mark of what belongs to an adapter: save_pretrained writes it into the
# adapter file and load_adapter (Trainer's resume) inserts the adapter name back into its keys, in every tested
# PEFT version; from_pretrained / load_adapter below restore it after binding the method.
_STATE = "lora_sparse_adapt_state"


def _version_tuple(v: str):
    out = []
    for part in v.split(".")[:3]:
        digits = "".join(c for c in part if c.isdigit())
        out.append(int(digits) if digits else 0)
    return tuple(out)


if _version_tuple(peft.__version__) < _version_tuple(PEFT_MIN_VERSION):
    raise ImportError(f"sparse_adapt.peft needs peft>={PEFT_MIN_VERSION} (tested: {', '.join(TESTED_PEFT_VERSIONS)}); "
                      f"found {peft.__version__}")
if _version_tuple(peft.__version__)[:2] > _version_tuple(TESTED_PEFT_VERSIONS[-1])[:2]:
    warnings.warn(f"sparse_adapt.peft is tested with peft {', '.join(TESTED_PEFT_VERSIONS)}; found {peft.__version__} "
                  f"(run tests/test_peft.py to check it)", stacklevel=2)


def peft_methods() -> List[str]:
    """The methods an adapter of PEFT's LoRA shapes can run: A (r, in), B (out, r), an update made of B @ A and
    no extra trainable tensors (lora, roselora, sqft, sqft_gc, lors among the built-in ones; SPP's B is a column)."""
    out = []
    for name in method_names():
        record = get_method(name)
        if record.lowrank_product and record.factor_shapes(4, 6, 2) == ((2, 6), (4, 2)):
            out.append(name)
    return out


# ------------------------------------------------------------------------------------------------- the config


@dataclass
class SparseAdaptLoraConfig(peft.LoraConfig):
    """PEFT's ``LoraConfig`` plus the sparse_adapt method its layers run (saved in adapter_config.json)."""

    sparse_adapt: Optional[Dict[str, Any]] = field(default=None, metadata={"help": (
        "sparse_adapt's method and its options, e.g. {'method': 'lors', 'exact_grad': False} or {'method': "
        "'roselora', 'sparsity': 0.9, ...}; written by sparse_adapt.peft.get_peft_model.")})

    def __post_init__(self):
        super().__post_init__()
        if self.sparse_adapt is None:
            raise ValueError("SparseAdaptLoraConfig needs sparse_adapt={'method': ...}; build it with "
                             "sparse_adapt.peft.get_peft_model(model, lora_config, method=...)")
        self.sparse_adapt = _check_options(dict(self.sparse_adapt), self)
        self._register_custom_module({nn.Linear: SparseLoraPeftLinear})

    def method_config(self, r: int, alpha: float) -> SparseLoraConfig:
        """The sparse_adapt config of one layer's adapter (PEFT's rank_pattern/alpha_pattern give each layer its
        r and alpha)."""
        return replace(self._method_config, r=r, alpha=float(alpha))

    @property
    def _method_config(self) -> SparseLoraConfig:
        return _method_config(self.sparse_adapt, self)


def _method_config(options: Dict[str, Any], config: peft.LoraConfig) -> SparseLoraConfig:
    """The sparse_adapt config that `options` (the saved "sparse_adapt" entry) and PEFT's LoraConfig describe."""
    fields_ = {k: v for k, v in options.items() if k not in ("method", "format")}
    if fields_.get("clip") is not None:
        fields_["clip"] = tuple(fields_["clip"])
    target = config.target_modules if isinstance(config.target_modules, str) else sorted(config.target_modules or [])
    return config_for(options["method"], r=config.r, alpha=float(config.lora_alpha),
                      dropout=float(config.lora_dropout), use_rslora=bool(config.use_rslora),
                      target_modules=target or "all-linear", **fields_)


def _check_options(options: Dict[str, Any], config: peft.LoraConfig) -> Dict[str, Any]:
    """Refuse what the methods cannot run, naming the argument; return the options as saved."""
    method = options.get("method")
    supported = peft_methods()
    if method not in supported:
        raise ValueError(f"method must be one of {supported} for a PEFT LoRA model, got {method!r}"
                         + (" (SPP's B is a column, not PEFT's (out, r) lora_B; use sa.inject for it)"
                            if method in ("spp", "spp_gc") else ""))
    options.setdefault("format", FORMAT)
    if options["format"] != FORMAT:
        raise ValueError(f"adapter_config.json's sparse_adapt entry has format {options['format']!r}; this version "
                         f"reads format {FORMAT}")
    record = get_method(method)
    if method != "lora":
        refused = {
            "use_dora": "DoRA rescales the merged weight's columns",
            "lora_bias": "a trainable bias of lora_B",
            "fan_in_fan_out": "fan_in_fan_out (Conv1D weights)",
        }
        for name, what in refused.items():
            if getattr(config, name, False):
                raise ValueError(f"lora_config.{name}=True ({what}) cannot be combined with method={method!r}")
        for name in ("use_alora", "use_qalora", "use_bdlora", "arrow_config", "alora_invocation_tokens",
                     "velora_config", "monteclora_config", "kasa_config", "mica"):
            if getattr(config, name, None) not in (None, False):
                raise ValueError(f"lora_config.{name} selects a PEFT LoRA variant, which cannot be combined with "
                                 f"method={method!r}")
        if config.layer_replication:
            raise ValueError(f"lora_config.layer_replication cannot be combined with method={method!r}")
    # The options are a config's fields: build one now so that a bad value is refused before the model changes.
    allowed = {f.name for f in fields(record.config_class)} - {
        "method", "r", "alpha", "dropout", "use_rslora", "target_modules", "init"}
    unknown = set(options) - allowed - {"method", "format"}
    if unknown:
        raise ValueError(f"method {method!r} takes no option(s) {sorted(unknown)} (its options: {sorted(allowed)}; "
                         f"r, alpha, dropout, rsLoRA and target modules come from the LoraConfig)")
    try:
        _method_config(options, config)
    except TypeError as e:  # a wrong type of value
        raise ValueError(f"method {method!r}: {e}") from None
    return options


# ------------------------------------------------------------------------------------------ one adapter, viewed


class _Weights:
    """A base layer seen with a different weight tensor (a safe merge folds into a copy first)."""

    def __init__(self, weight: Tensor, bias: Optional[Tensor]):
        self.weight, self.bias = weight, bias


class _MethodState(nn.Module):
    """Holds one adapter's method state (its buffers); like SparseLoraLinear, it keeps them float32 when the model
    is moved to another dtype."""

    def _apply(self, fn, recurse=True):
        super()._apply(fn, recurse)
        keep_state_float32(self, list(self._buffers))
        return self


class PeftAdapter:
    """One adapter of a :class:`SparseLoraPeftLinear`, with the attributes a method record reads (the same ones as
    a ``SparseLoraLinear``): its record's forward, update, merge and state all work on it, and so do
    ``sa.RoseLoraPruner``, ``sa.sparsity_report`` and ``sa.gradient_svd_init_`` (through ``sa.adapter_sites``)."""

    def __init__(self, layer: "SparseLoraPeftLinear", adapter: str, base: Optional[_Weights] = None,
                 dtype: Optional[torch.dtype] = None):
        self._layer, self.adapter, self._base, self._dtype = layer, adapter, base, dtype

    # what the records read
    @property
    def config(self) -> SparseLoraConfig:
        return self._layer.sparse_adapt_config[self.adapter]

    @property
    def record(self):
        return get_method(self.config.method)

    @property
    def method(self) -> str:
        return self.config.method

    @property
    def name(self) -> str:
        return self._layer.sparse_adapt_names.get(self.adapter, self.adapter)

    @property
    def base_layer(self):
        return self._base if self._base is not None else self._layer.get_base_layer()

    def _factor(self, module: nn.Module) -> Tensor:
        w = module.weight
        return w if self._dtype is None or w.dtype == self._dtype else w.to(self._dtype)

    @property
    def lora_A(self) -> Tensor:
        return self._factor(self._layer.lora_A[self.adapter])

    @property
    def lora_B(self) -> Tensor:
        return self._factor(self._layer.lora_B[self.adapter])

    @property
    def scale(self) -> float:
        return self._layer.scaling[self.adapter]

    @property
    def dropout(self) -> nn.Module:
        return self._layer.lora_dropout[self.adapter]

    @property
    def r(self) -> int:
        return self._layer.r[self.adapter]

    @property
    def in_features(self) -> int:
        return self._layer.in_features

    @property
    def out_features(self) -> int:
        return self._layer.out_features

    @property
    def exact_grad(self) -> bool:
        return self.config.exact_grad

    # a method's extra state (RoseLoRA's scores and step) lives in the layer's lora_sparse_adapt_state[adapter]
    def register_buffer(self, name: str, tensor: Tensor) -> None:
        state = self._layer.lora_sparse_adapt_state
        if self.adapter not in state:
            state[self.adapter] = _MethodState()
        state[self.adapter].register_buffer(name, tensor)

    def __getattr__(self, name: str):
        if name.startswith("_"):
            raise AttributeError(name)
        state = self._layer.lora_sparse_adapt_state
        if self.adapter in state and name in state[self.adapter]._buffers:
            return state[self.adapter]._buffers[name]
        raise AttributeError(f"adapter {self.adapter!r} of {self.name} has no {name!r}")

    def register_forward_hook(self, hook):
        return self._layer.register_forward_hook(hook)

    def __repr__(self) -> str:
        return f"PeftAdapter({self.name}, adapter={self.adapter!r}, method={self.method})"


# ------------------------------------------------------------------------------------------------- the layer


class SparseLoraPeftLinear(_PeftLoraLinear):
    """PEFT's LoRA ``Linear``, whose adapters bound to a sparse_adapt method (``sparse_adapt_config[adapter]``) run
    that method in forward, merge, unmerge and ``get_delta_weight``; an adapter not bound runs PEFT's LoRA."""

    other_param_names = _PeftLoraLinear.other_param_names + ("sparse_adapt_config", "sparse_adapt_names")

    def update_layer(self, adapter_name: str, *args: Any, **kwargs: Any) -> None:
        self._sparse_init()  # PEFT calls this from __init__ and for each new adapter; its signature is PEFT's
        super().update_layer(adapter_name, *args, **kwargs)

    def _sparse_init(self) -> None:
        if "sparse_adapt_config" not in self.__dict__:
            self.sparse_adapt_config: Dict[str, SparseLoraConfig] = {}
            self.sparse_adapt_names: Dict[str, str] = {}
        if _STATE not in self._modules:
            self.lora_sparse_adapt_state = nn.ModuleDict()

    def sparse_adapt_bind(self, adapter: str, config: SparseLoraConfig, name: str) -> None:
        """Make `adapter` run `config.method` (called by get_peft_model / from_pretrained, after PEFT made it)."""
        self._sparse_init()
        if adapter not in self.lora_A:
            raise KeyError(f"{name} has no adapter {adapter!r}")
        record = get_method(config.method)
        record.check_layer(name, self.out_features, self.in_features, config.r)
        self.sparse_adapt_config[adapter] = config
        self.sparse_adapt_names[adapter] = name
        if adapter in self.lora_sparse_adapt_state:
            del self.lora_sparse_adapt_state[adapter]
        record.init_state(PeftAdapter(self, adapter))

    def _bound(self, adapter: str) -> bool:
        return adapter in self.__dict__.get("sparse_adapt_config", {})

    def _runs_own_forward(self, adapter: str) -> bool:
        """Bound to a method whose forward is not LoRA's (lors, sqft...): PEFT's `base(x) + B(A(x))` is wrong."""
        return self._bound(adapter) and (
            type(get_method(self.sparse_adapt_config[adapter].method)).forward is not Method.forward)

    def _masked_adapters(self, adapters) -> List[str]:
        return [a for a in adapters if a in self.lora_A and self._runs_own_forward(a)]

    def sparse_adapt_sites(self) -> List[PeftAdapter]:
        """The active adapters bound to a method, as sa.adapter_sites lists them."""
        return [PeftAdapter(self, a) for a in self.active_adapters if a in self.lora_A and self._bound(a)]

    def delete_adapter(self, adapter_name: str) -> None:
        super().delete_adapter(adapter_name)
        if _STATE in self._modules and adapter_name in self.lora_sparse_adapt_state:
            del self.lora_sparse_adapt_state[adapter_name]

    # ----------------------------------------------------------------------------------------------- compute

    def forward(self, x: Tensor, *args: Any, **kwargs: Any) -> Tensor:
        masked = self._masked_adapters(self.active_adapters)
        if not masked or self.disable_adapters or self.merged:
            return super().forward(x, *args, **kwargs)
        if kwargs.get("adapter_names") is not None:
            raise ValueError(f"{self.sparse_adapt_names[masked[0]]}: adapter_names (mixed adapter batches) cannot be "
                             f"used with method {self.sparse_adapt_config[masked[0]].method!r}, whose forward is "
                             f"not W x + B A x")
        active = [a for a in self.active_adapters if a in self.lora_A]
        if len(active) > 1:
            raise ValueError(f"{self.sparse_adapt_names[masked[0]]}: {len(active)} active adapters {active}, but "
                             f"method {self.sparse_adapt_config[masked[0]].method!r} computes through the merged "
                             f"weight and runs alone; set_adapter() one of them")
        for key in ("alora_offsets",):
            kwargs.pop(key, None)
        if args or kwargs:
            raise TypeError(f"nn.Linear takes one input, got extra arguments {list(kwargs) or len(args)}")
        weight = self.get_base_layer().weight
        adapter = PeftAdapter(self, masked[0], dtype=weight.dtype)
        x = self._cast_input_dtype(x, weight.dtype) if not torch.is_autocast_enabled(x.device.type) else x
        return adapter.record.forward(adapter, x)

    def get_delta_weight(self, adapter: str) -> Tensor:
        if not self._bound(adapter):
            return super().get_delta_weight(adapter)
        view = PeftAdapter(self, adapter, dtype=self.get_base_layer().weight.dtype)
        return view.record.delta_weight(view)

    @torch.no_grad()
    def merge(self, safe_merge: bool = False, adapter_names: Optional[List[str]] = None) -> None:
        adapter_names = check_adapters_to_merge(self, adapter_names)
        if not any(self._bound(a) for a in adapter_names):
            return super().merge(safe_merge=safe_merge, adapter_names=adapter_names)
        base = self.get_base_layer()
        for adapter in adapter_names:
            if adapter not in self.lora_A:
                continue
            if not self._bound(adapter):
                super().merge(safe_merge=safe_merge, adapter_names=[adapter])
                continue
            view = PeftAdapter(self, adapter, dtype=base.weight.dtype)
            view.record.check_merge(view)
            if safe_merge:
                merged = base.weight.data.clone()
                view_copy = PeftAdapter(self, adapter, _Weights(merged, base.bias), dtype=base.weight.dtype)
                view.record.fold(view_copy, +1)
                if not torch.isfinite(merged).all():
                    raise ValueError(f"NaNs detected in the merged weights. The adapter {adapter} seems to be broken")
                base.weight.data = merged
            else:
                view.record.fold(view, +1)
            self.merged_adapters.append(adapter)

    @torch.no_grad()
    def unmerge(self) -> None:
        if not self.merged:
            warnings.warn("Already unmerged. Nothing to do.", stacklevel=2)
            return
        while self.merged_adapters:
            adapter = self.merged_adapters.pop()
            if adapter not in self.lora_A:
                continue
            if self._bound(adapter):
                view = PeftAdapter(self, adapter, dtype=self.get_base_layer().weight.dtype)
                view.record.fold(view, -1)
            else:  # PEFT's own unmerge, for this one adapter
                rest, self.merged_adapters = self.merged_adapters, [adapter]
                try:
                    super().unmerge()
                finally:
                    self.merged_adapters = rest

    def __repr__(self) -> str:
        rep = super().__repr__()
        bound = {a: c.method for a, c in self.__dict__.get("sparse_adapt_config", {}).items()}
        return rep.replace("lora.SparseLoraPeftLinear(", f"sparse_adapt.SparseLoraPeftLinear(methods={bound}, ", 1)


# ------------------------------------------------------------------------------------------------ entry points


def _as_config(lora_config: peft.LoraConfig, method: str, options: Dict[str, Any]) -> SparseAdaptLoraConfig:
    if not isinstance(lora_config, peft.LoraConfig):
        raise TypeError(f"lora_config must be a peft.LoraConfig, got {type(lora_config).__name__}")
    if isinstance(lora_config, SparseAdaptLoraConfig):
        if method is not None or options:
            raise ValueError("lora_config already names its method (a SparseAdaptLoraConfig); pass no method/options")
        return copy.deepcopy(lora_config)
    values = {f.name: copy.deepcopy(getattr(lora_config, f.name)) for f in fields(peft.LoraConfig) if f.init}
    return SparseAdaptLoraConfig(**values, sparse_adapt={"method": method or "lors", **options})


def _bind_all(peft_model: "peft.PeftModel", adapter_name: str) -> None:
    """Bind every layer PEFT made for `adapter_name` to the config's method; refuse LoRA layers of other kinds."""
    config = peft_model.peft_config[adapter_name]
    base = peft_model.base_model.model
    found, foreign = 0, []
    for name, module in base.named_modules():
        if not isinstance(module, LoraLayer) or adapter_name not in module.r:  # r: every LoRA layer kind has it
            continue
        if isinstance(module, SparseLoraPeftLinear):
            module.sparse_adapt_bind(adapter_name, config.method_config(module.r[adapter_name],
                                                                        module.lora_alpha[adapter_name]), name)
            found += 1
        else:
            foreign.append(f"{name} ({type(module.get_base_layer()).__name__})")
    if foreign:
        raise ValueError(f"sparse_adapt methods adapt nn.Linear layers; target_modules also selects {foreign[:3]}"
                         f"{' ...' if len(foreign) > 3 else ''}: leave those out")
    if not found:
        raise ValueError(f"no nn.Linear layer was adapted for adapter {adapter_name!r}: check target_modules")


def _bind_or_undo(peft_model: "peft.PeftModel", adapter_name: str, fresh: bool, then=None) -> "peft.PeftModel":
    """Bind the adapter PEFT just made (and run `then`); on any failure put the model back as it came: the whole
    injection (fresh) or the one adapter."""
    try:
        _bind_all(peft_model, adapter_name)
        if then is not None:
            then()
    except BaseException:
        if fresh:
            peft_model.base_model.unload()
        else:
            peft_model.delete_adapter(adapter_name)
        raise
    return peft_model


def get_peft_model(model: nn.Module, lora_config: peft.LoraConfig, method: Optional[str] = None,
                   adapter_name: str = "default", calibration_batches=None, loss_fn=None,
                   autocast_adapter_dtype: bool = True, **options: Any) -> "peft.PeftModel":
    """``peft.get_peft_model(model, lora_config)`` whose LoRA layers run `method` (default ``lors``).

    `options` are the method's own config fields: ``exact_grad=True`` (lors), ``sparsity``, ``beta``, ``t_init``,
    ``t_final``, ``clip`` (roselora). `calibration_batches` (with an optional ``loss_fn(model, batch)``) run
    LoRS's gradient-SVD init (``sa.gradient_svd_init_``) on the new adapters; without them A starts as PEFT's
    ``init_lora_weights`` says and B at zero. ``autocast_adapter_dtype`` is PEFT's: True keeps the adapters of a
    float16 / bfloat16 model in float32. Everything is checked before the model changes, and a failure after that
    (a layer the method cannot take, the calibration pass) puts the model back as it came.
    """
    config = _as_config(lora_config, method, options)
    peft_model = peft.get_peft_model(model, config, adapter_name=adapter_name,
                                     autocast_adapter_dtype=autocast_adapter_dtype)
    init = None if calibration_batches is None else lambda: gradient_svd_init_(peft_model, calibration_batches,
                                                                                loss_fn)
    return _bind_or_undo(peft_model, adapter_name, fresh=True, then=init)


def _read_config(path: Union[str, os.PathLike]) -> SparseAdaptLoraConfig:
    file = Path(path) / "adapter_config.json"
    if not file.is_file():
        raise FileNotFoundError(f"{file} does not exist: not a PEFT adapter directory")
    try:
        saved = json.loads(file.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{file} is not valid JSON ({e})") from None
    if not isinstance(saved, dict) or saved.get("peft_type") != "LORA":
        raise ValueError(f"{file} is not a PEFT LoRA adapter config")
    if not isinstance(saved.get("sparse_adapt"), dict):
        raise ValueError(f"{file} has no sparse_adapt entry: it was not saved from sparse_adapt.peft; load it "
                         f"with peft.PeftModel.from_pretrained")
    known = {f.name for f in fields(SparseAdaptLoraConfig) if f.init}
    ignored = sorted(set(saved) - known - {"auto_mapping"})
    if ignored:
        warnings.warn(f"{file}: ignoring fields this PEFT version does not know: {ignored}", stacklevel=3)
    return SparseAdaptLoraConfig(**{k: v for k, v in saved.items() if k in known})


def _restore_state(peft_model: "peft.PeftModel", path: Union[str, os.PathLike], adapter_name: str) -> None:
    """Put the method state saved in the adapter file (RoseLoRA's scores and pruning step) back into the layers
    of `adapter_name`, which binding the method has just initialised: training resumes where it stopped. (PEFT's
    load cannot: in from_pretrained it runs before the binding creates the state.) A file
    saved without it (a PEFT version that did not write it) leaves the fresh state."""
    from peft.utils import load_peft_weights

    marker = f".{_STATE}."
    saved = {k: v for k, v in load_peft_weights(str(path), device="cpu").items() if marker in k}
    if not saved:
        return
    buffers = dict(peft_model.named_buffers())
    for key, value in saved.items():
        head, _, name = key.rpartition(".")
        target = f"{head}.{adapter_name}.{name}"
        if target not in buffers:
            raise ValueError(f"{path}: the adapter file holds method state {key!r} that the model has no place for "
                             f"(was it saved from a different model or method?)")
        if buffers[target].shape != value.shape:
            raise ValueError(f"{path}: method state {key!r} has shape {tuple(value.shape)}, the model's "
                             f"{tuple(buffers[target].shape)}")
        with torch.no_grad():
            buffers[target].copy_(value)


def from_pretrained(model: nn.Module, path: Union[str, os.PathLike], adapter_name: str = "default",
                    is_trainable: bool = False, **kwargs: Any) -> "peft.PeftModel":
    """``peft.PeftModel.from_pretrained(model, path)`` for a directory saved from a model of
    :func:`get_peft_model`: the adapter comes back running its method. `kwargs` go to PEFT."""
    config = _read_config(path)
    config.inference_mode = not is_trainable
    peft_model = peft.PeftModel.from_pretrained(model, str(path), adapter_name=adapter_name,
                                                is_trainable=is_trainable, config=config, **kwargs)
    return _bind_or_undo(peft_model, adapter_name, fresh=True,
                         then=lambda: _restore_state(peft_model, path, adapter_name))


def load_adapter(peft_model: "peft.PeftModel", path: Union[str, os.PathLike], adapter_name: str,
                 is_trainable: bool = False, **kwargs: Any) -> "peft.PeftModel":
    """``peft_model.load_adapter(path, adapter_name)`` for a second adapter saved from sparse_adapt.peft."""
    config = _read_config(path)
    config.inference_mode = not is_trainable
    if adapter_name in peft_model.peft_config:
        raise ValueError(f"the model already has an adapter named {adapter_name!r}")
    # PEFT's load_adapter would read the config as a plain LoraConfig: add the adapter with ours, then load into it.
    peft_model.add_adapter(adapter_name, config)

    def load():
        # the method is bound before this load, so PEFT's own key mapping fills its state (lora_sparse_adapt_state)
        peft_model.load_adapter(str(path), adapter_name=adapter_name, is_trainable=is_trainable, **kwargs)
        if is_trainable and hasattr(peft_model, "set_requires_grad"):
            peft_model.set_requires_grad(adapter_name)

    return _bind_or_undo(peft_model, adapter_name, fresh=False, then=load)


def add_adapter(peft_model: "peft.PeftModel", adapter_name: str, lora_config: peft.LoraConfig,
                method: Optional[str] = None, **options: Any) -> "peft.PeftModel":
    """``peft_model.add_adapter(adapter_name, lora_config)`` whose layers run `method`."""
    config = _as_config(lora_config, method, options)
    peft_model.add_adapter(adapter_name, config)
    return _bind_or_undo(peft_model, adapter_name, fresh=False)


__all__ = ["PEFT_MIN_VERSION", "PeftAdapter", "SparseAdaptLoraConfig", "SparseLoraPeftLinear", "TESTED_PEFT_VERSIONS",
           "add_adapter", "from_pretrained", "get_peft_model", "load_adapter", "peft_methods"]
