"""Precise editing's parts: the subject (given or inferred) and the template it leaves, EasyEdit's JSON fields,
the strict neighbourhood metric, the neighbours and prefixes formed from generic text, and the relations the
benchmark draws its counterfactuals from."""

import json
import math
from dataclasses import replace

import pytest
import torch
from test_edit import Counting, DigitTokenizer

import sparse_adapt as sa
from sparse_adapt import cli
from sparse_adapt.edit import editing


@pytest.mark.parametrize("prompt, subject", [
    ("The capital of North Korea is", "North Korea"),
    ("The capital of Bosnia and Herzegovina is", "Bosnia and Herzegovina"),
    ("Chile's capital is", "Chile"),
    ("What university did Watts Humphrey attend?", "Watts Humphrey"),
    ("A person from United States of America is called", "United States of America"),
    ("The capital of the country is", None),
])
def test_subject_is_inferred(prompt, subject):
    assert editing.infer_subject(prompt) == subject
    assert sa.edit.Edit(prompt, "x").subject == subject


def test_given_subject_and_template():
    e = sa.edit.Edit("The capital of Chile is", "Belgrade", subject="Chile")
    assert e.template == "The capital of {} is" and e.template.format("Peru") == "The capital of Peru is"
    assert sa.edit.Edit("Where is {Chile}?", "x", subject="Chile").template.format("Peru") == "Where is {Peru}?"
    with pytest.raises(ValueError, match="must occur in its prompt"):
        sa.edit.Edit("The capital of Chile is", "Belgrade", subject="Peru")
    assert sa.edit.Edit("the capital of the country is", "x").template is None  # nothing to preserve around


EASYEDIT = {
    "case_id": 3, "prompt": "The mother tongue of Danielle Darrieux is", "subject": "Danielle Darrieux",
    "target_new": "English", "ground_truth": "French",
    "rephrase_prompt": "Danielle Darrieux's mother tongue is",
    "locality_prompt": "The mother tongue of Léon Blum is", "locality_ground_truth": "French",
    "portability": {"Reasoning": [{"prompt": "Danielle Darrieux speaks", "ground_truth": ["English"]}]},
}


def test_easyedit_fields():
    e = sa.edit.Edit.from_dict(EASYEDIT)
    assert (e.prompt, e.target, e.subject) == (EASYEDIT["prompt"], " English", "Danielle Darrieux")
    assert e.rephrasings == ["Danielle Darrieux's mother tongue is"]
    assert e.neighbors == [("The mother tongue of Léon Blum is", "French")]
    assert e.portability == [("Danielle Darrieux speaks", "English")]
    zsre = sa.edit.Edit.from_dict({"src": "What university did Watts Humphrey attend?", "alt": "Harvard",
                                   "rephrase": "Which university did Watts Humphrey go to?",
                                   "loc": "nq question: who sang it", "loc_ans": "Elvis"})
    assert zsre.target == " Harvard" and zsre.subject == "Watts Humphrey" and zsre.neighbors[0][1] == "Elvis"
    counterfact = {k: v for k, v in EASYEDIT.items() if not k.startswith("locality_")}
    nested = sa.edit.Edit.from_dict({**counterfact, "target_new": {"str": "German"},
                                     "locality": {"Relation_Specificity": [{"prompt": "p", "ground_truth": "a"}]}})
    assert nested.target == " German" and nested.neighbors == [("p", "a")]


def test_cli_reads_easyedit_json(tmp_path):
    path = tmp_path / "edits.json"
    path.write_text(json.dumps([EASYEDIT, {**EASYEDIT, "subject": "Léon Blum"}]))
    with pytest.raises(SystemExit, match=r"edits.json\[1\]: the subject"):
        cli._read_edits(str(path))
    path.write_text(json.dumps([EASYEDIT]))
    edits, locality = cli._read_edits(str(path))
    assert edits[0].neighbors and locality == []


