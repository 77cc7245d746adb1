"""Serve what you merged: 2:4-sparse checkpoints in compressed-tensors' ``sparse-24-bitmask`` format.

Pruned models in the wild come from llm-compressor, which saves them with ``compressed-tensors``: each 2:4 linear
weight as ``<name>.compressed`` (the kept values, ``(out, in/2)``), ``<name>.bitmask`` (their positions, packed
bits) and ``<name>.shape``, and ``config.json``'s ``quantization_config`` naming the format. This module

- **loads** such a checkpoint as a plain dense model to fine-tune (:func:`load_sparse24`): its zeros are what
  LoRS / SQFT keep (their mask is ``W != 0``), and every weight is checked to be 2:4 on the way in;
- **saves** a merged model in that format (:func:`save_sparse24`), after checking that every linear it compresses
  is exactly 2:4 along its inputs (the format's compressor would silently keep the top 2 of a group of 3).

The per-weight encoding is compressed-tensors' own (``Sparse24BitMaskTensor``): ``pip install
"compressed-tensors==0.13.0"`` -- the 2:4 formats were removed from compressed-tensors after 0.14 and from vLLM in
2026 (vllm-project/vllm#36799), so serving with 2:4 kernels needs a vLLM release from before that removal.
"""

import json
import os
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Union

import torch
from torch import Tensor, nn

from .adapters import adapter_sites, find_targets
from .adapters.model import matches_targets

FORMAT = "sparse-24-bitmask"
PARTS = ("compressed", "bitmask", "shape")
WEIGHTS_NAME = "model.safetensors"


def _compressed_tensors():
    try:
        from compressed_tensors.compressors.sparse_compressors.sparse_24_bitmask import Sparse24BitMaskTensor
        from compressed_tensors.config import Sparse24BitMaskConfig
    except ImportError as e:
        raise ImportError(f"2:4 checkpoints need compressed-tensors with its {FORMAT} format: pip install "
                          f"'compressed-tensors==0.13.0' (releases after 0.14 dropped it) -- {e}") from None
    return Sparse24BitMaskTensor, Sparse24BitMaskConfig


