"""The embedded default remote: llama.cpp in-process (``llama_cpp.Llama``).

It works on token ids, so it continues any accepted prefix exactly (no
re-tokenisation when the decoder passes ids), reports exact bytes for every
token (also partial UTF-8 ones) and full-vocabulary logprobs, of which it
returns the top-k. The prompt is rendered with the GGUF's own chat template
through llama-cpp-python's ``Jinja2ChatFormatter``, exactly as
``Llama.create_chat_completion`` does, so that a direct call and the proxy
see the same prompt tokens.

One llama.cpp context and up to ``n_contexts`` prompt caches: each call leases
the cache that holds the longest prefix of its tokens, so up to ``n_contexts``
concurrent requests and choices do not evict each other's prompts. One call
computes at a time (llama.cpp already uses every core for one evaluation, and
its spinning threads slow down badly when several evaluations share the cores),
so one context is enough: the cache of the last call stays in it, and the
others wait as saved sequence states (``llama_state_seq_get_data``: the KV
cells in use, about 23 kB per token for SmolLM2, instead of a context's whole
KV buffer), restored when their request calls again. A restored cache gives the
logits the kept context would have given: the same cells at the same positions.
"""

from __future__ import annotations

import asyncio
import ctypes
import itertools
import threading
from collections.abc import Iterator, Sequence
from concurrent.futures import Executor
from contextlib import contextmanager
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
    drafted,
    position_from_logprobs,
)
from .llama_cache import CLOSED, PromptCache
from .llama_vocab import token_piece
from .stepped_draft import SteppedDraft
from .templates import SpecialStrings, tokenize_chat

#: :meth:`LlamaInProcessAdapter._tokenize`: a prompt longer than this many characters per
#: context token is probed by its head first (English text averages about 4 per token).
PROBE_CHARS_PER_TOKEN = 8
PROBE_MARGIN = 64


