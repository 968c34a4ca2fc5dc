"""Hand-written fakes: a remote that replays known top-k steps (the one-method seam)."""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Iterator, Sequence

import numpy as np

from adapters.base import Candidate, Capabilities, Context, Draft, Position, Sample
from adapters.stepped_draft import SteppedDraft

EOT = Candidate(b"", 0.0, "<|im_end|>", is_eot=True)


def cand(text: str | bytes, logprob: float) -> Candidate:
    data = text.encode() if isinstance(text, str) else text
    return Candidate(data, logprob, data.decode("utf-8", "replace"))


def normalised(pairs: Sequence[tuple[str | bytes, float]]) -> tuple[Candidate, ...]:
    """Candidates whose logprobs are log-softmax of the given scores."""
    m = max(s for _, s in pairs)
    z = math.log(sum(math.exp(s - m) for _, s in pairs)) + m
    return tuple(cand(t, s - z) for t, s in pairs)


class FakeRemote:
    """Replays ``steps(prefix) -> candidates``; counts calls.

    The candidates ``steps`` returns are the remote's whole vocabulary at that
    position. Drafts of several tokens sample from them (log-softmax of the
    given logprobs, T = 1; only from the top ``top_k`` renormalised with
    ``top_k_drafts``, as llama.cpp's and vLLM's ``top_k`` filter does) or take
    the top one (``greedy``), and report the top ``top_k`` with normalised
    logprobs, as a real server does.
    """

    name = "fake"

    def __init__(
        self,
        steps: Callable[[bytes], Sequence[Candidate]],
        *,
        can_continue: bool = True,
        seed: int = 0,
        top_k_drafts: bool = False,
        logprobs: bool = True,
        on_demand: bool = False,
    ) -> None:
        self.steps = steps
        self.rng = np.random.default_rng(seed)
        self.calls = 0
        self.drafted = 0
        """Positions returned by calls of more than one token."""
        self.requested: list[int] = []
        """``n_tokens`` of every call, in order."""
        self.samples = 0
        """Complete answers given (sequence mode)."""
        self.contexts: list[Context] = []
        self.capabilities = Capabilities(
            can_continue=can_continue,
            top_k_drafts=top_k_drafts,
            logprobs=logprobs,
            streams_drafts=on_demand,
            drafts_on_demand=on_demand,
        )
        self.not_ready: Exception | None = None
        """Raised by :meth:`check` when set (readiness tests)."""

    async def draft(
        self, ctx: Context, *, n_tokens: int, top_k: int, seed: int | None = None, greedy: bool = False
    ) -> Draft:
        self.calls += 1
        self.contexts.append(ctx)
        self.requested.append(n_tokens)
        if n_tokens == 1:
            cands = tuple(sorted(self.steps(ctx.assistant_prefix), key=lambda c: -c.logprob))[:top_k]
            return Draft((Position(cands, cands[0]),), None, 7)
        positions = list(self._positions(ctx, n_tokens, top_k, seed, greedy))
        last = positions[-1].sampled
        return Draft(tuple(positions), "stop" if last.is_eot or last.data is None else "length", 7)

    def _positions(self, ctx: Context, n_tokens: int, top_k: int, seed: int | None, greedy: bool) -> Iterator[Position]:
        """A draft's positions, each computed when asked for (one random draw each, in order)."""
        rng = self.rng if seed is None else np.random.default_rng(seed)
        prefix = ctx.assistant_prefix
        for _ in range(n_tokens):
            full = sorted(self.steps(prefix), key=lambda c: -c.logprob)
            lp = np.array([c.logprob for c in full])
            lp = lp - (lp.max() + np.log(np.exp(lp - lp.max()).sum()))
            every = [Candidate(c.data, float(v), c.token, c.token_id, c.is_eot) for c, v in zip(full, lp, strict=True)]
            law = np.exp(lp[:top_k] if self.capabilities.top_k_drafts else lp)
            pick = 0 if greedy else int(rng.choice(law.size, p=law / law.sum()))
            self.drafted += 1
            yield Position(tuple(every[:top_k]), every[pick])
            if every[pick].is_eot or every[pick].data is None:
                return
            prefix += every[pick].data

    async def stream_draft(
        self, ctx: Context, *, n_tokens: int, top_k: int, seed: int | None = None, greedy: bool = False
    ) -> SteppedDraft | None:
        """With ``on_demand``: :meth:`draft`'s positions computed as read (an in-process remote's
        :class:`adapters.stepped_draft.SteppedDraft`); ``self.computed`` counts them."""
        if n_tokens < 2:
            return None
        self.calls += 1
        self.contexts.append(ctx)
        self.requested.append(n_tokens)
        positions = self._positions(ctx, n_tokens, top_k, seed, greedy)

        def step(count: int) -> tuple[list[Position], bool]:
            out = list(itertools.islice(positions, count))
            ended = bool(out) and (out[-1].sampled.is_eot or out[-1].sampled.data is None)
            return out, ended

        return SteppedDraft(step, n_tokens=n_tokens, prompt_tokens=7, executor=None)

    async def sample(
        self,
        ctx: Context,
        *,
        max_tokens: int,
        temperature: float,
        top_p: float,
        stop: tuple[str, ...] = (),
        seed: int | None = None,
        logprobs: bool = False,
    ) -> Sample:
        """A whole answer (continuing ``ctx.assistant_prefix``): greedy at T = 0, else tokens
        drawn at T = 1 as in :meth:`draft`; with ``logprobs`` their summed logprob."""
        if logprobs and not self.capabilities.logprobs:
            raise AssertionError("logprobs asked of a remote that gives none")
        self.contexts.append(ctx)
        draft = await self.draft(ctx, n_tokens=max(2, max_tokens), top_k=1, seed=seed, greedy=temperature == 0)
        self.calls -= 1
        self.samples += 1
        positions = draft.positions[:max_tokens]
        text = b"".join(p.sampled.data or b"" for p in positions).decode("utf-8", "replace")
        self.drafted -= len(draft.positions)
        ended = bool(positions) and positions[-1].sampled.is_eot
        total = sum(p.sampled.logprob for p in positions) if logprobs else None
        return Sample(text, "stop" if ended else "length", 7, len(positions), total)

    async def check(self) -> None:
        if self.not_ready is not None:
            raise self.not_ready

    async def aclose(self) -> None:
        pass


