"""sparse_adapt.peft: PEFT's own PeftModel running LoRS, SQFT and RoseLoRA -- the same function and gradients as
sa.inject's layers, PEFT's names and files, Trainer, merge_and_unload keeping every zero, save and reload."""

import copy
import json
import warnings

import pytest
import torch
from torch import nn

peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")

import sparse_adapt as sa  # noqa: E402
import sparse_adapt.peft as sap  # noqa: E402
from sparse_adapt.memory import SavedBytes  # noqa: E402

from toy_models import prune_, tiny_llama  # noqa: E402

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
PEFT_METHODS = ["lors", "sqft", "sqft_gc", "roselora", "lora"]


def lora_config(**kw):
    return peft.LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS, **kw)


def pruned_llama(seed=0, device="cpu"):
    torch.manual_seed(seed)
    return prune_(tiny_llama(), "2:4", seed).to(device)


def ids(seed=0, batch=2, length=7, device="cpu"):
    return torch.randint(0, 96, (batch, length), generator=torch.Generator().manual_seed(seed)).to(device)


def randomize_adapters_(model, seed=1):
    """Non-zero B (and a new A), so that the adapter changes the function and a merge moves the weights."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)


def zero_patterns(model):
    return {n: (m.weight == 0).clone() for n, m in model.named_modules() if isinstance(m, nn.Linear)}


def lora_layers(model):
    return [(n, m) for n, m in model.named_modules() if isinstance(m, peft.tuners.lora.LoraLayer)]


# -------------------------------------------------------------------------------------- PEFT's classes and names


@pytest.mark.parametrize("method", PEFT_METHODS)
def test_peft_classes_names_and_parameter_count(method, capsys):
    ours = sap.get_peft_model(pruned_llama(), lora_config(), method=method)
    plain = peft.get_peft_model(pruned_llama(), lora_config())
    assert type(ours) is type(plain)  # PEFT's own PeftModelForCausalLM / PeftModel class
    layers = lora_layers(ours)
    assert len(layers) == 14 and all(isinstance(m, sap.SparseLoraPeftLinear) for _, m in layers)
    assert all(isinstance(m, peft.tuners.lora.Linear) for _, m in layers)
    mine, theirs = ({k for k in m.state_dict() if "lora_" in k} for m in (ours, plain))
    assert theirs <= mine  # PEFT's names; and a method's state (RoseLoRA's scores and step) where it has one
    assert all(".lora_sparse_adapt_state.default." in k for k in mine - theirs)
    assert len(mine - theirs) == (3 * 14 if method == "roselora" else 0)
    assert [n for n, p in ours.named_parameters() if p.requires_grad] == \
        [n for n, p in plain.named_parameters() if p.requires_grad]
    ours.print_trainable_parameters()
    plain.print_trainable_parameters()
    mine, theirs = capsys.readouterr().out.strip().splitlines()
    assert mine == theirs
    for _, layer in layers:
        assert layer.sparse_adapt_config["default"].method == method
    assert f"'default': '{method}'" in repr(layers[0][1])


# ---------------------------------------------------- the same function and gradients as sa.inject's layers


def _copy_factors(peft_model, sa_model):
    """Give the sa.inject model the PEFT model's A and B (same module names under base_model.model)."""
    with torch.no_grad():
        for name, layer in sa.adapter_layers(sa_model):
            peft_layer = peft_model.base_model.model.get_submodule(name)
            layer.lora_A.copy_(peft_layer.lora_A["default"].weight)
            layer.lora_B.copy_(peft_layer.lora_B["default"].weight)


@pytest.mark.parametrize("method,options", [("lors", {}), ("lors", {"exact_grad": True}), ("sqft", {}),
                                            ("sqft_gc", {}), ("roselora", {})],
                         ids=["lors", "lors-exact_grad", "sqft", "sqft_gc", "roselora"])
