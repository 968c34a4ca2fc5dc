"""The local pair: base model B and unlearned model U = B + a peft adapter,
sharing one copy of the weights (B is U with the adapter disabled), or, for a
fully fine-tuned offset, U as a second model.

:class:`LocalPair` loads a transformers folder or a GGUF (converted once,
:mod:`proxy.models`) and an offset artifact (:mod:`proxy.artifact`), renders
prompts with the pair's own chat template, and opens a
:class:`PairScorer` per generated choice: the torch side of
:class:`proxy.alignment.TreeScorer`, with one KV cache per model for the
trunk and tree attention for the candidates' paths.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from adapters.base import ContextExhausted

from .alignment import Aligner, Tree
from .artifact import OffsetArtifact, load_artifact
from .models import local_model_dir
from .vocab import ByteVocab

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class PairInfo:
    name: str
    model_sha256: str
    tokenizer_sha256: str


class LocalPair:
    """B and U on one set of weights. Without an offset, U = B and Δ ≡ 0.

    Not thread-safe: the server runs every call on one worker thread.
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
    ) -> None:
        self.model = model.eval()
        self.u_model = u_model.eval() if u_model is not None else None
        """U as its own model (a ``"full"`` artifact); ``None``: U is ``model`` with its adapter."""
        self.tokenizer = tokenizer
        self.name = name
        self.offset = offset
        self.vocab = vocab if vocab is not None else ByteVocab.from_tokenizer(tokenizer)
        self.max_length = int(getattr(model.config, "max_position_embeddings", 2048))
        from peft.tuners.tuners_utils import BaseTunerLayer

        self._adapter_layers = [m for m in self.model.modules() if isinstance(m, BaseTunerLayer)]
        """The LoRA layers of U, switched off for B by :meth:`_base_only`."""
        self.executor = ThreadPoolExecutor(1, thread_name_prefix="pair")
        """The one thread that runs this pair for every served model that uses it."""

    @property
    def has_offset(self) -> bool:
        return self.offset is not None

    @classmethod
    def load(cls, ref: str, offset_dir: str | Path | None = None) -> LocalPair:
        """Load the pair from a transformers folder, a GGUF path or a packaged
        name, and an optional offset artifact folder.

        Raises:
            FileNotFoundError: the model or artifact is missing.
            proxy.artifact.ArtifactError: the artifact does not belong to this
                base model or tokenizer, or fails its checksums.
        """
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
        return cls(model, tokenizer, name=ref, offset=offset, vocab=vocab, u_model=u_model)

    # ---------------------------------------------------------------- prompts
    def prompt_ids(self, messages: Sequence[dict[str, Any]] | None = None, prompt: str | None = None) -> list[int]:
        """Local token ids of the prompt: chat messages rendered with the
        pair's chat template (generation prompt added), or raw text.

        Raises:
            ValueError: the template rejects the messages, or the prompt is empty (the
                offset needs at least one token to condition on).
        """
        if messages is not None:
            try:
                text = self.tokenizer.apply_chat_template(list(messages), add_generation_prompt=True, tokenize=False)
            except Exception as exc:  # jinja2 errors from the template itself
                raise ValueError(f"the pair's chat template failed: {exc}") from exc
            ids = list(self.tokenizer.encode(text, add_special_tokens=False))
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
        scorer = PairScorer(self)
        aligner = Aligner(self.vocab, scorer, same_tokenizer=same_tokenizer)
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
        ids = list(self.tokenizer.encode(text, add_special_tokens=False))
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
        out = []
        for adapter in (True, False) if self.has_offset else (False,):
            mask = torch.ones((1, n), dtype=torch.long)
            lp = self._forward(full, None, adapter=adapter, mask=mask, positions=torch.arange(n)[None, :])
            out.append(lp[len(prompt_ids) - 1 : n - 1])
        return out[0], out[-1]

    # ---------------------------------------------------------------- forward
    @contextlib.contextmanager
    def _base_only(self) -> Iterator[None]:
        """B = U with its LoRA layers off. The same switch as peft's
        ``disable_adapter()`` (each layer's ``disable_adapters`` flag) without
        its walk over every module and its ``requires_grad`` bookkeeping, which
        an inference-only pair does not need: a B forward of the 135M pair at one
        token costs about 55 ms instead of 135 ms (2 cores).
        ``tests/test_alignment.py`` checks Δ against ``disable_adapter()``."""
        for layer in self._adapter_layers:
            layer._disable_adapters = True
        try:
            yield
        finally:
            for layer in self._adapter_layers:
                layer._disable_adapters = False

    def _forward(
        self,
        ids: torch.Tensor,
        cache: Any,
        *,
        adapter: bool,
        mask: torch.Tensor,
        positions: torch.Tensor,
        keep: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Log-softmax over the vocabulary, ``[n, V]`` float32, at every position of ``ids``
        or only at the positions ``keep`` (``[len(keep), V]``: the output head, 49,152 × 576
        for SmolLM2, and the rows' memory are spent only where a row is read)."""
        kwargs: dict[str, Any] = dict(
            input_ids=ids, past_key_values=cache, attention_mask=mask, position_ids=positions, use_cache=True
        )
        if keep is not None:
            kwargs["logits_to_keep"] = keep
        if self.u_model is not None:  # a full artifact: U and B are two models
            out = (self.u_model if adapter else self.model)(**kwargs)
        elif adapter or self.offset is None:
            out = self.model(**kwargs)
        else:
            with self._base_only():
                out = self.model(**kwargs)
        return torch.log_softmax(out.logits[0].float(), dim=-1)  # [n, V]


class PairScorer:
    """KV caches of the trunk for U and B; scores a tree of tokens after it."""

    def __init__(self, pair: LocalPair) -> None:
        from transformers import DynamicCache

        self.pair = pair
        self.caches = {True: DynamicCache(), False: DynamicCache()}
        self.trunk_len = 0
        self.trunk_ids: list[int] = []
        self.last: dict[bool, np.ndarray | None] = {True: None, False: None}
        self._undo: tuple[int, dict[bool, np.ndarray | None]] | None = None
        """Before the last :meth:`score`'s commit: trunk length and last rows."""

    @torch.inference_mode()
    def score(self, tree: Tree, commit: int, need: Sequence[int] | None = None) -> tuple[np.ndarray, np.ndarray]:
        """See :meth:`proxy.alignment.TreeScorer.score`.

        Raises:
            ContextExhausted: the trunk plus the tree exceed the pair's context.
            ValueError: no trunk and nothing to score.
        """
        n = len(tree.tokens)
        if self.trunk_len + n > self.pair.max_length:
            raise ContextExhausted(f"the pair's context ({self.pair.max_length} tokens) is exhausted")
        want = list(range(n + 1)) if need is None else list(need)
        models = (True, False) if self.pair.has_offset else (False,)
        rows: dict[bool, np.ndarray] = {}
        self._undo = None
        if n == 0:
            for m in models:
                if self.last[m] is None:
                    raise ValueError("empty prompt: the pair has nothing to condition on")
                rows[m] = np.repeat(self.last[m][None, :], len(want), axis=0)  # type: ignore[index]
        else:
            depth = np.zeros(n, dtype=np.int64)
            allowed = torch.zeros((n, self.trunk_len + n), dtype=torch.bool)
            allowed[:, : self.trunk_len] = True
            for i, p in enumerate(tree.parents):
                if p >= 0:
                    depth[i] = depth[p] + 1
                    allowed[i, self.trunk_len : self.trunk_len + p + 1] = allowed[
                        p, self.trunk_len : self.trunk_len + p + 1
                    ]
                allowed[i, self.trunk_len + i] = True
            mask = torch.zeros(allowed.shape, dtype=torch.float32)
            mask.masked_fill_(~allowed, torch.finfo(torch.float32).min)
            ids = torch.tensor([tree.tokens], dtype=torch.long)
            positions = torch.from_numpy(self.trunk_len + depth)[None, :]
            # Nodes whose next-token row is read: the requested ones and the last committed one.
            nodes = sorted({r - 1 for r in want if r >= 1} | ({commit - 1} if commit else set()))
            at = {node: j for j, node in enumerate(nodes)}
            keep = torch.tensor(nodes, dtype=torch.long)
            undo = (self.trunk_len, dict(self.last))
            # Rows stay float32 (the logits' precision): a float64 copy of a 128-position draft's
            # rows is 50 MB per model, and the aligner only gathers from them.
            identity = [at.get(r - 1, -1) for r in want] == list(range(len(want)))
            for m in models:
                lp = self.pair._forward(
                    ids, self.caches[m], adapter=m, mask=mask[None, None], positions=positions, keep=keep
                )
                after = lp.numpy()
                first = self.last[m]
                if identity:  # every row read is a kept row, in order (the usual draft): no copy
                    out = after
                else:
                    out = np.empty((len(want), after.shape[1]), dtype=after.dtype)
                    for j, r in enumerate(want):
                        if r >= 1:
                            out[j] = after[at[r - 1]]
                        else:  # no trunk yet: row 0 is never read when the chain is the prompt
                            out[j] = first if first is not None else -np.inf
                rows[m] = out
                # Keep the committed chain in the cache, drop the rest of the tree.
                remove = n - commit
                if remove:
                    self.caches[m].crop(-remove)
                if commit:
                    self.last[m] = after[at[commit - 1]].copy()
            self._undo = undo
            self.trunk_len += commit
            self.trunk_ids.extend(tree.tokens[:commit])
        if not self.pair.has_offset:
            rows[True] = rows[False]
        return rows[True], rows[False]

    def rollback(self, keep: int) -> int:
        """See :meth:`proxy.alignment.TreeScorer.rollback`. Rows after committed nodes are
        not kept (16 streams × 64 draft positions × 2 models × a 49,152-wide float64 row
        would be 800 MB): when part of the commit is rolled back, the last kept token
        leaves the caches too, to be run again at the front of the next tree, which gives
        its row for free.

        Raises:
            ValueError: nothing to roll back, or ``keep`` outside the last commit.
        """
        if self._undo is None:
            raise ValueError("rollback without a preceding score")
        before, last = self._undo
        committed = self.trunk_len - before
        if not 0 <= keep <= committed:
            raise ValueError(f"cannot keep {keep} of {committed} committed tokens")
        if keep == committed:
            return keep
        cached = max(0, keep - 1)
        for m in list(self.last):
            if self.caches[m].get_seq_length():
                self.caches[m].crop(-(committed - cached))
            self.last[m] = last[m] if cached == 0 and keep == 0 else None
        self.trunk_len = before + cached
        del self.trunk_ids[self.trunk_len :]
        self._undo = None
        return cached