def test_neighborhood_is_exact_match_of_the_true_answer():
    # Counting predicts last + 1: after "1 2" it says 3 4 5 ...
    e = sa.edit.Edit("1 2", "3", subject="2", neighbors=[("4", "5 6"), ("7", "8 1")])
    _, m = sa.edit.apply_edits(CountingLM(), DigitTokenizerLM(), [e],
                               sa.edit.EditConfig(method="ft-l", steps=1, ft_module="p", generation_tokens=2,
                                                  preserve=0.0, neighbors=0, prefixes=0))
    assert m.neighborhood == pytest.approx(0.5)  # "4" -> "5 6" holds, "7" -> "8 9" is not "8 1"


def test_rephrased_neighbours_put_each_neighbour_into_each_rephrasing():
    e = sa.edit.Edit("The official language of Chile is", "Nepali", subject="Chile",
                     rephrasings=["In Chile, the official language is", "Which language is official here?"],
                     neighbors=[("The official language of Peru is", "Spanish"), ("Lima is in", "Peru")])
    assert e.rephrasing_templates == ["In {}, the official language is"]  # the second names no subject
    assert e.rephrased_neighbors() == [("In Peru, the official language is", "Spanish")]  # not the other form
    assert sa.edit.Edit("the capital is", "x", rephrasings=["a capital is"]).rephrased_neighbors() == []


def test_rephrased_neighborhood_counts_only_what_the_unedited_model_knew():
    # Counting says last + 1. In the rephrasing "3 {}", neighbour 4 -> "5" is right before the edit, neighbour
    # 7 -> "8 1" is not (it says 8 9): only the first is measured, and it still holds.
    e = sa.edit.Edit("1 2", "3", subject="2", rephrasings=["3 2"], neighbors=[("1 4", "5"), ("1 7", "8 1")])
    _, m = sa.edit.apply_edits(CountingLM(), DigitTokenizerLM(), [e],
                               sa.edit.EditConfig(method="ft-l", steps=1, ft_module="p", generation_tokens=2,
                                                  preserve=0.0, neighbors=0, prefixes=0))
    assert m.neighborhood == pytest.approx(0.5) and m.neighborhood_rephrased == 1.0
    assert "neighbourhood, rephrased" in sa.edit.results_table([m])


def test_neighbour_prompts_in_the_rephrasings_forms():
    e = sa.edit.Edit("The capital of Chile is", "Lima", ["In Chile, the capital is"], subject="Chile")
    config = sa.edit.EditConfig(neighbors=3, similar_neighbors=0.0)
    plain = editing.neighbour_prompts(None, None, [e], config)
    both = editing.neighbour_prompts(None, None, [e], replace(config, neighbor_rephrasings=True))
    assert both[0::2] == plain and len(plain) == 3
    assert both[1::2] == [f"In {p[len('The capital of '):-len(' is')]}, the capital is" for p in plain]


def test_counterfactual_fluency_is_measured_on_the_new_target_and_the_unedited_continuation(monkeypatch):
    """The unedited model's text after each prompt followed by its new target: the target's tokens, then its own
    greedy continuation, `generation_tokens` in all (a target longer than that is cut)."""
    seen = []
    real_fluency = editing.metrics.fluency
    monkeypatch.setattr(editing.metrics, "fluency", lambda texts: seen.append(list(texts)) or real_fluency(texts))
    edits = [sa.edit.Edit("1 2", "7"), sa.edit.Edit("4", "9 9 9 9 9 9")]
    _, m = sa.edit.apply_edits(CountingLM(), DigitTokenizerLM(), edits,
                               sa.edit.EditConfig(method="ft-l", steps=1, ft_module="p", generation_tokens=4,
                                                  preserve=0.0, neighbors=0, prefixes=0))
    assert ["7 8 9 0", "9 9 9 9"] in seen  # not the unedited answers' "3 4 5 6", "5 6 7 8"
    assert m.fluency_counterfactual == pytest.approx(real_fluency(["7 8 9 0", "9 9 9 9"]))
    assert "unedited after the new answer" in sa.edit.results_table([m])
    assert math.isnan(m.fluency_rephrased) and math.isnan(m.fluency_rephrased_before)  # no rephrasings


