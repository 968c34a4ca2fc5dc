"""Training an offset: U = B + a LoRA adapter (or, with ``parameters="full"``,
all of U's weights), trained on the forget set (and
retain set) with an unlearning objective on the combined logits (DESIGN.md,
"Training"; δ-unlearning, arXiv 2404.11045, Eq. 4):

* ``proxy`` mode (default, any remote): combined logits = l_U, reference = B;
* ``exact`` mode (the paper): combined logits = l_R + l_U − l_B with R an
  in-process model over the same vocabulary; R and B frozen.

The data order is a function of (seed, epoch) and LoRA has no dropout, so a
run resumed from a checkpoint (``<out>.ckpt/``, written atomically every
``checkpoint_every`` optimizer steps) ends with the same weights as an
uninterrupted one. The artifact is written atomically at the end
(:func:`proxy.artifact.save_artifact`); the training log (loss per step,
forget and retain loss per epoch) goes to ``<out>.train.jsonl``.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import json
import math
import os
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from .artifact import PARAMETERS, save_artifact, weights_sha256
from .data import DataSet, Encoded, Example, collate, encode, load_dataset, without_end_of_turn
from .objectives import Batches, get_objective, mean_nll
from .vocab import ByteVocab

IDK_FILE = Path(__file__).with_name("resources") / "idk.jsonl"


@dataclass(frozen=True)
class TrainConfig:
    forget: str
    out: str
    objective: str = "NPO+GD"
    retain: str | None = None
    base: str = "smollm2"
    mode: str = "proxy"
    remote: str | None = None
    """exact mode: the in-process model R (folder, GGUF or packaged name)."""
    forget_weight: float | None = None
    """open-unlearning's gamma (None: the objective's default, 1, or 0.125 for SimNPO)."""
    retain_weight: float | None = None
    """open-unlearning's alpha, the weight of the retain term (None: 1)."""
    lr: float = 5e-4
    """LoRA on a 135M model moves slowly at 1e-4; 5e-4 unlearns a small set in a few epochs."""
    epochs: int = 5
    batch_size: int = 4
    retain_batch_size: int | None = None
    """Retain examples per step (None: ``batch_size``); the retain set is cycled through."""
    grad_accum: int = 1
    warmup_steps: int = 0
    max_length: int = 256
    """QA answers are short; 256 tokens covers prompt + answer with room to spare."""
    seed: int = 0
    parameters: str = "lora"
    """``"lora"`` (a peft adapter on B, the default) or ``"full"`` (fine-tune all of U's weights; B is a frozen copy)."""
    lora_rank: int = 8
    lora_alpha: int = 16
    lora_layers: tuple[int, ...] | None = None
    """Decoder layers that get the adapter (peft's ``layers_to_transform``); None: all."""
    target_modules: tuple[str, ...] = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
    forget_end_of_turn: bool = False
    """Keep the end-of-turn label in the forget term. Off by default: the end-of-turn holds
    no forget-set information, and lowering it makes U suppress end-of-turn on every prompt
    (:func:`proxy.data.without_end_of_turn`). open-unlearning keeps it. Retain terms always keep it."""
    offset_alpha: float = 1.0
    """α written to the manifest (the serving strength)."""
    checkpoint_every: int = 10
    resume: bool = False
    log: str | None = None

    def settings(self) -> dict[str, Any]:
        """What the manifest records (no paths to the data, no text)."""
        keep = (
            "objective",
            "forget_weight",
            "retain_weight",
            "mode",
            "lr",
            "epochs",
            "batch_size",
            "retain_batch_size",
            "grad_accum",
            "warmup_steps",
            "max_length",
            "seed",
            "parameters",
            "forget_end_of_turn",
            "lora_rank",
            "lora_alpha",
            "lora_layers",
            "target_modules",
        )
        return {k: (list(v) if isinstance(v, tuple) else v) for k, v in dataclasses.asdict(self).items() if k in keep}