def script(words: Sequence[str], alternatives: int = 3) -> Callable[[bytes], Sequence[Candidate]]:
    """A remote that says ``words`` in order (top-1), then ends its turn."""

    def steps(prefix: bytes) -> Sequence[Candidate]:
        done = prefix.decode("utf-8", "ignore")
        i = 0
        text = ""
        while i < len(words) and len(text + words[i]) <= len(done):
            text += words[i]
            i += 1
        if i >= len(words):
            return (Candidate(b"", -0.01, "<|im_end|>", is_eot=True), cand(" more", -5.0))
        others = [cand(f" alt{j}", -3.0 - j) for j in range(alternatives)]
        return (cand(words[i], -0.1), *others, Candidate(b"", -6.0, "<|im_end|>", is_eot=True))

    return steps


def corrupt_last_byte(path) -> None:
    """Flip every bit of a file's last byte: an alteration that keeps its size."""
    data = bytearray(path.read_bytes())
    data[-1] ^= 0xFF
    path.write_bytes(bytes(data))


class EchoWorker:
    """A Ray worker (:class:`proxy.jobs.ray_engine.LineWorker`) for the engine's tests: answers
    ``{"id", "text"}`` with the text upper-cased and the process that answered it."""

    def __init__(self, fail: bool = False) -> None:
        if fail:
            raise ValueError("this worker cannot start: its model is missing")

    async def answer(self, payload: dict) -> dict:
        import asyncio
        import os

        await asyncio.sleep(0.001)
        return {"id": payload["id"], "text": payload["text"].upper(), "pid": os.getpid()}

    async def aclose(self) -> None:
        pass