def test_same_function_and_gradients_as_inject(method, options, device):
    pm = sap.get_peft_model(pruned_llama(device=device), lora_config(use_rslora=True), method=method, **options)
    randomize_adapters_(pm)
    ref = pruned_llama(device=device)
    sa.inject(ref, sa.config_for(method, r=4, alpha=8, use_rslora=True, target_modules=TARGETS, **options))
    _copy_factors(pm, ref)
    x = ids(device=device)
    out = pm(input_ids=x, labels=x)
    want = ref(input_ids=x, labels=x)
    torch.testing.assert_close(out.logits, want.logits)
    out.loss.backward()
    want.loss.backward()
    for name, layer in sa.adapter_layers(ref):
        peft_layer = pm.base_model.model.get_submodule(name)
        torch.testing.assert_close(peft_layer.lora_A["default"].weight.grad, layer.lora_A.grad)
        torch.testing.assert_close(peft_layer.lora_B["default"].weight.grad, layer.lora_B.grad)
    # and it is not LoRA's function: the masked methods differ from plain PEFT on the same factors
    if method != "roselora":
        plain = peft.get_peft_model(pruned_llama(device=device), lora_config(use_rslora=True))
        plain.load_state_dict(pm.state_dict(), strict=False)
        assert not torch.allclose(plain(input_ids=x).logits, out.logits, atol=1e-4)


def test_lors_saves_what_lora_saves():
    """Bytes autograd saves for backward, counted exactly: LoRS through PEFT = PEFT's LoRA; SQFT saves more."""
    def saved(method):
        pm = sap.get_peft_model(pruned_llama(), lora_config(), method=method)
        randomize_adapters_(pm)
        x = ids(batch=4, length=16)
        with SavedBytes(list(pm.parameters()) + list(pm.buffers())) as count:
            loss = pm(input_ids=x, labels=x).loss
        assert loss.requires_grad
        return count.total

    lora, lors, sqft = saved("lora"), saved("lors"), saved("sqft")
    assert lors <= lora < sqft, (lora, lors, sqft)


# --------------------------------------------------------------- Trainer, merge_and_unload, save and reload


@pytest.mark.slow
@pytest.mark.parametrize("method", ["lors", "sqft", "roselora"])
def test_trainer_merge_save_reload(method, tmp_path, device):
    base = pruned_llama()
    original = copy.deepcopy(base.state_dict())
    zeros = zero_patterns(base)
    pm = sap.get_peft_model(base, lora_config(), method=method, **({"sparsity": 0.5} if method == "roselora" else {}))
    data = ids(seed=3, batch=16, length=12)
    dataset = [{"input_ids": row, "labels": row} for row in data]
    callbacks = [sa.RoseLoraPruner(pm).trainer_callback()] if method == "roselora" else []
    args = transformers.TrainingArguments(output_dir=str(tmp_path / "run"), max_steps=6, per_device_train_batch_size=8,
                                          learning_rate=2e-2, report_to=[], save_strategy="no",
                                          use_cpu=device == "cpu", logging_steps=1, disable_tqdm=True)
    trainer = transformers.Trainer(model=pm, args=args, train_dataset=dataset, callbacks=callbacks)
    trainer.train()
    assert next(pm.parameters()).device.type == device  # the Trainer put the model on the device
    losses = [log["loss"] for log in trainer.state.log_history if "loss" in log]
    assert len(losses) == 6 and losses[-1] < losses[0]
    if method == "roselora":  # the pruner ran on PEFT's layers: each row of A / column of B kept half its entries
        for row in sa.sparsity_report(pm):
            assert torch.allclose(row.rows_A.cpu(), torch.tensor(0.5), atol=0.05) and row.bound_holds
    pm.eval()
    x = ids(seed=5, device=device)
    adapted = pm(input_ids=x).logits.detach()

    pm.save_pretrained(tmp_path / "adapter")
    saved = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert saved["sparse_adapt"]["method"] == method
    reloaded_base = pruned_llama(device=device)
    reloaded_base.load_state_dict(original)
    reloaded = sap.from_pretrained(reloaded_base, tmp_path / "adapter")
    assert all(m.sparse_adapt_config["default"].method == method for _, m in lora_layers(reloaded))
    torch.testing.assert_close(reloaded(input_ids=x).logits, adapted)

    merged = pm.merge_and_unload()
    assert not lora_layers(merged)
    torch.testing.assert_close(merged(input_ids=x).logits, adapted, rtol=1e-4, atol=1e-4)
    for name, was_zero in zeros.items():
        if method == "roselora":  # LoRA's merge: the update is dense on W's zeros
            continue
        assert torch.equal(merged.get_submodule(name).weight.cpu() == 0, was_zero), name  # the Trainer moved it
    moved = [n for n in zeros if not torch.equal(merged.get_submodule(n).weight.cpu(), original[n + ".weight"])]
    assert len(moved) == 14  # every adapted projection changed (the lm_head is not adapted)


