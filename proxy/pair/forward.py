"""The local pair's forward passes: one model of the pair (U or B, :class:`Side`) over a
sequence (:func:`forward`, log-softmax rows) or over the trees of a batch of
:class:`proxy.pair.batcher.TreeJob` (:func:`forward_trees`: each request's KV cache
left-padded to the longest, its tree right-padded; U's and B's rows in one pass where U
is B plus a LoRA adapter, :func:`fused`, else one pass per model), and the switch between
U and B on one set of weights (:func:`switched`, :func:`base_only`). The functions take the
pair (:class:`proxy.pair.local.LocalPair`, as :class:`PairModels`).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from typing import Any, Protocol

import torch

from proxy.pair.batcher import TreeJob
from proxy.pair.sides import Side, sides


class PairModels(Protocol):
    """What the forward passes use of the pair: :class:`proxy.pair.local.LocalPair`."""

    @property
    def model(self) -> Any:
        """B, and U too when it carries U's adapter layers."""

    @property
    def u_model(self) -> Any:
        """U as its own model (a ``"full"`` artifact), or ``None``."""

    @property
    def adapter_layers(self) -> Sequence[Any]:
        """The LoRA layers of U in :attr:`model`, switched off for B."""

    @property
    def has_offset(self) -> bool: ...

    @property
    def lock(self) -> contextlib.AbstractContextManager[Any]:
        """Held for every forward pass (the adapter switch is shared state)."""

    @property
    def fuse_sides(self) -> bool:
        """Whether U and B may run as the rows of one pass (:func:`fused`)."""

    @property
    def lean(self) -> dict[Side, Any]:
        """Each side's :class:`proxy.pair.lean.LeanDecoder` where it has one (empty: the modules)."""


def adapter_layers(model: Any) -> list[Any]:
    """The LoRA layers (peft's ``BaseTunerLayer``) of ``model``: what :func:`adapters_off` switches."""
    from peft.tuners.tuners_utils import BaseTunerLayer  # peft loads transformers: seconds

    return [m for m in model.modules() if isinstance(m, BaseTunerLayer)]


@contextlib.contextmanager
def adapters_off(layers: Sequence[Any]) -> Iterator[None]:
    """The model without these LoRA ``layers`` (:func:`adapter_layers`): B = U with its
    adapter off. The same switch as peft's ``disable_adapter()`` (each layer's
    ``disable_adapters`` flag) without its walk over every module, its model-status check
    and its ``requires_grad`` bookkeeping, which a forward pass of B under ``torch.no_grad``
    does not need: a B forward of the 135M pair at one token costs about 55 ms instead of
    135 ms (2 cores), and training's B passes lost about 0.07 s each.
    ``tests/test_alignment.py`` checks Δ against ``disable_adapter()``."""
    for layer in layers:
        layer._disable_adapters = True
    try:
        yield
    finally:
        for layer in layers:
            layer._disable_adapters = False


def base_only(pair: PairModels) -> contextlib.AbstractContextManager[None]:
    """B = U with the pair's LoRA layers off (:func:`adapters_off`)."""
    return adapters_off(pair.adapter_layers)


def forward(
    pair: PairModels,
    ids: torch.Tensor,
    cache: Any,
    *,
    side: Side,
    mask: torch.Tensor,
    positions: torch.Tensor,
    keep: torch.Tensor | None = None,
) -> torch.Tensor:
    """Log-softmax over the vocabulary, ``[n, V]`` float32, at every position of ``ids``
    or only at the positions ``keep`` (``[len(keep), V]``: the output head, 49,152 × 576
    for SmolLM2, and the rows' memory are spent only where a row is read), of the model
    ``side`` (U or B) with ``cache`` (extended in place) and the attention ``mask``."""
    kwargs: dict[str, Any] = dict(
        input_ids=ids, past_key_values=cache, attention_mask=mask, position_ids=positions, use_cache=True
    )
    if keep is not None:
        kwargs["logits_to_keep"] = keep
    with switched(pair, side) as net:
        out = net(**kwargs)
    return _log_softmax_(out.logits[0].float())  # [n, V]


