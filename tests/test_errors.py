"""Every bad input of the op contract (docs/ops.md) raises a clear error naming the argument -- eagerly and under
fake tensors (what torch.compile traces with), with the same exception type and the same message -- and nothing
crashes."""

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch._subclasses.fake_tensor import FakeTensorMode

import sparse_adapt as sa

# name -> (function that corrupts a valid argument dict in place, text the error must contain)
CORRUPTIONS = {
    "weight_1d": (lambda a: a.update(weight=a["weight"][0]), "weight must be 2-D"),
    "weight_3d": (lambda a: a.update(weight=a["weight"][None]), "weight must be 2-D"),
    "weight_empty": (lambda a: a.update(weight=a["weight"][:0], lora_B=a["lora_B"][:0]), "weight is empty"),
    "weight_int": (lambda a: a.update(weight=a["weight"].long()), "weight must be float32"),
    "lora_A_in": (lambda a: a.update(lora_A=torch.cat([a["lora_A"], a["lora_A"][:, :1]], 1)), "lora_A must have shape"),
    "lora_A_1d": (lambda a: a.update(lora_A=a["lora_A"][0]), "lora_A must be 2-D"),
    "lora_B_out": (lambda a: a.update(lora_B=torch.cat([a["lora_B"], a["lora_B"][:1]], 0)), "lora_B must have shape"),
    "lora_B_rank": (lambda a: a.update(lora_B=torch.cat([a["lora_B"], a["lora_B"][:, :1]], 1)),
                    "lora_B must have shape"),
    "rank_0": (lambda a: a.update(lora_A=a["lora_A"][:0], lora_B=a["lora_B"][:, :0]), "rank"),
    "lora_A_dtype": (lambda a: a.update(lora_A=a["lora_A"].double()), "lora_A has dtype"),
    "lora_B_dtype": (lambda a: a.update(lora_B=a["lora_B"].half()), "lora_B has dtype"),
    "mask_dtype": (lambda a: a.update(mask=(a["weight"] != 0).float()), "mask must be a bool tensor"),
    "mask_shape": (lambda a: a.update(mask=(a["weight"] != 0)[:, 1:]), "mask must have weight's shape"),
    "scale_nan": (lambda a: a.update(scale=math.nan), "scale must be finite"),
    "scale_inf": (lambda a: a.update(scale=-math.inf), "scale must be finite"),
}
LINEAR_CORRUPTIONS = {
    "x_in": (lambda a: a.update(x=torch.cat([a["x"], a["x"][..., :1]], -1)), "x must have shape"),
    "x_0d": (lambda a: a.update(x=a["x"].sum()), "x must have shape"),
    "x_dtype": (lambda a: a.update(x=a["x"].double()), "x has dtype"),
    "bias_shape": (lambda a: a.update(bias=a["bias"][1:]), "bias must have shape"),
    "bias_dtype": (lambda a: a.update(bias=a["bias"].bfloat16()), "bias has dtype"),
}


def valid_args(op, out, in_, r, lead):
    g = torch.Generator().manual_seed(out * 100 + in_)
    w = torch.randn(out, in_, generator=g)
    args = dict(weight=w, lora_A=torch.randn(r, in_, generator=g), lora_B=torch.randn(out, r, generator=g),
                scale=0.5, mask=None)
    if op == "masked_lora_linear":
        args.update(x=torch.randn(*lead, in_, generator=g), bias=torch.randn(out, generator=g))
    return args


def call(op, a):
    if op == "masked_lora_linear":
        return sa.masked_lora_linear(a["x"], a["weight"], a["bias"], a["lora_A"], a["lora_B"], a["scale"], a["mask"])
    fn = sa.masked_merge if op == "masked_merge" else sa.masked_merge_
    return fn(a["weight"], a["lora_A"], a["lora_B"], a["scale"], a["mask"])


OPS = ["masked_merge", "masked_merge_", "masked_lora_linear"]
CASES = [(op, c) for op in OPS for c in CORRUPTIONS] + [("masked_lora_linear", c) for c in LINEAR_CORRUPTIONS]


