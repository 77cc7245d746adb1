"""sparse_adapt.serving: 2:4 checkpoints in compressed-tensors' sparse-24-bitmask format, with the real package --
our files read by compressed-tensors' own ModelCompressor, its files read by us, round trips exact, bad input
refused by name."""

import copy
import json
import shutil

import pytest
import torch

# compressed-tensors is a test requirement (requirements-dev.txt): imported, not skipped when missing
from compressed_tensors.compressors import ModelCompressor
from compressed_tensors.config import Sparse24BitMaskConfig
from torch import nn

import sparse_adapt as sa
from sparse_adapt import serving

from toy_models import prune_, tiny_llama


def pruned_llama(seed=0, pattern="2:4"):
    torch.manual_seed(seed)
    return prune_(tiny_llama(), pattern, seed).eval()


def ids(seed=0):
    return torch.randint(0, 96, (2, 7), generator=torch.Generator().manual_seed(seed))


def linear_names(model):
    return [n for n, m in model.named_modules() if isinstance(m, nn.Linear) and n != "lm_head"]


def test_round_trip_exact(tmp_path):
    model = pruned_llama()
    serving.save_sparse24(model, tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())["quantization_config"]
    assert config["quant_method"] == "compressed-tensors"
    assert config["sparsity_config"]["format"] == "sparse-24-bitmask"
    assert config["sparsity_config"]["sparsity_structure"] == "2:4"
    assert config["sparsity_config"]["ignore"] == ["lm_head"]
    loaded = serving.load_sparse24(tmp_path)
    want = model.state_dict()
    assert loaded.state_dict().keys() == want.keys()
    assert all(torch.equal(v, want[k]) for k, v in loaded.state_dict().items())
    torch.testing.assert_close(loaded(input_ids=ids()).logits, model(input_ids=ids()).logits, rtol=0, atol=0)
    # the 2:4 weights are stored compressed: half the values plus one bit each
    from safetensors.torch import load_file

    stored = load_file(tmp_path / "model.safetensors")
    name = "model.layers.0.mlp.up_proj"
    assert f"{name}.weight" not in stored and stored[f"{name}.compressed"].shape == (64, 16)
    assert stored[f"{name}.bitmask"].dtype == torch.uint8 and stored[f"{name}.bitmask"].shape == (64, 4)


def test_compressed_tensors_reads_our_checkpoint(tmp_path):
    model = pruned_llama()
    serving.save_sparse24(model, tmp_path)
    compressor = ModelCompressor.from_pretrained(str(tmp_path))
    assert compressor is not None and compressor.sparsity_config.format == "sparse-24-bitmask"
    other = pruned_llama(seed=7)
    compressor.decompress(str(tmp_path), other)
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in other.state_dict().items())


def _save_with_compressed_tensors(model, directory):
    """What llm-compressor does after pruning: compress the model in place and save it with its config."""
    model = copy.deepcopy(model)
    compressor = ModelCompressor.from_pretrained_model(
        model, sparsity_config_or_format=Sparse24BitMaskConfig(targets=["Linear"], ignore=["lm_head"]))
    compressor.compress_model(model)
    model.save_pretrained(directory)
    compressor.update_config(str(directory))


def test_load_a_compressed_tensors_checkpoint_and_fine_tune(tmp_path):
    """A checkpoint pruned and saved by compressed-tensors loads; its zeros are the mask LoRS keeps; the merged
    model saves back in the format and compressed-tensors reads it."""
    model = pruned_llama(seed=3)
    _save_with_compressed_tensors(model, tmp_path / "from-ct")
    loaded = serving.load_sparse24(tmp_path / "from-ct")
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in loaded.state_dict().items())
    zeros = {n: loaded.get_submodule(n).weight == 0 for n in linear_names(loaded)}
    sa.inject(loaded, sa.SparseLoraConfig(method="lors", r=4, alpha=8, target_modules="all-linear"))
    opt = torch.optim.AdamW([p for p in loaded.parameters() if p.requires_grad], lr=1e-2)
    x = ids(1)
    for _ in range(3):
        opt.zero_grad()
        loaded(input_ids=x, labels=x).loss.backward()
        opt.step()
    sa.merge(loaded)
    assert all(torch.equal(loaded.get_submodule(n).weight == 0, z) for n, z in zeros.items())
    serving.save_sparse24(loaded, tmp_path / "merged", dtype=torch.bfloat16)
    back = serving.load_sparse24(tmp_path / "merged", dtype=torch.bfloat16)
    for n in zeros:
        w = back.get_submodule(n).weight
        assert w.dtype == torch.bfloat16 and torch.equal(w, loaded.get_submodule(n).weight.to(torch.bfloat16))
        assert serving.violations_2_4(w) == 0
    reader = pruned_llama(seed=9).to(torch.bfloat16)
    ModelCompressor.from_pretrained(str(tmp_path / "merged")).decompress(str(tmp_path / "merged"), reader)
    assert all(torch.equal(v, back.state_dict()[k]) for k, v in reader.state_dict().items())


