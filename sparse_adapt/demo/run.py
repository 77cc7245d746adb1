"""The demo's work: load and prune the model, then fine-tune, merge and measure each method on the same budget."""

import copy
import math
import statistics
import sys
import time
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence

import torch
from torch import nn

from .. import distributed, prune
from ..adapters import config_for, find_targets, get_method, inject, merge
from ..assets import models, text
from ..lm import lm_batches, perplexity, to_device
from ..memory import SavedBytes
from ..progress import progress_bar
from ..training import pruner_for
from .launch import data_parallel, init_distributed, local_rows
from .settings import DemoSettings


@dataclass
class MethodResult:
    method: str
    init: str
    history: List[Dict[str, float]] = field(default_factory=list)  # {"step", "ppl"} at the evaluation points
    train_loss: List[float] = field(default_factory=list)
    adapted_ppl: float = math.nan
    merged_ppl: float = math.nan
    step_seconds: float = math.nan
    saved_bytes: int = 0
    keeps_zeros: bool = False
    filled_fraction: float = 0.0  # of the pruned zeros that the merge made non-zero


@dataclass
class DemoResult:
    settings: DemoSettings
    dense_ppl: float
    pruned_ppl: float
    prune_summary: str
    methods: List[MethodResult]
    machine: str
    model_layers: int = 0  # decoder layers of the model as shipped (settings.layers may keep fewer)
    adapted_modules: int = 0  # projections pruned and adapted
    saved_model: Optional[Dict[str, object]] = None  # {"method", "path", "bytes", "dense_bytes"}: what was written


def log(msg: str) -> None:
    """One line per stage on stderr (rank 0 only): long runs show where they are even without progress bars."""
    if distributed.rank() == 0:
        print(f"[sparse_adapt] {msg}", file=sys.stderr, flush=True)


def truncate_layers(model: nn.Module, layers: Optional[int]) -> nn.Module:
    if layers is not None:
        model.model.layers = model.model.layers[:layers]
        model.config.num_hidden_layers = layers
    return model


def pruned_masks(model: nn.Module, names: Sequence[str]) -> Dict[str, torch.Tensor]:
    return {n: model.get_submodule(n).weight.detach() != 0 for n in names}


def zero_pattern_check(model: nn.Module, masks: Dict[str, torch.Tensor]):
    """(every merged weight has exactly the pruned zeros, fraction of pruned zeros the merge filled)."""
    exact, filled, zeros = True, 0, 0
    for name, keep in masks.items():
        nonzero = model.get_submodule(name).weight.detach() != 0
        exact &= bool(torch.equal(nonzero, keep))
        filled += int((nonzero & ~keep).sum())
        zeros += int((~keep).sum())
    return exact, filled / max(zeros, 1)


def method_config(method: str, s: DemoSettings, init: Optional[str] = None, **options):
    """Each method with the initialisation its paper uses (LoRS: gradient-SVD), unless `init` says otherwise;
    `options` are more fields of its config (exact_grad=True ...)."""
    return config_for(method, r=s.r, alpha=s.alpha, init=init or get_method(method).preferred_init,
                      target_modules="all-linear", **options)


def finetune(model: nn.Module, method: str, s: DemoSettings, train, calibration, eval_batches,
             masks, init: Optional[str] = None, lr: Optional[float] = None, **options) -> MethodResult:
    """Inject `method`, train s.steps steps (AdamW at `lr`, default s.lr), merge, measure; `options` go to its
    config."""
    config = method_config(method, s, init, **options)
    inject(model, config, calibration_batches=[to_device(local_rows(b), s.device) for b in calibration[:2]])
    result = MethodResult(method, config.init)
    trained = data_parallel(model, s.device)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr or s.lr)
    pruner = pruner_for(model, total_steps=s.steps)  # roselora: its sensitivity pruning after every step
    result.history.append({"step": 0, "ppl": perplexity(model, eval_batches, s.device)})
    times = []
    model.train()
    for step in progress_bar(range(1, s.steps + 1), f"fine-tune {method}", enabled=s.progress):
        batch = to_device(local_rows(train[(step - 1) % len(train)]), s.device)
        t0 = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        if step == 1:
            with SavedBytes([*model.parameters(), *model.buffers()]) as saved:
                loss = trained(**batch, use_cache=False).loss
            result.saved_bytes = saved.total
        else:
            loss = trained(**batch, use_cache=False).loss
        loss.backward()
        opt.step()
        if pruner is not None:
            pruner.step()
        if s.device.startswith("cuda"):
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
        result.train_loss.append(loss.item())
        if step % s.eval_every == 0 or step == s.steps:
            result.history.append({"step": step, "ppl": perplexity(model, eval_batches, s.device)})
            log(f"{method} step {step}: loss {loss.item():.3f}, held-out perplexity {result.history[-1]['ppl']:.2f}")
    result.step_seconds = statistics.median(times[1:] or times)  # the first step also counts saved bytes
    result.adapted_ppl = result.history[-1]["ppl"]
    merge(model)
    result.keeps_zeros, result.filled_fraction = zero_pattern_check(model, masks)
    result.merged_ppl = perplexity(model, eval_batches, s.device)
    log(f"{method} merged: perplexity {result.merged_ppl:.2f}, zero pattern "
        f"{'exactly kept' if result.keeps_zeros else f'lost ({100 * result.filled_fraction:.1f}% filled)'}")
    return result