def test_fluency_after_the_rephrasings_before_and_after_the_edit(monkeypatch):
    """Measured on the unedited model and the edited one, after every rephrasing of every edit."""
    edits = [sa.edit.Edit("1 2", "7", rephrasings=["3", "4 5"]), sa.edit.Edit("4", "9", rephrasings=["6"])]
    step = []

    class Stuck(CountingLM):  # once trained it repeats the last token
        def generate(self, ids, max_new_tokens, **kw):
            for _ in range(max_new_tokens):
                ids = torch.cat([ids, (ids[:, -1:] + (0 if step else 1)) % 10], 1)
            return ids

    monkeypatch.setattr(editing, "_train", lambda *a, **k: step.append(1))
    _, m = sa.edit.apply_edits(Stuck(), DigitTokenizerLM(), edits,
                               sa.edit.EditConfig(method="ft-l", steps=1, ft_module="p", generation_tokens=4,
                                                  preserve=0.0, neighbors=0, prefixes=0))
    fluency = editing.metrics.fluency
    assert m.fluency_rephrased_before == pytest.approx(fluency(["4 5 6 7", "6 7 8 9", "7 8 9 0"]))
    assert m.fluency_rephrased == pytest.approx(fluency(["3 3 3 3", "5 5 5 5", "6 6 6 6"]))
    assert m.fluency_rephrased < m.fluency_rephrased_before
    assert sa.edit.mean_metrics([m, m]).fluency_rephrased == pytest.approx(m.fluency_rephrased)
    assert "fluency after the rephrasings (before)" in sa.edit.results_table([m])


class CountingLM(Counting):
    def get_submodule(self, name):
        return self

    @property
    def weight(self):
        return self.p

    def generate(self, ids, max_new_tokens, **kw):
        for _ in range(max_new_tokens):
            ids = torch.cat([ids, (ids[:, -1:] + 1) % 10], 1)
        return ids

    def forward(self, input_ids, attention_mask=None, use_cache=False, labels=None):
        out = super().forward(input_ids)
        out.logits = out.logits + 0 * self.p  # differentiable in p, so one FT-L step runs
        if labels is not None:
            out.loss = torch.nn.functional.cross_entropy(out.logits[:, :-1].reshape(-1, 10),
                                                         labels[:, 1:].reshape(-1), ignore_index=-100)
        return out


class DigitTokenizerLM(DigitTokenizer):
    eos_token_id = 0

    def decode(self, ids, skip_special_tokens=True):
        return " ".join(str(int(i)) for i in ids)


def test_generic_neighbours_and_prefixes_come_from_the_wikipedia_titles():
    subjects = editing.generic_subjects(16, seed=0, exclude=["Chile"])
    assert len(set(subjects)) == 16 and "Chile" not in subjects
    assert subjects == editing.generic_subjects(16, seed=0, exclude=["Chile"])  # deterministic
    prefixes = editing.generic_prefixes(3)
    assert len(prefixes) == 3 and all(p.endswith(". ") and len(p.split()) <= 8 for p in prefixes)


def test_recipe_config_validation():
    with pytest.raises(ValueError, match="needs something to preserve"):
        sa.edit.EditConfig(preserve=1.0, neighbors=0, preserve_after=0, group_size=None)
    with pytest.raises(ValueError, match="group_size"):
        sa.edit.EditConfig(group_size=0)
    with pytest.raises(ValueError, match="preserve_after"):
        sa.edit.EditConfig(preserve_after=-1)
    with pytest.raises(ValueError, match="layers"):
        sa.edit.EditConfig(layers=(5, 2))
    with pytest.raises(ValueError, match="extra_steps must be >= 0"):
        sa.edit.EditConfig(extra_steps=-1)


@pytest.mark.parametrize("relation", sorted(sa.edit.RELATIONS))
def test_relations_give_facts_and_counterfactuals(relation):
    pytest.importorskip("countryinfo")
    facts = sa.edit.relation_facts(relation)
    assert len(facts) > 50 and all(isinstance(f, str) and f for _, f in facts)
    edits, locality = sa.edit.counterfactual_edits(facts[:40], 2, seed=1, relation=relation, neighbors=5)
    for e in edits:
        assert e.subject in e.prompt and len(e.neighbors) == 5
        assert all(e.subject not in p for p, _ in e.neighbors)
        assert not math.isnan(len(e.rephrasings))