@contextlib.contextmanager
def switched(pair: PairModels, side: Side) -> Iterator[Any]:
    """U or B (``side``): a full artifact's second model, or the LoRA layers on, or off for B."""
    if pair.u_model is not None:  # a full artifact: U and B are two models
        yield pair.u_model if side is Side.U else pair.model
    elif side is Side.U or not pair.has_offset:
        yield pair.model
    else:
        with base_only(pair):
            yield pair.model


def forward_trees(pair: PairModels, jobs: Sequence[TreeJob]) -> list[dict[Side, Any]]:
    """One forward pass over the trees of ``jobs``, batched: each job's rows
    (``[len(job.keep), V]`` float32 log-softmax, nats) by model (:class:`Side`; only
    ``Side.B`` without an offset; only the models of ``job.sides`` where it names them), or
    what the job's ``reduce`` made of them, and each job's caches extended by its tree (as
    one pass of its own would leave them); when the pass fails, every job's caches are left
    as they were.

    With a LoRA offset, U and B run as the rows of one pass (:func:`fused`): the weights
    are read once for both, U's adapter applied to U's rows only (:class:`_RowAdapters`).
    Otherwise (a full artifact, a model whose body and head cannot be run apart)
    one pass per model.

    Shapes in a pass: ``B`` rows (``len(jobs)``, or ``2 · len(jobs)`` fused: U's rows
    first) of ``N = max n_i`` positions after ``L = max L_i`` cached ones; row i's cache
    sits at ``[L − L_i, L)`` and its tree at ``[L, L + n_i)``, the padding masked out (a
    padded position attends to itself only, and its output is never read).
    """
    models = sides(pair.has_offset)
    out: list[dict[Side, Any]] = [{} for _ in jobs]
    # (job index, model) of every row of the pass, U's rows first, then B's
    runs = [(i, m) for m in models for i, job in enumerate(jobs) if job.sides is None or m in job.sides]
    before = [{m: (c, c.get_seq_length()) for m, c in job.caches.items()} for job in jobs]
    with pair.lock:
        try:
            if fused(pair):
                results = forward_rows(pair, [(jobs[i], m) for i, m in runs])
                for (i, m), got in zip(runs, results, strict=True):
                    out[i][m] = got
            else:  # one pass per model
                for m in models:
                    picked = [i for i, side in runs if side is m]
                    if picked:
                        for i, got in zip(picked, forward_rows(pair, [(jobs[i], m) for i in picked]), strict=True):
                            out[i][m] = got
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


def fused(pair: PairModels) -> bool:
    """Whether U and B run as the rows of one pass (:func:`forward_trees`): the pair allows it
    (:attr:`PairModels.fuse_sides`), U is B plus plain LoRA linear layers on one set of
    weights (no DoRA or other variant, none merged), and the model's body and head can be
    run apart."""
    from peft.tuners.lora.layer import Linear as LoraLinear

    return (
        pair.fuse_sides
        and pair.has_offset
        and pair.u_model is None
        and bool(pair.adapter_layers)
        and all(
            type(layer) is LoraLinear and not layer.merged and not layer.lora_variant for layer in pair.adapter_layers
        )
        and body_and_head(pair.model) is not None
    )


class _RowAdapters:
    """U's adapter on some rows of a pass only: a forward hook on each LoRA layer's ``B``
    factor multiplies its output (``scaling · B·A·x``, what the layer adds to its base
    layer's output) by :attr:`mask` (``[rows]``, 1.0 for U's rows, 0.0 for B's), so that
    B's rows get the base layer's output exactly (+ 0.0) and U's the adapted one; no row is
    gathered or scattered (peft's own mixed batches, ``adapter_names``, gather each
    adapter's rows, which at one token per row costs more than the rank-r products)."""

    def __init__(self, layers: Sequence[Any], mask: torch.Tensor) -> None:
        self.mask = mask
        self.rows = mask  # the pass's rows' mask; `mask` is set per group of positions for the head
        self._handles = [b.register_forward_hook(self._hook) for layer in layers for b in layer.lora_B.values()]

    def _hook(self, module: Any, args: tuple[Any, ...], output: torch.Tensor) -> torch.Tensor:
        return output * self.mask.view(-1, *(1,) * (output.dim() - 1))

    def __enter__(self) -> _RowAdapters:
        return self

    def __exit__(self, *exc: object) -> None:
        for handle in self._handles:
            handle.remove()