def _roselora_trainer(pm, data, out, max_steps):
    dataset = [{"input_ids": row, "labels": row} for row in data]
    args = transformers.TrainingArguments(output_dir=str(out), max_steps=max_steps, per_device_train_batch_size=16,
                                          learning_rate=2e-2, report_to=[], save_strategy="steps", save_steps=3,
                                          use_cpu=True, logging_strategy="no", disable_tqdm=True)
    return transformers.Trainer(model=pm, args=args, train_dataset=dataset,
                                callbacks=[sa.RoseLoraPruner(pm).trainer_callback()])


def roselora_state(model):
    return {n.replace(".default", ""): b for n, b in model.named_buffers() if "rose_" in n}


@pytest.mark.slow
def test_roselora_state_round_trips_and_trainer_resumes_through_peft(tmp_path):
    """RoseLoRA's scores and pruning step are in PEFT's adapter file: sap.from_pretrained brings them back, and
    Trainer resuming from a checkpoint (PEFT's own load_adapter) continues the schedule where it stopped -- the
    run ends with the adapters and masks of an uninterrupted one."""
    from peft.utils import load_peft_weights

    data = ids(seed=3, batch=16, length=12)
    torch.manual_seed(0)
    whole = sap.get_peft_model(pruned_llama(), lora_config(), method="roselora", sparsity=0.5, t_init=1)
    _roselora_trainer(whole, data, tmp_path / "whole", 6).train()
    checkpoint = tmp_path / "whole" / "checkpoint-3"

    saved = {k: v for k, v in load_peft_weights(str(checkpoint)).items() if "rose_" in k}
    reloaded = roselora_state(sap.from_pretrained(pruned_llama(), checkpoint, is_trainable=True))
    assert saved.keys() == reloaded.keys() and len(saved) == 3 * 14  # scores of A and B and the step, 14 layers
    assert all(torch.equal(saved[k], v) for k, v in reloaded.items())
    assert all(int(v) == 3 for k, v in reloaded.items() if k.endswith("rose_step"))
    assert all(v.abs().sum() > 0 for k, v in reloaded.items() if "score" in k)
    second = sap.get_peft_model(pruned_llama(), lora_config(), method="lors")
    sap.load_adapter(second, checkpoint, "loaded")  # a second adapter gets the state too
    loaded = {n.replace(".loaded", ""): b for n, b in second.named_buffers() if "rose_" in n}
    assert saved.keys() == loaded.keys() and all(torch.equal(saved[k], v) for k, v in loaded.items())

    torch.manual_seed(1)  # other adapters: the resume must load the checkpoint's
    resumed = sap.get_peft_model(pruned_llama(), lora_config(), method="roselora", sparsity=0.5, t_init=1)
    _roselora_trainer(resumed, data, tmp_path / "resumed", 6).train(resume_from_checkpoint=str(checkpoint))
    assert sa.RoseLoraPruner(resumed).step_count == 6
    for (name, a), (_, b) in zip(sa.adapter_sites(whole), sa.adapter_sites(resumed)):
        assert torch.equal(a.lora_A != 0, b.lora_A != 0), name
        torch.testing.assert_close(b.lora_A, a.lora_A, msg=name)
        torch.testing.assert_close(b.lora_B, a.lora_B, msg=name)