def _digit_edits():
    return [sa.edit.Edit("1 2 3", "7"), sa.edit.Edit("4 5 6", "9 9")]


def _tiny_edit_config(**kw):
    fields = dict(method="lora", steps=40, lr=2e-2, r=4, alpha=8.0, neighbors=0, prefixes=0, preserve=1.0,
                  preserve_after=2, generation_tokens=4)
    return sa.edit.EditConfig(**{**fields, **kw})


def test_edits_in_groups_hold_the_earlier_ones(monkeypatch, device):
    """group_size=1: each edit is made on the model the earlier ones left (merged), its preservation term holding
    the earlier edits' answers and what the unedited model says after the new answer."""
    from toy_models import tiny_llama

    torch.manual_seed(0)
    model, tok = tiny_llama().to(device), DigitTokenizerLM()
    names = [f"model.layers.{i}.mlp.down_proj" for i in range(2)]
    before = [model.get_submodule(n).weight.detach().clone() for n in names]
    terms = []
    real_kl = editing._KL

    def recording_kl(model, sequences, positions, pad_id, device):
        terms.append((sequences, positions))
        return real_kl(model, sequences, positions, pad_id, device)

    monkeypatch.setattr(editing, "_KL", recording_kl)
    edited, m = sa.edit.apply_edits(model, tok, _digit_edits(), _tiny_edit_config(group_size=1))
    assert m.edit_exact == 1.0 and m.edits == 2
    assert not list(sa.adapter_layers(edited))  # each group merged before the next
    assert m.weights_changed > 0
    assert m.weights_changed == sum(int((edited.get_submodule(n).weight != w).sum()) for n, w in zip(names, before))
    # first edit: only the continuation after "1 2 3 7" (2 tokens, scored from the answer's position on)
    (after1, cols1), (after2, cols2), (earlier, cols_earlier) = terms
    assert len(after1) == 1 and after1[0][:4] == [1, 2, 3, 7] and cols1 == [[3, 4]]
    assert after2[0][:5] == [4, 5, 6, 9, 9] and cols2 == [[4, 5]]
    assert earlier == [[1, 2, 3, 7]] and cols_earlier == [[2]]  # the first edit's answer, held while the second


def test_a_failing_group_leaves_the_model_as_it_came(monkeypatch, device):
    from toy_models import tiny_llama

    torch.manual_seed(0)
    model, tok = tiny_llama().to(device), DigitTokenizerLM()
    weights = {n: p.detach().clone() for n, p in model.named_parameters()}
    calls = []
    real_train = editing._train

    def train_then_fail(*args, **kw):
        calls.append(1)
        if len(calls) == 2:
            raise RuntimeError("interrupted")
        return real_train(*args, **kw)

    monkeypatch.setattr(editing, "_train", train_then_fail)
    with pytest.raises(RuntimeError, match="interrupted"):
        sa.edit.apply_edits(model, tok, _digit_edits(), _tiny_edit_config(group_size=1, steps=5))
    assert len(calls) == 2 and not list(sa.adapter_layers(model))  # the first group had been merged
    assert all(torch.equal(p, weights[n]) for n, p in model.named_parameters())


@pytest.mark.parametrize("fields", [dict(group_size=None, merge=True), dict(group_size=None, merge=False)])
def test_weights_changed_counts_one_adapter_merged_or_not(fields, device):
    from toy_models import tiny_llama

    torch.manual_seed(0)
    model, tok = tiny_llama().to(device), DigitTokenizerLM()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    edited, m = sa.edit.apply_edits(model, tok, _digit_edits(), _tiny_edit_config(steps=5, **fields))
    assert bool(list(sa.adapter_layers(edited))) != fields["merge"]
    if fields["merge"]:
        assert m.weights_changed == sum(int((p != before[n]).sum()) for n, p in edited.named_parameters()) > 0
    else:
        assert m.weights_changed > 0