class CombinedScorer:
    """The combined model for the objectives (:class:`proxy.objectives.Scorer`)."""

    def __init__(self, model: Any, remote: Any | None = None, reference: Any | None = None) -> None:
        self.model = model  # a PeftModel (U with the adapter, B without), or U itself when `reference` is B
        self.remote = remote  # R (exact mode) or None (proxy mode)
        self.reference = reference  # B as a frozen copy (full fine-tuning), or None (B = adapter disabled)

    def _r(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        assert self.remote is not None
        with torch.no_grad():
            return self.remote(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits

    def _b(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        b = self.reference if self.reference is not None else self.model
        off = contextlib.nullcontext() if self.reference is not None else self.model.disable_adapter()
        with torch.no_grad(), off:
            return b(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits

    def logits(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        u = self.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        if self.remote is None:
            return u
        return self._r(batch) + u - self._b(batch)  # l_R + l_U − l_B  (arXiv 2404.11045, Eq. 4)

    def ref_logits(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return self._b(batch) if self.remote is None else self._r(batch)


def _idk_answers() -> list[str]:
    return [json.loads(line)["answer"] for line in IDK_FILE.read_text().splitlines() if line.strip()]


@dataclass
class _Plan:
    """Deterministic batches: a function of (seed, epoch, index) only."""

    forget: list[Encoded]
    retain: list[Encoded]
    idk: list[Encoded]
    batch_size: int
    retain_batch_size: int
    seed: int
    pad_id: int
    per_epoch: int = field(init=False)

    def __post_init__(self) -> None:
        self.per_epoch = math.ceil(len(self.forget) / self.batch_size)

    def batches(self, epoch: int) -> Iterator[Batches]:
        g = torch.Generator().manual_seed(self.seed * 100_003 + epoch)
        order = torch.randperm(len(self.forget), generator=g).tolist()
        r_order = torch.randperm(len(self.retain), generator=g).tolist() if self.retain else []
        rb = self.retain_batch_size
        for k in range(self.per_epoch):
            idx = order[k * self.batch_size : (k + 1) * self.batch_size]
            retain = None
            if self.retain:
                r_idx = [r_order[(k * rb + j) % len(r_order)] for j in range(rb)]
                retain = collate([self.retain[i] for i in r_idx], self.pad_id)
            idk = collate([self.idk[i] for i in idx], self.pad_id) if self.idk else None
            yield Batches(collate([self.forget[i] for i in idx], self.pad_id), retain, idk)


def _trainable_state(model: Any) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


def _save_checkpoint(path: Path, model: Any, optimizer: Any, scheduler: Any, step: int) -> None:
    tmp = path.with_name(path.name + ".tmp")
    torch.save(
        {
            "step": step,
            "weights": _trainable_state(model),
            "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict(),
        },
        tmp,
    )
    os.replace(tmp, path)


def offset_key(cfg: TrainConfig) -> str:
    """What an offset trained with ``cfg`` depends on, for caching it: the
    settings, the data files' bytes and the base model's folder name (16 hex digits)."""
    import hashlib
    import json

    from .models import local_model_dir

    h = hashlib.sha256(json.dumps(cfg.settings(), sort_keys=True).encode())
    for path in (cfg.forget, cfg.retain):
        h.update(Path(path).read_bytes() if path else b"-")
    h.update(local_model_dir(cfg.base).name.encode())
    return h.hexdigest()[:16]


def load_models(cfg: TrainConfig) -> tuple[Any, Any, Any, Any]:
    """(base model, tokenizer, remote R or None, vocab) for ``cfg``.

    Raises:
        ValueError: exact mode without a remote, or a remote with another vocabulary.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from .models import local_model_dir

    folder = local_model_dir(cfg.base)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    base = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    vocab = ByteVocab.from_tokenizer(tokenizer)
    remote = None
    if cfg.mode == "exact":
        if not cfg.remote:
            raise ValueError("--mode exact needs --remote (an in-process model over the same vocabulary)")
        r_folder = local_model_dir(cfg.remote)
        if ByteVocab.from_tokenizer(AutoTokenizer.from_pretrained(r_folder)).fingerprint() != vocab.fingerprint():
            raise ValueError("--remote must use the same tokenizer as --base in exact mode")
        remote = AutoModelForCausalLM.from_pretrained(r_folder, dtype=torch.float32).eval().requires_grad_(False)
    elif cfg.mode != "proxy":
        raise ValueError(f"--mode must be 'proxy' or 'exact', not {cfg.mode!r}")
    return base, tokenizer, remote, vocab


def train(
    cfg: TrainConfig,
    *,
    models: tuple[Any, Any, Any, Any] | None = None,
    stop_after: int | None = None,
    progress: bool = True,
) -> Path:
    """Train an offset and write its artifact to ``cfg.out``.

    ``models`` passes preloaded (base, tokenizer, remote, vocab) (tests);
    ``stop_after`` interrupts after that many optimizer steps, as a crash
    would (tests of ``--resume``).

    Raises:
        proxy.data.DataError: a bad data file (nothing is written).
        ValueError: bad settings (unknown objective, retain set missing, ...).
        FileExistsError: ``cfg.out`` exists.
    """
    from peft import LoraConfig, get_peft_model
    from transformers import get_scheduler

    objective = get_objective(cfg.objective, forget_weight=cfg.forget_weight, retain_weight=cfg.retain_weight)
    if cfg.parameters not in PARAMETERS:
        raise ValueError(f"parameters must be one of {PARAMETERS}, not {cfg.parameters!r}")
    if objective.retain_required and not cfg.retain:  # before loading anything
        raise ValueError(f"objective {cfg.objective} needs a retain set (--retain)")
    out = Path(cfg.out)
    if out.exists():
        raise FileExistsError(f"{out} exists; remove it or choose another --out")
    forget_set = load_dataset(cfg.forget)
    retain_set: DataSet | None = load_dataset(cfg.retain) if cfg.retain else None

    base, tokenizer, remote, vocab = models if models is not None else load_models(cfg)
    base_sha = weights_sha256(base)
    eot = vocab.eot_ids[0]
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eot

    def enc(examples: tuple[Example, ...] | list[Example]) -> list[Encoded]:
        return [encode(e, tokenizer, eot, cfg.max_length) for e in examples]

    idk: list[Encoded] = []
    if cfg.objective == "DPO":
        answers = _idk_answers()
        idk = enc([Example(e.prompt, answers[i % len(answers)]) for i, e in enumerate(forget_set.examples)])
    forget_items = enc(forget_set.examples)
    if not cfg.forget_end_of_turn:
        forget_items = [without_end_of_turn(it, eot) for it in forget_items]
    plan = _Plan(
        forget_items,
        enc(retain_set.examples) if retain_set else [],
        idk,
        cfg.batch_size,
        cfg.retain_batch_size or cfg.batch_size,
        cfg.seed,
        pad,
    )

    torch.manual_seed(cfg.seed)
    reference = None
    if cfg.parameters == "full":
        reference = copy.deepcopy(base).eval().requires_grad_(False)  # B stays as it was
        model = base.requires_grad_(True)
    else:
        lora = LoraConfig(
            r=cfg.lora_rank,
            lora_alpha=cfg.lora_alpha,
            lora_dropout=0.0,
            target_modules=list(cfg.target_modules),
            layers_to_transform=list(cfg.lora_layers) if cfg.lora_layers is not None else None,
        )
        model = get_peft_model(base, lora)
    model.train()
    scorer = CombinedScorer(model, remote, reference)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=cfg.lr)
    total_steps = math.ceil(plan.per_epoch * cfg.epochs / cfg.grad_accum)
    scheduler = get_scheduler("linear", optimizer, num_warmup_steps=cfg.warmup_steps, num_training_steps=total_steps)

    ckpt = out.with_name(out.name + ".ckpt")
    step = 0
    if cfg.resume and ckpt.exists():
        state = torch.load(ckpt, weights_only=False)
        with torch.no_grad():
            named = dict(model.named_parameters())
            for n, t in state["weights"].items():
                named[n].copy_(t)
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        step = int(state["step"])
    log_path = Path(cfg.log) if cfg.log else out.with_name(out.name + ".train.jsonl")
    log = open(log_path, "a" if cfg.resume else "w")
    started = time.monotonic()

    def record(entry: dict[str, Any]) -> None:
        log.write(json.dumps(entry) + "\n")
        log.flush()

    micro = 0
    bar = tqdm(total=total_steps, initial=step, desc=f"train {cfg.objective}", unit="step", disable=not progress)
    try:
        for epoch in range(cfg.epochs):
            for batches in plan.batches(epoch):
                micro += 1
                if micro <= step * cfg.grad_accum:
                    continue  # done before the checkpoint we resumed from
                loss = objective(scorer, batches) / cfg.grad_accum
                loss.backward()
                if micro % cfg.grad_accum:
                    continue
                optimizer.step()
                scheduler.step()
                optimizer.zero_grad(set_to_none=True)
                step += 1
                bar.update(1)
                record(
                    {
                        "step": step,
                        "epoch": epoch,
                        "loss": loss.item() * cfg.grad_accum,
                        "lr": scheduler.get_last_lr()[0],
                    }
                )
                if step % cfg.checkpoint_every == 0:
                    _save_checkpoint(ckpt, model, optimizer, scheduler, step)
                if stop_after is not None and step >= stop_after:
                    _save_checkpoint(ckpt, model, optimizer, scheduler, step)
                    raise KeyboardInterrupt(f"stopped after {step} steps")
            record({"epoch": epoch, **_epoch_losses(scorer, plan)})
    finally:
        bar.close()
        log.close()
    model.eval()
    data = {"forget": forget_set.describe(), "retain": retain_set.describe() if retain_set else None}
    training = {**cfg.settings(), "steps": step, "seconds": round(time.monotonic() - started, 1)}
    path = save_artifact(
        out,
        model,
        base_name=cfg.base,
        base_sha256=base_sha,
        vocab=vocab,
        alpha=cfg.offset_alpha,
        objective=cfg.objective,
        training=training,
        data=data,
        parameters=cfg.parameters,
    )
    ckpt.unlink(missing_ok=True)
    return path


@torch.no_grad()
def _epoch_losses(scorer: CombinedScorer, plan: _Plan) -> dict[str, float]:
    """Mean NLL of the forget and retain sets under the combined model (the log's per-epoch numbers)."""
    out: dict[str, float] = {}
    for name, items in (("forget_loss", plan.forget), ("retain_loss", plan.retain)):
        if not items:
            continue
        total = 0.0
        for k in range(0, len(items), plan.batch_size):
            batch = collate(items[k : k + plan.batch_size], plan.pad_id)
            total += mean_nll(scorer.logits(batch), batch["labels"]).item() * len(items[k : k + plan.batch_size])
        out[name] = total / len(items)
    return out