def test_adapter_file_is_pefts(tmp_path):
    """The weights file of a LoRS adapter is PEFT's LoRA file: same tensor names, shapes, dtypes and bytes."""
    from safetensors.torch import load_file

    pm = sap.get_peft_model(pruned_llama(), lora_config(), method="lors")
    randomize_adapters_(pm)
    plain = peft.get_peft_model(pruned_llama(), lora_config())
    plain.load_state_dict(pm.state_dict(), strict=False)
    pm.save_pretrained(tmp_path / "ours")
    plain.save_pretrained(tmp_path / "plain")
    ours, theirs = (load_file(tmp_path / d / "adapter_model.safetensors") for d in ("ours", "plain"))
    assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in ours)
    assert sum(t.nbytes for t in ours.values()) == sum(t.nbytes for t in theirs.values())


def test_plain_peft_reads_the_directory_but_computes_lora(tmp_path):
    pm = sap.get_peft_model(pruned_llama(), lora_config(), method="lors")
    randomize_adapters_(pm)
    x = ids()
    lors_out = pm(input_ids=x).logits
    pm.save_pretrained(tmp_path)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        plain = peft.PeftModel.from_pretrained(pruned_llama(), str(tmp_path))
    assert any("sparse_adapt" in str(w.message) for w in caught)  # PEFT says it ignores our entry
    assert not any(isinstance(m, sap.SparseLoraPeftLinear) for m in plain.modules())
    assert not torch.allclose(plain(input_ids=x).logits, lors_out, atol=1e-4)  # LoRA's unmasked function


def test_from_pretrained_refuses_plain_peft_directories(tmp_path):
    plain = peft.get_peft_model(pruned_llama(), lora_config())
    plain.save_pretrained(tmp_path)
    model = pruned_llama()
    with pytest.raises(ValueError, match="no sparse_adapt entry.*peft.PeftModel.from_pretrained"):
        sap.from_pretrained(model, tmp_path)
    assert not lora_layers(model)
    with pytest.raises(FileNotFoundError, match="adapter_config.json"):
        sap.from_pretrained(model, tmp_path / "missing")


# ------------------------------------------------------------------------- init, compile, several adapters


def test_gradient_svd_init_through_peft():
    """calibration_batches run LoRS's gradient-SVD init on PEFT's layers: the same A as sa.inject computes."""
    x = ids(seed=7, batch=4, length=10)
    batch = {"input_ids": x, "labels": x}
    pm = sap.get_peft_model(pruned_llama(), lora_config(), method="lors", calibration_batches=[batch])
    ref = pruned_llama()
    sa.inject(ref, sa.config_for("lors", r=4, alpha=8, target_modules=TARGETS, init="gradient_svd"),
              calibration_batches=[batch])
    for name, layer in sa.adapter_layers(ref):
        peft_layer = pm.base_model.model.get_submodule(name)
        torch.testing.assert_close(peft_layer.lora_A["default"].weight, layer.lora_A)
        assert not peft_layer.lora_B["default"].weight.any()


def test_compile_fullgraph():
    pm = sap.get_peft_model(pruned_llama(), lora_config(), method="lors")
    randomize_adapters_(pm)
    layer = pm.base_model.model.model.layers[0].self_attn.q_proj
    x = torch.randn(3, 32, requires_grad=True)
    want = layer(x)
    got = torch.compile(layer, fullgraph=True, backend="aot_eager")(x)
    torch.testing.assert_close(got, want)
    got.sum().backward()
    assert layer.lora_A["default"].weight.grad is not None


