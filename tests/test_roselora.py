"""RoseLoRA's training utilities: the cubic schedule, the pruner, clipping, Proposition 1, resume, Trainer."""

import copy
import math

import pytest
import torch

import sparse_adapt as sa
from sparse_adapt.training import kept_count, kept_fraction, proposition1_bound

from toy_models import make_model

INPUTS = {"attention": lambda g: torch.randn(2, 5, 32, generator=g), "mlp": lambda g: torch.randn(6, 24, generator=g)}


def roselora_model(model_name="attention", device="cpu", **kw):
    model, _ = make_model(model_name)
    model.to(device)
    example = INPUTS[model_name]
    kw.setdefault("sparsity", 0.75)
    kw.setdefault("t_init", 2)
    kw.setdefault("t_final", 8)
    sa.inject(model, sa.RoseLoraConfig(r=4, alpha=8, target_modules="all-linear", **kw))
    return model, example


def train_with_pruner(model, example, steps, pruner=None, seed=0):
    """SGD on a fixed input and target (both from `seed`), with the pruner after each step."""
    if pruner is None:  # a run of `steps` steps, which may stop before the schedule's t_final
        t_final = next(sa.adapter_layers(model))[1].config.t_final or steps
        pruner = sa.RoseLoraPruner(model, total_steps=max(steps, t_final))
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.SGD(params, lr=0.05)
    g = torch.Generator().manual_seed(seed)
    device = next(model.parameters()).device
    x = example(g).to(device)  # drawn on the CPU: the same numbers on every device
    target = torch.randn(model(x).shape, generator=g).to(device)
    losses = []
    for _ in range(steps):
        opt.zero_grad()
        loss = (model(x) - target).square().mean()
        loss.backward()
        opt.step()
        pruner.step()
        losses.append(loss.item())
    return pruner, losses


def test_schedule():
    assert kept_fraction(0, 10, 50, 0.9) == 1.0
    assert kept_fraction(10, 10, 50, 0.9) == 1.0
    assert kept_fraction(30, 10, 50, 0.9) == pytest.approx(0.1 + 0.9 * 0.5 ** 3)
    assert kept_fraction(50, 10, 50, 0.9) == pytest.approx(0.1)
    assert kept_fraction(1000, 10, 50, 0.9) == pytest.approx(0.1)
    values = [kept_fraction(t, 10, 50, 0.9) for t in range(60)]
    assert all(a >= b for a, b in zip(values, values[1:]))
    assert kept_count(0.1, 576) == 58 and kept_count(0.001, 10) == 1 and kept_count(1.0, 7) == 7


def test_proposition1_bound_by_hand():
    # r = 2: rank-one term 1 has zero fraction 0.5 + 0.5 − 0.25 = 0.75, term 2 has 0.5 → 1 + 1.25 − 2 = 0.25
    assert proposition1_bound(torch.tensor([0.5, 0.5]), torch.tensor([0.5, 0.0])) == pytest.approx(0.25)
    assert proposition1_bound(torch.tensor([0.1, 0.2]), torch.tensor([0.0, 0.1])) == 0.0


def test_pruner_reaches_the_target_sparsity_and_the_bound_holds(device):
    model, example = roselora_model(device=device)
    pruner, losses = train_with_pruner(model, example, steps=10)
    assert pruner.step_count == 10 and pruner.kept_fraction() == pytest.approx(0.25)
    assert losses[-1] < losses[0]
    for name, layer in sa.adapter_layers(model):
        k_A = kept_count(0.25, layer.in_features)
        k_B = kept_count(0.25, layer.out_features)
        assert ((layer.lora_A != 0).sum(1) <= k_A).all() and ((layer.lora_B != 0).sum(0) <= k_B).all(), name
        assert (layer.lora_A != 0).sum(1).eq(k_A).all(), f"{name}: rows of A not at k={k_A}"
    report = sa.sparsity_report(model)
    assert len(report) == 6 and all(row.bound_holds for row in report)
    assert all(row.bound > 0 for row in report)  # 75% sparse factors: the bound says something
    assert "Prop. 1 bound" in report.to_markdown()
    counts = sa.trainable_parameters(model)
    assert counts.effective < 0.3 * counts.trainable


