"""save_adapter / load_adapter refuse bad files clearly and never half-load; export to PEFT loads in peft."""

import json

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from test_adapters import adapted, config_for, train_steps

import sparse_adapt as sa
from sparse_adapt.adapters.io import CONFIG_NAME, WEIGHTS_NAME, adapter_state

from toy_models import make_model


@pytest.fixture
def saved(tmp_path):
    model, _, example = adapted("lors", "attention")
    train_steps(model, example)
    sa.save_adapter(model, tmp_path)
    return model, tmp_path


def assert_refused_without_change(directory, match):
    fresh, _ = make_model("attention")
    sa.inject(fresh, config_for("lors"))
    before = {k: v.clone() for k, v in adapter_state(fresh).items()}
    with pytest.raises((ValueError, FileNotFoundError), match=match):
        sa.load_adapter(fresh, directory)
    for k, v in adapter_state(fresh).items():
        assert torch.equal(v, before[k]), f"{k} changed by a refused load"


def test_truncated_weights(saved):
    _, d = saved
    data = (d / WEIGHTS_NAME).read_bytes()
    (d / WEIGHTS_NAME).write_bytes(data[: len(data) - 100])
    assert_refused_without_change(d, "truncated or corrupt")


def test_corrupt_header(saved):
    _, d = saved
    data = bytearray((d / WEIGHTS_NAME).read_bytes())
    data[8:40] = b"\xff" * 32  # garbage inside the JSON header
    (d / WEIGHTS_NAME).write_bytes(bytes(data))
    assert_refused_without_change(d, "truncated or corrupt")


def test_truncated_config(saved):
    _, d = saved
    text = (d / CONFIG_NAME).read_text()
    (d / CONFIG_NAME).write_text(text[: len(text) // 2])
    assert_refused_without_change(d, "not valid JSON")


def resave(path, tensors):
    """Rewrite a weights file with other tensors and its own metadata (the embedded config and save id)."""
    with safe_open(path, framework="pt") as f:
        metadata = f.metadata()
    save_file(tensors, path, metadata=metadata)


def test_missing_tensor(saved):
    _, d = saved
    tensors = load_file(d / WEIGHTS_NAME)
    tensors.pop(sorted(tensors)[0])
    resave(d / WEIGHTS_NAME, tensors)
    assert_refused_without_change(d, "missing")


def test_shape_mismatch(saved):
    _, d = saved
    tensors = load_file(d / WEIGHTS_NAME)
    key = sorted(k for k in tensors if k.endswith("lora_A"))[-1]
    tensors[key] = torch.zeros(tensors[key].shape[0], tensors[key].shape[1] + 1)
    resave(d / WEIGHTS_NAME, tensors)
    assert_refused_without_change(d, "made for another model")


def test_other_method_refused(saved):
    _, d = saved
    fresh, _ = make_model("attention")
    sa.inject(fresh, config_for("lora"))
    with pytest.raises(ValueError, match="the saved ones are lors"):
        sa.load_adapter(fresh, d)


def test_missing_files(tmp_path):
    fresh, _ = make_model("attention")
    with pytest.raises(FileNotFoundError, match=CONFIG_NAME):
        sa.load_adapter(fresh, tmp_path)


def test_config_round_trip_and_files(saved):
    model, d = saved
    meta = json.loads((d / CONFIG_NAME).read_text())
    assert meta["config"]["method"] == "lors" and meta["format"] == "sparse_adapt"
    assert set(meta["modules"]) == {n for n, _ in sa.adapter_layers(model)}
    assert not [p for p in d.iterdir() if p.name.endswith(".tmp")], "temporary files left behind"
    assert set(load_file(d / WEIGHTS_NAME)) == set(adapter_state(model))


def test_failed_write_leaves_the_old_file(saved, monkeypatch):
    model, d = saved
    old = (d / WEIGHTS_NAME).read_bytes()

    def boom(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr(sa.adapters.io, "save_file", boom)
    with pytest.raises(OSError, match="disk full"):
        sa.save_adapter(model, d)
    assert (d / WEIGHTS_NAME).read_bytes() == old
    assert not [p for p in d.iterdir() if p.name.endswith(".tmp")]


def test_roselora_state_is_saved(tmp_path):
    model, _, example = adapted("roselora", "mlp")
    for _, layer in sa.adapter_layers(model):
        layer.rose_score_A.uniform_()
        layer.rose_step.fill_(7)
    sa.save_adapter(model, tmp_path)
    fresh, _ = make_model("mlp")
    sa.load_adapter(fresh, tmp_path)
    for (_, a), (_, b) in zip(sa.adapter_layers(model), sa.adapter_layers(fresh)):
        assert torch.equal(a.rose_score_A, b.rose_score_A) and int(b.rose_step) == 7
    assert isinstance(next(sa.adapter_layers(fresh))[1].config, sa.RoseLoraConfig)


@pytest.mark.parametrize("method", ["lora", "roselora"])
def test_export_to_peft_loads_in_peft(method, tmp_path):
    peft = pytest.importorskip("peft")
    model, base, example = adapted(method, "mlp")
    x = train_steps(model, example)
    with torch.no_grad():
        for _, layer in sa.adapter_layers(model):
            layer.lora_A[:, ::3] = 0  # sparse, as RoseLoRA leaves it
    sa.export_peft(model, tmp_path)
    peft_model = peft.PeftModel.from_pretrained(base, tmp_path)
    model.eval(), peft_model.eval()
    with torch.no_grad():
        torch.testing.assert_close(peft_model(x), model(x), rtol=1e-5, atol=1e-6)


def test_export_to_peft_refuses_masked_methods(tmp_path):
    model, _, _ = adapted("lors", "mlp")
    with pytest.raises(ValueError, match="cannot express lors"):
        sa.export_peft(model, tmp_path)