@torch.inference_mode()
def forward_rows(pair: PairModels, rows: Sequence[tuple[TreeJob, Side]]) -> list[Any]:
    """One pass over ``rows`` (a job and the model, U or B, it runs as): each row's result
    (:meth:`TreeJob.output`), the job's cache for that model replaced by the extended one.
    Rows of one model run on it (:func:`switched`); rows of both, only where :func:`fused`,
    on the pair's one model with U's adapter on U's rows (:class:`_RowAdapters`). One row,
    or a model whose body and head cannot be run apart, runs alone on its own cache, in
    place.

    Raises:
        ValueError: a job's ``allowed`` does not fit its tokens after its cache.
    """
    from transformers import DynamicCache  # here: importing the pair does not load transformers

    neg = torch.finfo(torch.float32).min
    for job, side in rows:
        n, held = len(job.ids), job.caches[side].get_seq_length()
        if job.allowed.shape != (n, held + n):
            raise ValueError(f"tree mask {tuple(job.allowed.shape)} does not fit {n} tokens after {held} cached")
    mixed = len({side for _, side in rows}) > 1
    if mixed and not fused(pair):
        raise ValueError("U's and B's rows run in one pass only on a LoRA offset (fused)")
    lean = _lean(pair, rows)
    if lean is not None:
        return _lean_rows(pair, rows, *lean)
    if not mixed and (len(rows) == 1 or body_and_head(pair.model) is None):
        result: list[Any] = []  # no padding: the job's own cache, in place
        for job, side in rows:
            mask = _additive(job.allowed)
            lp = forward(
                pair,
                torch.tensor([job.ids], dtype=torch.long),
                job.caches[side],
                side=side,
                mask=mask[None, None],
                positions=job.positions[None, :],
                keep=torch.tensor(job.keep, dtype=torch.long),
            )
            result.append(job.output(side, lp.numpy()))
        return result
    jobs = [job for job, _ in rows]
    caches = [job.caches[side] for job, side in rows]
    lens = [c.get_seq_length() for c in caches]
    b, width, past = len(rows), max(len(job.ids) for job in jobs), max(lens)
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
    with contextlib.ExitStack() as stack:
        if mixed:
            net = pair.model
            on_u = torch.tensor([side is Side.U for _, side in rows], dtype=torch.float32)
            row_adapters = stack.enter_context(_RowAdapters(pair.adapter_layers, on_u))
        else:
            net = stack.enter_context(switched(pair, rows[0][1]))
        inner = body_and_head(net)
        hidden = inner.model(
            input_ids=ids, past_key_values=batched, attention_mask=mask, position_ids=positions, use_cache=True
        ).last_hidden_state
        result = _head_outputs(inner, hidden, rows, row_adapters if mixed else None)
    grown: list[Any] = list(batched.layers)  # DynamicLayer: keys and values [b, heads, past + width, dim]
    for i, ((job, side), held) in enumerate(zip(rows, lens, strict=True)):
        span = slice(past - held, past + len(job.ids))
        job.caches[side] = DynamicCache(
            ddp_cache_data=[(layer.keys[i : i + 1, :, span], layer.values[i : i + 1, :, span]) for layer in grown]
        )
    return result