def test_neighbours_are_held_against_the_unedited_model_in_every_group(monkeypatch, device):
    """The neighbour prompts of all groups are chosen once, with the unedited model's distributions: a group holds
    its own and, drawn afresh at every step, the other groups' -- so drift left by an earlier edit is pulled back."""
    from toy_models import tiny_llama

    torch.manual_seed(0)
    model, tok = tiny_llama().to(device), DigitTokenizerLM()
    monkeypatch.setattr(editing, "_neighbours_per_edit",
                        lambda model, tok, edits, config, unseen, per_edit: [["1 1 1", "3 3"], ["2 2 2", "3 3"]])
    with torch.no_grad():
        ids = {p: torch.tensor([[int(c) for c in p.split()]], device=device) for p in ("1 1 1", "2 2 2", "3 3")}
        unedited = {p: torch.log_softmax(model(x).logits[0, -1], -1) for p, x in ids.items()}
    held = []
    real = editing._Preservation

    def recording(model, tokenizer, edits, target_ids, config, device, held_terms=(), earlier=()):
        held.append(list(held_terms))
        return real(model, tokenizer, edits, target_ids, config, device, held_terms, earlier)

    monkeypatch.setattr(editing, "_Preservation", recording)
    _, m = sa.edit.apply_edits(model, tok, _digit_edits(), _tiny_edit_config(group_size=1, neighbors=1))
    assert m.edit_exact == 1.0 and len(held) == 2
    for k, (own, others) in enumerate(held):
        # own: this group's prompts ("3 3", a duplicate, belongs to the first group), against the unedited model
        mine = ["1 1 1", "3 3"] if k == 0 else ["2 2 2"]
        assert torch.allclose(own.base, torch.stack([unedited[p] for p in mine]), atol=1e-5)
        assert isinstance(others, editing._Sampled) and others.n == 1
        assert sorted(others.sequences) == ([2] if k == 0 else [0, 1])
        assert torch.isfinite(others(model))  # one of them, drawn at this call


def test_preserve_with_nothing_to_preserve_is_refused_for_the_call():
    e = sa.edit.Edit("1 2", "3", subject="2")
    config = sa.edit.EditConfig(method="ft-l", steps=1, ft_module="p", preserve=1.0, neighbors=0, preserve_after=0)
    with pytest.raises(ValueError, match="nothing to preserve"):
        sa.edit.apply_edits(CountingLM(), DigitTokenizerLM(), [e], config)


def test_extra_steps_go_on_only_until_the_edit_holds(monkeypatch):
    """An edit that has not held after `steps` trains on, up to `extra_steps` more; one that holds stops."""

    class ConfidentCountingLM(CountingLM):  # last + 1 at probability 0.9996, whatever p is
        def forward(self, input_ids, attention_mask=None, use_cache=False, labels=None):
            out = super().forward(input_ids, attention_mask, use_cache, labels)
            out.logits = out.logits * 10
            return out

    runs = []
    real_bar = editing.progress_bar

    def counting_bar(iterable, desc):
        runs.append(0)
        for x in real_bar(iterable, desc):
            runs[-1] += 1
            yield x

    monkeypatch.setattr(editing, "progress_bar", counting_bar)

    def steps_run(target, extra, early_stop=True):
        config = sa.edit.EditConfig(method="ft-l", steps=3, extra_steps=extra, early_stop=early_stop, ft_module="p",
                                    generation_tokens=2, preserve=0.0, neighbors=0, prefixes=0)
        sa.edit.apply_edits(ConfidentCountingLM(), DigitTokenizerLM(), [sa.edit.Edit("1 2", target)], config)
        return runs[-1]

    assert steps_run("5", 0) == 3 and steps_run("5", 4) == 7  # never holds: the whole budget
    assert steps_run("5", 4, early_stop=False) == 3  # without early stop: exactly `steps`
    assert steps_run("3", 4) == 1  # the model's own answer holds at the first check


