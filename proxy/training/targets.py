"""What the objectives train against: the combined model and its reference
(:class:`CombinedScorer`, docs/concepts.md, "How an offset is trained"; δ-unlearning, arXiv 2404.11045, Eq. 4)
in each mode, and the models that training loads (:func:`load_models`).

* ``proxy`` mode (default, any remote): combined logits = l_U, reference = B;
* ``exact`` mode (the paper): combined logits = l_R + l_U − l_B with R an
  in-process model over the same vocabulary; R and B frozen;
* ``remote`` mode: R's logits come from a vLLM server's ``prompt_logprobs``
  (:func:`remote_logits`, :class:`RemoteLogits`), on the remote's top-k plus the
  target token (:data:`OFF_SUPPORT` elsewhere); positions it does not score fall
  back to proxy mode.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import torch
from tqdm import tqdm

from adapters.base import Context
from adapters.openai_completions import CompletionsAdapter
from adapters.profiles import VLLM
from adapters.retry import call_with_retries
from proxy.common.aio import gather_or_cancel
from proxy.common.files import cache_dir
from proxy.decoding.scoring import PromptLogprobsCache, score_text
from proxy.decoding.vocab import ByteVocab
from proxy.pair.forward import adapter_layers, adapters_off
from proxy.pair.model_files import local_model_dir
from proxy.training.config import TrainConfig
from proxy.training.data import IGNORE, Encoded, collate
from proxy.training.objectives import answer_nll
from proxy.training.prefix import head_is_plain, shared_hidden


class CombinedScorer:
    """The combined model for the objectives (:class:`proxy.training.objectives.Scorer`).

    With a position mask ``at``, the rows are computed from each model's last hidden state
    at those positions only (the output head, 49,152 × 576 for SmolLM2, never runs on the
    prompt), where the head is a plain linear map of it: checked once per model, on the first
    batch's first row alone (:func:`proxy.training.prefix.head_is_plain`); otherwise, and in remote mode, the whole logits
    are computed and the rows taken from them. The tokens that a batch's rows share at
    their start (the system prompt, a question asked with several answers) are computed
    once (:func:`proxy.training.prefix.shared_hidden`)."""

    def __init__(self, model: Any, remote: Any | None = None, reference: Any | None = None) -> None:
        self.model = model  # a PeftModel (U with the adapter, B without), or U itself when `reference` is B
        self.remote = remote  # R (exact mode), RemoteLogits (remote mode) or None (proxy mode)
        self.reference = reference  # B as a frozen copy (full fine-tuning), or None (B = adapter disabled)
        self._adapters = adapter_layers(model) if reference is None else []
        self._plain_head: dict[int, bool] = {}  # per model, decided on its first call with a mask (:meth:`_plain`)
        self._ref_nll: dict[tuple[tuple[int, ...], tuple[int, ...]], torch.Tensor] = {}
        self.b_hidden: dict[tuple[int, ...], torch.Tensor] = {}
        """B's last hidden state (``[L_i, d]`` float32) of every sequence B scored from it,
        by its token ids: what the scope gate is fitted on (:func:`proxy.training.scope_gate.fit_scope_gate`)."""

    def _rows(
        self, model: Any, batch: dict[str, torch.Tensor], at: torch.Tensor | None, keep_hidden: bool = False
    ) -> torch.Tensor:
        """``model``'s logits ``[B, L, V]``, or ``[N, V]`` at the positions ``at``; with
        ``keep_hidden``, each sequence's last hidden state goes to :attr:`b_hidden`."""
        kwargs = dict(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
        if at is None or not self._plain(model, batch):
            logits = model(**kwargs).logits
            return logits if at is None else logits[at]
        head = model.get_output_embeddings()
        hidden = shared_hidden(model, batch["input_ids"], batch["attention_mask"])
        if hidden is None:
            hidden = model(**kwargs, output_hidden_states=True, logits_to_keep=1).hidden_states[-1]
        if keep_hidden:
            for ids, mask, h in zip(batch["input_ids"], batch["attention_mask"], hidden, strict=True):
                n = int(mask.sum())
                self.b_hidden.setdefault(tuple(ids[:n].tolist()), h[:n].detach().float().clone())
        return head(hidden[at])

    def _plain(self, model: Any, batch: dict[str, torch.Tensor]) -> bool:
        """Whether ``model``'s output head is a plain linear map of its last hidden state
        (decided once per model, on the batch's first row: not on the batch itself, so that
        how a batch is computed never depends on the calls before it, and a resumed run
        computes as the uninterrupted one did)."""
        if id(model) not in self._plain_head:
            n = int(batch["attention_mask"][0].sum())
            self._plain_head[id(model)] = head_is_plain(model, batch["input_ids"][:1, :n])
        return self._plain_head[id(model)]

    def _r(self, batch: dict[str, torch.Tensor], at: torch.Tensor | None = None) -> torch.Tensor:
        assert self.remote is not None
        with torch.no_grad():
            return self._rows(self.remote, batch, at)

    def _b(self, batch: dict[str, torch.Tensor], at: torch.Tensor | None = None) -> torch.Tensor:
        b = self.reference if self.reference is not None else self.model
        off = contextlib.nullcontext() if self.reference is not None else adapters_off(self._adapters)
        with torch.no_grad(), off:
            return self._rows(b, batch, at, keep_hidden=True)

    def logits(self, batch: dict[str, torch.Tensor], at: torch.Tensor | None = None) -> torch.Tensor:
        if isinstance(self.remote, RemoteLogits):
            u = self.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
            values, support, scored = self.remote.dense(batch, u.shape[-1])
            combined = torch.where(support, values + u - self._b(batch), torch.full_like(u, OFF_SUPPORT))
            out = torch.where(scored[..., None], combined, u)
            return out if at is None else out[at]
        u = self._rows(self.model, batch, at)
        if self.remote is None:
            return u
        return self._r(batch, at) + u - self._b(batch, at)  # l_R + l_U − l_B  (arXiv 2404.11045, Eq. 4)

    def ref_logits(self, batch: dict[str, torch.Tensor], at: torch.Tensor | None = None) -> torch.Tensor:
        if isinstance(self.remote, RemoteLogits):
            b = self._b(batch)
            values, support, scored = self.remote.dense(batch, b.shape[-1])
            out = torch.where(scored[..., None], torch.where(support, values, torch.full_like(b, OFF_SUPPORT)), b)
            return out if at is None else out[at]
        return self._b(batch, at) if self.remote is None else self._r(batch, at)

    def ref_nll(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """The reference's summed answer NLL per sequence ``[B]``, computed once per sequence
        (the reference is frozen: NPO's forget batches repeat every epoch)."""
        keys = []
        for ids, mask, labels in zip(batch["input_ids"], batch["attention_mask"], batch["labels"], strict=True):
            n = int(mask.sum())
            keys.append((tuple(ids[:n].tolist()), tuple(labels[:n].tolist())))
        missing = [i for i, k in enumerate(keys) if k not in self._ref_nll]
        if missing:
            index = torch.tensor(missing)
            width = max(len(keys[i][0]) for i in missing)
            part = {k: v[index, :width] for k, v in batch.items() if k in ("input_ids", "attention_mask", "labels")}
            with torch.no_grad():
                total, _ = answer_nll(self.ref_logits, part)
            for i, t in zip(missing, total, strict=True):
                self._ref_nll[keys[i]] = t.detach()
        return torch.stack([self._ref_nll[k] for k in keys])

    def reference_pass(self, items: Sequence[Encoded], pad_id: int) -> None:
        """:meth:`ref_nll` of every item, in batches of :data:`REFERENCE_BATCH` in the items'
        order, before the first step: an item's reference NLL is then the same whichever
        step reads it first, in a resumed run too (how a batch is computed depends on the
        rows beside it, :mod:`proxy.training.prefix`)."""
        for k in range(0, len(items), REFERENCE_BATCH):
            self.ref_nll(collate(items[k : k + REFERENCE_BATCH], pad_id))


#: Items per batch of :meth:`CombinedScorer.reference_pass`.
REFERENCE_BATCH = 16


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
    assert cfg.remote is not None
    cache = PromptLogprobsCache(cache_dir() / "prompt_logprobs")
    vocab_size = len(tokenizer)

    async def run() -> RemoteLogits:
        name = cfg.remote_model
        probe = CompletionsAdapter(
            template=None, profile=VLLM, name="remote", base_url=cfg.remote, model=name or "", api_key=None
        )
        if name is None:

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
                template=None, profile=VLLM, name="remote", base_url=cfg.remote, model=name, api_key=None
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
    with ThreadPoolExecutor(1) as pool:
        return pool.submit(asyncio.run, run()).result()


def load_models(cfg: TrainConfig) -> tuple[Any, Any, Any, Any]:
    """(base model, tokenizer, remote R or None, vocab) for ``cfg``.

    Raises:
        ValueError: exact mode without a remote, or a remote with another vocabulary.
    """
    # transformers is imported here, not at the top: importing it takes seconds.
    from transformers import AutoModelForCausalLM, AutoTokenizer

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