def _head_outputs(inner: Any, hidden: torch.Tensor, rows: Sequence[tuple[TreeJob, Side]], on_u: Any) -> list[Any]:
    """Each row's result (:meth:`TreeJob.output`) from the hidden states ``[b, w, d]``: the head
    over groups of at most :data:`HEAD_ROWS` positions (one product reads its weights for many
    one-token jobs; a group's rows are freed before the next's). ``on_u``: the pass's
    :class:`_RowAdapters` where U's adapter is on some rows only (a LoRA head sees its rows)."""
    cap = getattr(inner.config, "final_logit_softcapping", None)
    jobs = [job for job, _ in rows]
    result: list[Any] = []
    start, b = 0, len(rows)
    while start < b:
        end, rows_in = start + 1, len(jobs[start].keep)
        while end < b and rows_in + len(jobs[end].keep) <= HEAD_ROWS:
            rows_in += len(jobs[end].keep)
            end += 1
        picked = torch.cat([hidden[i, torch.tensor(jobs[i].keep, dtype=torch.long)] for i in range(start, end)])
        if on_u is not None:
            on_u.mask = torch.cat([on_u.rows[i].expand(len(jobs[i].keep)) for i in range(start, end)])
        logits = inner.lm_head(picked).float()
        if cap:
            logits = torch.tanh(logits / cap) * cap
        flat = _log_softmax_(logits).numpy()
        at = 0
        for job, side in rows[start:end]:
            got = flat[at : at + len(job.keep)]
            at += len(job.keep)
            result.append(job.output(side, got))
        del picked, logits, flat
        start = end
    return result


#: Rows up to which a pass runs on the lean body (rows attending one at a time); beyond, where
#: padding is under :data:`LEAN_PADDING` of the positions, the modules' batched attention costs
#: less (16 token-by-token streams, fake upstream, 2 cores: 45.2 tokens/s against 41.4).
LEAN_MAX_ROWS = 8
#: Padding share from which a larger pass runs on the lean body, which packs the rows' tokens
#: (speculative trees of several widths: a tofu-lite audit's passes were 2.8× their tokens).
LEAN_PADDING = 0.25


def _lean(pair: PairModels, rows: Sequence[tuple[TreeJob, Side]]) -> tuple[Any, bool] | None:
    """The lean body that runs ``rows`` (:attr:`PairModels.lean`) and whether U's adapter applies
    to its U rows; ``None``: the modules (no lean body, a full artifact's two models in one
    pass, more than :data:`LEAN_MAX_ROWS` rows with little padding)."""
    found, widths = {pair.lean.get(side) for _, side in rows}, [len(job.ids) for job, _ in rows]
    decoder = found.pop() if len(found) == 1 else None
    if decoder is None or (len(rows) > LEAN_MAX_ROWS and len(rows) * max(widths) * (1 - LEAN_PADDING) < sum(widths)):
        return None
    lora = pair.u_model is None and pair.has_offset and any(side is Side.U for _, side in rows)
    if lora and not decoder.has_lora:
        return None
    return decoder, lora


def _lean_rows(pair: PairModels, rows: Sequence[tuple[TreeJob, Side]], decoder: Any, lora: bool) -> list[Any]:
    """:func:`forward_rows` on the lean body (:meth:`proxy.pair.lean.LeanDecoder.rows`)."""
    jobs, caches = [job for job, _ in rows], [job.caches[side] for job, side in rows]
    b, width = len(rows), max(len(job.ids) for job in jobs)
    ids, positions = torch.zeros((b, width), dtype=torch.long), torch.zeros((b, width), dtype=torch.long)
    for i, job in enumerate(jobs):
        ids[i, : len(job.ids)] = torch.tensor(job.ids, dtype=torch.long)
        positions[i, : len(job.ids)] = job.positions
    on_u = torch.tensor([side is Side.U for _, side in rows], dtype=torch.float32) if lora else None
    hidden = decoder.rows(ids, positions, [_additive(job.allowed) for job in jobs], caches, on_u)
    net = pair.u_model if pair.u_model is not None and rows[0][1] is Side.U else pair.model
    return _head_outputs(body_and_head(net), hidden, rows, None)


#: Rows of the output head computed in one product in a batched pass (:func:`forward_rows`).
HEAD_ROWS = 64


def _log_softmax_(logits: torch.Tensor, chunk: int = 32) -> torch.Tensor:
    """``logits`` (``[n, V]``) turned into their log-softmax (``torch.log_softmax``'s values)
    in place, ``chunk`` rows at a time: one ``[chunk, V]`` temporary instead of a second
    ``[n, V]`` array (50 MB for a 256-position SmolLM2 batch). Logits that autograd tracks
    get an ordinary out-of-place log-softmax."""
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