def test_edit_batch_marks_the_subjects_last_token():
    tok = DigitTokenizerLM()
    edits = [sa.edit.Edit("1 2 3", "7", subject="2"), sa.edit.Edit("4 5 6", "9 9", subject="5 6")]
    batch, at_subject = editing._edit_batch(tok, edits, [[7], [9, 9]], "cpu", prefixes=["8 "], at_subject=True)
    assert editing._edit_batch(tok, edits, [[7], [9, 9]], "cpu", prefixes=["8 "])[1] is None  # only when asked
    # rows: "1 2 3 7", "8 1 2 3 7", "4 5 6 9 9", "8 4 5 6 9 9" (the unprefixed rows: everywhere)
    assert at_subject.shape == batch["input_ids"].shape == (4, 6)
    assert [row.nonzero().flatten().tolist() for row in at_subject] == [list(range(6)), [2], list(range(6)), [3]]
    no_subject = sa.edit.Edit("1 2", "3")
    no_subject.subject = None  # as for a prompt with no recognisable subject: the whole row
    _, whole = editing._edit_batch(tok, [no_subject], [[3]], "cpu", prefixes=["8 "], at_subject=True)
    assert whole.tolist() == [[1.0] * 4] * 2


def test_updates_only_at_the_marked_positions():
    """Inside _updates_only_at an adapter acts where the mask is 1 and is its base layer elsewhere -- forward and
    gradient -- and after it the adapter acts everywhere again."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(6, 5))
    sa.inject(model, sa.config_for("lora", r=2, target_modules=["0"]))
    layer = model[0]
    torch.nn.init.normal_(layer.lora_B)
    x = torch.randn(2, 4, 6)
    mask = torch.zeros(2, 4)
    mask[0, 1] = mask[1, 3] = 1
    with editing._updates_only_at(model, mask):
        y = model(x)
    full, base = model(x), layer.base_layer(x)
    keep = mask.bool()
    assert torch.allclose(y[keep], full[keep]) and torch.allclose(y[~keep], base[~keep])
    assert not torch.allclose(full[~keep], base[~keep])  # the update does act there once the block is left
    grad_masked = torch.autograd.grad(y.sum(), layer.lora_B)[0]
    grad_marked = torch.autograd.grad(full[keep].sum(), layer.lora_B)[0]
    assert torch.allclose(grad_masked, grad_marked, atol=1e-6)
    assert not layer._forward_hooks


def test_subject_update_edits_and_is_refused_for_ft_l(monkeypatch, device):
    from toy_models import tiny_llama

    torch.manual_seed(0)
    monkeypatch.setattr(editing, "generic_prefixes", lambda n, seed: ["8 ", "9 8 "][:n])  # digits, for the toy
    edits = [sa.edit.Edit("1 2 3", "7", subject="2")]
    config = _tiny_edit_config(subject_update=True, prefixes=2)
    _, m = sa.edit.apply_edits(tiny_llama().to(device), DigitTokenizerLM(), edits, config)
    assert m.edit_exact == 1.0
    for bad in (dict(method="ft-l"), dict(prefixes=0)):
        with pytest.raises(ValueError, match="subject_update applies to the adapter methods"):
            sa.edit.EditConfig(subject_update=True, **bad)
    with pytest.raises(ValueError, match="stop_probability"):
        sa.edit.EditConfig(stop_probability=1.0)


def test_subject_representations_are_each_subjects_last_token_state(device):
    """The representation of a subject is the unit hidden state of its last token after the chosen block, read in
    right-padded batches from a model on any device and returned on the CPU."""
    from toy_models import tiny_llama

    torch.manual_seed(0)
    model = tiny_llama().to(device)
    subjects = ["1 2 3", "4", "5 6"]
    reps = editing.subject_representations(model, DigitTokenizerLM(), subjects, layer=0, batch_size=2)
    assert reps.shape == (3, 32) and reps.device.type == "cpu"
    for subject, rep in zip(subjects, reps):
        ids = torch.tensor([[int(c) for c in subject.split()]], device=device)
        with torch.no_grad():
            hidden = model(input_ids=ids, output_hidden_states=True).hidden_states[1][0, -1]  # after block 0
        torch.testing.assert_close(rep, torch.nn.functional.normalize(hidden.float(), dim=-1).cpu(),
                                   rtol=1e-5, atol=1e-5)


class PunctuationDigits(DigitTokenizerLM):
    """Digits, with 5 decoding as ".": a model's own answer ends before a 5."""

    def decode(self, ids, skip_special_tokens=True):
        return " ".join("." if int(i) == 5 else str(int(i)) for i in ids)


