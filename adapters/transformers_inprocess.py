"""A transformers model in-process as the remote, with full-vocabulary logits.

Used where the remote must be a model we built (tofu-lite's target and retain
models, fine-tuned here and never converted back to GGUF, which needs
llama.cpp's converter script that no package here ships), and for the
paper's exact mode. Besides :meth:`draft`, it scores given text
(:meth:`full_logprobs`), which the audit's probability metrics need.

The prompt is rendered with the tokenizer's own chat template
(``apply_chat_template``, generation prompt added), as the local pair does,
so with the same tokenizer the two see the same prompt tokens. A pool of KV
caches is kept (:class:`adapters.kv_slots.SlotPool`), so a token-by-token
decode costs one new token per step, also with several requests interleaved.
One call computes at a time (torch already uses every core).
"""

from __future__ import annotations

import asyncio
import functools
import threading
from collections.abc import Callable
from concurrent.futures import Executor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from .base import (
    Candidate,
    Capabilities,
    Context,
    ContextExhausted,
    Draft,
    Position,
    RemoteRejected,
    RemoteUnavailable,
    ScoredText,
    drafted,
    position_from_logprobs,
)
from .hf_vocab import hf_eot_ids, hf_token_bytes
from .kv_slots import CacheSlot, SlotPool
from .step_batcher import StepBatcher
from .templates import hf_chat_ids, hf_special_strings

#: Drafted tokens (one per request) per batched pass at most.
MAX_BATCH = 32

BodyBuilder = Callable[[Any], Any]
"""``build(model)``: a decoder body for ``model`` with ``rows(ids, positions, masks, caches,
on_u)`` (:meth:`proxy.pair.lean.LeanDecoder.rows`: per-row KV caches, final-norm hidden
states), or None for a model it does not take."""


@dataclass(frozen=True)
class _Step:
    """One drafted token of one request: the token ids so far (prompt and draft), and how
    its position is read (:func:`adapters.base.position_from_logprobs`)."""

    tokens: tuple[int, ...]
    top_k: int
    rng: np.random.Generator
    sample: bool


