"""The command line checks its arguments and its input files before it works: bad values are refused with a
message naming them, before any model is loaded or any step is trained."""

import json

import pytest
import torch

import sparse_adapt as sa
from sparse_adapt import cli
from sparse_adapt.demo import run as demo_run
from sparse_adapt.demo.settings import DemoSettings
from sparse_adapt.training import roselora

from toy_models import tiny_llama


@pytest.mark.parametrize("args, match", [
    (["--steps", "0"], "--steps: expected a positive integer"),
    (["--threads", "0"], "--threads: expected a positive integer"),
    (["--layers", "-1"], "--layers: expected a positive integer"),
    (["--r", "x"], "--r: expected a positive integer"),
    (["--lr=-1e-3"], "--lr: expected a positive number"),
    (["--sparsity", "1.5"], "sparsity must be a fraction"),
    (["--sparsity", "4:2"], "'N:M' with 0 < N < M"),
    (["--sparsity", "half"], "expected 'N:M' or a fraction"),
])
def test_demo_refuses_bad_values_at_parse_time(args, match, capsys):
    with pytest.raises(SystemExit) as exit_:
        cli.build_parser().parse_args(["demo", *args])
    assert exit_.value.code == 2
    assert match in capsys.readouterr().err


def test_demo_sparsity_takes_fractions_and_n_m():
    parse = cli.build_parser().parse_args
    assert parse(["demo", "--sparsity", "0.5"]).sparsity == 0.5
    assert parse(["demo", "--sparsity", "2:4"]).sparsity == "2:4"
    assert parse(["demo"]).sparsity == "2:4"


@pytest.mark.parametrize("args, match", [
    (["--steps", "0"], "--steps: expected a positive integer"),
    (["--extra-steps", "-1"], "--extra-steps: expected an integer >= 0"),
    (["--extra-steps", "2.5"], "--extra-steps: expected an integer >= 0, got '2.5'"),
])
def test_edit_refuses_bad_values_at_parse_time(args, match, capsys):
    with pytest.raises(SystemExit) as exit_:
        cli.build_parser().parse_args(["edit", "--edits", "e.jsonl", *args])
    assert exit_.value.code == 2
    assert match in capsys.readouterr().err


def test_edit_steps_default_to_the_config():
    args = cli.build_parser().parse_args(["edit", "--edits", "e.jsonl"])
    assert (args.steps, args.extra_steps) == (sa.edit.EditConfig.steps, sa.edit.EditConfig.extra_steps)
    assert cli.build_parser().parse_args(["edit", "--edits", "e.jsonl", "--extra-steps", "0"]).extra_steps == 0
    assert not args.hold_rephrasings and sa.edit.EditConfig.neighbor_rephrasings is False
    assert not args.subject_update and sa.edit.EditConfig.subject_update is False
    assert args.after == sa.edit.EditConfig.after == "new_answer"


def test_edit_switches_reach_the_config(tmp_path, monkeypatch):
    edits = tmp_path / "e.jsonl"
    edits.write_text(json.dumps({"prompt": "The capital of France is", "target": "Rome"}))
    seen = []
    monkeypatch.setattr("sparse_adapt.assets.models.load_smollm2", lambda: (torch.nn.Linear(1, 1), None))
    monkeypatch.setattr(sa.edit, "apply_edits", lambda m, t, e, config, loc: seen.append(config) or 1 / 0)
    with pytest.raises(ZeroDivisionError):
        cli.main(["edit", "--edits", str(edits), "--hold-rephrasings", "--subject-update", "--extra-steps", "3",
                  "--together", "--after", "own_answer"])
    assert (seen[0].neighbor_rephrasings, seen[0].subject_update, seen[0].extra_steps, seen[0].group_size,
            seen[0].after) == (True, True, 3, None, "own_answer")