def test_own_answer_ends_before_the_first_punctuation():
    tok = PunctuationDigits()
    assert editing._own_answer_end(tok, [3, 4, 5, 6]) == 2
    assert editing._own_answer_end(tok, [5, 6, 7]) is None  # no answer before the punctuation
    assert editing._own_answer_end(tok, [1] * 8 + [5]) == 8 == editing._MAX_OWN_ANSWER
    assert editing._own_answer_end(tok, [1] * 9 + [5]) is None  # no end within the first _MAX_OWN_ANSWER + 1
    assert editing._own_answer_end(tok, [1, 2]) is None


def test_what_followed_the_own_answer_is_held_up_to_where_it_says_the_answer_again():
    tok = PunctuationDigits()
    assert editing._before_recurrence(tok, [5, 6, 3, 4, 7], "3 4") == [5, 6]
    assert editing._before_recurrence(tok, [5, 6, 3, 7, 4], "3 4") == [5, 6, 3, 7, 4]
    assert editing._before_recurrence(tok, [3, 4, 7], "3 4") == []


@pytest.mark.parametrize("after", ["own_answer", "new_answer"])
def test_after_the_new_answer_the_model_is_held_to_what_followed_its_own(after):
    """CountingLM continues "1 2" with "3 4 . 6 ...": its own answer "3 4", then ". 6". With after="own_answer"
    the term's sequence is the prompt, the new target and ". 6", held to the model's distributions after
    "1 2 3 4" at those tokens; an edit whose own continuation starts with punctuation ("4" -> ". 6") falls back to
    what follows the new target, there, as with after="new_answer"."""
    edits = [sa.edit.Edit("1 2", "7"), sa.edit.Edit("3", "8 8"), sa.edit.Edit("4", "1")]
    config = sa.edit.EditConfig(method="ft-l", preserve_after=2, after=after)
    pairs, reference = editing._after_answer(CountingLM(), PunctuationDigits(), edits, [[7], [8, 8], [1]], config)
    fallback = [([4, 1, 2, 3], [1, 2])]
    if after == "own_answer":
        assert pairs == [([1, 2, 7, 5, 6], [2, 3]), ([3, 8, 8, 5, 6], [2, 3])] + fallback
        assert reference == [([1, 2, 3, 4, 5, 6], [3, 4]), ([3, 4, 5, 6], [1, 2])] + fallback
    else:
        assert pairs == [([1, 2, 7, 8, 9], [2, 3]), ([3, 8, 8, 9, 0], [2, 3])] + fallback
        assert reference is None  # the pairs themselves
    with pytest.raises(ValueError, match="after must be one of"):
        sa.edit.EditConfig(after="counterfactual")


def test_kl_term_held_to_reference_distributions(device):
    """With a reference, the term's unedited distributions are the model's at the reference's positions (there
    as many per sequence), and the term compares the model at its own positions with them."""
    from toy_models import tiny_llama

    torch.manual_seed(0)
    model = tiny_llama().to(device)
    seqs, cols = [[1, 2, 7, 5, 6], [3, 8, 5]], [[2, 3], [1]]
    ref_seqs, ref_cols = [[1, 2, 3, 4, 5, 6], [3, 4, 5]], [[3, 4], [1]]
    term = editing._KL(model, seqs, cols, 0, device, reference=(ref_seqs, ref_cols))

    def log_probs(sequences, positions):
        with torch.no_grad():
            return torch.cat([torch.log_softmax(model(torch.tensor([s], device=device)).logits[0, c].float(), -1)
                              for s, c in zip(sequences, positions)])

    torch.testing.assert_close(term.base, log_probs(ref_seqs, ref_cols), rtol=1e-5, atol=1e-5)
    p, q = log_probs(ref_seqs, ref_cols), log_probs(seqs, cols)
    torch.testing.assert_close(term(model), (p.exp() * (p - q)).sum(-1).mean(), rtol=1e-4, atol=1e-6)
    assert float(term(model).detach()) > 0  # the model after "7" is not yet what it was after "3 4"
    with pytest.raises(ValueError, match="as many positions"):
        editing._KL(model, seqs, cols, 0, device, reference=(ref_seqs, [[3], [1]]))