class TransformersInProcessAdapter:
    """A causal LM folder (``save_pretrained`` layout) served in-process."""

    def __init__(
        self,
        *,
        name: str,
        model_dir: str | Path,
        max_length: int | None = None,
        seed: int = 0,
        executor: Executor | None = None,
        body: BodyBuilder | None = None,
    ) -> None:
        import torch  # here, not at the top: importing this module loads neither torch nor transformers
        from transformers import AutoModelForCausalLM, AutoTokenizer

        self.name = name
        self._torch = torch
        self._executor = executor
        """Where the blocking forward passes run (None: asyncio's default executor)."""
        folder = Path(model_dir)
        self.identity = f"transformers:{folder.resolve()}"
        """What the audit's prompt-logprobs cache keys scores by: the folder, not the served name."""
        if not (folder / "config.json").is_file():
            raise FileNotFoundError(f"{folder}: not a transformers model folder (no config.json)")
        self.tokenizer = AutoTokenizer.from_pretrained(folder)
        self._specials = hf_special_strings(self.tokenizer)
        self.model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
        self.max_length = max_length or int(getattr(self.model.config, "max_position_embeddings", 2048))
        self.token_bytes = hf_token_bytes(self.tokenizer)
        """Bytes of every token (``None`` for special tokens)."""
        self.n_vocab = int(self.model.config.vocab_size)
        self.eot_ids = frozenset(hf_eot_ids(self.tokenizer))
        """The end-of-turn ids: those of :data:`adapters.base.EOT_TOKENS` and the eos token."""
        self._eot_text = self.tokenizer.eos_token or "</s>"
        self._lock = threading.Lock()
        self._slots = SlotPool()
        self._closed = False
        self._rng = np.random.default_rng(seed)
        """Draft randomness when a call gives no seed: one stream, so that calls draw independently."""
        self._body = body(self.model) if body is not None else None
        self._steps: StepBatcher[_Step, Position] | None = (
            StepBatcher(self._steps_sync, executor, max_batch=MAX_BATCH) if self._body is not None else None
        )
        """Concurrent drafts' tokens batched into one pass (None: drafts run one at a time)."""
        self.capabilities = Capabilities(
            can_continue=True,
            token_ids=True,
            top_k_drafts=True,
            prompt_logprobs=True,
        )

    # ------------------------------------------------------------- prompts
    def prompt_tokens(self, ctx: Context) -> list[int]:
        """The prompt's token ids (chat template with the generation prompt, or the raw prompt).

        Raises:
            RemoteRejected: the template rejects the messages.
        """
        if ctx.prompt is not None:
            return list(self.tokenizer.encode(ctx.prompt, add_special_tokens=False))
        try:
            return hf_chat_ids(self.tokenizer, list(ctx.messages or ()), self._specials)
        except ValueError as exc:  # the template failed, or cannot keep content plain
            raise RemoteRejected(f"model {self.name!r}: {exc}", status=400) from exc

    def _tokens(self, ctx: Context) -> tuple[list[int], int]:
        prompt = self.prompt_tokens(ctx)
        if ctx.token_ids is not None:
            return prompt + list(ctx.token_ids), len(prompt)
        rest = (
            list(self.tokenizer.encode(ctx.assistant_prefix.decode("utf-8", "replace"), add_special_tokens=False))
            if ctx.assistant_prefix
            else []
        )
        return prompt + rest, len(prompt)

    # ------------------------------------------------------------- forward
    def _logits(self, tokens: list[int], *, all_from: int | None = None) -> np.ndarray:
        """log-softmax of the next token after ``tokens`` (``[V]``), or, with
        ``all_from``, the rows that predict ``tokens[all_from:]``
        (``[len(tokens) - all_from, V]``).

        The cache holding the longest prefix of ``tokens`` is extended
        (:meth:`adapters.kv_slots.SlotPool.claim`), so interleaved decodes of
        several requests each cost one new token per step.
        """
        torch = self._torch
        if not tokens:
            raise RemoteRejected(f"model {self.name!r}: the prompt is empty: no token to condition on", status=400)
        if len(tokens) >= self.max_length:
            raise ContextExhausted(f"model {self.name!r}: {len(tokens)} tokens exceed the context of {self.max_length}")
        # the positions to compute: at least the last one, all of ``all_from:`` when scoring
        need = len(tokens) - 1 if all_from is None else all_from - 1

        best, common = self._slots.claim(tokens, need)
        with torch.inference_mode():
            ids = torch.tensor([tokens[common:]], dtype=torch.long)
            out = self.model(input_ids=ids, past_key_values=best.cache, use_cache=True)
        self._slots.used(best, tokens)
        if all_from is None:
            return torch.log_softmax(out.logits[0, -1].double(), dim=-1).numpy()
        rows = out.logits[0, all_from - 1 - common : -1].double()
        return torch.log_softmax(rows, dim=-1).numpy()

    def _steps_sync(self, steps: list[_Step]) -> list[Position | BaseException]:
        """One drafted token for each of ``steps`` (:class:`StepBatcher`'s batch): every
        step's new tokens (one, or a prompt's after the longest cached prefix) as a row of
        one pass of the body (its rows packed: no padding computed), each row attending to
        its own cache slot. Positions read as :meth:`_draft_sync` reads them."""
        torch = self._torch
        with self._lock:
            if self._closed:
                return [RemoteUnavailable(f"model {self.name!r} is shut down") for _ in steps]
            taken: list[int] = []
            claims = []
            for step in steps:
                slot, common = self._slots.claim(step.tokens, len(step.tokens) - 1, taken)
                taken.append(self._slots.slots.index(slot))
                claims.append((slot, common))
            try:
                with torch.inference_mode():
                    logits = self._body_rows([(step.tokens, *c) for step, c in zip(steps, claims, strict=True)])
                    rows = torch.log_softmax(logits.double(), dim=-1).numpy()
            except BaseException:
                for slot, _ in claims:  # a pass that failed half-way may have extended some layers: drop them
                    slot.cache, slot.tokens = None, []
                raise
            out: list[Position | BaseException] = []
            for step, (slot, _), lp in zip(steps, claims, rows, strict=True):
                self._slots.used(slot, step.tokens)
                out.append(
                    position_from_logprobs(
                        lp, top_k=step.top_k, candidate=self._candidate, rng=step.rng, sample=step.sample
                    )
                )
            return out

    def _body_rows(self, rows: list[tuple[tuple[int, ...], CacheSlot, int]]) -> Any:
        """The next-token logits ``[len(rows), V]`` after each row's tokens, one pass of the
        body over each row's tokens past its slot's ``common`` cached ones (right-padded)."""
        torch = self._torch
        news = [tokens[common:] for tokens, _, common in rows]
        width = max(len(n) for n in news)
        ids = torch.zeros((len(rows), width), dtype=torch.long)
        positions = torch.zeros((len(rows), width), dtype=torch.long)
        masks = []
        low = torch.finfo(torch.float32).min
        for r, (new, (_, _, common)) in enumerate(zip(news, rows, strict=True)):
            n = len(new)
            ids[r, :n] = torch.tensor(new)
            positions[r, :n] = common + torch.arange(n)
            span = torch.arange(common + n)[None, :]
            mask = torch.zeros((n, common + n))
            masks.append(mask.masked_fill_(span > (common + torch.arange(n))[:, None], low))
        assert self._body is not None  # only batched drafts come here
        hidden = self._body.rows(ids, positions, masks, [slot.cache for _, slot, _ in rows], None)
        last = hidden[torch.arange(len(rows)), torch.tensor([len(n) - 1 for n in news])]
        return self.model.get_output_embeddings()(last)

    def _candidate(self, tid: int, lp: float) -> Candidate:
        if tid in self.eot_ids:
            return Candidate(b"", lp, self._eot_text, tid, is_eot=True)
        data = self.token_bytes[tid] if tid < len(self.token_bytes) else None
        return Candidate(data, lp, "" if data is None else data.decode("utf-8", "replace"), tid)

    def _draft_sync(self, ctx: Context, n_tokens: int, top_k: int, seed: int | None, greedy: bool = False) -> Draft:
        tokens, n_prompt = self._tokens(ctx)
        rng = self._rng if seed is None else np.random.default_rng(seed)
        positions: list[Position] = []
        finish = None
        with self._lock:
            if self._closed:
                raise RemoteUnavailable(f"model {self.name!r} is shut down")
            for _ in range(n_tokens):
                lp = self._logits(tokens)
                pos = position_from_logprobs(
                    lp, top_k=top_k, candidate=self._candidate, rng=rng, sample=n_tokens > 1 and not greedy
                )
                if drafted(positions, tokens, pos):
                    finish = "stop"
                    break
        return Draft(tuple(positions), finish or "length", n_prompt)

    async def draft(
        self, ctx: Context, *, n_tokens: int, top_k: int, seed: int | None = None, greedy: bool = False
    ) -> Draft:
        if self._steps is None:
            return await asyncio.get_running_loop().run_in_executor(
                self._executor, self._draft_sync, ctx, n_tokens, top_k, seed, greedy
            )
        # batched with the other requests' drafts, a token per pass (the same positions as _draft_sync's)
        tokens, n_prompt = self._tokens(ctx)
        if not tokens:
            raise RemoteRejected(f"model {self.name!r}: the prompt is empty: no token to condition on", status=400)
        rng = self._rng if seed is None else np.random.default_rng(seed)
        positions: list[Position] = []
        finish = None
        for _ in range(n_tokens):
            if self._closed:
                raise RemoteUnavailable(f"model {self.name!r} is shut down")
            if len(tokens) >= self.max_length:
                raise ContextExhausted(
                    f"model {self.name!r}: {len(tokens)} tokens exceed the context of {self.max_length}"
                )
            pos = await self._steps.submit(_Step(tuple(tokens), top_k, rng, n_tokens > 1 and not greedy))
            if drafted(positions, tokens, pos):
                finish = "stop"
                break
        return Draft(tuple(positions), finish or "length", n_prompt)

    def full_logprobs(self, ctx: Context, text: str, *, end_of_turn: bool = False) -> tuple[list[int], np.ndarray]:
        """Teacher-forced scoring of ``text`` after the context (prompt plus
        ``ctx.assistant_prefix``): the token ids of ``text`` (plus the
        end-of-turn token when ``end_of_turn``) and the log-softmax over the
        whole vocabulary at each of them, ``[n_tokens, V]`` float64, nats.

        Raises:
            ContextExhausted: longer than the model's context.
            ValueError: ``text`` is empty and no end-of-turn is asked for.
        """
        _, ids, lp = self._score(ctx, text, end_of_turn=end_of_turn)
        return ids, lp

    def _score(self, ctx: Context, text: str, *, end_of_turn: bool) -> tuple[list[int], list[int], np.ndarray]:
        """:meth:`full_logprobs`, with the context's own token ids first."""
        base, _ = self._tokens(ctx)
        ids = list(self.tokenizer.encode(text, add_special_tokens=False))
        if end_of_turn:
            ids.append(self.tokenizer.eos_token_id)
        if not ids:
            raise ValueError("nothing to score")
        with self._lock:
            lp = self._logits(base + ids, all_from=len(base))
        return base, ids, lp

    async def score_text(self, ctx: Context, text: str, *, top_k: int) -> ScoredText:
        """See :meth:`adapters.base.TextScoringAdapter.score_text`: what a vLLM server's
        ``prompt_logprobs`` gives (the top-``top_k`` and the answer's own token at each of
        its positions), with every token's bytes known from this model's vocabulary. The
        audit scores a pair with another tokenizer this way (:class:`proxy.evaluation.scoring.QScorer`).

        Raises:
            ContextExhausted: longer than the model's context.
            ValueError: ``text`` is empty.
        """
        prompt, ids, lp = await asyncio.get_running_loop().run_in_executor(
            self._executor, functools.partial(self._score, ctx, text, end_of_turn=False)
        )
        positions = []
        for row, tid in zip(lp, ids, strict=True):
            pos = position_from_logprobs(row, top_k=top_k, candidate=self._candidate, rng=self._rng, sample=False)
            positions.append(Position(pos.candidates, self._candidate(tid, float(row[tid]))))
        return ScoredText(tuple(ids), tuple(positions), tuple(prompt))

    async def check(self) -> None:
        """In-process: ready once constructed."""

    async def aclose(self) -> None:
        with self._lock:
            self._closed = True
            self._slots.clear()

    def vocab_bytes(self) -> list[bytes | None]:
        """Bytes of every token (``None`` for special tokens), for same-tokenizer detection."""
        return list(self.token_bytes)

    def direct_chat(self, messages: list[dict[str, Any]], max_tokens: int) -> str:
        """Greedy text straight from the model (no proxy), for comparisons."""
        ctx = Context(messages=tuple(messages))
        tokens, n_prompt = self._tokens(ctx)
        with self._lock:
            for _ in range(max_tokens):
                t = int(np.argmax(self._logits(tokens)))
                if t in self.eot_ids:
                    break
                tokens.append(t)
        return str(self.tokenizer.decode(tokens[n_prompt:], skip_special_tokens=True))
