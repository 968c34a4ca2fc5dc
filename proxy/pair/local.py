"""The local pair: base model B and unlearned model U = B + a peft adapter,
sharing one copy of the weights (B is U with the adapter disabled), or, for a
fully fine-tuned offset, U as a second model.

:class:`LocalPair` loads a transformers folder or a GGUF (converted once,
:mod:`proxy.pair.model_files`) and an offset artifact (:mod:`proxy.pair.artifact`), renders
prompts with the pair's own chat template, and opens a
:class:`PairScorer` per generated choice: the torch side of
:class:`proxy.decoding.alignment.TreeScorer`, with one KV cache per model for the
trunk and tree attention for the candidates' paths.

Concurrent requests share the pair's weights: their tree passes meet in one
queue (:class:`TreeBatcher`) and run as one batched forward pass per model
(each request's KV cache left-padded to the longest, its tree right-padded),
so that 16 one-token passes read the weights once instead of 16 times.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from adapters.base import ContextExhausted
from adapters.templates import hf_chat_ids, hf_special_strings
from proxy.decoding.alignment import Aligner, Tree
from proxy.decoding.vocab import ByteVocab, text_ids
from proxy.pair.artifact import OffsetArtifact, load_artifact
from proxy.pair.model_files import local_model_dir

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class BatchSettings:
    """Dynamic batching of the pair's tree passes across concurrent requests
    (``[server]`` ``pair_max_batch``, ``pair_batch_window_ms``, ``pair_max_batch_tokens``).

    The batcher waits at most ``window_s`` for requests still computing on the CPU
    to bring their next pass, never while every running request is already queued
    (a single stream runs at once). Then, while the batch has room, it waits for
    answers that are between passes (their remote call in flight) at most a quarter of
    the last pass's time and 100 ms (:attr:`TreeBatcher.FOLLOW_FRACTION`): 16
    token-by-token streams against a fast remote then run as one batch of 15 on
    average instead of alternating halves of 8 (16 streams over one: 3.8x → 6.4x,
    ``bench.speed``). A batch holds at most ``max_batch`` requests
    and ``max_tokens`` tree positions after padding (one request's longer tree
    runs alone): a 16-row one-token pass of SmolLM2-135M costs 4.1x a single row's
    time for 16x the work, a 4-row 128-token pass 3.2x for 4x
    (``bench.pair_batching``, 2 cores), so long trees gain little from company
    and pay for the padding of shorter ones.
    """

    max_batch: int = 16
    window_s: float = 0.005
    max_tokens: int = 256


@dataclass(frozen=True)
class PairInfo:
    name: str
    model_sha256: str
    tokenizer_sha256: str


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
        self.tokenizer = tokenizer
        self._specials = hf_special_strings(tokenizer)
        self.name = name
        self.offset = offset
        self.vocab = vocab if vocab is not None else ByteVocab.from_tokenizer(tokenizer)
        self.max_length = int(getattr(model.config, "max_position_embeddings", 2048))
        from peft.tuners.tuners_utils import BaseTunerLayer

        self._adapter_layers = [m for m in self.model.modules() if isinstance(m, BaseTunerLayer)]
        """The LoRA layers of U, switched off for B by :meth:`_base_only`."""
        self.batching = batching if batching is not None else BatchSettings()
        self.executor = ThreadPoolExecutor(self.batching.max_batch, thread_name_prefix="pair")
        """The threads that run this pair's calls for every served model that uses it."""
        self.lock = threading.RLock()
        """Held for every forward pass (the adapter switch is shared state)."""
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
        window). What :meth:`proxy.decoding.decoder.ServedModel.run_pair` runs on :attr:`executor`."""
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
    ) -> LocalPair:
        """Load the pair from a transformers folder, a GGUF path or a packaged
        name, and an optional offset artifact folder.

        Raises:
            FileNotFoundError: the model or artifact is missing.
            proxy.pair.artifact.ArtifactError: the artifact does not belong to this
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
        return cls(
            model,
            tokenizer,
            name=ref,
            offset=offset,
            vocab=vocab,
            u_model=u_model,
            batching=batching,
            prefix_cache_tokens=prefix_cache_tokens,
        )

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
        with self.lock:
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
        with self._switched(adapter) as net:
            out = net(**kwargs)
        return _log_softmax_(out.logits[0].float())  # [n, V]

    @contextlib.contextmanager
    def _switched(self, adapter: bool) -> Iterator[Any]:
        """The model to run as U (``adapter``) or B: the second model of a full artifact, or
        the one model with its LoRA layers on, or off (:meth:`_base_only`) for B."""
        if self.u_model is not None:  # a full artifact: U and B are two models
            yield self.u_model if adapter else self.model
        elif adapter or self.offset is None:
            yield self.model
        else:
            with self._base_only():
                yield self.model

    def forward_trees(self, jobs: Sequence[TreeJob]) -> list[dict[bool, Any]]:
        """One forward pass per model of the pair over the trees of ``jobs``, batched:
        each job's rows (``[len(job.keep), V]`` float32 log-softmax, nats) by model
        (``True``: U, ``False``: B; only ``False`` without an offset), or what the job's
        ``reduce`` made of them, and each job's caches extended by its tree (as one pass
        of its own would leave them); when the pass fails, every job's caches are left as
        they were.

        Shapes in the pass: ``B = len(jobs)`` rows of ``N = max n_i`` positions after
        ``L = max L_i`` cached ones; row i's cache sits at ``[L − L_i, L)`` and its tree
        at ``[L, L + n_i)``, the padding masked out (a padded position attends to itself
        only, and its output is never read).
        """
        models = (True, False) if self.has_offset else (False,)
        out: list[dict[bool, Any]] = [{} for _ in jobs]
        before = [{m: (c, c.get_seq_length()) for m, c in job.caches.items()} for job in jobs]
        with self.lock:
            try:
                for m in models:
                    for rows, lp in zip(out, self._forward_batch(jobs, m), strict=True):
                        rows[m] = lp
            except BaseException:
                # Every job's caches as they were (a pass that failed half-way, for one model
                # or for some layers, must not leave tokens behind: the jobs run again alone).
                for job, held in zip(jobs, before, strict=True):
                    for m, (cache, length) in held.items():
                        job.caches[m] = cache
                        for layer in cache.layers:
                            if layer.get_seq_length() > length:
                                layer.crop(length - layer.get_seq_length())
                raise
        return out

    @torch.inference_mode()
    def _forward_batch(self, jobs: Sequence[TreeJob], adapter: bool) -> list[Any]:
        from transformers import DynamicCache

        neg = torch.finfo(torch.float32).min
        for job in jobs:
            n, held = len(job.ids), job.caches[adapter].get_seq_length()
            if job.allowed.shape != (n, held + n):
                raise ValueError(f"tree mask {tuple(job.allowed.shape)} does not fit {n} tokens after {held} cached")
        if len(jobs) == 1 or body_and_head(self.model) is None:  # no padding: the job's own cache, in place
            result: list[Any] = []
            for job in jobs:
                mask = _additive(job.allowed)
                lp = self._forward(
                    torch.tensor([job.ids], dtype=torch.long),
                    job.caches[adapter],
                    adapter=adapter,
                    mask=mask[None, None],
                    positions=job.positions[None, :],
                    keep=torch.tensor(job.keep, dtype=torch.long),
                )
                result.append(job.output(adapter, lp.numpy()))
            return result
        caches = [job.caches[adapter] for job in jobs]
        lens = [c.get_seq_length() for c in caches]
        b, width, past = len(jobs), max(len(job.ids) for job in jobs), max(lens)
        ids = torch.zeros((b, width), dtype=torch.long)
        positions = torch.zeros((b, width), dtype=torch.long)
        mask = torch.full((b, 1, width, past + width), neg, dtype=torch.float32)
        pad = torch.arange(width)
        for i, (job, held) in enumerate(zip(jobs, lens, strict=True)):
            n = len(job.ids)
            ids[i, :n] = torch.tensor(job.ids, dtype=torch.long)
            positions[i, :n] = job.positions
            block = _additive(job.allowed)
            mask[i, 0, :n, past - held : past] = block[:, :held]
            mask[i, 0, :n, past : past + n] = block[:, held:]
            mask[i, 0, pad[n:], past + pad[n:]] = 0.0
        batched = DynamicCache()
        if past:
            full = next(c for c, held in zip(caches, lens, strict=True) if held)
            layers = []
            for li, layer in enumerate(full.layers):
                k = layer.keys.new_zeros((b, layer.keys.shape[1], past, layer.keys.shape[3]))
                v = layer.values.new_zeros((b, layer.values.shape[1], past, layer.values.shape[3]))
                for i, (c, held) in enumerate(zip(caches, lens, strict=True)):
                    if held:
                        k[i, :, past - held :] = c.layers[li].keys[0]
                        v[i, :, past - held :] = c.layers[li].values[0]
                layers.append((k, v))
            batched = DynamicCache(ddp_cache_data=layers)
        with self._switched(adapter) as net:
            inner = body_and_head(net)
            hidden = inner.model(
                input_ids=ids, past_key_values=batched, attention_mask=mask, position_ids=positions, use_cache=True
            ).last_hidden_state
            cap = getattr(inner.config, "final_logit_softcapping", None)
            result = []
            # The output head over groups of jobs of at most HEAD_ROWS rows (a longer job alone):
            # one matrix product reads the head's weights (113 MB for SmolLM2) once for many
            # one-token jobs, and a group's rows are freed before the next group's are made.
            start = 0
            while start < b:
                end, rows_in = start + 1, len(jobs[start].keep)
                while end < b and rows_in + len(jobs[end].keep) <= HEAD_ROWS:
                    rows_in += len(jobs[end].keep)
                    end += 1
                picked = torch.cat([hidden[i, torch.tensor(jobs[i].keep, dtype=torch.long)] for i in range(start, end)])
                logits = inner.lm_head(picked).float()
                if cap:
                    logits = torch.tanh(logits / cap) * cap
                flat = _log_softmax_(logits).numpy()
                at = 0
                for job in jobs[start:end]:
                    rows = flat[at : at + len(job.keep)]
                    at += len(job.keep)
                    result.append(job.output(adapter, rows))
                del picked, logits, flat, rows
                start = end
        grown: list[Any] = list(batched.layers)  # DynamicLayer: keys and values [b, heads, past + width, dim]
        for i, (job, held) in enumerate(zip(jobs, lens, strict=True)):
            span = slice(past - held, past + len(job.ids))
            job.caches[adapter] = DynamicCache(
                ddp_cache_data=[(layer.keys[i : i + 1, :, span], layer.values[i : i + 1, :, span]) for layer in grown]
            )
        return result


