"""Save and load adapters (adapter_config.json + adapter_model.safetensors), and export to PEFT's LoRA format.

Writes are atomic (temporary file, fsync, rename), and the weights file carries the config with the id of its save,
so a pair of files from two saves is recognised. Loads validate everything -- that pair, JSON, file integrity, the
set of keys, every shape -- before changing the model, and undo a load that fails midway, so a bad file never
half-loads.
"""

import dataclasses
import json
import os
import tempfile
import uuid
from pathlib import Path
from typing import Dict, Optional, Tuple, Union

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file
from torch import nn

from ..distributed import assign_, barrier, full, rank
from .config import SparseLoraConfig
from .layer import SparseLoraLinear, adapter_layers
from .method import get_method
from .model import adapter_config, inject, restored_on_failure

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
FORMAT = "sparse_adapt"
FORMAT_VERSION = 2  # 2: the config is also inside the weights file, with the id of the save both came from
READABLE_VERSIONS = (1, 2)
METADATA_KEY = "sparse_adapt"  # the safetensors metadata entry that holds the config
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


def _write_tensors(path: Path, tensors: Dict[str, torch.Tensor], metadata: Optional[Dict[str, str]] = None) -> None:
    cpu = {k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}
    _atomic_write(path, lambda tmp: save_file(cpu, tmp, metadata={"format": "pt", **(metadata or {})}))


def adapter_state(model: nn.Module) -> Dict[str, torch.Tensor]:
    """Every tensor an adapter needs to be restored and resumed, keyed '<module>.<name>'."""
    state = {}
    for name, layer in adapter_layers(model):
        for attr in FACTOR_NAMES + layer.record.state_names:
            state[f"{name}.{attr}"] = getattr(layer, attr)
    return state


def save_adapter(model: nn.Module, directory: Union[str, os.PathLike]) -> Path:
    """Write the adapters (tensors only, plus RoseLoRA's scores and step) and their config to ``directory``.

    Each file is replaced atomically, the weights first; the weights file also carries the config and the id of
    this save, so a crash between the two replacements leaves a pair that :func:`load_adapter` recognises as
    mismatched (and the weights file still loads on its own once the stale config is removed). In a distributed
    job call it on every rank: sharded tensors are gathered, rank 0 writes the same file a single process would,
    the others wait for it."""
    config = adapter_config(model)
    directory = Path(directory)
    modules = {name: [layer.out_features, layer.in_features] for name, layer in adapter_layers(model)}
    state = {k: full(v) for k, v in adapter_state(model).items()}
    if rank() == 0:
        meta = {"format": FORMAT, "format_version": FORMAT_VERSION, "config": config.to_dict(), "modules": modules,
                "save_id": uuid.uuid4().hex}
        directory.mkdir(parents=True, exist_ok=True)
        _write_tensors(directory / WEIGHTS_NAME, state, {METADATA_KEY: json.dumps(meta, sort_keys=True)})
        _write_json(directory / CONFIG_NAME, meta)
    barrier()
    return directory


def _check_meta(meta, where: str) -> dict:
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise ValueError(f"{where} is not a sparse_adapt adapter config (for PEFT adapters use peft)")
    if meta.get("format_version") not in READABLE_VERSIONS:
        raise ValueError(f"{where} has format_version {meta.get('format_version')}; this sparse_adapt reads "
                         f"{list(READABLE_VERSIONS)}")
    if not isinstance(meta.get("config"), dict):
        raise ValueError(f"{where} has no adapter config")
    modules = meta.get("modules")
    if not (isinstance(modules, dict) and modules and all(
            isinstance(n, str) and isinstance(s, list) and len(s) == 2
            and all(isinstance(d, int) and not isinstance(d, bool) and d > 0 for d in s) for n, s in modules.items())):
        raise ValueError(f"{where}: 'modules' must map module names to [out_features, in_features]")
    return meta


def _read_config(directory: Path) -> Optional[dict]:
    path = directory / CONFIG_NAME
    try:
        meta = json.loads(path.read_text())
    except FileNotFoundError:
        return None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{path} is not valid JSON (truncated or corrupt?): {e}") from None
    return _check_meta(meta, str(path))


def _read_tensors(path: Path) -> Tuple[Dict[str, torch.Tensor], Optional[dict]]:
    """The tensors and the config embedded in the file (None in a format-1 file)."""
    try:
        tensors = load_file(path)
        with safe_open(path, framework="pt") as f:
            metadata = f.metadata() or {}
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        raise ValueError(f"{path} is truncated or corrupt: {e}") from None
    if METADATA_KEY not in metadata:
        return tensors, None
    try:
        embedded = json.loads(metadata[METADATA_KEY])
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: its embedded adapter config is corrupt: {e}") from None
    return tensors, _check_meta(embedded, f"the config inside {path}")


def _read(directory: Path) -> Tuple[dict, Dict[str, torch.Tensor]]:
    """The config and tensors of a saved adapter, checked to come from one save."""
    config_path, weights_path = directory / CONFIG_NAME, directory / WEIGHTS_NAME
    meta = _read_config(directory)
    if not weights_path.exists():
        raise FileNotFoundError(f"no {WEIGHTS_NAME} in {directory}" if meta else
                                f"no {CONFIG_NAME} and no {WEIGHTS_NAME} in {directory}")
    tensors, embedded = _read_tensors(weights_path)
    if meta is None:
        if embedded is None:
            raise FileNotFoundError(f"no {CONFIG_NAME} in {directory}, and {WEIGHTS_NAME} carries no config")
        return embedded, tensors  # the weights file alone is complete
    if meta["format_version"] >= 2:
        if embedded is None or embedded.get("save_id") != meta.get("save_id"):
            raise ValueError(
                f"{config_path} and {weights_path} are not from the same save (save "
                f"{meta.get('save_id')} vs {embedded.get('save_id') if embedded else 'none'}): an interrupted "
                f"save_adapter, or files mixed from two saves. The weights file carries its own config: remove "
                f"{CONFIG_NAME} to load it as saved, or save again")
        if embedded != meta:
            raise ValueError(f"{config_path} was edited after the save: it differs from the config saved inside "
                             f"{weights_path}")
    return meta, tensors