class LlamaInProcessAdapter:
    """A GGUF served in-process by llama.cpp."""

    def __init__(
        self,
        *,
        name: str,
        model_path: str | Path,
        n_ctx: int = 4096,
        n_threads: int | None = None,
        n_contexts: int = 8,
        seed: int = 0,
        executor: Executor | None = None,
    ) -> None:
        import llama_cpp
        from llama_cpp import llama_chat_format

        if n_contexts < 1:
            raise ValueError("n_contexts must be at least 1")
        self.name = name
        self._llama_cpp = llama_cpp
        self._executor = executor
        """Where the blocking llama.cpp calls run (None: asyncio's default executor)."""
        self.llama = llama_cpp.Llama(
            model_path=str(model_path),
            n_ctx=n_ctx,
            n_threads=n_threads,
            logits_all=False,
            verbose=False,
            seed=seed,
        )
        """The one context (and the tokenizer, vocabulary and metadata)."""
        self._slots = [PromptCache() for _ in range(n_contexts)]
        self._live: PromptCache | None = None
        """The slot whose cache the context holds."""
        # llama.cpp rounds its context up (to 256 tokens); llama-cpp-python's token buffer is
        # the size asked for, and the smaller of the two is the context.
        self.n_ctx = min(self.llama.n_ctx(), len(self.llama.input_ids))
        self.n_vocab = self.llama.n_vocab()
        vocab = self.llama._model.vocab
        self.token_bytes: list[bytes | None] = []
        self.eog = np.zeros(self.n_vocab, dtype=bool)
        # Tokens that llama.cpp's special-token pass matches in text: kept out of message content.
        parsed = llama_cpp.LLAMA_TOKEN_ATTR_CONTROL | llama_cpp.LLAMA_TOKEN_ATTR_USER_DEFINED
        special_texts = []
        for i in range(self.n_vocab):
            if llama_cpp.llama_vocab_is_eog(vocab, i):
                self.eog[i] = True
            is_control = llama_cpp.llama_vocab_is_control(vocab, i)
            self.token_bytes.append(None if is_control else token_piece(llama_cpp, vocab, i))
            if self.llama._model.token_get_attr(i) & parsed:
                special_texts.append(self.llama._model.token_get_text(i))
        self._specials = SpecialStrings(special_texts)
        eos = self.llama.token_eos()
        bos = self.llama.token_bos()
        template = self.llama.metadata.get("tokenizer.chat_template")
        self._formatter = (
            llama_chat_format.Jinja2ChatFormatter(
                template=template,
                eos_token=self.llama._model.token_get_text(eos) if eos != -1 else "",
                bos_token=self.llama._model.token_get_text(bos) if bos != -1 else "",
                stop_token_ids=[eos],
            )
            if template
            else None
        )
        self._eot_text = self.llama._model.token_get_text(eos) if eos != -1 else "</s>"
        self._cond = threading.Condition()
        self._clock = itertools.count(1)
        self._closed = False
        self.capabilities = Capabilities(
            can_continue=True, token_ids=True, top_k_drafts=True, streams_drafts=True, drafts_on_demand=True
        )

    # ------------------------------------------------------------- prompts
    def _tokenize(self, text: str, *, add_bos: bool) -> list[int]:
        """``Llama.tokenize(text, special=True)``, refusing an over-long prompt early.

        llama.cpp's special-token pass costs time quadratic in the text's length (20,000
        short chat messages, 939 kB, took over 90 s to tokenize before the context check
        could refuse them). A text longer than :data:`PROBE_CHARS_PER_TOKEN` characters per
        context token is first tokenized up to there: when that head alone is over the
        context (by more than :data:`PROBE_MARGIN` tokens, for the word or special token cut
        at its end), the whole is too, and it is refused without tokenizing the rest.

        Raises:
            ContextExhausted: the head of the text is already longer than the context.
        """
        n_ctx = self.n_ctx
        probe = n_ctx * PROBE_CHARS_PER_TOKEN
        if len(text) > probe:
            head = self.llama.tokenize(text[:probe].encode("utf-8"), add_bos=add_bos, special=True)
            if len(head) > n_ctx + PROBE_MARGIN:
                raise ContextExhausted(
                    f"model {self.name!r}: the prompt is longer than the context of {n_ctx} tokens "
                    f"(its first {probe} characters alone are {len(head)} tokens)"
                )
        return self.llama.tokenize(text.encode("utf-8"), add_bos=add_bos, special=True)

    def prompt_tokens(self, ctx: Context) -> list[int]:
        """The prompt's token ids, as ``create_chat_completion`` / ``create_completion`` build them.

        Raises:
            RemoteRejected: no chat template, or the template rejects the messages.
            ContextExhausted: the prompt is clearly longer than the context (:meth:`_tokenize`).
        """
        if ctx.prompt is not None:
            return self._tokenize(ctx.prompt, add_bos=True)
        if self._formatter is None:
            raise RemoteRejected(f"model {self.name!r} has no chat template; use /v1/completions", status=400)
        assert ctx.messages is not None
        formatter = self._formatter
        add_bos = True

        def render(messages: Sequence[dict[str, Any]]) -> str:
            nonlocal add_bos
            try:
                result = formatter(messages=list(messages))  # type: ignore[arg-type]
            except Exception as exc:  # jinja2 / raise_exception in the template
                raise ValueError(f"chat template failed: {exc}") from exc
            add_bos = not result.added_special
            return str(result.prompt)

        try:
            # Message content is plain text: special-token strings in it are not control tokens.
            return tokenize_chat(
                render,
                ctx.messages,
                self._specials,
                lambda text, first: self._tokenize(text, add_bos=first and add_bos),
                lambda text, first: self.llama.tokenize(text.encode("utf-8"), add_bos=first and add_bos, special=False),
            )
        except ValueError as exc:
            raise RemoteRejected(f"model {self.name!r}: {exc}", status=400) from exc

    # ------------------------------------------------------------- decoding
    @contextmanager
    def _lease(self, tokens: list[int], prompt_len: int = 0) -> Iterator[Any]:
        """The context whose cache holds the longest usable prefix of ``tokens`` (a prompt of
        ``prompt_len`` tokens and the answer so far; :meth:`PromptCache.reusable`), least
        recently used among equals, once no other call is computing.

        Raises:
            RemoteUnavailable: the adapter is closed.
        """

        with self._cond:
            while True:
                if self._closed:  # llama.cpp would crash on a freed context
                    raise RemoteUnavailable(f"model {self.name!r} is shut down")
                if not any(s.busy for s in self._slots):
                    break
                self._cond.wait()
            slot = max(self._slots, key=lambda s: (s.reusable(tokens, prompt_len), -s.used))
            slot.busy = True
        try:
            self._activate(slot)
            try:
                yield slot
            finally:
                slot.tokens = self.llama.input_ids[: self.llama.n_tokens].copy()
        finally:
            with self._cond:
                slot.busy = False
                slot.used = next(self._clock)
                self._cond.notify_all()

    def _activate(self, slot: PromptCache) -> None:
        """Put ``slot``'s cache in the context (the one there saved into its own slot first).
        Runs only while no other call computes. A state that llama.cpp cannot restore leaves
        the slot empty (its prompt is evaluated again), never a wrong cache."""
        lc = self._llama_cpp
        if self._live is slot:
            return
        ctx = self.llama.ctx
        memory = lc.llama_get_memory(ctx)
        live, n_live = self._live, self.llama.n_tokens
        if live is not None:
            live.tokens = self.llama.input_ids[:n_live].copy()
            live.state = None
            if n_live:
                lc.llama_memory_seq_rm(memory, -1, n_live, -1)  # cells past what it holds
                size = lc.llama_state_seq_get_size(ctx, 0)
                buf = (ctypes.c_uint8 * size)()
                written = lc.llama_state_seq_get_data(ctx, buf, size, 0)
                if written:
                    live.state = buf
                else:  # not saved: the slot holds nothing
                    live.tokens, live.batch_end, live.batch_logits = live.tokens[:0], 0, None
        lc.llama_memory_clear(memory, False)
        self.llama.n_tokens = 0
        self._live = slot
        if len(slot.tokens) and slot.state is not None:
            if lc.llama_state_seq_set_data(ctx, slot.state, len(slot.state), 0):
                self.llama.input_ids[: len(slot.tokens)] = slot.tokens
                self.llama.n_tokens = len(slot.tokens)
            else:
                lc.llama_memory_clear(memory, False)
        if self.llama.n_tokens == 0:
            slot.tokens, slot.batch_end, slot.batch_logits = slot.tokens[:0], 0, None
        slot.state = None

    def _logprobs_after(self, slot: PromptCache, tokens: list[int], prompt_len: int) -> np.ndarray:
        """log-softmax of the next-token logits after ``tokens`` (a prompt of ``prompt_len``
        tokens and the answer so far), computed as a direct generation computes them: the
        prompt in one batch, every later token alone (the cache reused as far as
        :meth:`PromptCache.reusable` allows)."""
        llama = self.llama
        if not tokens:
            raise RemoteRejected(f"model {self.name!r}: the prompt is empty: no token to condition on", status=400)
        if len(tokens) >= self.n_ctx:
            raise ContextExhausted(f"model {self.name!r}: {len(tokens)} tokens exceed the context of {self.n_ctx}")
        prompt_len = max(1, min(prompt_len, len(tokens)))
        slot.tokens = llama.input_ids[: llama.n_tokens]  # the live cache (a view; copied on release)
        keep = slot.reusable(tokens, prompt_len)
        llama.n_tokens = keep
        if keep == len(tokens):
            assert slot.batch_logits is not None
            return slot.batch_logits.copy()
        if keep < prompt_len:
            llama.eval(tokens[:prompt_len])
            lp = self._last_logprobs()
            slot.batch_end, slot.batch_logits = prompt_len, lp  # kept: the prompt's last logits
            keep = prompt_len
        for token in tokens[keep:]:
            llama.eval([token])
            lp = self._last_logprobs()
        return lp

    def _last_logprobs(self) -> np.ndarray:
        """log-softmax of the logits of the last evaluated position (``[V]`` float64)."""
        ptr = self._llama_cpp.llama_get_logits_ith(self.llama.ctx, -1)
        logits = np.ctypeslib.as_array(ptr, shape=(self.n_vocab,)).astype(np.float64)
        top = logits.max()
        return logits - top - np.log(np.exp(logits - top).sum())

    def _candidate(self, tid: int, lp: float) -> Candidate:
        if self.eog[tid]:
            return Candidate(b"", lp, self._eot_text, tid, is_eot=True)
        data = self.token_bytes[tid]
        return Candidate(data, lp, "" if data is None else data.decode("utf-8", "replace"), tid)

    def _tokens(self, ctx: Context) -> tuple[list[int], list[int]]:
        """The prompt's token ids, and those of the prompt and the accepted text after it."""
        prompt = self.prompt_tokens(ctx)
        if ctx.token_ids is not None:
            return prompt, prompt + list(ctx.token_ids)
        prefix = ctx.assistant_prefix
        return prompt, prompt + (self.llama.tokenize(prefix, add_bos=False, special=False) if prefix else [])

    def _steps(
        self,
        tokens: list[int],
        prompt_len: int,
        positions: list[Position],
        rng: np.random.Generator,
        count: int,
        top_k: int,
        sample: bool,
    ) -> bool:
        """Up to ``count`` further positions of a draft after ``tokens`` (a prompt of
        ``prompt_len`` tokens and the answer so far; ``tokens`` and ``positions`` extended in
        place), under one lease of the context; True where the draft ended (end of turn)."""
        with self._lease(tokens, prompt_len) as slot:
            for _ in range(count):
                lp = self._logprobs_after(slot, tokens, prompt_len)
                pos = position_from_logprobs(lp, top_k=top_k, candidate=self._candidate, rng=rng, sample=sample)
                if drafted(positions, tokens, pos):
                    return True
        return False

    def _draft_sync(self, ctx: Context, n_tokens: int, top_k: int, seed: int | None, greedy: bool = False) -> Draft:
        prompt, tokens = self._tokens(ctx)
        positions: list[Position] = []
        rng, sample = np.random.default_rng(seed), n_tokens > 1 and not greedy
        ended = self._steps(tokens, len(prompt), positions, rng, n_tokens, top_k, sample)
        return Draft(tuple(positions), "stop" if ended else "length", len(prompt))

    async def draft(
        self, ctx: Context, *, n_tokens: int, top_k: int, seed: int | None = None, greedy: bool = False
    ) -> Draft:
        return await asyncio.get_running_loop().run_in_executor(
            self._executor, self._draft_sync, ctx, n_tokens, top_k, seed, greedy
        )

    async def stream_draft(
        self, ctx: Context, *, n_tokens: int, top_k: int, seed: int | None = None, greedy: bool = False
    ) -> SteppedDraft | None:
        """:meth:`draft`'s positions computed as the decoder reads them
        (:class:`adapters.stepped_draft.SteppedDraft`; the same positions for the same ``seed``).
        None for a one-token call.

        Raises:
            RemoteRejected, ContextExhausted: the prompt cannot be served (as :meth:`draft`).
        """
        if n_tokens < 2:
            return None
        prompt, tokens = await asyncio.get_running_loop().run_in_executor(self._executor, self._tokens, ctx)
        rng, sample = np.random.default_rng(seed), not greedy

        def step(count: int) -> tuple[list[Position], bool]:
            positions: list[Position] = []
            ended = self._steps(tokens, len(prompt), positions, rng, count, top_k, sample)
            return positions, ended

        return SteppedDraft(step, n_tokens=n_tokens, prompt_tokens=len(prompt), executor=self._executor)

    async def check(self) -> None:
        """In-process: ready once constructed."""

    async def aclose(self) -> None:
        await asyncio.to_thread(self._close)

    def _close(self) -> None:
        with self._cond:
            self._closed = True
            while any(s.busy for s in self._slots):  # let running calls finish first
                self._cond.wait()
            for slot in self._slots:
                slot.state = None
            if self._live is not CLOSED:
                self._live = CLOSED
                self.llama.close()

    def vocab_bytes(self) -> list[bytes | None]:
        """Bytes of every token (``None`` for control tokens): lets the server
        detect a pair with the same tokenizer (the fast path)."""
        return self.token_bytes

    def direct_chat(self, messages: list[dict[str, Any]], max_tokens: int) -> str:
        """Greedy text straight from llama.cpp (no proxy), for comparisons."""
        with self._lease([]) as slot:
            llama = self.llama
            llama.n_tokens = 0
            slot.batch_end, slot.batch_logits = 0, None
            typed: Any = messages  # llama_cpp's TypedDicts; plain dicts are what it accepts at run time
            out: Any = llama.create_chat_completion(
                messages=typed, max_tokens=max_tokens, temperature=0.0, repeat_penalty=1.0
            )
            llama.n_tokens = 0
            return out["choices"][0]["message"]["content"] or ""