def test_two_adapters_switch_and_merge():
    base = pruned_llama()
    zeros = zero_patterns(base)
    pm = sap.get_peft_model(base, lora_config(), method="lors")
    sap.add_adapter(pm, "sq", lora_config(), method="sqft")
    randomize_adapters_(pm)
    x = ids()
    pm.set_adapter("sq")
    out_sq = pm(input_ids=x).logits
    pm.set_adapter("default")
    out_lors = pm(input_ids=x).logits
    assert not torch.allclose(out_sq, out_lors)
    pm.base_model.set_adapter(["default", "sq"])
    with pytest.raises(ValueError, match="2 active adapters.*set_adapter"):
        pm(input_ids=x)
    pm.set_adapter("default")
    pm.eval()  # PEFT takes adapter_names at inference only
    with pytest.raises(ValueError, match="adapter_names.*'lors'"):
        pm(input_ids=x, adapter_names=["default", "sq"])
    pm.delete_adapter("sq")
    merged = pm.merge_and_unload()
    torch.testing.assert_close(merged(input_ids=x).logits, out_lors, rtol=1e-4, atol=1e-4)
    assert all(torch.equal(merged.get_submodule(n).weight == 0, z) for n, z in zeros.items())


def test_merge_unmerge_restores_weights():
    pm = sap.get_peft_model(pruned_llama(), lora_config(), method="lors")
    randomize_adapters_(pm)
    before = {k: v.clone() for k, v in pm.state_dict().items() if "base_layer" in k}
    x = ids()
    out = pm(input_ids=x).logits
    pm.merge_adapter(safe_merge=True)
    torch.testing.assert_close(pm(input_ids=x).logits, out, rtol=1e-4, atol=1e-4)
    layer = pm.base_model.model.model.layers[0].mlp.up_proj
    assert torch.equal(layer.get_base_layer().weight == 0, before[
        "base_model.model.model.layers.0.mlp.up_proj.base_layer.weight"] == 0)
    delta = layer.get_delta_weight("default")  # the masked update: zero wherever W is
    assert not delta[before["base_model.model.model.layers.0.mlp.up_proj.base_layer.weight"] == 0].any()
    pm.unmerge_adapter()
    for k, v in before.items():
        torch.testing.assert_close(pm.state_dict()[k], v, rtol=1e-5, atol=1e-6)


# --------------------------------------------------------------------------------------------------- refusals


def test_refusals_name_the_argument():
    model = pruned_llama()
    state = copy.deepcopy(model.state_dict())
    with pytest.raises(ValueError, match="method must be one of .*SPP's B is a column"):
        sap.get_peft_model(model, lora_config(), method="spp")
    with pytest.raises(ValueError, match=r"lora_config.use_dora=True .*'lors'"):
        sap.get_peft_model(model, lora_config(use_dora=True), method="lors")
    with pytest.raises(ValueError, match=r"takes no option\(s\) \['sparsity'\]"):
        sap.get_peft_model(model, lora_config(), method="lors", sparsity=0.5)
    with pytest.raises(ValueError, match="sparsity must be in"):
        sap.get_peft_model(model, lora_config(), method="roselora", sparsity=1.5)
    with pytest.raises(TypeError, match="peft.LoraConfig"):
        sap.get_peft_model(model, {"r": 4}, method="lors")
    assert not lora_layers(model)
    # a target PEFT adapts with its own layer (an embedding): refused after injection, and the model is put back
    with pytest.raises(ValueError, match=r"adapt nn.Linear layers.*embed_tokens \(Embedding\)"):
        sap.get_peft_model(model, peft.LoraConfig(r=4, target_modules=["q_proj", "embed_tokens"]), method="lors")
    assert not lora_layers(model)
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in state.items())
    assert type(model.model.layers[0].self_attn.q_proj) is nn.Linear
    # a calibration pass that fails (a non-finite loss) also leaves the model as it came
    x = ids()
    with pytest.raises(ValueError, match="calibration loss is nan"):
        sap.get_peft_model(model, lora_config(), method="lors", calibration_batches=[{"input_ids": x}],
                           loss_fn=lambda m, b: m(**b).logits.sum() * float("nan"))
    assert not lora_layers(model) and model.state_dict().keys() == state.keys()