#: Rows of the output head computed in one product in a batched pass (:meth:`LocalPair._forward_batch`).
HEAD_ROWS = 64


def _log_softmax_(logits: torch.Tensor, chunk: int = 32) -> torch.Tensor:
    """``logits`` (``[n, V]``) turned into their log-softmax over the last axis, in place,
    ``chunk`` rows at a time: one ``[chunk, V]`` temporary instead of a second ``[n, V]``
    array (a 256-position batch's is 50 MB for SmolLM2). The values are
    ``torch.log_softmax``'s, row by row. Logits that autograd tracks (outside inference
    mode) get an ordinary out-of-place log-softmax."""
    if logits.requires_grad:
        return torch.log_softmax(logits, dim=-1)
    for part in logits.split(chunk):
        part.copy_(torch.log_softmax(part, dim=-1))
    return logits


def _additive(allowed: torch.Tensor) -> torch.Tensor:
    """A boolean attention mask (True: may attend) as the additive float32 one the models take."""
    return torch.zeros(allowed.shape, dtype=torch.float32).masked_fill_(~allowed, torch.finfo(torch.float32).min)


def body_and_head(net: Any) -> Any:
    """The causal LM inside ``net`` (a peft wrapper's base model) when its decoder body
    (``.model``) and output head (``.lm_head``) can be run apart, else ``None``."""
    inner = net.get_base_model() if hasattr(net, "get_base_model") else net
    return inner if hasattr(inner, "model") and hasattr(inner, "lm_head") else None


