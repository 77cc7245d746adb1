"""Save and load adapters (adapter_config.json + adapter_model.safetensors), and export to PEFT's LoRA format.

Writes are atomic (temporary file, fsync, rename). Loads validate everything -- JSON, file integrity, the set
of keys, every shape -- before copying anything into the model, so a bad file never half-loads.
"""

import dataclasses
import json
import os
import tempfile
from pathlib import Path
from typing import Dict, Union

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from ..distributed import assign_, barrier, full, rank
from .config import SparseLoraConfig
from .layer import adapter_layers
from .method import get_method
from .model import adapter_config, inject

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
FORMAT = "sparse_adapt"
FORMAT_VERSION = 1
FACTOR_NAMES = ("lora_A", "lora_B")


def _atomic_write(path: Path, write) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(tmp)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def _write_json(path: Path, obj) -> None:
    def write(tmp):
        with open(tmp, "w") as f:
            json.dump(obj, f, indent=2, sort_keys=True)
            f.write("\n")

    _atomic_write(path, write)


def _write_tensors(path: Path, tensors: Dict[str, torch.Tensor]) -> None:
    cpu = {k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}
    _atomic_write(path, lambda tmp: save_file(cpu, tmp, metadata={"format": "pt"}))


def adapter_state(model: nn.Module) -> Dict[str, torch.Tensor]:
    """Every tensor an adapter needs to be restored and resumed, keyed '<module>.<name>'."""
    state = {}
    for name, layer in adapter_layers(model):
        for attr in FACTOR_NAMES + layer.record.state_names:
            state[f"{name}.{attr}"] = getattr(layer, attr)
    return state


def save_adapter(model: nn.Module, directory: Union[str, os.PathLike]) -> Path:
    """Write the adapters (tensors only, plus RoseLoRA's scores and step) and their config to ``directory``.
    In a distributed job call it on every rank: sharded tensors are gathered, rank 0 writes the same file a
    single process would, the others wait for it."""
    config = adapter_config(model)
    directory = Path(directory)
    modules = {name: [layer.out_features, layer.in_features] for name, layer in adapter_layers(model)}
    state = {k: full(v) for k, v in adapter_state(model).items()}
    if rank() == 0:
        directory.mkdir(parents=True, exist_ok=True)
        _write_tensors(directory / WEIGHTS_NAME, state)
        _write_json(directory / CONFIG_NAME, {"format": FORMAT, "format_version": FORMAT_VERSION,
                                              "config": config.to_dict(), "modules": modules})
    barrier()
    return directory


def _read_config(directory: Path) -> dict:
    path = directory / CONFIG_NAME
    try:
        meta = json.loads(path.read_text())
    except FileNotFoundError:
        raise FileNotFoundError(f"no {CONFIG_NAME} in {directory}") from None
    except json.JSONDecodeError as e:
        raise ValueError(f"{path} is not valid JSON (truncated or corrupt?): {e}") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise ValueError(f"{path} is not a sparse_adapt adapter config (for PEFT adapters use peft)")
    if meta.get("format_version") != FORMAT_VERSION:
        raise ValueError(f"{path} has format_version {meta.get('format_version')}; this sparse_adapt reads "
                         f"{FORMAT_VERSION}")
    return meta


def _read_tensors(path: Path) -> Dict[str, torch.Tensor]:
    if not path.exists():
        raise FileNotFoundError(f"no {path.name} in {path.parent}")
    try:
        return load_file(path)
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        raise ValueError(f"{path} is truncated or corrupt: {e}") from None


def load_adapter(model: nn.Module, directory: Union[str, os.PathLike]) -> nn.Module:
    """Restore adapters saved by :func:`save_adapter` into ``model``: injecting them first if the model has none
    (with the saved config), else into the existing ones. Refuses, with a clear error and before changing the
    model, a file that is truncated or corrupt, has missing or extra tensors, or was made for other shapes."""
    directory = Path(directory)
    meta = _read_config(directory)
    config = SparseLoraConfig.from_dict(meta["config"])
    tensors = _read_tensors(directory / WEIGHTS_NAME)

    existing = list(adapter_layers(model))
    if existing:
        current = existing[0][1].config
        if (current.method, current.r) != (config.method, config.r):
            raise ValueError(f"the model's adapters are {current.method} r={current.r}; the saved ones are "
                             f"{config.method} r={config.r}")
    else:
        # The saved weights replace any initialisation, so inject with a data-free init.
        target = dataclasses.replace(config, target_modules=list(meta["modules"]), init="zeros_B")
        inject(model, target)
        for _, layer in adapter_layers(model):
            layer.config = config
    saved_modules = set(meta["modules"])
    model_modules = {name for name, _ in adapter_layers(model)}
    if saved_modules != model_modules:
        raise ValueError(f"the saved adapter covers other modules than the model's: missing in the model "
                         f"{sorted(saved_modules - model_modules)[:5]}, not in the file "
                         f"{sorted(model_modules - saved_modules)[:5]}")

    expected = adapter_state(model)
    missing, unexpected = sorted(set(expected) - set(tensors)), sorted(set(tensors) - set(expected))
    if missing or unexpected:
        raise ValueError(f"{directory / WEIGHTS_NAME} does not match the model's adapters: missing {missing[:5]}, "
                         f"unexpected {unexpected[:5]}")
    for key, target in expected.items():
        if tuple(tensors[key].shape) != tuple(target.shape):
            raise ValueError(f"{key}: the file has shape {tuple(tensors[key].shape)}, the model {tuple(target.shape)} "
                             f"(made for another model?)")
    with torch.no_grad():
        for key, target in expected.items():
            assign_(target, tensors[key].to(device=target.device, dtype=target.dtype))
    return model


def export_peft(model: nn.Module, directory: Union[str, os.PathLike]) -> Path:
    """Write lora / roselora adapters in PEFT's LoRA format, loadable with ``peft.PeftModel.from_pretrained`` on
    the un-adapted base model (for inference). RoseLoRA's sparse A and B are stored as they are."""
    config = adapter_config(model)
    if not get_method(config.method).exports_to_peft:
        raise ValueError(f"PEFT's LoRA format adds B @ A densely; it cannot express {config.method}'s update "
                         f"(merge it with sa.merge instead)")
    directory = Path(directory)
    names = [name for name, _ in adapter_layers(model)]
    tensors = {}
    for name, layer in adapter_layers(model):
        tensors[f"base_model.model.{name}.lora_A.weight"] = full(layer.lora_A)
        tensors[f"base_model.model.{name}.lora_B.weight"] = full(layer.lora_B)
    if rank() != 0:
        barrier()
        return directory
    directory.mkdir(parents=True, exist_ok=True)
    _write_tensors(directory / WEIGHTS_NAME, tensors)
    _write_json(directory / CONFIG_NAME, {
        "peft_type": "LORA", "r": config.r, "lora_alpha": config.alpha, "target_modules": names,
        "lora_dropout": config.dropout, "bias": "none", "use_rslora": config.use_rslora, "fan_in_fan_out": False,
        "init_lora_weights": True, "inference_mode": True, "task_type": None, "base_model_name_or_path": None,
        "modules_to_save": None,
    })
    barrier()
    return directory