def violations_2_4(weight: Tensor) -> int:
    """Groups of 4 consecutive inputs of a row with more than 2 non-zeros (0: the weight is 2:4)."""
    out, in_ = weight.shape
    if in_ % 4:
        raise ValueError(f"in_features={in_} is not divisible by 4")
    return int(((weight.detach().reshape(out, in_ // 4, 4) != 0).sum(-1) > 2).sum())


def _targets(model: nn.Module, ignore: Sequence[str]) -> List[str]:
    """The linears to compress: inject's 'all-linear' (every nn.Linear but the output embedding) less `ignore`."""
    return [n for n in find_targets(model, "all-linear") if not matches_targets(n, list(ignore))]


def save_sparse24(model: nn.Module, directory: Union[str, os.PathLike], tokenizer=None,
                  dtype: Optional[torch.dtype] = None, ignore: Sequence[str] = ()) -> Path:
    """Write a merged Hugging Face model as a compressed-tensors 2:4 checkpoint (``sparse-24-bitmask``).

    Every ``nn.Linear`` except the output embedding and `ignore` is compressed and must be exactly 2:4 along its
    inputs; anything else (embeddings, norms, the head) is stored dense. `dtype` casts the floating tensors
    (``torch.bfloat16`` is what a server runs). The model is not changed. Refused, with nothing written: a model
    that still has adapters (merge first), a target that is not 2:4 (named, with its count of bad groups).
    """
    Sparse24BitMaskTensor, Sparse24BitMaskConfig = _compressed_tensors()
    from safetensors.torch import save_file

    if any(True for _ in adapter_sites(model)) or any("lora_" in n for n, _ in model.named_parameters()):
        raise ValueError("the model still has adapters: merge them first (sa.merge(model) or merge_and_unload())")
    if not hasattr(model, "config") or not hasattr(model.config, "to_dict"):
        raise TypeError(f"save_sparse24 writes a Hugging Face model (with .config), got {type(model).__name__}")
    targets = _targets(model, ignore)
    if not targets:
        raise ValueError("no nn.Linear layer to compress (check ignore)")
    bad = {}
    for name in targets:
        weight = model.get_submodule(name).weight
        try:
            n = violations_2_4(weight)
        except ValueError as e:
            raise ValueError(f"{name}: {e}; leave it out with ignore=[{name.rsplit('.', 1)[-1]!r}]") from None
        if n:
            bad[name] = n
    if bad:
        first = next(iter(bad))
        raise ValueError(f"{len(bad)} layer(s) are not 2:4, e.g. {first}: {bad[first]} group(s) of 4 inputs with "
                         f"more than 2 non-zeros; prune with sa.prune (sparsity='2:4') and merge with a method that "
                         f"keeps the zeros (lors, sqft, spp)")

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    state = model.state_dict()
    tensors: Dict[str, Tensor] = {}
    zeros = total = 0
    compressed = set(targets)
    for key, value in state.items():
        module, _, leaf = key.rpartition(".")
        value = value.detach()
        if dtype is not None and value.is_floating_point():
            value = value.to(dtype)
        if module in compressed and leaf == "weight":
            tensors.update(Sparse24BitMaskTensor.from_dense(value.cpu().contiguous()).dict(module))
            zeros += int((value == 0).sum())
            total += value.numel()
        else:
            tensors[key] = value.cpu().contiguous()
    _drop_tied(model, tensors)
    config = model.config.to_dict()
    config["quantization_config"] = {
        "quant_method": "compressed-tensors",
        "sparsity_config": Sparse24BitMaskConfig(
            targets=["Linear"], ignore=sorted(set(_ignored(model, targets))), global_sparsity=zeros / max(total, 1),
        ).model_dump(),
        "version": _version(),
    }
    if dtype is not None:
        config["torch_dtype"] = config["dtype"] = str(dtype).removeprefix("torch.")
    save_file(tensors, str(directory / WEIGHTS_NAME), metadata={"format": "pt"})
    (directory / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True, default=str) + "\n")
    if getattr(model, "generation_config", None) is not None:
        model.generation_config.save_pretrained(directory)
    if tokenizer is not None:
        tokenizer.save_pretrained(directory)
    return directory


def _ignored(model: nn.Module, targets: List[str]) -> List[str]:
    """The Linear modules left dense, as compressed-tensors' `ignore` lists them (vLLM reads it per module)."""
    compressed = set(targets)
    return [n for n, m in model.named_modules() if isinstance(m, nn.Linear) and n not in compressed]


def _drop_tied(model: nn.Module, tensors: Dict[str, Tensor]) -> None:
    """A tied output embedding is stored once, as Hugging Face checkpoints do."""
    if not getattr(model.config, "tie_word_embeddings", False):
        return
    head, emb = model.get_output_embeddings(), model.get_input_embeddings()
    if head is not None and emb is not None and head.weight is emb.weight:
        for name, module in model.named_modules():
            if module is head:
                tensors.pop(f"{name}.weight", None)


def _version() -> str:
    from importlib.metadata import version

    return version("compressed-tensors")


def read_sparse24(directory: Union[str, os.PathLike]) -> Dict[str, Tensor]:
    """The dense state dict of a ``sparse-24-bitmask`` checkpoint (every compressed weight decoded and checked)."""
    Sparse24BitMaskTensor, _ = _compressed_tensors()
    from safetensors.torch import load_file

    directory = Path(directory)
    _read_config(directory)
    files = sorted(directory.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"{directory} has no .safetensors weights")
    raw: Dict[str, Tensor] = {}
    for f in files:
        raw.update(load_file(str(f)))
    dense: Dict[str, Tensor] = {}
    groups: Dict[str, Dict[str, Tensor]] = {}
    for key, value in raw.items():
        module, _, leaf = key.rpartition(".")
        if leaf in PARTS:
            groups.setdefault(module, {})[leaf] = value
        else:
            dense[key] = value
    for module, parts in groups.items():
        missing = [p for p in PARTS if p not in parts]
        if missing:
            raise ValueError(f"{directory}: {module} has {sorted(parts)} but not {missing}: a damaged {FORMAT} "
                             f"checkpoint")
        shape = parts["shape"].flatten().tolist()
        rows, cols = shape if len(shape) == 2 else (None, None)
        if rows is None or tuple(parts["compressed"].shape) != (rows, cols // 2) or \
                tuple(parts["bitmask"].shape) != (rows, (cols + 7) // 8):
            raise ValueError(f"{directory}: {module}'s compressed {tuple(parts['compressed'].shape)} / bitmask "
                             f"{tuple(parts['bitmask'].shape)} do not fit its shape {shape}")
        if _popcount(parts["bitmask"]) != parts["compressed"].numel():
            raise ValueError(f"{directory}: {module}'s bitmask marks a different number of entries than it has "
                             f"values")
        weight = Sparse24BitMaskTensor.from_compressed_data(parts["shape"], parts["compressed"],
                                                            parts["bitmask"]).decompress()
        n = violations_2_4(weight)
        if n:
            raise ValueError(f"{directory}: {module} decodes to a weight that is not 2:4 ({n} bad groups)")
        dense[f"{module}.weight"] = weight
    if not groups:
        raise ValueError(f"{directory}: no compressed weights in a checkpoint whose config says {FORMAT}")
    return dense


def _popcount(bits: Tensor) -> int:
    table = torch.tensor([bin(i).count("1") for i in range(256)], dtype=torch.int64)
    return int(table[bits.to(torch.int64).flatten()].sum())


def _read_config(directory: Path) -> dict:
    file = directory / "config.json"
    if not file.is_file():
        raise FileNotFoundError(f"{file} does not exist: not a Hugging Face checkpoint")
    config = json.loads(file.read_text(encoding="utf-8"))
    q = config.get("quantization_config") or config.get("compression_config")
    if not isinstance(q, dict) or q.get("quant_method") not in ("compressed-tensors", "sparseml"):
        raise ValueError(f"{file} has no compressed-tensors quantization_config: load it with from_pretrained")
    sparsity = q.get("sparsity_config") or {}
    if sparsity.get("format") != FORMAT:
        raise ValueError(f"{file}: sparsity format {sparsity.get('format')!r}; this reads {FORMAT!r} (2:4, "
                         f"unquantized)")
    if q.get("config_groups"):
        raise ValueError(f"{file} is also quantized (config_groups): only unquantized 2:4 checkpoints are read")
    return config


def load_sparse24(directory: Union[str, os.PathLike], dtype: torch.dtype = torch.float32):
    """A Hugging Face causal LM from a ``sparse-24-bitmask`` checkpoint, dense in memory with its zeros: the model to
    fine-tune with LoRS / SQFT (whose mask is ``W != 0``) or to evaluate."""
    from transformers import AutoConfig, AutoModelForCausalLM

    directory = Path(directory)
    state = read_sparse24(directory)
    config = AutoConfig.from_pretrained(directory)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    state = {k: v.to(dtype) if v.is_floating_point() else v for k, v in state.items()}
    missing, unexpected = model.load_state_dict(state, strict=False)
    tied = {k for k in missing if k.endswith("lm_head.weight")} if config.tie_word_embeddings else set()
    if set(missing) - tied or unexpected:
        raise ValueError(f"{directory}: weights do not match {type(model).__name__}: missing "
                         f"{sorted(set(missing) - tied)[:3]}, unexpected {sorted(unexpected)[:3]}")
    if tied:
        model.tie_weights()
    return model.eval()