def test_a_pruner_made_before_the_model_moves_prunes_the_moved_model():
    """Trainer moves the model to the GPU after the callback's pruner was made, and model.to replaces every buffer
    (parameters keep their objects): the pruner must find the scores and step counts in the layers at each step.
    The move here is what model.to(device) does to each tensor, on a CPU: a copy."""
    model, example = roselora_model()
    pruner = sa.RoseLoraPruner(model, total_steps=8)
    before = [layer.rose_score_A for _, layer in sa.adapter_layers(model)]
    model._apply(torch.clone)
    assert all(layer.rose_score_A is not old for (_, layer), old in zip(sa.adapter_layers(model), before))
    train_with_pruner(model, example, steps=3, pruner=pruner)
    assert pruner.step_count == 3
    for name, layer in sa.adapter_layers(model):
        assert layer.rose_score_A.abs().sum() > 0, name
        assert int(layer.rose_step) == 3, name
        assert (layer.lora_A != 0).sum(1).lt(layer.in_features).all(), f"{name}: not pruned"


def test_moving_the_model_to_bf16_keeps_the_scores_float32():
    """model.to(torch.bfloat16) converts every floating-point buffer; RoseLoRA's EMA scores stay float32 (the pruning
    op accumulates them in float32 and refuses any other dtype), so a bf16 model trains with its pruner."""
    model, example = roselora_model()
    model.to(torch.bfloat16)
    for _, layer in sa.adapter_layers(model):
        assert layer.lora_A.dtype == torch.bfloat16 and layer.base_layer.weight.dtype == torch.bfloat16
        assert layer.rose_score_A.dtype == layer.rose_score_B.dtype == torch.float32
        assert layer.rose_step.dtype == torch.long
    pruner, losses = train_with_pruner(model, lambda g: example(g).bfloat16(), steps=3)
    assert pruner.step_count == 3 and all(math.isfinite(v) for v in losses)
    assert all(layer.rose_score_A.abs().sum() > 0 for _, layer in sa.adapter_layers(model))
    model.float()  # and back: the scores were float32 all along, nothing is lost
    assert all(layer.rose_score_A.abs().sum() > 0 for _, layer in sa.adapter_layers(model))


def test_no_pruning_before_t_init_but_scores_accumulate():
    model, example = roselora_model(t_init=5, t_final=9)
    train_with_pruner(model, example, steps=3)  # the first 3 of a 9-step run
    for _, layer in sa.adapter_layers(model):
        assert torch.count_nonzero(layer.lora_A) == layer.lora_A.numel()
        assert layer.rose_score_A.abs().sum() > 0


@pytest.mark.parametrize("clip", [("frobenius", 0.5), ("elementwise", 0.05)])
def test_clipping(clip, device):
    model, example = roselora_model(clip=clip, device=device)
    train_with_pruner(model, example, steps=4)
    for _, layer in sa.adapter_layers(model):
        for p in (layer.lora_A, layer.lora_B):
            if clip[0] == "frobenius":
                assert p.square().sum() <= 0.5 * (1 + 1e-5)
            else:
                assert p.abs().max() <= 0.05


def test_step_needs_gradients():
    model, _ = roselora_model()
    with pytest.raises(RuntimeError, match="no gradient"):
        sa.RoseLoraPruner(model, total_steps=8).step()


def test_pruner_needs_roselora_and_a_horizon():
    model, _ = make_model("mlp")
    sa.inject(model, sa.SparseLoraConfig(method="lora", r=4))
    with pytest.raises(ValueError, match="no roselora adapters"):
        sa.RoseLoraPruner(model, 10)
    model, _ = roselora_model(t_final=None)
    with pytest.raises(ValueError, match="needs total_steps"):
        sa.RoseLoraPruner(model).kept_fraction()