@dataclass
class PrunedSetup:
    """The pruned model and the data every method is fine-tuned and measured on."""

    model: nn.Module
    train: List[Dict[str, torch.Tensor]]
    calibration: List[Dict[str, torch.Tensor]]
    eval_batches: List[Dict[str, torch.Tensor]]
    masks: Dict[str, torch.Tensor]
    dense_ppl: float
    pruned_ppl: float
    prune_summary: str
    model_layers: int
    tokenizer: object = None


def prepare(s: DemoSettings) -> PrunedSetup:
    """Load the model and the text, measure the dense perplexity, prune, measure again."""
    init_distributed(s.device)
    torch.manual_seed(s.seed)
    torch.set_num_threads(s.threads)
    model, tokenizer = models.load_smollm2()
    model_layers = model.config.num_hidden_layers
    model = truncate_layers(model, s.layers).to(s.device)
    n_train = s.steps * s.batch_size
    train_texts, eval_texts = text.wiki_split(n_train + s.calibration_texts, s.eval_texts, seed=s.seed)
    train = lm_batches(tokenizer, train_texts[:n_train], s.batch_size, s.seq_len)
    calibration = lm_batches(tokenizer, train_texts[n_train:], s.batch_size, s.seq_len)
    eval_batches = lm_batches(tokenizer, eval_texts, s.batch_size, s.seq_len)

    dense_ppl = perplexity(model, eval_batches, s.device)
    log(f"dense perplexity {dense_ppl:.2f}; pruning ({s.pruner} {s.sparsity})")
    if s.pruner == "wanda":
        report = prune.wanda_(model, [to_device(b, s.device) for b in calibration], s.sparsity, progress=s.progress)
    elif s.pruner == "magnitude":
        report = prune.magnitude_(model, s.sparsity, progress=s.progress)
    else:
        raise ValueError(f"pruner must be 'wanda' or 'magnitude', got {s.pruner!r}")
    masks = pruned_masks(model, find_targets(model, "all-linear"))
    pruned_ppl = perplexity(model, eval_batches, s.device)
    log(f"{report.summary()}; pruned perplexity {pruned_ppl:.2f}")
    return PrunedSetup(model, train, calibration, eval_batches, masks, dense_ppl, pruned_ppl, report.summary(),
                       model_layers, tokenizer)


def machine_description(s: DemoSettings) -> str:
    machine = torch.cuda.get_device_name() if s.device.startswith("cuda") else f"CPU, {s.threads} thread(s)"
    world = distributed.world_size()
    return f"{machine}{f' x {world} processes (DDP)' if world > 1 else ''}, torch {torch.__version__}"


def save_for_serving(model: nn.Module, result: MethodResult, s: DemoSettings, tokenizer) -> Optional[Dict]:
    """The merged model as a compressed-tensors 2:4 checkpoint (bf16), when the method kept the 2:4 zeros."""
    if prune.parse_sparsity(s.sparsity)[2:] != (2, 4) or not result.keeps_zeros:
        log(f"not writing a 2:4 checkpoint: sparsity {s.sparsity}, zeros kept: {result.keeps_zeros}")
        return None
    from pathlib import Path

    from ..serving import save_sparse24

    path = save_sparse24(model, Path(s.out_dir) / "merged-2of4", tokenizer=tokenizer, dtype=torch.bfloat16)
    stored = sum(f.stat().st_size for f in path.glob("*.safetensors"))
    dense = sum(t.numel() * 2 for t in model.state_dict().values() if t.is_floating_point())
    if getattr(model.config, "tie_word_embeddings", False):
        dense -= model.get_output_embeddings().weight.numel() * 2
    log(f"{result.method} merged model written for serving: {path} ({stored / 2**20:.1f} MiB, dense bf16 "
        f"{dense / 2**20:.1f} MiB)")
    return {"method": result.method, "path": str(path), "bytes": stored, "dense_bytes": dense}


def run_demo(s: DemoSettings) -> DemoResult:
    setup = prepare(s)
    results = []
    saved = None
    for i, method in enumerate(s.methods):
        # each method starts from the same pruned model; the last one may consume it
        candidate = setup.model if i == len(s.methods) - 1 else copy.deepcopy(setup.model)
        torch.manual_seed(s.seed)
        results.append(finetune(candidate, method, s, setup.train, setup.calibration, setup.eval_batches, setup.masks))
        if i == 0 and s.save_merged and distributed.rank() == 0:
            saved = save_for_serving(distributed.unwrap(candidate), results[-1], s, setup.tokenizer)
        del candidate
    return DemoResult(s, setup.dense_ppl, setup.pruned_ppl, setup.prune_summary, results, machine_description(s),
                      setup.model_layers, len(setup.masks), saved)