# --------------------------------------------------------------------------------------------------- refusals


def test_save_refuses_what_is_not_2_4_and_writes_nothing(tmp_path):
    dense = pruned_llama(pattern="unstructured")  # 50% random: many groups of 4 with 3 or 4 non-zeros
    with pytest.raises(ValueError, match=r"14 layer\(s\) are not 2:4, e\.g\. model\.layers\.0\.self_attn\.q_proj: \d+ "
                                         r"group\(s\)"):
        serving.save_sparse24(dense, tmp_path / "x")
    assert not (tmp_path / "x").exists()
    adapted = pruned_llama()
    sa.inject(adapted, sa.SparseLoraConfig(method="lors", r=4, target_modules="all-linear"))
    with pytest.raises(ValueError, match="still has adapters: merge them first"):
        serving.save_sparse24(adapted, tmp_path / "y")
    with pytest.raises(TypeError, match="Hugging Face model"):
        serving.save_sparse24(nn.Sequential(nn.Linear(8, 4)), tmp_path / "z")
    odd = nn.Linear(6, 4)
    with pytest.raises(ValueError, match="in_features=6 is not divisible by 4"):
        serving.violations_2_4(odd.weight)


def test_load_refuses_damaged_or_other_checkpoints(tmp_path):
    model = pruned_llama()
    good = tmp_path / "good"
    serving.save_sparse24(model, good)
    model.save_pretrained(tmp_path / "plain")
    with pytest.raises(ValueError, match="no compressed-tensors quantization_config"):
        serving.load_sparse24(tmp_path / "plain")
    with pytest.raises(FileNotFoundError, match="config.json"):
        serving.load_sparse24(tmp_path / "missing")

    from safetensors.torch import load_file, save_file

    def damaged(name, change):
        d = tmp_path / name
        shutil.copytree(good, d)
        tensors = load_file(d / "model.safetensors")
        change(tensors)
        save_file(tensors, d / "model.safetensors")
        return d

    key = "model.layers.1.self_attn.o_proj"
    with pytest.raises(ValueError, match=f"{key} has .* but not \\['bitmask'\\]"):
        serving.load_sparse24(damaged("nobitmask", lambda t: t.pop(f"{key}.bitmask")))

    def three_of_four(t):  # mark a third entry of the first group: the bit count no longer matches the values
        t[f"{key}.bitmask"][0, 0] |= 0b1111
    with pytest.raises(ValueError, match="bitmask marks a different number"):
        serving.load_sparse24(damaged("bits", three_of_four))

    def wrong_shape(t):
        t[f"{key}.shape"] = torch.tensor([[32], [64]])
    with pytest.raises(ValueError, match="do not fit its shape"):
        serving.load_sparse24(damaged("shape", wrong_shape))

    quantized = tmp_path / "quantized"
    shutil.copytree(good, quantized)
    config = json.loads((quantized / "config.json").read_text())
    config["quantization_config"]["config_groups"] = {"group_0": {"targets": ["Linear"]}}
    (quantized / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="also quantized"):
        serving.load_sparse24(quantized)


# ---------------------------------------------------------------------------------------------- real model


@pytest.mark.slow
def test_smollm2_serving_round_trip(tmp_path):
    from sparse_adapt.assets import models

    model, tokenizer = models.load_smollm2()
    model.model.layers = model.model.layers[:2]
    model.config.num_hidden_layers = 2
    sa.prune.magnitude_(model, "2:4", progress=False)
    serving.save_sparse24(model, tmp_path, tokenizer=tokenizer, dtype=torch.bfloat16)
    assert (tmp_path / "tokenizer.json").exists() or (tmp_path / "tokenizer_config.json").exists()
    back = serving.load_sparse24(tmp_path, dtype=torch.bfloat16)
    want = {k: v.to(torch.bfloat16) for k, v in model.state_dict().items()}
    assert all(torch.equal(v, want[k]) for k, v in back.state_dict().items())
    # the tied head is stored once and tied again on load
    assert back.get_output_embeddings().weight is back.get_input_embeddings().weight
    # and it computes what the saved (bf16-rounded) weights compute
    x = tokenizer(["The capital of France is"], return_tensors="pt")
    as_float = serving.load_sparse24(tmp_path, dtype=torch.float32)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(p.to(torch.bfloat16).float())
    torch.testing.assert_close(as_float(**x).logits, model(**x).logits)
