"""Adding a method is one record: a method defined here, outside the library, works through inject, forward,
merge / unmerge, save / load and the command line without a line of the library changing."""

import torch
from torch import nn

import sparse_adapt as sa
from sparse_adapt import cli
from sparse_adapt.adapters import Method, register_method, unregister_method

from toy_models import make_model


class MaskedHalfLora(Method):
    """A made-up method: half of LoRA's update, masked by the base weight's zeros (so it preserves sparsity)."""

    name = "masked_half_lora"
    help = "test-only: s/2 · (B@A) ⊙ (W != 0)"
    config_class = sa.SparseLoraConfig
    preserves_sparsity = True

    def forward(self, layer, x):
        return nn.functional.linear(x, layer.base_layer.weight + self.delta_weight(layer), layer.base_layer.bias)

    def delta_weight(self, layer):
        w = layer.base_layer.weight
        return 0.5 * layer.scale * (layer.lora_B @ layer.lora_A) * (w != 0)

    @torch.no_grad()
    def fold(self, layer, sign):
        sa.masked_merge_(layer.base_layer.weight, layer.lora_A, layer.lora_B, 0.5 * sign * layer.scale)


def test_a_new_method_is_one_record(tmp_path):
    register_method(MaskedHalfLora())
    try:
        assert "masked_half_lora" in sa.method_names()
        model, example = make_model("attention")
        base_out = model(example_x := example())
        sa.inject(model, sa.config_for("masked_half_lora", r=4, alpha=8, target_modules="all-linear"))
        torch.testing.assert_close(model(example_x), base_out)  # B starts at zero
        for _, layer in sa.adapter_layers(model):
            nn.init.normal_(layer.lora_B)
        adapted = model(example_x)
        zeros = {n: (layer.base_layer.weight == 0).clone() for n, layer in sa.adapter_layers(model)}
        sa.save_adapter(model, tmp_path)
        sa.merge(model, unload=False)
        torch.testing.assert_close(model(example_x), adapted, rtol=1e-5, atol=1e-5)
        for name, layer in sa.adapter_layers(model):
            assert torch.equal(layer.base_layer.weight == 0, zeros[name])
        sa.unmerge(model)
        reloaded, _ = make_model("attention")
        sa.load_adapter(reloaded, tmp_path)
        torch.testing.assert_close(reloaded(example_x), adapted, rtol=1e-5, atol=1e-5)
        assert "masked_half_lora" in cli.build_parser().parse_args(["demo", "--method", "masked_half_lora"]).method
    finally:
        unregister_method("masked_half_lora")
    assert "masked_half_lora" not in sa.method_names()
