"""The local pair: base model B and unlearned model U = B + a peft adapter,
sharing one copy of the weights (B is U with the adapter disabled), or, for a
fully fine-tuned offset, U as a second model.

:class:`LocalPair` loads a transformers folder or a GGUF (converted once,
:mod:`proxy.pair.model_files`) and an offset artifact (:mod:`proxy.pair.artifact`), renders
prompts with the pair's own chat template, scores answers teacher-forced, and opens a
:class:`proxy.pair.scorer.PairScorer` per generated choice: the torch side of
:class:`proxy.decoding.alignment.TreeScorer`, with one KV cache per model for the
trunk and tree attention for the candidates' paths.

Concurrent requests share the pair's weights: their tree passes meet in one
queue (:class:`proxy.pair.batcher.TreeBatcher`) and run as one batched forward pass per
model (:func:`proxy.pair.forward.forward_trees`; each request's KV cache left-padded to the
longest, its tree right-padded), so that 16 one-token passes read the weights once instead
of 16 times. Recent prompts' KV caches are kept (:class:`proxy.pair.prefix_cache.PrefixCache`).
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import torch

from adapters.templates import hf_chat_ids, hf_special_strings
from proxy.decoding.alignment import Aligner
from proxy.decoding.scope_gate import ScopeGate
from proxy.decoding.types import AnswerScores
from proxy.decoding.vocab import ByteVocab, text_ids
from proxy.pair import compute
from proxy.pair.artifact import OffsetArtifact, load_artifact
from proxy.pair.batcher import BatchSettings, TreeBatcher, TreeJob
from proxy.pair.few_rows import use_few_rows_kernel
from proxy.pair.forward import adapter_layers, forward, forward_trees
from proxy.pair.lean import LeanDecoder
from proxy.pair.model_files import local_model_dir
from proxy.pair.prefix_cache import PrefixCache
from proxy.pair.scorer import PairScorer
from proxy.pair.sides import Side, sides


class LocalPair:
    """B and U on one set of weights. Without an offset, U = B and Δ ≡ 0.

    Calls run on :attr:`executor` (``batching.max_batch`` threads, one per request
    in flight) through :meth:`tracked`; every forward pass runs under one lock
    (B is U with its adapter layers switched off), the trees of concurrent
    :class:`PairScorer` objects batched by :attr:`batcher`.
    """

    def __init__(
        self,
        model: Any,
        tokenizer: Any,
        *,
        name: str,
        offset: OffsetArtifact | None = None,
        vocab: ByteVocab | None = None,
        u_model: Any | None = None,
        batching: BatchSettings | None = None,
        prefix_cache_tokens: int = 512,
    ) -> None:
        self.model = model.eval()
        self.u_model = u_model.eval() if u_model is not None else None
        """U as its own model (a ``"full"`` artifact); ``None``: U is ``model`` with its adapter."""
        for net in (self.model, self.u_model):
            if net is not None:
                use_few_rows_kernel(net)
        self.tokenizer = tokenizer
        self._specials = hf_special_strings(tokenizer)
        self.name = name
        self.offset = offset
        self.gate: ScopeGate | None = None
        """The offset's scope gate (:mod:`proxy.decoding.scope_gate`) where the pair serves it:
        U's rows are B's where it is closed, in every score the pair gives."""
        self.vocab = vocab if vocab is not None else ByteVocab.from_tokenizer(tokenizer)
        self.max_length = int(getattr(model.config, "max_position_embeddings", 2048))
        self.adapter_layers = adapter_layers(self.model)
        """The LoRA layers of U, switched off for B by :func:`proxy.pair.forward.base_only`."""
        self.batching = batching if batching is not None else BatchSettings()
        self.executor = ThreadPoolExecutor(
            self.batching.max_batch, thread_name_prefix="pair", initializer=compute.single_threaded
        )
        """The threads that run this pair's calls for every served model that uses it."""
        self.lock = threading.RLock()
        """Held for every forward pass (the adapter switch is shared state)."""
        self.fuse_sides = True
        """U and B as the rows of one pass where the offset is a LoRA adapter
        (:func:`proxy.pair.forward.fused`); ``False``: one pass per model (the reference
        that ``bench.speed`` and the tests compare against)."""
        self.lazy_u = True
        """U's rows computed only where the scope gate opens on B's (:class:`PairScorer`); ``False``:
        U and B in every pass (the reference that ``bench.speed`` and the tests compare against)."""
        self.lean: dict[Side, Any] = {}
        """Each side's lean body (:class:`proxy.pair.lean.LeanDecoder`) for the batched passes,
        where the model is of the Llama family (:meth:`LeanDecoder.build`); empty:
        transformers' modules (the reference ``bench.speed`` and the tests compare against)."""
        b_lean = LeanDecoder.build(self.model)
        u_lean = b_lean if self.u_model is None else LeanDecoder.build(self.u_model)
        if b_lean is not None and u_lean is not None:
            self.lean = {Side.B: b_lean, Side.U: u_lean}
        self.batcher = TreeBatcher(self, self.batching)
        self.prefix_cache = PrefixCache(prefix_cache_tokens) if prefix_cache_tokens > 0 else None
        """KV of recent prompts (``[server] pair_prefix_cache_tokens``; 0: off)."""

    def close(self) -> None:
        """Stop this pair's threads (calls in flight finish, queued ones are cancelled), so that
        the pair and its weights can be freed."""
        self.executor.shutdown(wait=True, cancel_futures=True)
        self.batcher.close()

    @property
    def has_offset(self) -> bool:
        return self.offset is not None

    def tracked(self, fn: Callable[..., Any], *args: Any) -> Any:
        """``fn(*args)``, counted as a request computing on the pair (for :class:`TreeBatcher`'s
        window). What :meth:`proxy.decoding.served.ServedModel.run_pair` runs on :attr:`executor`."""
        self.batcher.enter()
        try:
            return fn(*args)
        finally:
            self.batcher.leave()

    @classmethod
    def load(
        cls,
        ref: str,
        offset_dir: str | Path | None = None,
        batching: BatchSettings | None = None,
        prefix_cache_tokens: int = 512,
        gate: bool = True,
    ) -> LocalPair:
        """Load the pair from a transformers folder, a GGUF path or a packaged
        name, and an optional offset artifact folder; ``gate``: serve the offset's scope gate
        where it has one.

        Raises:
            FileNotFoundError: the model or artifact is missing.
            proxy.pair.artifact.ArtifactError: the artifact does not belong to this
                base model or tokenizer, or fails its checksums.
        """
        # on the compute thread: loading copies weights with torch's intra-op threads, which
        # would give the calling thread a team of its own (proxy.pair.compute)
        return compute.run(cls._load, ref, offset_dir, batching, prefix_cache_tokens, gate)

    @classmethod
    def _load(
        cls,
        ref: str,
        offset_dir: str | Path | None,
        batching: BatchSettings | None,
        prefix_cache_tokens: int,
        gate: bool,
    ) -> LocalPair:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        folder = local_model_dir(ref)
        tokenizer = AutoTokenizer.from_pretrained(folder)
        model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
        vocab = ByteVocab.from_tokenizer(tokenizer)
        offset = None
        u_model = None
        if offset_dir is not None:
            offset = load_artifact(Path(offset_dir), model, vocab)
            if offset.parameters == "full":
                u_model = offset.load_full()
            else:
                model = offset.attach(model)
        pair = cls(
            model,
            tokenizer,
            name=ref,
            offset=offset,
            vocab=vocab,
            u_model=u_model,
            batching=batching,
            prefix_cache_tokens=prefix_cache_tokens,
        )
        if offset is not None and gate:
            pair.gate = offset.scope_gate()
        return pair

    # ---------------------------------------------------------------- prompts
    def prompt_ids(self, messages: Sequence[dict[str, Any]] | None = None, prompt: str | None = None) -> list[int]:
        """Local token ids of the prompt: chat messages rendered with the
        pair's chat template (generation prompt added; special-token strings in a
        message's content are plain text, :func:`adapters.templates.tokenize_chat`),
        or raw text.

        Raises:
            ValueError: the template rejects the messages, or the prompt is empty (the
                offset needs at least one token to condition on).
        """
        if messages is not None:
            try:
                ids = hf_chat_ids(self.tokenizer, messages, self._specials)
            except ValueError as exc:
                raise ValueError(f"the pair's {exc}") from exc
        else:
            ids = list(self.tokenizer.encode(prompt or "", add_special_tokens=False))
        if not ids:
            raise ValueError(
                "the prompt is empty: the offset needs at least one prompt token to condition on "
                "(send a prompt, or offset_alpha 0 for the remote alone)"
            )
        return ids

    def aligner(self, prompt_ids: Sequence[int], *, same_tokenizer: bool) -> Aligner:
        """Alignment state for one choice, with ``prompt_ids`` as the trunk's start."""
        scorer = PairScorer(self, self.gate)
        aligner = Aligner(self.vocab, scorer, same_tokenizer=same_tokenizer, gate=self.gate)
        aligner.pending = list(prompt_ids)
        return aligner

    def token_logprobs(self, prompt_ids: Sequence[int], ids: Sequence[int]) -> tuple[np.ndarray, np.ndarray]:
        """Teacher-forced log U and log B (nats) of each token of ``ids`` after
        ``prompt_ids``: two ``[len(ids)]`` float64 arrays (equal without an offset).

        Raises:
            ValueError: no prompt token to condition on, or longer than the pair's context.
        """
        target = torch.tensor(list(ids), dtype=torch.long)[:, None]
        u, b = self._teacher_forced(prompt_ids, ids)
        return (u.gather(1, target)[:, 0].double().numpy(), b.gather(1, target)[:, 0].double().numpy())

    def sequence_offset(self, prompt_ids: Sequence[int], text: str, end_of_turn: bool) -> tuple[float, int]:
        """ΣΔ = log P_U(y | x) − log P_B(y | x) (nats) of a whole answer ``text`` after
        ``prompt_ids``, teacher-forced over its local tokens (and the end-of-turn token
        when the answer ended there), and the number of local tokens scored: sequence
        mode's score. An answer longer than the pair's context is scored up to it.

        Raises:
            ValueError: no prompt token to condition on, or the prompt alone fills the context.
        """
        ids = text_ids(self.tokenizer, text)
        if end_of_turn:
            ids.append(self.vocab.eot_ids[0])
        room = self.max_length - len(prompt_ids)
        if room <= 0:
            raise ValueError(f"the prompt fills the pair's context ({self.max_length} tokens)")
        ids = ids[:room]
        if not ids or not self.has_offset:
            return 0.0, len(ids)
        u, b = self.token_logprobs(prompt_ids, ids)
        return float(np.sum(u - b)), len(ids)

    def encode_answer(self, text: str) -> tuple[list[int], list[tuple[int, int]]]:
        """Local token ids of answer ``text`` (a special token's string is characters, as in
        :func:`proxy.decoding.vocab.text_ids`) and each token's character span ``[start, end)``."""
        enc = self.tokenizer(text, add_special_tokens=False, split_special_tokens=True, return_offsets_mapping=True)
        return list(enc["input_ids"]), [(int(a), int(b)) for a, b in enc["offset_mapping"]]

    @torch.inference_mode()
    def answer_scores(self, prompt_ids: Sequence[int], ids: Sequence[int], top_k: int) -> AnswerScores:
        """Teacher-forced log B, Δ and the step rule's s_t (B standing in for the remote) of each
        of ``ids`` after ``prompt_ids``, and B's top-``top_k`` candidates with their log B and Δ
        (:class:`proxy.decoding.types.AnswerScores`; Δ ≡ 0 without an offset).

        Raises:
            ValueError: no prompt token to condition on, nothing to score, or longer than the
                pair's context.
        """
        u, b = self._teacher_forced(prompt_ids, ids)
        d = u - b
        target = torch.tensor(list(ids), dtype=torch.long)[:, None]
        step = (b.exp() * torch.nan_to_num(d, nan=0.0, neginf=0.0, posinf=0.0)).sum(dim=1)
        k = min(top_k, b.shape[1])
        top_b, top_ids = b.topk(k, dim=1) if k > 0 else (b[:, :0], torch.zeros((len(ids), 0), dtype=torch.long))
        return AnswerScores(
            log_b=b.gather(1, target)[:, 0].double().numpy(),
            delta=d.gather(1, target)[:, 0].double().numpy(),
            step_offset=step.double().numpy(),
            top_ids=top_ids.numpy(),
            top_log_b=top_b.double().numpy(),
            top_delta=d.gather(1, top_ids).double().numpy(),
        )

    def full_logprobs(self, prompt_ids: Sequence[int], ids: Sequence[int]) -> tuple[np.ndarray, np.ndarray]:
        """Teacher-forced log-softmax of U and of B over the whole local
        vocabulary at each token of ``ids`` after ``prompt_ids``: two
        ``[len(ids), V]`` float64 arrays, nats (the same array twice without an offset).

        Raises:
            ValueError: no prompt token to condition on, or longer than the pair's context.
        """
        u, b = self._teacher_forced(prompt_ids, ids)
        un = u.double().numpy()
        return un, (un if b is u else b.double().numpy())

    @torch.inference_mode()
    def _teacher_forced(self, prompt_ids: Sequence[int], ids: Sequence[int]) -> tuple[torch.Tensor, torch.Tensor]:
        if not prompt_ids:
            raise ValueError("empty prompt: the pair has nothing to condition on")
        if not ids:
            raise ValueError("nothing to score")
        if len(prompt_ids) + len(ids) > self.max_length:
            raise ValueError(f"prompt and text exceed the pair's context ({self.max_length} tokens)")
        full = torch.tensor([list(prompt_ids) + list(ids)], dtype=torch.long)
        n = full.shape[1]

        @torch.inference_mode()
        def passes() -> list[torch.Tensor]:
            out = []
            with self.lock:
                for side in sides(self.has_offset):
                    mask = torch.ones((1, n), dtype=torch.long)
                    lp = forward(self, full, None, side=side, mask=mask, positions=torch.arange(n)[None, :])
                    out.append(lp[len(prompt_ids) - 1 : n - 1])
            return out

        out = compute.run(passes)
        return gated_rows(self.gate, out[0], out[-1]), out[-1]

    def forward_trees(self, jobs: Sequence[TreeJob]) -> list[dict[Side, Any]]:
        """One batched forward pass (U's and B's rows together, or one per model) over the
        trees of ``jobs``: what :attr:`batcher` runs (:func:`proxy.pair.forward.forward_trees`,
        which says what it returns)."""
        return forward_trees(self, jobs)


def gated_rows(gate: ScopeGate | None, u: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """U's log-probability rows (``[n, V]``) with B's where scope gate ``gate`` is closed on B's
    row (Δ = 0 there, :mod:`proxy.decoding.scope_gate`); ``u`` itself without a gate, when
    ``u`` is ``b`` (no offset) or where the gate is open everywhere."""
    if gate is None or u is b:
        return u
    closed = torch.from_numpy(~gate.open(b.detach().numpy()))
    if not bool(closed.any()):
        return u
    return torch.where(closed[:, None], b, u)