# Config fields that may differ between a saved adapter and the adapters it is loaded into: how A was first
# initialised, and how the modules were selected (the set of modules is compared on its own).
_LOAD_IGNORES = ("init", "target_modules")


def _check_compatible(current: SparseLoraConfig, saved: SparseLoraConfig) -> None:
    a, b = current.to_dict(), saved.to_dict()
    differ = [k for k in sorted(set(a) | set(b)) if k not in _LOAD_IGNORES and a.get(k) != b.get(k)]
    if differ:
        details = ", ".join(f"{k}: model {a.get(k)!r}, file {b.get(k)!r}" for k in differ)
        raise ValueError(f"the model's adapters are {current.method} r={current.r}; the saved ones are "
                         f"{saved.method} r={saved.r} -- their configs differ ({details}). Load into a model without "
                         f"adapters (sa.unload first) to take the saved config")


def _expected_shapes(model: nn.Module, config: SparseLoraConfig, modules: Dict[str, list]) -> Dict[str, tuple]:
    """The shape of every tensor an adapter with `config` on `modules` has, worked out on the meta device (nothing
    allocated), after checking that each module exists in the model with the saved shape."""
    shapes = {}
    for name, (out_features, in_features) in modules.items():
        try:
            module = model.get_submodule(name)
        except AttributeError:
            raise ValueError(f"the saved adapter covers {name!r}, which the model does not have "
                             f"(made for another model?)") from None
        if not isinstance(module, nn.Linear):
            raise ValueError(f"the saved adapter covers {name!r}, which is a {type(module).__name__} in the model, "
                             f"not an nn.Linear")
        if tuple(module.weight.shape) != (out_features, in_features):
            raise ValueError(f"{name}: the model's weight is {tuple(module.weight.shape)}, the saved adapter was "
                             f"made for ({out_features}, {in_features}) (made for another model?)")
        probe = SparseLoraLinear(nn.Linear(in_features, out_features, bias=False, device="meta"), config, name)
        for attr in FACTOR_NAMES + probe.record.state_names:
            shapes[f"{name}.{attr}"] = tuple(getattr(probe, attr).shape)
    return shapes


def _check_tensors(path: Path, tensors: Dict[str, torch.Tensor], expected: Dict[str, tuple]) -> None:
    missing, unexpected = sorted(set(expected) - set(tensors)), sorted(set(tensors) - set(expected))
    if missing or unexpected:
        raise ValueError(f"{path} does not match the model's adapters: missing {missing[:5]}, "
                         f"unexpected {unexpected[:5]}")
    for key, shape in expected.items():
        if tuple(tensors[key].shape) != shape:
            raise ValueError(f"{key}: the file has shape {tuple(tensors[key].shape)}, the model {shape} "
                             f"(made for another model?)")


def load_adapter(model: nn.Module, directory: Union[str, os.PathLike]) -> nn.Module:
    """Restore adapters saved by :func:`save_adapter` into ``model``: injecting them first if the model has none
    (with the saved config), else into the existing ones, whose config must match the saved one.

    Everything is checked before the model changes -- that the two files come from one save, that neither is
    truncated or corrupt, the set of tensors, every shape (worked out without allocating), that the modules exist
    with the saved shapes, that existing adapters are not merged -- and a failure while loading puts the model
    back as it was: a refused or failed load changes nothing."""
    directory = Path(directory)
    meta, tensors = _read(directory)
    config = SparseLoraConfig.from_dict(meta["config"])
    weights_path = directory / WEIGHTS_NAME

    existing = list(adapter_layers(model))
    if existing:
        _check_compatible(existing[0][1].config, config)
        merged = [name for name, layer in existing if layer.merged]
        if merged:
            raise ValueError(f"the model's adapters are merged ({merged[:3]}); sa.unmerge(model) before loading "
                             f"new adapter weights into them")
        saved_modules, model_modules = set(meta["modules"]), {name for name, _ in existing}
        if saved_modules != model_modules:
            raise ValueError(f"the saved adapter covers other modules than the model's: missing in the model "
                             f"{sorted(saved_modules - model_modules)[:5]}, not in the file "
                             f"{sorted(model_modules - saved_modules)[:5]}")
        expected = {k: tuple(v.shape) for k, v in adapter_state(model).items()}
    else:
        expected = _expected_shapes(model, config, meta["modules"])
    _check_tensors(weights_path, tensors, expected)

    if existing:
        before = {k: v.detach().clone() for k, v in adapter_state(model).items()}
        try:
            _assign_all(model, tensors)
        except BaseException:
            _assign_all(model, before)
            raise
        return model
    # The saved weights replace any initialisation, so inject with a data-free init.
    target = dataclasses.replace(config, target_modules=list(meta["modules"]), init="zeros_B")
    with restored_on_failure(model):
        inject(model, target)
        for _, layer in adapter_layers(model):
            layer.config = config
        _assign_all(model, tensors)
    return model


def _assign_all(model: nn.Module, tensors: Dict[str, torch.Tensor]) -> None:
    with torch.no_grad():
        for key, target in adapter_state(model).items():
            assign_(target, tensors[key].to(device=target.device, dtype=target.dtype))


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