@pytest.mark.parametrize("op,name", CASES)
@settings(max_examples=8)
@given(out=st.integers(2, 9), in_=st.integers(2, 9), r=st.integers(1, 4), lead=st.lists(st.integers(1, 3), max_size=2))
def test_bad_input_raises_naming_the_argument(op, name, out, in_, r, lead):
    corrupt, expected = {**CORRUPTIONS, **LINEAR_CORRUPTIONS}[name]
    args = valid_args(op, out, in_, r, lead)
    call(op, dict(args))  # the valid arguments pass
    corrupt(args)
    with pytest.raises((RuntimeError, ValueError), match=expected) as info:
        call(op, args)
    assert str(info.value).startswith(f"sparse_adapt.{op}: ")
    assert_fake_raises_the_same(lambda a: call(op, a), args, info.value)


def assert_fake_raises_the_same(fn, args, real):
    """fn on fake copies of args raises what it raised on the real ones: same type, same message."""
    with FakeTensorMode() as mode:
        fake = {k: mode.from_tensor(v) if isinstance(v, torch.Tensor) else v for k, v in args.items()}
        with pytest.raises((RuntimeError, ValueError)) as info:
            fn(fake)
    assert type(info.value) is type(real)
    assert str(info.value) == str(real)


def test_scale_nan_is_a_value_error():
    a = valid_args("masked_merge", 3, 4, 2, [])
    a["scale"] = math.nan
    with pytest.raises(ValueError, match="scale must be finite"):
        call("masked_merge", a)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("moved", ["lora_A", "lora_B", "mask", "x", "bias"])
def test_mixed_devices(moved):
    a = valid_args("masked_lora_linear", 8, 6, 2, [3])
    a["mask"] = a["weight"] != 0
    a = {k: v.cuda() if isinstance(v, torch.Tensor) else v for k, v in a.items()}
    a[moved] = a[moved].cpu()
    with pytest.raises(RuntimeError, match=f"{moved} is on"):
        call("masked_lora_linear", a)


def test_mixed_devices_under_fake_tensors():
    a = valid_args("masked_merge", 4, 5, 2, [])
    a["lora_A"] = a["lora_A"].to("meta")
    with pytest.raises(RuntimeError, match="lora_A is on meta but weight is on cpu"):
        call("masked_merge", a)


def test_backward_ops_check_the_gradient_shape():
    a = valid_args("masked_lora_linear", 4, 5, 2, [3])
    ops = torch.ops.sparse_adapt
    a["grad_out"], a["grad"] = torch.zeros(3, 5), torch.zeros(5, 4)

    def linear_backward(a):
        ops.masked_lora_linear_backward(a["grad_out"], a["x"], a["weight"], a["lora_A"], a["lora_B"], 1.0, None, False,
                                        [True] * 5)

    def merge_backward(a):
        ops.masked_merge_backward(a["grad"], a["weight"], a["lora_A"], a["lora_B"], 1.0, None, [True, True])

    for fn, expected in ((linear_backward, r"grad_out must have shape \(\.\.\., out\) = \[3, 4\] to match x \(3, 5\)"),
                         (merge_backward, r"grad must have weight's shape \(4, 5\), got \(5, 4\)")):
        with pytest.raises(RuntimeError, match=expected) as info:
            fn(a)
        assert_fake_raises_the_same(fn, a, info.value)


MULTI_CORRUPTIONS = {
    "lengths": (lambda a: a.update(ks=a["ks"][:1]), "one entry per matrix"),
    "k_of_the_second": (lambda a: a["ks"].__setitem__(1, 99), r"k must be in \[0, \d+\] \(the length of params\[1\]"),
    "score_dtype_of_the_second": (lambda a: a["scores"].__setitem__(1, a["scores"][1].double()),
                                  r"scores\[1\] must be float32"),
    "grad_shape_of_the_first": (lambda a: a["grads"].__setitem__(0, a["grads"][0][1:]),
                                r"grads\[0\] must have params\[0\]'s shape"),
}