def test_load_adapter_second_adapter(tmp_path):
    pm = sap.get_peft_model(pruned_llama(), lora_config(), method="sqft")
    randomize_adapters_(pm)
    x = ids()
    want = pm(input_ids=x).logits
    pm.save_pretrained(tmp_path)
    other = sap.get_peft_model(pruned_llama(), lora_config(), method="lors")
    sap.load_adapter(other, tmp_path, "loaded")
    other.set_adapter("loaded")
    layer = other.base_model.model.model.layers[0].self_attn.q_proj
    methods = {a: c.method for a, c in layer.sparse_adapt_config.items()}
    assert methods == {"default": "lors", "loaded": "sqft"}
    torch.testing.assert_close(other(input_ids=x).logits, want)


# ---------------------------------------------------------------------------------------- the real model


@pytest.mark.slow
def test_smollm2_lors_through_peft(tmp_path):
    """SmolLM2-135M (two decoder layers), 2:4-pruned, LoRS through PEFT on real text with Trainer; merged model
    keeps every zero and equals the adapted one; the PEFT directory reloads to the same outputs."""
    from sparse_adapt.assets import models
    from sparse_adapt.assets import text as data

    model, tokenizer = models.load_smollm2()
    model.model.layers = model.model.layers[:2]
    model.config.num_hidden_layers = 2
    sa.prune.magnitude_(model, "2:4", progress=False)
    original = copy.deepcopy(model.state_dict())
    zeros = {n: (m.weight == 0).clone() for n, m in model.model.layers.named_modules() if isinstance(m, nn.Linear)}
    assert all(z.float().mean() >= 0.5 for z in zeros.values())
    texts, held_out = data.wiki_split(16, 2)
    enc = tokenizer(texts, return_tensors="pt", truncation=True, max_length=32, padding="max_length")
    dataset = [{"input_ids": i, "attention_mask": a, "labels": i.masked_fill(a == 0, -100)}
               for i, a in zip(enc["input_ids"], enc["attention_mask"])]
    pm = sap.get_peft_model(model, peft.LoraConfig(r=8, lora_alpha=16, target_modules="all-linear"), method="lors")
    args = transformers.TrainingArguments(output_dir=str(tmp_path / "run"), max_steps=3, per_device_train_batch_size=8,
                                          learning_rate=1e-3, report_to=[], save_strategy="no", use_cpu=True,
                                          logging_steps=1, disable_tqdm=True)
    transformers.Trainer(model=pm, args=args, train_dataset=dataset).train()
    pm.eval()
    x = tokenizer(held_out, return_tensors="pt", truncation=True, max_length=24, padding="max_length")
    adapted = pm(**x).logits.detach()
    pm.save_pretrained(tmp_path / "adapter")
    merged = pm.merge_and_unload()
    torch.testing.assert_close(merged(**x).logits, adapted, rtol=1e-3, atol=1e-3)
    for n, z in zeros.items():
        assert torch.equal(merged.model.layers.get_submodule(n).weight == 0, z), n
    fresh, _ = models.load_smollm2()
    fresh.model.layers = fresh.model.layers[:2]
    fresh.config.num_hidden_layers = 2
    fresh.load_state_dict(original)
    reloaded = sap.from_pretrained(fresh, tmp_path / "adapter")
    torch.testing.assert_close(reloaded(**x).logits, adapted, rtol=1e-4, atol=1e-4)