@dataclass
class TreeJob:
    """One :class:`PairScorer` tree pass waiting for :class:`TreeBatcher`: the tree's ``n``
    token ids, which cached and tree positions each may see (``allowed``, ``[n, L + n]``
    bool, ``L`` the cache length), its positions (``[n]``), the positions whose
    next-token rows are read (``keep``), and the scorer's caches by model.

    ``reduce(model, rows)``, when given, runs inside the pass on each model's rows
    (``True``: U; ``[len(keep), V]`` float32, valid only during the call), and its value
    is the job's result for that model instead of the rows: the rows of a batch are
    then freed as soon as the pass ends, instead of staying alive until every request
    in it has read them (at 16 streams about 150 MB of a 96-position draft's rows).
    It must not change state: a failed batch runs it again."""

    ids: list[int]
    allowed: torch.Tensor
    positions: torch.Tensor
    keep: list[int]
    caches: dict[bool, Any]
    reduce: Callable[[bool, np.ndarray], Any] | None = None
    done: threading.Event = field(default_factory=threading.Event)
    result: dict[bool, Any] | None = None
    error: BaseException | None = None

    def output(self, model: bool, rows: np.ndarray) -> Any:
        """The job's result for ``model`` from its rows: ``reduce``'s value, or the rows."""
        return self.reduce(model, rows) if self.reduce else rows


