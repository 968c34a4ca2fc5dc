"""Training an offset: U = B + a LoRA adapter (or, with ``parameters="full"``,
all of U's weights), trained on the forget set (and
retain set) with an unlearning objective on the combined logits (docs/concepts.md,
"Training"; δ-unlearning, arXiv 2404.11045, Eq. 4; :mod:`proxy.training.targets`):

* ``proxy`` mode (default, any remote): combined logits = l_U, reference = B;
* ``exact`` mode (the paper): combined logits = l_R + l_U − l_B with R an
  in-process model over the same vocabulary; R and B frozen;
* ``remote`` mode (the paper as far as a top-k API allows): R is a vLLM
  server (``--remote URL``) that scores the training text with
  ``prompt_logprobs`` (:class:`proxy.training.targets.RemoteLogits`, once per example, cached on
  disk); at each answer position the combined logits are l_R + l_U − l_B on
  the remote's top-k plus the target token and nothing elsewhere, the
  reference is l_R on the same support. Positions the remote does not score
  (the prompt) fall back to proxy mode. The remote must tokenize the text as
  the pair does (checked; a clear error otherwise).

The data order is a function of (seed, epoch) and LoRA has no dropout, so a
run resumed from a checkpoint (``<out>.ckpt/``, written atomically every
``checkpoint_every`` optimizer steps; :mod:`proxy.training.checkpoint`) ends with the same weights as an
uninterrupted one. The artifact is written atomically at the end
(:func:`proxy.pair.artifact.save_artifact`); the training log (loss per step,
the final forget and retain loss) goes to ``<out>.train.jsonl``.

This module holds the run itself (:func:`train`) in its steps: the settings
(:mod:`proxy.training.config`), the scope sets (:mod:`proxy.training.scope_sets`), the
step plan (:mod:`proxy.training.plan`), the optimizer loop, the self-check
(:mod:`proxy.training.selfcheck`) and the artifact.
"""

from __future__ import annotations

import copy
import json
import logging
import math
import time
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from proxy.decoding.scope_gate import ScopeGate
from proxy.pair.artifact import save_artifact, weights_sha256
from proxy.training.checkpoint import load_checkpoint, save_checkpoint
from proxy.training.config import TrainConfig
from proxy.training.data import DataSet, collate, load_dataset
from proxy.training.greedy import PairModels
from proxy.training.objectives import Objective, answer_nll
from proxy.training.plan import Plan, build_plan
from proxy.training.scope import check_sets
from proxy.training.scope_gate import fit_scope_gate
from proxy.training.scope_sets import ScopeSets, build_scope_sets
from proxy.training.selfcheck import calibrate_and_check
from proxy.training.targets import CombinedScorer, load_models, remote_logits