@pytest.mark.parametrize("name", MULTI_CORRUPTIONS)
def test_ema_topk_multi_bad_input(name):
    g = torch.Generator().manual_seed(0)
    shapes = [(4, 6), (5, 3)]
    args = dict(params=[torch.randn(s, generator=g) for s in shapes],
                grads=[torch.randn(s, generator=g) for s in shapes],
                scores=[torch.zeros(s) for s in shapes], ks=[2, 1], dims=[1, 0])
    corrupt, expected = MULTI_CORRUPTIONS[name]
    corrupt(args)

    def call_multi(a):
        sa.ema_topk_multi_(a["params"], a["grads"], a["scores"], 0.8, a["ks"], a["dims"])

    before = [p.clone() for p in args["params"]]
    with pytest.raises((RuntimeError, ValueError), match=expected) as info:
        call_multi(args)
    assert all(torch.equal(p, b) for p, b in zip(args["params"], before))
    with FakeTensorMode() as mode:
        fake = {k: [mode.from_tensor(t) for t in v] if k in ("params", "grads", "scores") else v
                for k, v in args.items()}
        with pytest.raises((RuntimeError, ValueError)) as fake_info:
            call_multi(fake)
    assert type(fake_info.value) is type(info.value) and str(fake_info.value) == str(info.value)


EMA_CORRUPTIONS = {
    "k_negative": (lambda a: a.update(k=-1), "k must be in"),
    "k_too_large": (lambda a: a.update(k=a["param"].shape[a["dim"]] + 1), "k must be in"),
    "beta_negative": (lambda a: a.update(beta=-0.1), "beta must be in"),
    "beta_above_one": (lambda a: a.update(beta=1.5), "beta must be in"),
    "beta_nan": (lambda a: a.update(beta=math.nan), "beta must be in"),
    "dim": (lambda a: a.update(dim=2), "dim must be 0"),
    "param_1d": (lambda a: a.update(param=a["param"][0], grad=a["grad"][0], score=a["score"][0]), "param must be 2-D"),
    "param_int": (lambda a: a.update(param=a["param"].long(), grad=a["grad"].long()), "param must be float32"),
    "grad_shape": (lambda a: a.update(grad=a["grad"][:, 1:]), "grad must have param's shape"),
    "grad_dtype": (lambda a: a.update(grad=a["grad"].double()), "grad has dtype"),
    "score_dtype": (lambda a: a.update(score=a["score"].bfloat16()), "score must be float32"),
    "score_shape": (lambda a: a.update(score=a["score"][1:]), "score must have param's shape"),
    "score_device": (lambda a: a.update(score=a["score"].to("meta")), "score is on"),
}


@pytest.mark.parametrize("name", EMA_CORRUPTIONS)
@settings(max_examples=8)
@given(rows=st.integers(2, 9), cols=st.integers(2, 9), dim=st.sampled_from([0, 1]))
def test_ema_topk_bad_input(name, rows, cols, dim):
    g = torch.Generator().manual_seed(rows * 10 + cols)
    args = dict(param=torch.randn(rows, cols, generator=g), grad=torch.randn(rows, cols, generator=g),
                score=torch.zeros(rows, cols), beta=0.8, k=1, dim=dim)
    corrupt, expected = EMA_CORRUPTIONS[name]
    corrupt(args)
    before = args["param"].clone()
    with pytest.raises((RuntimeError, ValueError), match=expected) as info:
        sa.ema_topk_(**args)
    if before.device.type != "meta":
        assert torch.equal(args["param"], before), "a rejected call must not modify param"
    if args["score"].device.type != "meta":  # (a meta score is dispatched to the fake kernel eagerly already)
        assert_fake_raises_the_same(lambda a: sa.ema_topk_(**a), args, info.value)


def test_ema_topk_k_and_beta_are_value_errors():
    p = torch.randn(3, 4)
    with pytest.raises(ValueError, match="k must be in"):
        sa.ema_topk_(p, p.clone(), torch.zeros(3, 4), 0.5, 5, 1)
    with pytest.raises(ValueError, match="beta must be in"):
        sa.ema_topk_(p, p.clone(), torch.zeros(3, 4), 2.0, 1, 1)