class _Closed(Exception):
    """The batcher was closed (its thread ends)."""


class TreeBatcher:
    """One queue of tree passes for a pair, run in batches by one thread.

    Requests computing on the pair are counted (:meth:`enter`, :meth:`leave`), and so are
    answers decoding with it (:meth:`open_stream`, :meth:`close_stream`); a batch starts
    when every computing request is queued, when ``max_batch`` are, or ``window_s`` after
    the first arrived, whichever comes first, and then waits for answers between passes
    as :class:`BatchSettings` says. The first queued
    job always runs; the others join it nearest in tree size first while the
    padded batch stays within ``max_tokens`` positions. A batch that fails runs
    again job by job, so that one bad request fails alone.

    Once the pair has been idle (no request computing, nothing queued) for
    :data:`IDLE_RELEASE_S` after passes ran, the thread gives the memory that malloc
    holds freed back to the system (:func:`proxy.release_free_memory`): the rows of a
    burst of requests do not stay resident after it.
    """

    IDLE_RELEASE_S = 1.0
    FOLLOW_FRACTION = 0.25
    """A batch waits for answers between passes at most this fraction of the last pass's time…"""
    FOLLOW_MAX_S = 0.1
    """…and at most this long."""

    def __init__(self, pair: LocalPair, settings: BatchSettings) -> None:
        self.pair = pair
        self.settings = settings
        self._cond = threading.Condition()
        self._queue: list[TreeJob] = []
        self._active = 0
        self._streams = 0
        """Answers being decoded with the pair (:meth:`open_stream`), computing or not."""
        self._thread: threading.Thread | None = None
        self._closed = False
        self._used = False
        """Passes have run since memory was last released (:data:`IDLE_RELEASE_S`)."""
        self._idle_since = 0.0
        """When the last request left or the last batch ended (``time.monotonic()``)."""
        self.releases = 0
        """Times freed memory was given back after the pair went idle."""
        self._last_pass_s = 0.0
        """Wall time of the last batched pass."""
        self.passes = 0
        """Batched passes run (each a forward pass per model)."""
        self.jobs = 0
        """Tree passes run (``jobs / passes`` is the mean batch size)."""

    def enter(self) -> None:
        with self._cond:
            if self._closed:
                raise RuntimeError("the pair is closed")
            self._active += 1
            self._used = True
            self._start()

    def leave(self) -> None:
        with self._cond:
            self._active -= 1
            self._idle_since = time.monotonic()
            self._cond.notify_all()

    def open_stream(self) -> None:
        """An answer starts decoding with the pair: between its passes (while it waits for the
        remote) a batch may wait up to the window for it."""
        with self._cond:
            self._streams += 1

    def close_stream(self) -> None:
        with self._cond:
            self._streams -= 1
            self._cond.notify_all()

    def run(self, job: TreeJob) -> dict[bool, Any]:
        """Queue ``job`` and wait for its rows (see :meth:`LocalPair.forward_trees`).
        Without batching (``max_batch`` 1) the pass runs on the calling thread."""
        if self._closed:
            raise RuntimeError("the pair is closed")
        if self.settings.max_batch == 1:
            self._used = True
            self.jobs += 1
            self.passes += 1
            return self.pair.forward_trees([job])[0]
        with self._cond:
            if self._closed:
                raise RuntimeError("the pair is closed")
            self._queue.append(job)
            self._used = True
            self._start()
            self._cond.notify_all()
        job.done.wait()
        if job.error is not None:
            raise job.error
        assert job.result is not None
        return job.result

    def close(self) -> None:
        """Stop the batcher's thread once the queued passes have run; later :meth:`run` calls raise."""
        with self._cond:
            self._closed = True
            self._cond.notify_all()
        if self._thread is not None:
            self._thread.join()

    def _start(self) -> None:
        """Start the batcher's thread if it is not running (``self._cond`` held)."""
        if self._thread is None or not self._thread.is_alive():
            self._thread = threading.Thread(target=self._loop, name="pair-batcher", daemon=True)
            self._thread.start()

    def _idle(self) -> bool:
        """Wait for queued work (``self._cond`` held); ``True`` when the pair has instead been
        idle for :data:`IDLE_RELEASE_S` after passes ran (time to release memory)."""
        while not self._queue:
            if self._closed:
                raise _Closed
            if self._used and self._active == 0:
                left = self._idle_since + self.IDLE_RELEASE_S - time.monotonic()
                if left <= 0:
                    self._used = False
                    return True
                self._cond.wait(left)
            else:
                self._cond.wait()
        return False

    def _loop(self) -> None:
        from proxy import release_free_memory

        while True:
            with self._cond:
                try:
                    idle = self._idle()
                except _Closed:
                    return
                if idle:
                    self.releases += 1
                    batch = []
                else:
                    batch = self._wait_and_pick()
            if idle:
                release_free_memory()
            else:
                t0 = time.monotonic()
                self._run(batch)
                with self._cond:
                    self._idle_since = time.monotonic()
                    self._last_pass_s = self._idle_since - t0

    def _wait_and_pick(self) -> list[TreeJob]:
        """The next batch (``self._cond`` held, the queue not empty): after the window, or
        at once when every request computing on the pair is queued."""
        start = time.monotonic()
        cap = self.settings.max_batch
        self._cond.wait_for(lambda: len(self._queue) >= min(self._active, cap), self.settings.window_s)
        # Answers between passes (waiting for the remote) come back soon when the remote is
        # fast: worth a wait of a fraction of a pass while the batch has room, so that token-by-
        # token streams run as one batch instead of alternating halves.
        follow = min(self.FOLLOW_MAX_S, self.FOLLOW_FRACTION * self._last_pass_s)
        self._cond.wait_for(
            lambda: (
                len(self._queue) >= min(self._streams, cap)
                or sum(len(j.ids) for j in self._queue) >= self.settings.max_tokens
            ),
            start + follow - time.monotonic(),
        )
        return self._pick()

    def _pick(self) -> list[TreeJob]:
        first = self._queue[0]
        chosen, width = [first], len(first.ids)
        for job in sorted(self._queue[1:], key=lambda j: abs(len(j.ids) - len(first.ids))):
            if len(chosen) == self.settings.max_batch:
                break
            grown = max(width, len(job.ids))
            if grown * (len(chosen) + 1) <= self.settings.max_tokens:
                chosen.append(job)
                width = grown
        taken = {id(j) for j in chosen}
        self._queue = [j for j in self._queue if id(j) not in taken]
        return chosen

    def _run(self, batch: list[TreeJob]) -> None:
        try:
            try:
                results = self.pair.forward_trees(batch)
            except Exception:
                if len(batch) == 1:
                    raise
                log.exception("a batched pass of %d trees failed; running them one by one", len(batch))
                for job in batch:
                    self._run([job])
                return
            for job, rows in zip(batch, results, strict=True):
                job.result = rows
            self.passes += 1
            self.jobs += len(batch)
        except BaseException as exc:  # noqa: BLE001 (handed to the waiting request, which raises it)
            for job in batch:
                job.error = exc
        finally:
            for job in batch:
                if job.result is None and job.error is None:
                    job.error = RuntimeError("the pair's batched pass ended without a result")
                job.done.set()