logger = logging.getLogger(__name__)


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
        proxy.training.data.DataError: a bad data file (nothing is written).
        ValueError: bad settings (unknown objective, retain set missing, ...).
        FileExistsError: ``cfg.out`` exists.
    """
    objective = cfg.validate()  # before loading anything
    out = Path(cfg.out)
    if out.exists():
        raise FileExistsError(f"{out} exists; remove it or choose another --out")
    forget_set = load_dataset(cfg.forget)
    retain_set: DataSet | None = load_dataset(cfg.retain) if cfg.retain else None
    for warning in check_sets(forget_set, retain_set):  # raises on an example in both sets
        logger.warning("%s", warning)

    base, tokenizer, remote, vocab = models if models is not None else load_models(cfg)
    base_sha = weights_sha256(base)
    scope = build_scope_sets(cfg, forget_set, base, tokenizer, vocab, base_sha)
    plan = build_plan(cfg, objective, forget_set, retain_set, scope, tokenizer, vocab)

    torch.manual_seed(cfg.seed)
    model, reference = _trainable_model(cfg, base)
    if cfg.mode == "remote":
        remote = remote_logits(cfg, tokenizer, [*plan.forget, *plan.retain, *plan.idk], progress=progress)
    scorer = CombinedScorer(model, remote, reference)
    ckpt = out.with_name(out.name + ".ckpt")
    step, epochs, started = _optimize(cfg, objective, scorer, plan, out, ckpt, stop_after=stop_after, progress=progress)
    model.eval()
    data = {
        "forget": forget_set.describe(),
        "retain": retain_set.describe() if retain_set else None,
        **scope.describe(),
    }
    training = {**cfg.settings(), "steps": step, "epochs_run": epochs, "seconds": round(time.monotonic() - started, 1)}
    extra: dict[str, Any] = {}
    gate = None
    pair = PairModels(model, tokenizer, vocab.eot_ids, b=reference)
    if cfg.scope_gate:
        gate, record = _scope_gate(cfg, pair, forget_set, retain_set, scope, known=scorer.b_hidden)
        if record is not None:
            extra["scope_gate"] = record
    scorer.b_hidden.clear()  # tens of MB the self-check does not need
    if cfg.calibrate:
        extra.update(_self_check(cfg, pair, forget_set, scope, gate))
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
        extra=extra,
        gate=gate,
    )
    ckpt.unlink(missing_ok=True)
    return path


def _trainable_model(cfg: TrainConfig, base: Any) -> tuple[Any, Any | None]:
    """(the model that training updates, in training mode; B as a frozen copy, or None):
    B with a LoRA adapter (B is the adapter disabled), or with ``parameters="full"`` B's
    own weights beside a frozen copy of them."""
    # peft is imported here, not at the top: it loads transformers, which takes seconds.
    from peft import LoraConfig, get_peft_model

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
    return model, reference


def _optimize(
    cfg: TrainConfig,
    objective: Objective,
    scorer: CombinedScorer,
    plan: Plan,
    out: Path,
    ckpt: Path,
    *,
    stop_after: int | None,
    progress: bool,
) -> tuple[int, int, float]:
    """Run the optimizer over ``plan`` (resuming from ``ckpt`` with ``cfg.resume``, writing it
    every ``cfg.checkpoint_every`` steps), logging each step; (optimizer steps, epochs,
    ``time.monotonic()`` at the start).

    Raises:
        KeyboardInterrupt: ``stop_after`` steps were taken (the checkpoint is written).
    """
    # transformers is imported here, not at the top: importing it takes seconds.
    from transformers import get_scheduler

    model = scorer.model
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=cfg.lr)
    epochs = cfg.epochs
    if cfg.min_steps:
        epochs = max(epochs, math.ceil(cfg.min_steps * cfg.grad_accum / plan.per_epoch))
    total_steps = math.ceil(plan.per_epoch * epochs / cfg.grad_accum)
    scheduler = get_scheduler("linear", optimizer, num_warmup_steps=cfg.warmup_steps, num_training_steps=total_steps)

    step = 0
    if cfg.resume and ckpt.exists():
        step = load_checkpoint(ckpt, model, optimizer, scheduler)
    log_path = Path(cfg.log) if cfg.log else out.with_name(out.name + ".train.jsonl")
    log = open(log_path, "a" if cfg.resume else "w")
    started = time.monotonic()

    def record(entry: dict[str, Any]) -> None:
        log.write(json.dumps(entry) + "\n")
        log.flush()

    if objective.reads_ref_nll:
        scorer.reference_pass([*plan.forget, *plan.idk], plan.pad_id)
    micro = 0
    bar = tqdm(total=total_steps, initial=step, desc=f"train {cfg.objective}", unit="step", disable=not progress)
    try:
        for epoch in range(epochs):
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
                    save_checkpoint(ckpt, model, optimizer, scheduler, step)
                if stop_after is not None and step >= stop_after:
                    save_checkpoint(ckpt, model, optimizer, scheduler, step)
                    raise KeyboardInterrupt(f"stopped after {step} steps")
        # The combined model's forget and retain loss once, at the end: every epoch it cost
        # about a third of the optimizer's time on the demo set (2 CPU cores).
        record({"epoch": epochs - 1, **_epoch_losses(scorer, plan)})
    finally:
        bar.close()
        log.close()
    return step, epochs, started


def _scope_gate(
    cfg: TrainConfig,
    pair: PairModels,
    forget_set: DataSet,
    retain_set: DataSet | None,
    scope: ScopeSets,
    known: dict[tuple[int, ...], torch.Tensor] | None = None,
) -> tuple[ScopeGate | None, dict[str, Any] | None]:
    """The scope gate of the trained U of ``pair`` and its manifest record
    (:func:`proxy.training.scope_gate.fit_scope_gate`): in scope the forget set and B's own
    answers to it, out of scope the user's retain set, the broad retain set's training part
    and the trained neighbours; B's hidden states that training's reference passes computed
    (``known``) are not computed again. None (with a warning) when there is nothing out of scope."""
    started = time.monotonic()
    inside = [*forget_set.examples, *(own for _, own, _ in scope.own_answers)]
    outside = [*(retain_set.examples if retain_set else ()), *scope.general, *scope.neighbours]
    if not outside:
        logger.warning(
            "%s: no scope gate: nothing out of scope to fit it on (no retain set, general_retain and "
            "neighbours off); the offset applies wherever τ lets it",
            forget_set.path,
        )
        return None, None
    with pair.base_model() as b:
        gate, record = fit_scope_gate(
            b,
            b.get_output_embeddings().weight,
            pair.tokenizer,
            pair.eot,
            inside,
            outside,
            l2=cfg.scope_gate_l2,
            threshold=cfg.scope_gate_threshold,
            max_length=cfg.max_length,
            known=known,
        )
    record["seconds"] = round(time.monotonic() - started, 1)
    return gate, record


def _self_check(
    cfg: TrainConfig, pair: PairModels, forget_set: DataSet, scope: ScopeSets, gate: ScopeGate | None = None
) -> dict[str, Any]:
    """The manifest's ``offset_threshold`` and ``self_check`` for the trained U of ``pair``
    (:func:`proxy.training.selfcheck.calibrate_and_check`; with ``gate``, the held-out checks
    and the forget answers are decoded through it, τ is calibrated without it)."""
    checked = time.monotonic()
    report = calibrate_and_check(
        pair,
        gate=gate,
        forget=forget_set.examples,
        calibration=scope.calibration,
        check=scope.check,
        neighbours=scope.neighbour_check,
        forget_guesses=(
            [scope.base_answers.get(i) for i, e in enumerate(forget_set.examples) if e.prompt is not None]
            if scope.base_answers is not None
            else None
        ),
        tau_through_gate=cfg.tau_through_gate,
        alpha=cfg.offset_alpha,
        unchanged=cfg.unchanged,
        scope=cfg.offset_scope,
        common_words=scope.common_words,
        names=scope.names,
    )
    report["seconds"] = round(time.monotonic() - checked, 1)
    return {"offset_threshold": report["offset_threshold"], "offset_scope": cfg.offset_scope, "self_check": report}


EPOCH_LOSS_RETAIN = 32
LOSS_BATCH = 16


@torch.no_grad()
def _epoch_losses(scorer: CombinedScorer, plan: Plan) -> dict[str, float]:
    """Per example, its NLL per answer token under the combined model, averaged over the
    forget set's examples (the user's, not the items that ride with them: B's own answers and
    the cross answers, about 20 per example with the defaults) and over the retain set's first
    :data:`EPOCH_LOSS_RETAIN` examples (the user's retain set comes first): the log's final
    numbers, in batches of :data:`LOSS_BATCH`."""
    out: dict[str, float] = {}
    for name, items in (("forget_loss", plan.forget[: plan.primary]), ("retain_loss", plan.retain[:EPOCH_LOSS_RETAIN])):
        if not items:
            continue
        total = 0.0
        for k in range(0, len(items), LOSS_BATCH):
            part = items[k : k + LOSS_BATCH]
            summed, count = answer_nll(scorer.logits, collate(part, plan.pad_id))
            total += (summed / count.clamp(min=1)).sum().item()
        out[name] = total / len(items)
    return out
