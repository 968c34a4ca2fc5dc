"""Training an offset: U = B + a LoRA adapter (or, with ``parameters="full"``,
all of U's weights), trained on the forget set (and
retain set) with an unlearning objective on the combined logits (DESIGN.md,
"Training"; δ-unlearning, arXiv 2404.11045, Eq. 4):

* ``proxy`` mode (default, any remote): combined logits = l_U, reference = B;
* ``exact`` mode (the paper): combined logits = l_R + l_U − l_B with R an
  in-process model over the same vocabulary; R and B frozen;
* ``remote`` mode (the paper as far as a top-k API allows): R is a vLLM
  server (``--remote URL``) that scores the training text with
  ``prompt_logprobs`` (:class:`RemoteLogits`, once per example, cached on
  disk); at each answer position the combined logits are l_R + l_U − l_B on
  the remote's top-k plus the target token and nothing elsewhere, the
  reference is l_R on the same support. Positions the remote does not score
  (the prompt) fall back to proxy mode. The remote must tokenize the text as
  the pair does (checked; a clear error otherwise).

The data order is a function of (seed, epoch) and LoRA has no dropout, so a
run resumed from a checkpoint (``<out>.ckpt/``, written atomically every
``checkpoint_every`` optimizer steps) ends with the same weights as an
uninterrupted one. The artifact is written atomically at the end
(:func:`proxy.pair.artifact.save_artifact`); the training log (loss per step,
the final forget and retain loss) goes to ``<out>.train.jsonl``.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import json
import logging
import math
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from proxy.common.aio import gather_or_cancel
from proxy.common.files import RESOURCES, atomic_file
from proxy.common.literals import Parameters, RetainPositions, TrainMode
from proxy.decoding.vocab import ByteVocab
from proxy.pair.artifact import PARAMETERS, save_artifact, weights_sha256
from proxy.training.data import (
    DataSet,
    Encoded,
    Example,
    both_dropped,
    collate,
    encode,
    load_dataset,
    only_dropped_labels,
    outside_words,
    without_end_of_turn,
    without_first_answer_token,
    without_prompt_copies,
    without_spans,
    word_spans,
)
from proxy.training.facts import fact_words, forget_names, lower_case_words, shared_words, words_of
from proxy.training.objectives import Batches, get_objective, mean_nll
from proxy.training.scope import (
    check_sets,
    example_text,
    forget_subjects,
    general_sets,
    generate_answers,
    mentions,
    neighbour_examples,
)
from proxy.training.selfcheck import PairModels, calibrate_and_check

IDK_FILE = RESOURCES / "idk.jsonl"
logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class TrainConfig:
    forget: str
    out: str
    objective: str = "NPO+KL"
    """NPO with a KL term to B on the retain set (open-unlearning's NPO+KL): the KL term holds
    B's own answers, which the broad retain set and the neighbours are."""
    retain: str | None = None
    base: str = "smollm2"
    mode: TrainMode = "proxy"
    remote: str | None = None
    """exact mode: the in-process model R (folder, GGUF or packaged name); remote mode: the
    base URL of a vLLM OpenAI-compatible server (``http://host:port/v1``)."""
    remote_model: str | None = None
    """remote mode: the upstream's model name (default: the only one it serves)."""
    remote_top_k: int = 20
    """remote mode: candidates per position from ``prompt_logprobs`` (vLLM's default maximum is 20)."""
    forget_weight: float | None = None
    """open-unlearning's gamma (None: the objective's default, 1, or 0.125 for SimNPO)."""
    retain_weight: float | None = 10.0
    """open-unlearning's alpha, the weight of the retain term (None: 1). 10: with weight 1 the
    offset shifted answers to unrelated prompts (SmolLM2, demo and tofu-lite)."""
    retain_positions: RetainPositions | None = None
    """Where a KL retain term is averaged: ``"all"`` attended positions (open-unlearning's
    definition) or ``"answer"`` positions only (:func:`proxy.training.objectives.get_objective`). The
    default is ``"answer"``: averaged over whole sequences, a short answer's first position
    weighs about 1/80 of the term and U learned to start no answer with a name. None (the
    default): ``"answer"`` for objectives with a KL retain term, else ``"all"``
    (:meth:`positions`)."""
    lr: float = 1e-3
    """LoRA on a 135M model moves slowly at 1e-4; with the retain term at weight 10, 1e-3
    unlearns a small set in a few epochs."""
    epochs: int = 8
    batch_size: int = 4
    retain_batch_size: int | None = 8
    """Retain examples per step (None: ``batch_size``); the retain set is cycled through."""
    grad_accum: int = 1
    warmup_steps: int = 0
    max_length: int = 256
    """QA answers are short; 256 tokens covers prompt + answer with room to spare."""
    seed: int = 0
    parameters: Parameters = "lora"
    """``"lora"`` (a peft adapter on B, the default) or ``"full"`` (fine-tune all of U's weights; B is a frozen copy)."""
    lora_rank: int = 8
    lora_alpha: int = 16
    lora_layers: tuple[int, ...] | None = None
    """Decoder layers that get the adapter (peft's ``layers_to_transform``); None: all."""
    target_modules: tuple[str, ...] = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
    forget_end_of_turn: bool = False
    """Keep the end-of-turn label in the forget term. Off by default: the end-of-turn holds
    no forget-set information, and lowering it makes U suppress end-of-turn on every prompt
    (:func:`proxy.training.data.without_end_of_turn`). open-unlearning keeps it. Retain terms always keep it."""
    forget_first_token: bool = True
    """Keep the answer's first label in the forget term (open-unlearning does). Off: see
    :func:`proxy.training.data.without_first_answer_token`."""
    forget_prompt_copies: bool = False
    """Keep answer tokens that repeat the prompt word for word (the asked-about name) in the
    forget term (open-unlearning does). Off: see :func:`proxy.training.data.without_prompt_copies`;
    where the retain term reads labels (NLL, or KL over answer positions) and a retain set
    is given, those tokens join the retain term of their forget example's step instead."""
    forget_shared_words: bool = True
    """Keep the words a forget answer shares with B's answers to its neighbour questions in
    the forget term (the default). Off: those words, the answer's form ("The capital of …
    is" in "The capital of France is Paris.") rather than its fact
    (:func:`proxy.training.facts.shared_words`), leave it; lowered, they taught U to answer the
    neighbours in another form or language ("Der Königin der Bundesliga" for the capital of
    Germany). Measured only together with ``forget_own_answers``: the neighbours then kept
    their form but lost their facts ("The capital of Germany is indeed the largest country
    …"; the README's real-knowledge table), so it is not the default."""
    forget_own_answers: bool = False
    """Add B's own greedy answers to the forget questions to the forget term, labelled only
    on the words that carry the forget answer's fact (:func:`proxy.training.facts.fact_words`), for
    the answers that hold one; each rides in the step of its forget example, so the number
    of steps stays the forget set's (:class:`_Plan`). A forget answer written by the user
    ("Albert Einstein developed the theory of relativity.") is not the path by which B
    states the fact ("The theory of relativity was developed by Albert Einstein …");
    lowering the user's phrasing alone left B's own path, and the paraphrases that follow
    it, nearly untouched (``bench.real_knowledge``). Needs the broad retain set or the
    calibration (its corpus tells common words from facts). Off by default: on the
    real-knowledge benchmark it took greedy probe leak to 0 but cost neighbour and general
    retention (the README's table)."""
    pin_prompt_copies: bool = False
    """With ``forget_prompt_copies`` off: the copied tokens join the retain term of their
    forget example's step (where it reads labels), so that U keeps repeating the asked-about
    name as B does (tofu-lite's recipe). Off by default: when the name is itself what is to
    be forgotten ("What is Albert Einstein famous for?" in a forget set about Einstein), the
    pinned copies taught U to keep saying it and the offset forgot nothing (bench.real_knowledge)."""
    near_share: float = 0.5
    """The share of each step's retain batch drawn from the near retain examples (the
    user's retain set and the trained neighbours), the rest from the broad retain set;
    each part is cycled through over the whole run (:class:`_Plan`). Drawn from one pool,
    the few near examples were lost among the broad set's 259 (24 steps of 8 saw each
    neighbour about once) and the offset garbled the neighbours it was meant to keep
    (other capitals when one capital is forgotten; ``bench.real_knowledge``). Used when
    both parts are non-empty."""
    min_steps: int = 24
    """At least this many optimizer steps: ``epochs`` is raised for a small forget set (8
    examples are 2 steps an epoch at batch size 4; 16 steps left SmolLM2 recalling them). 0: ``epochs`` alone."""
    general_retain: bool = True
    """Train with the broad retain set beside ``retain`` (:func:`proxy.training.scope.general_sets`):
    general prompts answered by B itself, so that forgetting one entity does not teach U
    to avoid famous names and facts in general."""
    neighbours: int = 3
    """Neighbour questions per forget question (:func:`proxy.training.scope.neighbour_examples`): the
    forget set's questions about nearby entities, answered by B at train time; a quarter of
    them is held out for the self-check. 0: none."""
    calibrate: bool = True
    """End with τ calibrated on the broad retain set's calibration part and a self-check
    (:func:`proxy.training.selfcheck.calibrate_and_check`), both written to the manifest."""
    unchanged: float = 0.95
    """The fraction of calibration prompts whose greedy answers τ keeps exactly B's."""
    offset_alpha: float = 1.0
    """α written to the manifest (the serving strength)."""
    checkpoint_every: int = 10
    resume: bool = False
    log: str | None = None

    def positions(self) -> str:
        """``retain_positions`` as training applies it (None resolved for the objective).

        Raises:
            ValueError: an unknown objective.
        """
        if self.retain_positions is not None:
            return self.retain_positions
        return "answer" if get_objective(self.objective).retain_is_kl else "all"

    def settings(self) -> dict[str, Any]:
        """What the manifest records (no paths to the data, no text)."""
        keep: tuple[str, ...] = (
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
        # Later settings only when they differ from their default, so that the settings (and
        # cache keys) of offsets trained before them stay as they were.
        if self.mode == "remote":
            keep = (*keep, "remote", "remote_model", "remote_top_k")
        if self.positions() != "all":
            keep = (*keep, "retain_positions")
        if not self.forget_first_token:
            keep = (*keep, "forget_first_token")
        if not self.forget_prompt_copies:
            keep = (*keep, "forget_prompt_copies")
            if not self.pin_prompt_copies:
                keep = (*keep, "pin_prompt_copies")
        if self.min_steps:
            keep = (*keep, "min_steps")
        if not self.forget_shared_words:
            keep = (*keep, "forget_shared_words")
        if self.forget_own_answers:
            keep = (*keep, "forget_own_answers")
        if self.general_retain:
            keep = (*keep, "general_retain", "near_share")
        if self.neighbours:
            keep = (*keep, "neighbours")
        if self.calibrate:
            keep = (*keep, "calibrate", "unchanged")
        values = {**dataclasses.asdict(self), "retain_positions": self.positions()}
        return {k: (list(v) if isinstance(v, tuple) else v) for k, v in values.items() if k in keep}


class CombinedScorer:
    """The combined model for the objectives (:class:`proxy.training.objectives.Scorer`)."""

    def __init__(self, model: Any, remote: Any | None = None, reference: Any | None = None) -> None:
        self.model = model  # a PeftModel (U with the adapter, B without), or U itself when `reference` is B
        self.remote = remote  # R (exact mode), RemoteLogits (remote mode) or None (proxy mode)
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
        if isinstance(self.remote, RemoteLogits):
            values, support, scored = self.remote.dense(batch, u.shape[-1])
            combined = torch.where(support, values + u - self._b(batch), torch.full_like(u, OFF_SUPPORT))
            return torch.where(scored[..., None], combined, u)
        return self._r(batch) + u - self._b(batch)  # l_R + l_U − l_B  (arXiv 2404.11045, Eq. 4)

    def ref_logits(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        if isinstance(self.remote, RemoteLogits):
            b = self._b(batch)
            values, support, scored = self.remote.dense(batch, b.shape[-1])
            return torch.where(scored[..., None], torch.where(support, values, torch.full_like(b, OFF_SUPPORT)), b)
        return self._b(batch) if self.remote is None else self._r(batch)


#: Remote mode: the logit of a token outside the remote's support (probability ~e^-10000, and
#: finite, so that KL terms stay 0 · finite rather than 0 · inf).
OFF_SUPPORT = -1e4


class RemoteLogits:
    """l_R of each training example from a vLLM remote's ``prompt_logprobs`` (remote mode).

    ``table`` maps an example's token ids to ``(row, ids, logprobs)`` triples: the logits
    row that predicts an answer token, the remote's top-k ids plus that token, and their
    logprobs (nats, over the remote's whole vocabulary).
    """

    def __init__(self, table: dict[tuple[int, ...], list[tuple[int, list[int], list[float]]]]) -> None:
        self.table = table

    def dense(self, batch: dict[str, torch.Tensor], vocab: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``values`` ``[B, L, V]`` float32 (l_R on the support), ``support`` ``[B, L, V]`` bool,
        ``scored`` ``[B, L]`` bool (rows the remote scored), for a right-padded batch."""
        ids, mask = batch["input_ids"], batch["attention_mask"]
        bsz, length = ids.shape
        values = torch.zeros((bsz, length, vocab))
        support = torch.zeros((bsz, length, vocab), dtype=torch.bool)
        scored = torch.zeros((bsz, length), dtype=torch.bool)
        for i in range(bsz):
            key = tuple(ids[i, : int(mask[i].sum())].tolist())
            for row, cand, lps in self.table[key]:
                index = torch.tensor(cand, dtype=torch.long)
                values[i, row, index] = torch.tensor(lps, dtype=torch.float32)
                support[i, row, index] = True
                scored[i, row] = True
        return values, support, scored


def remote_logits(cfg: TrainConfig, tokenizer: Any, items: list[Encoded], *, progress: bool = True) -> RemoteLogits:
    """Score every example's answer through the vLLM remote at ``cfg.remote`` (cached on disk,
    :class:`proxy.decoding.scoring.PromptLogprobsCache`).

    Raises:
        ValueError: the remote tokenizes an example differently from the pair, or has no such model.
        adapters.base.RemoteError: the remote failed.
    """
    import asyncio

    from adapters.base import Context
    from adapters.openai_http import CompletionsAdapter
    from proxy.common.files import cache_dir
    from proxy.decoding.scoring import PromptLogprobsCache, score_text
    from proxy.training.data import IGNORE

    assert cfg.remote is not None
    cache = PromptLogprobsCache(cache_dir() / "prompt_logprobs")
    vocab_size = len(tokenizer)

    async def run() -> RemoteLogits:
        name = cfg.remote_model
        probe = CompletionsAdapter(
            template=None, sampling="vllm", name="remote", base_url=cfg.remote, model=name or "", api_key=None
        )
        if name is None:
            from adapters.retry import call_with_retries

            async def listing() -> Any:
                return await probe._client.models.list()

            try:
                served = [m.id for m in (await call_with_retries(listing, probe.retry, f"--remote {cfg.remote}")).data]
            finally:
                await probe.aclose()
            if len(served) != 1:
                raise ValueError(
                    f"--remote serves {len(served)} models ({', '.join(served)}); pick one with --remote-model"
                )
            name = served[0]
            probe = CompletionsAdapter(
                template=None, sampling="vllm", name="remote", base_url=cfg.remote, model=name, api_key=None
            )
        limit = asyncio.Semaphore(4)
        table: dict[tuple[int, ...], list[tuple[int, list[int], list[float]]]] = {}
        bar = tqdm(total=len(items), desc="remote prompt_logprobs", unit="ex", disable=not progress)

        async def one(item: Encoded) -> None:
            ids = item.input_ids
            start = max(1, next((j for j, lab in enumerate(item.labels) if lab != IGNORE), len(ids)))
            prompt = tokenizer.decode(ids[:start], skip_special_tokens=False)
            answer = tokenizer.decode(ids[start:], skip_special_tokens=False)
            async with limit:
                scored = await score_text(probe, Context(prompt=prompt), answer, top_k=cfg.remote_top_k, cache=cache)
            if list(scored.token_ids) != list(ids[start:]) or list(scored.prompt_ids) != list(ids[:start]):
                raise ValueError(
                    "--mode remote: the remote tokenizes a training example differently from the pair "
                    f"(pair: {list(ids)[:8]}..., remote: {list(scored.prompt_ids + scored.token_ids)[:8]}...); "
                    "it needs a remote with the pair's tokenizer"
                )
            rows = []
            for j, pos in enumerate(scored.positions):
                cand = {
                    c.token_id: c.logprob for c in pos.candidates if c.token_id is not None and math.isfinite(c.logprob)
                }
                # finite: a −inf target logprob would make the loss inf/NaN
                cand[ids[start + j]] = max(pos.sampled.logprob, OFF_SUPPORT / 2)
                if max(cand) >= vocab_size:
                    raise ValueError(
                        f"--mode remote: the remote's token id {max(cand)} is outside the pair's vocabulary "
                        f"({vocab_size} tokens); it needs a remote with the pair's tokenizer"
                    )
                rows.append((start + j - 1, list(cand), list(cand.values())))
            table[tuple(ids)] = rows
            bar.update(1)

        try:
            await gather_or_cancel(*(one(it) for it in {tuple(it.input_ids): it for it in items}.values()))
        finally:
            bar.close()
            await probe.aclose()
        return RemoteLogits(table)

    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return asyncio.run(run())
    # Called from async code (bench.tofu trains inside its event loop): a loop of its own, in a thread.
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(1) as pool:
        return pool.submit(asyncio.run, run()).result()


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
    pinned: list[Encoded | None] = field(default_factory=list)
    """Per forget item, retain-term labels on its own tokens (or None), added to the
    retain batch of the step that has that item (:func:`proxy.training.data.only_dropped_labels`)."""
    near: int = 0
    """``retain[:near]`` are the near retain examples, ``retain[near:]`` the broad ones."""
    near_share: float = 0.5
    """With both parts non-empty, ``round(near_share · retain_batch_size)`` (at least 1, at
    most all but one) of each step's retain examples come from the near part and the rest
    from the broad part, each part cycled through in a fresh permutation per pass over it,
    counted over the whole run. Otherwise one permutation of the retain set per epoch."""
    companions: list[list[int]] = field(default_factory=list)
    """Per forget example of the user's set (the first ``len(companions)`` of ``forget``),
    the indices of further forget items that ride in the same step (B's own answers to its
    question, ``forget_own_answers``). Empty: every forget item is an example of its own."""
    per_epoch: int = field(init=False)

    def __post_init__(self) -> None:
        self.per_epoch = math.ceil(self.primary / self.batch_size)

    @property
    def primary(self) -> int:
        """How many forget items the epochs are over (the rest ride with them)."""
        return len(self.companions) if self.companions else len(self.forget)

    def _cycled(self, start: int, size: int, quota: int, step: int) -> list[int]:
        """``quota`` indices of ``retain[start : start + size]`` for optimizer step ``step``
        (over the whole run): positions ``step·quota …`` of an endless sequence of
        permutations of the part, the ``c``-th seeded by (seed, start, c)."""
        perms: dict[int, list[int]] = {}  # one permutation per pass over the part
        out = []
        for pos in range(step * quota, (step + 1) * quota):
            cycle, at = divmod(pos, size)
            if cycle not in perms:
                g = torch.Generator().manual_seed((self.seed * 1_000_003 + start) * 100_003 + cycle)
                perms[cycle] = torch.randperm(size, generator=g).tolist()
            out.append(start + perms[cycle][at])
        return out

    def batches(self, epoch: int) -> Iterator[Batches]:
        g = torch.Generator().manual_seed(self.seed * 100_003 + epoch)
        order = torch.randperm(self.primary, generator=g).tolist()
        r_order = torch.randperm(len(self.retain), generator=g).tolist() if self.retain else []
        rb = self.retain_batch_size
        mixed = 0 < self.near < len(self.retain)
        near_quota = min(rb - 1, max(1, round(self.near_share * rb)))
        for k in range(self.per_epoch):
            idx = order[k * self.batch_size : (k + 1) * self.batch_size]
            retain = None
            if self.retain:
                if mixed and rb > 1:
                    step = epoch * self.per_epoch + k
                    r_idx = [
                        *self._cycled(0, self.near, near_quota, step),
                        *self._cycled(self.near, len(self.retain) - self.near, rb - near_quota, step),
                    ]
                else:
                    r_idx = [r_order[(k * rb + j) % len(r_order)] for j in range(rb)]
                pins = [p for i in idx if self.pinned and (p := self.pinned[i]) is not None]
                retain = collate([*(self.retain[i] for i in r_idx), *pins], self.pad_id)
            rows = [*idx, *(j for i in idx for j in (self.companions[i] if self.companions else ()))]
            idk = collate([self.idk[i] for i in rows], self.pad_id) if self.idk else None
            yield Batches(collate([self.forget[i] for i in rows], self.pad_id), retain, idk)


def _trainable_state(model: Any) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


def _save_checkpoint(path: Path, model: Any, optimizer: Any, scheduler: Any, step: int) -> None:
    state = {
        "step": step,
        "weights": _trainable_state(model),
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict(),
    }
    with atomic_file(path) as tmp:
        torch.save(state, tmp)


def offset_key(cfg: TrainConfig) -> str:
    """What an offset trained with ``cfg`` depends on, for caching it: the
    settings, the data files' bytes and the base model's folder name (16 hex digits)."""
    import hashlib
    import json

    from proxy.pair.model_files import local_model_dir

    h = hashlib.sha256(json.dumps(cfg.settings(), sort_keys=True).encode())
    for path in (cfg.forget, cfg.retain):
        h.update(Path(path).read_bytes() if path else b"-")
    if cfg.general_retain or cfg.calibrate or cfg.neighbours:
        from proxy.training.scope import ENTITIES, GENERAL_FILES

        for f in (*GENERAL_FILES.values(), ENTITIES):
            h.update(f.read_bytes())
    h.update(local_model_dir(cfg.base).name.encode())
    return h.hexdigest()[:16]


def load_models(cfg: TrainConfig) -> tuple[Any, Any, Any, Any]:
    """(base model, tokenizer, remote R or None, vocab) for ``cfg``.

    Raises:
        ValueError: exact mode without a remote, or a remote with another vocabulary.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from proxy.pair.model_files import local_model_dir

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
    elif cfg.mode == "remote":
        if not cfg.remote or not cfg.remote.startswith(("http://", "https://")):
            raise ValueError("--mode remote needs --remote URL (a vLLM server's http://host:port/v1)")
    elif cfg.mode != "proxy":
        raise ValueError(f"--mode must be 'proxy', 'exact' or 'remote', not {cfg.mode!r}")
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
        proxy.training.data.DataError: a bad data file (nothing is written).
        ValueError: bad settings (unknown objective, retain set missing, ...).
        FileExistsError: ``cfg.out`` exists.
    """
    from peft import LoraConfig, get_peft_model
    from transformers import get_scheduler

    objective = get_objective(
        cfg.objective,
        forget_weight=cfg.forget_weight,
        retain_weight=cfg.retain_weight,
        retain_positions=cfg.positions(),
    )
    if cfg.parameters not in PARAMETERS:
        raise ValueError(f"parameters must be one of {PARAMETERS}, not {cfg.parameters!r}")
    if objective.retain_required and not cfg.retain and not cfg.general_retain:  # before loading anything
        raise ValueError(f"objective {cfg.objective} needs a retain set (--retain)")
    if not 0 < cfg.unchanged <= 1:
        raise ValueError(f"unchanged must be in (0, 1], not {cfg.unchanged}")
    if cfg.neighbours < 0:
        raise ValueError(f"neighbours must be ≥ 0, not {cfg.neighbours}")
    if not 0 < cfg.near_share < 1:
        raise ValueError(f"near_share must be in (0, 1), not {cfg.near_share}")
    if cfg.min_steps < 0:
        raise ValueError(f"min_steps must be ≥ 0, not {cfg.min_steps}")
    out = Path(cfg.out)
    if out.exists():
        raise FileExistsError(f"{out} exists; remove it or choose another --out")
    forget_set = load_dataset(cfg.forget)
    retain_set: DataSet | None = load_dataset(cfg.retain) if cfg.retain else None
    for warning in check_sets(forget_set, retain_set):  # raises on an example in both sets
        logger.warning("%s", warning)

    base, tokenizer, remote, vocab = models if models is not None else load_models(cfg)
    base_sha = weights_sha256(base)
    eot = vocab.eot_ids[0]
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eot

    def enc(examples: tuple[Example, ...] | list[Example]) -> list[Encoded]:
        return [encode(e, tokenizer, eot, cfg.max_length) for e in examples]

    scope = _scope_sets(cfg, forget_set, base, tokenizer, vocab, base_sha)
    near_examples = [*(retain_set.examples if retain_set else ()), *scope.neighbours]
    retain_examples = [*near_examples, *scope.general]

    idk: list[Encoded] = []
    if cfg.objective == "DPO":
        answers = _idk_answers()
        idk = enc([Example(e.prompt, answers[i % len(answers)]) for i, e in enumerate(forget_set.examples)])
    forget_items = full_items = enc(forget_set.examples)
    pinned: list[Encoded | None] = []
    if not cfg.forget_prompt_copies:  # first: it finds each answer at its first label
        cut = [without_prompt_copies(e, it, tokenizer) for e, it in zip(forget_set.examples, forget_items, strict=True)]
        if cfg.pin_prompt_copies and objective.retain_on_labels and retain_examples:
            # The copies join the retain term of the step that has their forget example,
            # so U keeps copying the question's name while it lowers what follows.
            pinned = [only_dropped_labels(f, c) for f, c in zip(forget_items, cut, strict=True)]
        forget_items = cut
    if not cfg.forget_shared_words and scope.shared:
        forget_items = [
            both_dropped(it, without_spans(e, full, tokenizer, word_spans(e.target, scope.shared.get(i, set()))))
            for i, (e, it, full) in enumerate(zip(forget_set.examples, forget_items, full_items, strict=True))
        ]
    forget_items = list(forget_items)
    companions: list[list[int]] = [[] for _ in forget_items] if scope.own_answers else []
    for i, own, words in scope.own_answers:
        companions[i].append(len(forget_items))
        # B's own statement of example i's fact: labels on the fact's words alone
        item = encode(own, tokenizer, eot, cfg.max_length)
        forget_items.append(without_spans(own, item, tokenizer, outside_words(own.target, words)))
        if idk:
            idk.append(idk[i])
        if pinned:
            pinned.append(None)
    if not cfg.forget_end_of_turn:
        forget_items = [without_end_of_turn(it, eot) for it in forget_items]
    if not cfg.forget_first_token:
        forget_items = [without_first_answer_token(it) for it in forget_items]
    plan = _Plan(
        forget_items,
        enc(retain_examples),
        idk,
        cfg.batch_size,
        cfg.retain_batch_size or cfg.batch_size,
        cfg.seed,
        pad,
        pinned,
        near=len(near_examples),
        near_share=cfg.near_share,
        companions=companions,
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
    if cfg.mode == "remote":
        remote = remote_logits(cfg, tokenizer, [*plan.forget, *plan.retain, *plan.idk], progress=progress)
    scorer = CombinedScorer(model, remote, reference)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=cfg.lr)
    epochs = cfg.epochs
    if cfg.min_steps:
        epochs = max(epochs, math.ceil(cfg.min_steps * cfg.grad_accum / plan.per_epoch))
    total_steps = math.ceil(plan.per_epoch * epochs / cfg.grad_accum)
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
                    _save_checkpoint(ckpt, model, optimizer, scheduler, step)
                if stop_after is not None and step >= stop_after:
                    _save_checkpoint(ckpt, model, optimizer, scheduler, step)
                    raise KeyboardInterrupt(f"stopped after {step} steps")
        # The combined model's forget and retain loss once, at the end: every epoch it cost
        # about a third of the optimizer's time on the demo set (2 CPU cores).
        record({"epoch": epochs - 1, **_epoch_losses(scorer, plan)})
    finally:
        bar.close()
        log.close()
    model.eval()
    data = {
        "forget": forget_set.describe(),
        "retain": retain_set.describe() if retain_set else None,
        **scope.describe(),
    }
    training = {**cfg.settings(), "steps": step, "epochs_run": epochs, "seconds": round(time.monotonic() - started, 1)}
    extra: dict[str, Any] = {}
    if cfg.calibrate:
        checked = time.monotonic()
        pair = PairModels(model, tokenizer, vocab.eot_ids, b=reference)
        report = calibrate_and_check(
            pair,
            forget=forget_set.examples,
            calibration=scope.calibration,
            check=scope.check,
            neighbours=scope.neighbour_check,
            alpha=cfg.offset_alpha,
            unchanged=cfg.unchanged,
        )
        report["seconds"] = round(time.monotonic() - checked, 1)
        extra = {"offset_threshold": report["offset_threshold"], "self_check": report}
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
    )
    ckpt.unlink(missing_ok=True)
    return path


@dataclass(frozen=True)
class _ScopeSets:
    """What training adds to the user's retain set, and what the self-check holds out."""

    general: list[Example]
    """The broad retain set's training part (empty with ``general_retain`` off)."""
    neighbours: list[Example]
    """The neighbours trained on (three of every four)."""
    calibration: list[Example]
    check: list[Example]
    neighbour_check: list[Example]
    subjects: list[str]
    names: list[str]
    """The forget set's proper names that no retain example of these sets holds (:func:`proxy.training.facts.forget_names`)."""
    shared: dict[int, set[str]]
    """Per forget example (by index), the words its answer shares with B's answers to its
    neighbour questions (:func:`proxy.training.facts.shared_words`); empty unless
    ``forget_shared_words`` is off."""
    own_answers: list[tuple[int, Example, set[str]]]
    """(forget example index, B's own greedy answer to its question, the fact words it
    holds) for the answers that hold one (``forget_own_answers``)."""

    def describe(self) -> dict[str, Any]:
        """The manifest's record of them: counts, never text."""
        return {
            "scope": {
                "retain_added": len(self.general) + len(self.neighbours),
                "neighbours_trained": len(self.neighbours),
                "neighbours_held_out": len(self.neighbour_check),
                "calibration_prompts": len(self.calibration),
                "check_prompts": len(self.check),
                "subjects": len(self.subjects),
                "names": len(self.names),
                "own_answers": len(self.own_answers),
            }
        }


def _scope_sets(
    cfg: TrainConfig, forget: DataSet, base: Any, tokenizer: Any, vocab: ByteVocab, base_sha: str
) -> _ScopeSets:
    """The broad retain set's parts and the neighbours for ``cfg`` (:mod:`proxy.training.scope`).
    General examples that name a forget subject or hold one of the forget set's proper names
    (:func:`proxy.training.facts.forget_names`: "Einstein's theory" in a retain answer held the name
    that a forget set about Albert Einstein removes) are left out, and so are neighbours whose
    answer holds one; every fourth neighbour is held out."""
    subjects = forget_subjects(forget.examples)
    general: dict[str, list[Example]] = {}
    names: list[str] = []
    own_answers: list[tuple[int, Example, set[str]]] = []
    if cfg.general_retain or cfg.calibrate:
        general = general_sets(base, tokenizer, vocab.eot_ids, base_sha)
        common = " ".join(example_text(e) for v in general.values() for e in v)
        names = forget_names(forget.examples, common)

        def clear(e: Example) -> bool:
            text = example_text(e)
            return not mentions(text, subjects) and not mentions(text, names, cased=True)

        general = {k: [e for e in v if clear(e)] for k, v in general.items()}
        if cfg.forget_own_answers:
            own_answers = _own_answers(forget.examples, base, tokenizer, vocab, lower_case_words(common), names)
    neighbours: list[Example] = []
    shared: dict[int, set[str]] = {}
    if cfg.neighbours:
        found = neighbour_examples(base, tokenizer, vocab.eot_ids, forget.examples, per_question=cfg.neighbours)
        found = [(i, e) for i, e in found if not mentions(e.target, names, cased=True)]
        neighbours = [e for _, e in found]
        if not cfg.forget_shared_words:
            answers: dict[int, list[str]] = {}
            for i, e in found:
                answers.setdefault(i, []).append(e.target)
            shared = {i: shared_words(forget.examples[i].target, a, [*subjects, *names]) for i, a in answers.items()}
        if not neighbours:
            logger.warning(
                "%s: no neighbour questions: the forget set's questions share no name to swap "
                "(raw text, or every question about another entity)",
                forget.path,
            )
    return _ScopeSets(
        general=general.get("train", []) if cfg.general_retain else [],
        neighbours=[e for i, e in enumerate(neighbours) if i % 4 != 3],
        calibration=general.get("calibration", []),
        check=general.get("check", []),
        neighbour_check=[e for i, e in enumerate(neighbours) if i % 4 == 3],
        subjects=subjects,
        names=names,
        shared=shared,
        own_answers=own_answers,
    )


def _own_answers(
    forget: Sequence[Example], base: Any, tokenizer: Any, vocab: ByteVocab, common_words: set[str], names: list[str]
) -> list[tuple[int, Example, set[str]]]:
    """B's greedy answers to the forget set's chat questions that hold a fact word of their
    forget answer (:func:`proxy.training.facts.fact_words`), with those words."""
    chat = [(i, e) for i, e in enumerate(forget) if e.prompt is not None]
    answers = generate_answers(base, tokenizer, vocab.eot_ids, [e.prompt for _, e in chat if e.prompt is not None])
    out = []
    for (i, e), answer in zip(chat, answers, strict=True):
        facts = fact_words(e, common_words, names)
        said = words_of(answer) & facts
        if said:
            out.append((i, Example(e.prompt, answer), said))
    return out


EPOCH_LOSS_RETAIN = 32


@torch.no_grad()
def _epoch_losses(scorer: CombinedScorer, plan: _Plan) -> dict[str, float]:
    """Mean NLL of the forget and retain sets under the combined model (the log's per-epoch
    numbers); the retain set's first :data:`EPOCH_LOSS_RETAIN` examples (the user's retain set
    comes first), so that the broad retain set does not cost a pass over it every epoch."""
    out: dict[str, float] = {}
    for name, items in (("forget_loss", plan.forget), ("retain_loss", plan.retain[:EPOCH_LOSS_RETAIN])):
        if not items:
            continue
        total = 0.0
        for k in range(0, len(items), plan.batch_size):
            batch = collate(items[k : k + plan.batch_size], plan.pad_id)
            total += mean_nll(scorer.logits(batch), batch["labels"]).item() * len(items[k : k + plan.batch_size])
        out[name] = total / len(items)
    return out
