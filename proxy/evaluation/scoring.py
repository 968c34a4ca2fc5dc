"""Scoring given answer text under the served distribution q, for the audit's probability
metrics (:class:`QScorer`).

**Probability metrics** (probability, truth ratio, forget quality, Min-K%
AUC) score given text under the served distribution q. That needs the
remote's logprobs of given text: in-process remotes with full logits
(:class:`adapters.transformers_inprocess.TransformersInProcessAdapter`)
give them, q then taken over the whole vocabulary at temperature 1 with the
model's α and scope threshold (:func:`proxy.decoding.offset.target_logits`; Δ on the
remote's own token ids, so only for a pair with the remote's tokenizer); vLLM
gives them as ``prompt_logprobs`` (``prefill = "vllm"`` or ``sampling =
"vllm"``), q then taken over its top-k plus the answer's token with the rest
of its mass kept (:mod:`proxy.decoding.scoring`; cached on disk under
``<cache>/prompt_logprobs``), Δ aligned in bytes as in serving; an in-process
remote with a pair of another tokenizer is scored the same way (its
``score_text``); the report's ``probability_support`` says
which. llama.cpp's server shifts its ``echo`` logprobs and OpenAI gives
none, so for those the report marks them "not possible" and says why.
"""

from __future__ import annotations

import asyncio
from typing import Any

import numpy as np

from adapters.base import Context, TextScoringAdapter
from proxy.decoding.offset import log_softmax, target_logits
from proxy.decoding.scoring import (
    PromptLogprobsCache,
    q_token_logprobs,
    score_text,
    scored_deltas,
    with_token_bytes,
)
from proxy.evaluation.items import AuditError, chat


class QScorer:
    """Per-token logprobs of given answer text under the served distribution q
    (full vocabulary, temperature 1; see this module's docstring).

    ``possible`` says whether this model can be scored; ``reason`` says why not.
    """

    def __init__(self, model: Any, system_prompt: str | None = None, cache: PromptLogprobsCache | None = None) -> None:
        self.model = model
        self.system_prompt = system_prompt
        self.cache = cache
        self.offset_on = bool(model.uses_offset and model.alpha != 0)
        self.possible = True
        self.reason = ""
        self.support = "full vocabulary"
        self.remote_scores = False
        scores_text = model.adapter.capabilities.prompt_logprobs and isinstance(model.adapter, TextScoringAdapter)
        if hasattr(model.adapter, "full_logprobs") and (model.same_tokenizer or not self.offset_on):
            pass  # the whole vocabulary, Δ from the pair on the same token ids
        elif scores_text:
            # a pair with another tokenizer aligns to the remote's tokens in bytes: over its top-k
            self.remote_scores = True
            self.support = f"the remote's top-{model.top_k} plus the answer's token, the rest of its mass kept"
        else:
            self.possible = False
            self.reason = (
                f"remote {model.adapter.name!r} ({type(model.adapter).__name__}) cannot score given text: "
                "it gives no logprobs of given text (llama.cpp's server shifts its echo logprobs, OpenAI gives none; "
                "vLLM's prompt_logprobs can)"
            )

    def _remote(self, question: str, text: str) -> tuple[list[int], np.ndarray]:
        return self.model.adapter.full_logprobs(Context(messages=chat(question, self.system_prompt)), text)  # type: ignore[no-any-return]

    async def _remote_scored(self, question: str, text: str) -> np.ndarray:
        """Through the remote's ``prompt_logprobs`` (:mod:`proxy.decoding.scoring`)."""
        msgs = chat(question, self.system_prompt)
        scored = await score_text(
            self.model.adapter, Context(messages=msgs), text, top_k=self.model.top_k, cache=self.cache
        )
        if self.offset_on and self.model.same_tokenizer:
            vocab = self.model.pair.vocab
            scored = with_token_bytes(scored, vocab.token_bytes, vocab.eot_ids)
        deltas = None
        if self.offset_on:
            pair = self.model.pair

            def offsets() -> Any:
                aligner = pair.aligner(pair.prompt_ids(list(msgs)), same_tokenizer=self.model.same_tokenizer)
                return scored_deltas(aligner, scored)

            deltas = await self.model.run_pair(offsets)
            if deltas is None:
                raise AuditError("an answer's token bytes could not be recovered from the remote's token strings")
        out = q_token_logprobs(
            scored,
            deltas,
            alpha=self.model.alpha,
            threshold=self.model.offset_threshold,
            scope=self.model.offset_scope,
        )
        return np.maximum(out, -1e4)

    async def logprobs(self, question: str, text: str) -> np.ndarray:
        """``[n_tokens]`` float64 logprobs (nats) of ``text`` as the answer to ``question``."""
        if self.remote_scores:
            return await self._remote_scored(question, text)
        return await self._full_vocabulary(question, text)

    async def _full_vocabulary(self, question: str, text: str) -> np.ndarray:
        """Over the whole vocabulary: the remote's full logprobs, Δ from the pair on the same token ids."""
        ids, lr = await asyncio.to_thread(self._remote, question, text)
        if self.offset_on:
            pair = self.model.pair
            msgs = list(chat(question, self.system_prompt))
            prompt_ids = await self.model.run_pair(pair.prompt_ids, msgs, None)
            lu, lb = await self.model.run_pair(pair.full_logprobs, prompt_ids, ids)
            v = min(lr.shape[1], lu.shape[1])
            rows = []
            for i, t in enumerate(ids):
                s = target_logits(
                    lr[i, :v],
                    lu[i, :v] - lb[i, :v],
                    temperature=1.0,
                    alpha=self.model.alpha,
                    threshold=self.model.offset_threshold,
                    scope=self.model.offset_scope,
                )
                rows.append(log_softmax(s)[t] if t < v else -np.inf)
            out = np.asarray(rows, dtype=np.float64)
        else:
            out = lr[np.arange(len(ids)), ids]
        return np.maximum(out, -1e4)  # a token q cannot produce: a huge loss, not -inf in JSON