class PrefixCache:
    """The pair's KV caches of recent prompts, so that a prompt that begins like one
    before (a shared system prompt, a chat template's header) runs only its new tokens:
    automatic prefix caching, as vLLM's.

    Holds whole committed trunks of fresh :class:`PairScorer` objects, at most
    ``max_tokens`` tokens in all (least recently used first out; about 92 KB per token
    for SmolLM2-135M's U and B, float32). A prefix is used from ``MIN_TOKENS`` shared
    tokens on. Thread-safe.
    """

    MIN_TOKENS = 8

    def __init__(self, max_tokens: int) -> None:
        self.max_tokens = max_tokens
        self._entries: OrderedDict[tuple[int, ...], dict[bool, list[tuple[torch.Tensor, torch.Tensor]]]] = OrderedDict()
        self._lock = threading.Lock()
        self.hits = 0
        self.tokens_reused = 0

    def _size(self) -> int:
        return sum(len(k) for k in self._entries)

    def lookup(self, ids: Sequence[int], limit: int) -> tuple[int, dict[bool, list[tuple[torch.Tensor, torch.Tensor]]]]:
        """The longest cached prefix of ``ids``, at most ``limit`` tokens: its length and
        its keys and values by model (``[1, heads, length, dim]`` views), or ``(0, {})``."""
        if limit < self.MIN_TOKENS:
            return 0, {}
        want = np.asarray(ids[:limit], dtype=np.int64)
        best, found = 0, None
        with self._lock:
            for key in self._entries:
                n = min(len(key), len(want))
                if n <= best:
                    continue
                diff = np.flatnonzero(np.asarray(key[:n], dtype=np.int64) != want[:n])
                common = int(diff[0]) if diff.size else n
                if common > best:
                    best, found = common, key
            if found is None or best < self.MIN_TOKENS:
                return 0, {}
            self._entries.move_to_end(found)
            kv = self._entries[found]
            self.hits += 1
            self.tokens_reused += best
        return best, {m: [(k[:, :, :best], v[:, :, :best]) for k, v in layers] for m, layers in kv.items()}

    def store(self, ids: Sequence[int], caches: dict[bool, Any], models: Sequence[bool]) -> None:
        """Keep the first ``len(ids)`` positions of ``caches`` (copies) under ``ids``; nothing
        when a cached entry already begins with them or they exceed the whole budget."""
        key = tuple(ids)
        if len(key) < self.MIN_TOKENS or len(key) > self.max_tokens:
            return
        with self._lock:
            if any(k[: len(key)] == key for k in self._entries):
                return
        kv = {
            m: [
                (layer.keys[:, :, : len(key)].clone(), layer.values[:, :, : len(key)].clone())
                for layer in caches[m].layers
            ]
            for m in models
        }
        with self._lock:
            for k in [k for k in self._entries if key[: len(k)] == k]:  # shorter entries it extends
                del self._entries[k]
            self._entries[key] = kv
            while self._size() > self.max_tokens:
                self._entries.popitem(last=False)


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
    def score(
        self,
        tree: Tree,
        commit: int,
        need: Sequence[int] | None = None,
        reduce: Callable[[np.ndarray], Any] | None = None,
    ) -> tuple[Any, Any]:
        """See :meth:`proxy.decoding.alignment.TreeScorer.score`. ``reduce`` runs inside the pair's
        batched pass (:class:`TreeJob`), so the rows are freed when the pass ends.

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
        undo = (self.trunk_len, dict(self.last))
        fresh = self.trunk_len == 0
        if fresh and n and self.pair.prefix_cache is not None:
            tree, commit, want = self._from_prefix_cache(tree, commit, want)
            n = len(tree.tokens)
        if n == 0:
            for m in models:
                if self.last[m] is None:
                    raise ValueError("empty prompt: the pair has nothing to condition on")
                repeated = np.repeat(self.last[m][None, :], len(want), axis=0)  # type: ignore[index]
                rows[m] = reduce(repeated) if reduce else repeated
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
            # Nodes whose next-token row is read: the requested ones and the last committed one.
            nodes = sorted({r - 1 for r in want if r >= 1} | ({commit - 1} if commit else set()))
            at = {node: j for j, node in enumerate(nodes)}
            # Rows stay float32 (the logits' precision): a float64 copy of a 128-position draft's
            # rows is 50 MB per model, and the aligner only gathers from them.
            identity = [at.get(r - 1, -1) for r in want] == list(range(len(want)))

            def post(m: bool, after: np.ndarray) -> tuple[Any, np.ndarray | None]:
                """In the pass: the rows ``want`` (or ``reduce``'s value of them), and a copy
                of the last committed node's row."""
                if identity:  # every row read is a kept row, in order (the usual draft): no copy
                    out = after
                else:
                    first = self.last[m]  # unchanged until the pass has returned
                    out = np.empty((len(want), after.shape[1]), dtype=after.dtype)
                    for j, r in enumerate(want):
                        if r >= 1:
                            out[j] = after[at[r - 1]]
                        else:  # no trunk yet: row 0 is never read when the chain is the prompt
                            out[j] = first if first is not None else -np.inf
                return (reduce(out) if reduce else out), (after[at[commit - 1]].copy() if commit else None)

            job = TreeJob(
                list(tree.tokens), allowed, torch.from_numpy(self.trunk_len + depth), nodes, self.caches, reduce=post
            )
            scored = self.pair.batcher.run(job)
            for m in models:
                rows[m], last = scored[m]
                # Keep the committed chain in the cache, drop the rest of the tree.
                remove = n - commit
                if remove:
                    self.caches[m].crop(-remove)
                if commit:
                    self.last[m] = last
            self._undo = undo
            self.trunk_len += commit
            self.trunk_ids.extend(tree.tokens[:commit])
            if fresh and self.pair.prefix_cache is not None:
                self.pair.prefix_cache.store(self.trunk_ids, self.caches, models)
        if not self.pair.has_offset:
            rows[True] = rows[False]
        return rows[True], rows[False]

    def _from_prefix_cache(self, tree: Tree, commit: int, want: list[int]) -> tuple[Tree, int, list[int]]:
        """A fresh scorer's first tree, less the head that the pair's prefix cache holds:
        the head enters the trunk and the caches, and the rest of the tree, its commit and
        its rows are renumbered after it. A head is usable up to the first node whose row
        is read, before the last committed node, and within the chain at the tree's start
        that every other node sees whole."""
        n = len(tree.tokens)
        chain = 0
        while chain < n and tree.parents[chain] == chain - 1:
            chain += 1
        limit = min(chain, n - 1, commit - 1, min(want, default=n + 1) - 1)
        for p in tree.parents[chain:]:
            limit = min(limit, p + 1)
        assert self.pair.prefix_cache is not None
        head, kv = self.pair.prefix_cache.lookup(tree.tokens, limit)
        if not head:
            return tree, commit, want
        from transformers import DynamicCache

        for m, layers in kv.items():
            self.caches[m] = DynamicCache(ddp_cache_data=layers)
        self.trunk_len = head
        self.trunk_ids = list(tree.tokens[:head])
        rest = Tree(tree.tokens[head:], tuple(p - head if p >= head else -1 for p in tree.parents[head:]))
        return rest, commit - head, [r - head for r in want]

    def rollback(self, keep: int) -> int:
        """See :meth:`proxy.decoding.alignment.TreeScorer.rollback`. Rows after committed nodes are
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