def test_merge_keeps_a_cancelled_weight_nonzero():
    """An update that cancels a kept weight exactly would turn it into a new zero under W += ΔW (PEFT's merge):
    the pattern would change and merge_and_unload would no longer be the adapted model's support. Ours keeps it
    non-zero (the smallest normal number, as sa.merge does) and unmerge gives the weight back."""
    pm = sap.get_peft_model(pruned_llama(), lora_config(), method="lors")
    layer = pm.base_model.model.model.layers[1].self_attn.o_proj
    w = layer.get_base_layer().weight
    i, j = map(int, (w != 0).nonzero()[0])
    with torch.no_grad():
        layer.lora_A["default"].weight.zero_()[0, j] = 1.0
        layer.lora_B["default"].weight.zero_()[i, 0] = -w[i, j] / layer.scaling["default"]  # scale 2: exact
    zeros = (w == 0).clone()
    original = w.detach().clone()
    pm.merge_adapter()
    assert torch.equal(w == 0, zeros) and w[i, j] != 0
    pm.unmerge_adapter()
    torch.testing.assert_close(w, original)


@pytest.mark.parametrize("method", ["lors", "sqft"])
def test_bf16_base_with_fp32_adapters(method, device):
    """PEFT keeps adapters in float32 over a bf16 model (autocast_adapter_dtype): the method computes in the base
    dtype and the fp32 factors get fp32 gradients; under autocast the fp32 model computes in bf16."""
    pm = sap.get_peft_model(pruned_llama(device=device).to(torch.bfloat16), lora_config(), method=method)
    layer = pm.base_model.model.model.layers[0].mlp.down_proj
    assert layer.lora_A["default"].weight.dtype == torch.float32
    randomize_adapters_(pm)
    x = ids(device=device)
    out = pm(input_ids=x, labels=x)
    assert out.logits.dtype == torch.bfloat16 and torch.isfinite(out.loss)
    out.loss.backward()
    assert layer.lora_A["default"].weight.grad.dtype == torch.float32
    assert layer.lora_B["default"].weight.grad.abs().sum() > 0

    pm32 = sap.get_peft_model(pruned_llama(device=device), lora_config(), method=method)
    randomize_adapters_(pm32)
    seen = []
    hook = pm32.base_model.model.model.layers[0].mlp.down_proj.register_forward_hook(
        lambda m, i, o: seen.append(o.dtype))
    with torch.autocast(device, dtype=torch.bfloat16):
        loss = pm32(input_ids=x, labels=x).loss
    hook.remove()
    loss.backward()
    assert seen == [torch.bfloat16]
    grad = pm32.base_model.model.model.layers[0].mlp.down_proj.lora_A["default"].weight.grad
    assert grad.dtype == torch.float32 and grad.abs().sum() > 0


def test_roselora_state_stays_float32_when_the_peft_model_moves_to_bf16():
    pm = sap.get_peft_model(pruned_llama(), lora_config(), method="roselora", sparsity=0.5, t_final=3)
    randomize_adapters_(pm)  # B != 0: with B = 0 every score |w·g| is 0 at the first step
    pm.to(torch.bfloat16)
    _, site = next(sa.adapter_sites(pm))
    assert site.lora_A.dtype == torch.bfloat16 and site.rose_score_A.dtype == torch.float32
    pruner = sa.RoseLoraPruner(pm, total_steps=3)
    x = ids()
    pm(input_ids=x, labels=x).loss.backward()
    pruner.step()
    assert pruner.step_count == 1 and site.rose_score_A.abs().sum() > 0


def test_adapters_in_the_base_dtype_without_autocast_adapter_dtype():
    """PEFT's autocast_adapter_dtype=False leaves the adapters of a bf16 model in bf16; the method runs in bf16."""
    pm = sap.get_peft_model(pruned_llama().to(torch.bfloat16), lora_config(), method="lors",
                            autocast_adapter_dtype=False)
    layer = pm.base_model.model.model.layers[0].mlp.down_proj
    assert layer.lora_A["default"].weight.dtype == torch.bfloat16
    randomize_adapters_(pm)
    x = ids()
    loss = pm(input_ids=x, labels=x).loss
    loss.backward()
    assert torch.isfinite(loss) and layer.lora_B["default"].weight.grad.dtype == torch.bfloat16