def test_resume_from_a_saved_adapter_continues_identically(tmp_path, device):
    model, example = roselora_model(device=device)
    reference = copy.deepcopy(model)
    train_with_pruner(reference, example, steps=8)

    train_with_pruner(model, example, steps=4)
    sa.save_adapter(model, tmp_path)
    resumed, _ = make_model("attention")
    sa.load_adapter(resumed.to(device), tmp_path)
    pruner = sa.RoseLoraPruner(resumed, total_steps=8)
    assert pruner.step_count == 4
    train_with_pruner(resumed, example, steps=4, pruner=pruner)
    for (n, a), (_, b) in zip(sa.adapter_layers(reference), sa.adapter_layers(resumed)):
        torch.testing.assert_close(b.lora_A, a.lora_A, msg=n)
        torch.testing.assert_close(b.lora_B, a.lora_B, msg=n)
        assert torch.equal(b.lora_A != 0, a.lora_A != 0)


@pytest.mark.slow
def test_trainer_callback(tmp_path):
    transformers = pytest.importorskip("transformers")
    from toy_models import tiny_llama

    lm = tiny_llama()
    sa.inject(lm, sa.RoseLoraConfig(r=4, sparsity=0.5, t_init=1, target_modules="all-linear"))
    pruner = sa.RoseLoraPruner(lm)
    ids = torch.randint(0, 96, (8, 12), generator=torch.Generator().manual_seed(0))
    dataset = [{"input_ids": row, "labels": row} for row in ids]
    args = transformers.TrainingArguments(output_dir=str(tmp_path), max_steps=6, per_device_train_batch_size=4,
                                          learning_rate=1e-2, report_to=[], save_strategy="no", use_cpu=True,
                                          logging_strategy="no", disable_tqdm=True)
    trainer = transformers.Trainer(model=lm, args=args, train_dataset=dataset, callbacks=[pruner.trainer_callback()])
    trainer.train()
    assert pruner.total_steps == 6 and pruner.step_count == 6
    for _, layer in sa.adapter_layers(lm):
        assert (layer.lora_A != 0).sum(1).eq(kept_count(0.5, layer.in_features)).all()


@pytest.mark.slow
def test_trainer_resume_continues_the_schedule(tmp_path):
    """Trainer resuming from a checkpoint loads the layers' step after the pruner's callback was made; the callback
    reads it again when training begins, so the run ends as an uninterrupted one (masks and adapters)."""
    transformers = pytest.importorskip("transformers")
    from toy_models import tiny_llama

    ids = torch.randint(0, 96, (8, 12), generator=torch.Generator().manual_seed(0))
    dataset = [{"input_ids": row, "labels": row} for row in ids]

    def run(seed, out, resume=None):
        torch.manual_seed(seed)
        lm = tiny_llama()
        sa.inject(lm, sa.RoseLoraConfig(r=4, sparsity=0.5, t_init=1, target_modules="all-linear"))
        args = transformers.TrainingArguments(output_dir=str(tmp_path / out), max_steps=6, learning_rate=1e-2,
                                              per_device_train_batch_size=8, report_to=[], save_strategy="steps",
                                              save_steps=3, use_cpu=True, logging_strategy="no", disable_tqdm=True)
        pruner = sa.RoseLoraPruner(lm)
        transformers.Trainer(model=lm, args=args, train_dataset=dataset,
                             callbacks=[pruner.trainer_callback()]).train(resume_from_checkpoint=resume)
        return lm, pruner

    whole, _ = run(0, "whole")
    resumed, pruner = run(0, "resumed", resume=str(tmp_path / "whole" / "checkpoint-3"))
    assert pruner.step_count == 6
    for (n, a), (_, b) in zip(sa.adapter_layers(whole), sa.adapter_layers(resumed)):
        assert torch.equal(a.lora_A != 0, b.lora_A != 0), n
        torch.testing.assert_close(b.lora_A, a.lora_A, msg=n)
        torch.testing.assert_close(b.lora_B, a.lora_B, msg=n)