def test_an_unusable_out_fails_before_the_run(tmp_path, monkeypatch):
    blocker = tmp_path / "file"
    blocker.write_text("")
    monkeypatch.setattr(sa.demo, "run_demo", lambda s: pytest.fail("the run started"))
    with pytest.raises(SystemExit, match="cannot write to"):
        cli.main(["demo", "--quick", "--out", str(blocker / "sub")])


def test_the_demo_prunes_roselora(monkeypatch):
    steps = []
    monkeypatch.setattr(roselora.RoseLoraPruner, "step", lambda self: steps.append(self.step_count))
    model = tiny_llama()
    s = DemoSettings.quick(steps=3, progress=False, eval_every=3, r=4)
    g = torch.Generator().manual_seed(0)
    batch = {"input_ids": torch.randint(0, 96, (2, 8), generator=g)}
    batch["labels"] = batch["input_ids"].clone()
    batch["attention_mask"] = torch.ones_like(batch["input_ids"])
    masks = demo_run.pruned_masks(model, sa.adapters.find_targets(model, "all-linear"))
    demo_run.finetune(model, "roselora", s, [batch], [batch], [batch], masks)
    assert len(steps) == 3


def write_lines(path, *objects):
    path.write_bytes(b"\n".join(o if isinstance(o, bytes) else json.dumps(o).encode() for o in objects))
    return str(path)


GOOD = {"prompt": "The capital of France is", "target": "Rome"}


@pytest.mark.parametrize("line, match", [
    ({**GOOD, "locality": "The capital of Spain is"}, "locality must be a list"),
    ({**GOOD, "locality": [""]}, "locality must be a list of non-empty strings"),
    ({**GOOD, "rephrasings": "France's capital is"}, "rephrasings of .* must be a list"),
    ({**GOOD, "portability": [{"prompt": "x"}]}, "portability of .* pairs"),
    ({**GOOD, "portability": "Paris"}, "portability of .* pairs"),
    ({**GOOD, "portability": [["a", "b", "c"]]}, "portability of .* pairs"),
    (["The capital of France is", "Rome"], "must be a JSON object"),
    (b"{not json", "edits.jsonl:2"),
])
def test_edit_files_are_checked_line_by_line(tmp_path, line, match):
    with pytest.raises(SystemExit, match=match):
        cli._read_edits(write_lines(tmp_path / "edits.jsonl", GOOD, line))


def test_edit_file_that_is_not_utf8(tmp_path):
    path = tmp_path / "edits.jsonl"
    path.write_bytes(json.dumps(GOOD).encode() + b"\n\xff\xfe\n")
    with pytest.raises(SystemExit, match="not UTF-8"):
        cli._read_edits(str(path))


def test_edit_portability_as_objects_or_pairs(tmp_path):
    edits, locality = cli._read_edits(write_lines(
        tmp_path / "e.jsonl", {**GOOD, "portability": [{"prompt": "a", "answer": "b"}, ["c", "d"]],
                               "locality": ["The capital of Spain is"]}))
    assert edits[0].portability == [("a", "b"), ("c", "d")] and locality == ["The capital of Spain is"]


def test_save_adapter_with_ft_l_is_refused(tmp_path, capsys):
    path = write_lines(tmp_path / "e.jsonl", GOOD)
    with pytest.raises(SystemExit):
        cli.main(["edit", "--edits", path, "--method", "ft-l", "--save-adapter", str(tmp_path / "a")])
    assert "--save-adapter needs an adapter method" in capsys.readouterr().err


def test_save_adapter_of_edits_made_one_after_another_is_refused(tmp_path):
    path = write_lines(tmp_path / "e.jsonl", GOOD, {**GOOD, "prompt": "The capital of Peru is"})
    with pytest.raises(SystemExit, match="add --together"):
        cli.main(["edit", "--edits", path, "--save-adapter", str(tmp_path / "a")])
    assert not (tmp_path / "a").exists() or not any((tmp_path / "a").iterdir())
