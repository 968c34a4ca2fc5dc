"""The decoder body of a Llama-family pair as plain tensor operations, for its inference
passes: transformers' ``LlamaModel.forward`` (4-D additive mask, position ids, a
``DynamicCache``) at about half its cost per one-token pass, where the modules spend
twice the weights' read time on 1,300 module calls and 420 LoRA factor products, the
math fallback of ``scaled_dot_product_attention`` (keys copied per head) and products
of few rows that MKL runs at a third of the bandwidth. :class:`LeanDecoder` runs the same
arithmetic with

- the query, key and value projections as one product, and the gate and up projections
  as another (their weights stored as one matrix, the modules' weights left as views of
  it: no second copy);
- grouped-query attention as two batched products over each key/value head's group of
  query heads, nothing copied per head;
- U's LoRA adapter as one pair of rank-r products per group of projections (the
  groups' ``A`` factors stacked, their ``B`` factors block-diagonal, each scaled by its
  ``lora_alpha / r``), applied to U's rows only (a row mask, 0 for B's rows: their
  output is the base product's exactly);
- the rows' tokens packed into one ``[Σ n_i, hidden]`` matrix for every product (no
  padding computed), each row attending to its own cache;
- every product of up to 64 positions computed as ``W · xᵀ`` on the weights in their
  stored ``[out, in]`` order (:func:`proxy.pair.few_rows.product`), the down projection
  included: stored transposed and multiplied as ``x · W``, it took 13.6 ms of a two-row
  pass's 50, against 5.8 now (2 cores, float32, inside the served pass; alone, a product
  of 1 to 512 rows is as fast or faster this way).

The in-process transformers remote runs its batched drafts on the same body
(:mod:`adapters.step_batcher`). The values are the modules' to float32 rounding (the same sums in another order;
``tests/test_lean.py`` checks logits against transformers' within 1e-4, with and without
the adapter, on trees after a cache). Which models: ``model_type == "llama"`` with
transformers' own Llama classes (SmolLM2, TinyLlama, Llama 2 and 3), LoRA as plain
peft ``Linear`` layers on the decoder's projections; any other model, adapter or layer
keeps transformers' modules (:func:`LeanDecoder.build` returns ``None``).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import torch

from proxy.pair.few_rows import product

_ATTENTION = ("q_proj", "k_proj", "v_proj")
_UP = ("gate_proj", "up_proj")
_NAMES = (*_ATTENTION, "o_proj", *_UP, "down_proj")


@dataclass
class _Projection:
    """One product of the decoder (a group of its linear layers side by side), and U's
    LoRA update of it: ``x · Wᵀ + b`` (:func:`proxy.pair.few_rows.product`), plus
    ``((x · Aᵀ) · Bᵀ) ⊙ u`` with ``u`` 1 on U's rows and 0 on B's."""

    weight: torch.Tensor
    """``[out, in]``"""
    bias: torch.Tensor | None
    lora_a: torch.Tensor | None
    """``[R, in]``: the group's ``A`` factors stacked."""
    lora_b: torch.Tensor | None
    """``[out, R]``: the group's ``B`` factors block-diagonal, each times its scaling."""

    def __call__(self, x: torch.Tensor, on_u: torch.Tensor | None) -> torch.Tensor:
        y = product(x, self.weight, self.bias)  # W · xᵀ for few rows (proxy.pair.few_rows)
        if on_u is not None and self.lora_a is not None and self.lora_b is not None:
            # the row mask on the rank-R product, B's product added in place of a temporary
            y = torch.addmm(y, torch.mm(x, self.lora_a.t()) * on_u, self.lora_b.t())
        return y


@dataclass
class _Layer:
    norm_1: torch.Tensor  # before attention
    norm_2: torch.Tensor  # before the MLP
    qkv: _Projection
    o: _Projection
    gate_up: _Projection
    down: _Projection


class LeanDecoder:
    """A Llama-family model's decoder body (:func:`build`) as one function of the ids, the
    positions, the additive mask and the cache: :meth:`hidden`."""

    def __init__(self, inner: Any, layers: list[_Layer]) -> None:
        cfg = inner.config
        self._inner = inner
        self._layers = layers
        self.heads = int(cfg.num_attention_heads)
        self.kv_heads = int(cfg.num_key_value_heads)
        self.head_dim = int(getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads)
        self.intermediate = int(cfg.intermediate_size)
        self.eps = float(cfg.rms_norm_eps)
        self.scale = self.head_dim**-0.5
        self._act = inner.model.layers[0].mlp.act_fn
        self.has_lora = any(
            p.lora_a is not None for layer in layers for p in (layer.qkv, layer.o, layer.gate_up, layer.down)
        )

    @classmethod
    def build(cls, net: Any) -> LeanDecoder | None:
        """The lean body of ``net`` (a ``LlamaForCausalLM``, or peft's wrapper of one with
        plain LoRA layers on its decoder's projections), or ``None`` where the model, its
        attention or its adapter is of another kind. Re-lays the projections' weights in
        place (:mod:`this module <proxy.pair.lean>`); the modules keep computing the same
        function on them."""
        from peft.tuners.lora.layer import Linear as LoraLinear
        from peft.tuners.tuners_utils import BaseTunerLayer

        inner = net.get_base_model() if hasattr(net, "get_base_model") else net
        cfg = getattr(inner, "config", None)
        body = getattr(inner, "model", None)
        if cfg is None or body is None or getattr(cfg, "model_type", None) != "llama":
            return None
        if type(inner).__name__ != "LlamaForCausalLM" or type(body).__name__ != "LlamaModel":
            return None
        if getattr(cfg, "pretraining_tp", 1) != 1 or getattr(cfg, "_attn_implementation", "sdpa") not in (
            "sdpa",
            "eager",
        ):
            return None
        for name, found in inner.named_modules():
            if isinstance(found, BaseTunerLayer):
                module: Any = found
                parts = name.split(".")
                plain = type(module) is LoraLinear and not module.merged and not module.lora_variant
                if (
                    not plain
                    or parts[-1] not in _NAMES
                    or ".layers." not in f".{name}."
                    or len(module.active_adapters) != 1
                ):
                    return None  # an adapter on the embeddings, the head or a norm; DoRA; several adapters
                adapter = module.active_adapters[0]
                if module.lora_B[adapter].bias is not None:
                    return None
        pages = _FilePages()
        layers = []
        for layer in body.layers:
            names = (type(layer).__name__, type(layer.self_attn).__name__, type(layer.mlp).__name__)
            if names != ("LlamaDecoderLayer", "LlamaAttention", "LlamaMLP"):
                return None
            attn, mlp = layer.self_attn, layer.mlp
            layers.append(
                _Layer(
                    norm_1=layer.input_layernorm.weight,
                    norm_2=layer.post_attention_layernorm.weight,
                    qkv=_group([getattr(attn, n) for n in _ATTENTION], pages),
                    o=_group([attn.o_proj], pages),
                    gate_up=_group([getattr(mlp, n) for n in _UP], pages),
                    down=_group([mlp.down_proj], pages),
                )
            )
        _own_memory(inner, layers, pages)
        return cls(inner, layers)

    def _norm(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.rms_norm(x, (x.shape[-1],), weight, self.eps)  # LlamaRMSNorm, fused

    @torch.inference_mode()
    def rows(
        self,
        ids: torch.Tensor,
        positions: torch.Tensor,
        masks: list[torch.Tensor],
        caches: list[Any],
        on_u: torch.Tensor | None,
    ) -> torch.Tensor:
        """The final-norm hidden states ``[b, w, hidden]`` float32 of ``ids`` (``[b, w]``, row
        i's first ``n_i`` real, the rest padding) at ``positions`` (``[b, w]``). Row i
        attends under ``masks[i]`` (``[n_i, L_i + n_i]``, additive: 0 where a position may
        attend, the dtype's minimum where not) to its own ``caches[i]`` (a ``DynamicCache``
        of ``L_i`` positions, extended in place by its ``n_i`` tokens, :func:`_append`) and
        to its tokens; U's adapter is on the rows where ``on_u`` (``[b]``, 1.0 or 0.0) is 1,
        ``None``: B alone. The rows' real tokens are packed (``Σ n_i`` positions, no
        padding computed); padding positions come out as zeros.
        transformers' ``LlamaModel.forward`` on each row alone, to float rounding."""
        (b, w), (heads, kv, d) = ids.shape, (self.heads, self.kv_heads, self.head_dim)
        group, lengths = heads // kv, [m.shape[0] for m in masks]
        starts = [sum(lengths[:i]) for i in range(b)]
        counts = torch.tensor(lengths)
        row_of, col_of = torch.repeat_interleave(torch.arange(b), counts), torch.cat([torch.arange(n) for n in lengths])
        total = int(counts.sum())
        x = self._inner.model.embed_tokens(ids[row_of, col_of])  # [T, hidden]
        cos, sin = self._inner.model.rotary_emb(x[None], positions[row_of, col_of][None])  # [1, T, d]
        cos, sin = cos[0, :, None], sin[0, :, None]
        tokens_on_u = on_u.repeat_interleave(counts)[:, None] if on_u is not None and self.has_lora else None
        width = x.shape[-1]
        for li, layer in enumerate(self._layers):
            qkv = layer.qkv(self._norm(x, layer.norm_1), tokens_on_u)
            # the rotary embedding of the queries and keys at once: [T, heads + kv, d]
            qk = qkv[:, : (heads + kv) * d].view(total, heads + kv, d)
            qk = qk * cos + _rotate_half(qk) * sin
            q, k = qk[:, :heads], qk[:, heads:]
            v = qkv[:, (heads + kv) * d :].view(total, kv, d)
            att = x.new_empty((total, heads * d))
            for i, (at, n) in enumerate(zip(starts, lengths, strict=True)):
                keys, values = _append(
                    caches[i], li, k[at : at + n].transpose(0, 1)[None], v[at : at + n].transpose(0, 1)[None]
                )  # [1, kv, L + n, d]
                span = keys.shape[2]
                # query head h reads key/value head h // group (transformers' repeat_kv order)
                queries = q[at : at + n].view(n, kv, group, d).permute(1, 2, 0, 3).reshape(kv, group * n, d)
                scores = torch.matmul(queries, keys[0].transpose(1, 2)) * self.scale
                probs = torch.softmax(scores.view(kv, group, n, span) + masks[i], dim=-1)
                out = torch.matmul(probs.view(kv, group * n, span), values[0])  # [kv, group · n, d]
                att[at : at + n] = out.view(kv, group, n, d).permute(2, 0, 1, 3).reshape(n, heads * d)
            x = x + layer.o(att, tokens_on_u)
            gate_up = layer.gate_up(self._norm(x, layer.norm_2), tokens_on_u)
            inner = self._act(gate_up[:, : self.intermediate]) * gate_up[:, self.intermediate :]
            x = x + layer.down(inner, tokens_on_u)
        hidden = x.new_zeros((b, w, width))
        hidden[row_of, col_of] = self._norm(x, self._inner.model.norm.weight)
        return hidden


#: Positions of room a cache layer's buffer keeps past its tokens (:func:`_append`).
HEADROOM = 32


def _append(cache: Any, li: int, keys: torch.Tensor, values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Layer ``li`` of ``cache`` (a ``DynamicCache`` of one row) extended by ``keys`` and
    ``values`` (``[1, kv, n, d]``); its keys and values after (``[1, kv, L + n, d]``).

    transformers' ``DynamicLayer`` concatenates, copying the whole cache per pass. Here a
    layer's keys and values are views of buffers with :data:`HEADROOM` positions to spare,
    owned by the layer (``_lean_kv``) and written past the layer's length; a layer whose
    keys are not the start of its own buffer (a prefix cache's views, a new layer) or
    whose buffer is full gets a new one (its tokens copied once). A crop leaves a view of
    the buffer's start, and the next tokens overwrite what it dropped."""
    n = keys.shape[2]
    layers = cache.layers
    if li >= len(layers) or not layers[li].is_initialized or layers[li].keys.numel() == 0:
        return cache.update(keys.contiguous(), values.contiguous(), li)
    layer = layers[li]
    held = layer.keys.shape[2]
    own = layer.__dict__.get("_lean_kv")
    if (
        own is None
        or own[0].data_ptr() != layer.keys.data_ptr()
        or own[1].data_ptr() != layer.values.data_ptr()
        or own[0].stride() != layer.keys.stride()
        or own[0].shape[2] < held + n
    ):
        shape = (1, layer.keys.shape[1], held + n + HEADROOM, layer.keys.shape[3])
        own = (layer.keys.new_empty(shape), layer.values.new_empty(shape))
        own[0][:, :, :held] = layer.keys
        own[1][:, :, :held] = layer.values
        layer._lean_kv = own
    own[0][:, :, held : held + n] = keys
    own[1][:, :, held : held + n] = values
    layer.keys, layer.values = own[0][:, :, : held + n], own[1][:, :, : held + n]
    return layer.keys, layer.values


def _own_memory(inner: Any, layers: list[_Layer], pages: _FilePages) -> None:
    """Every other parameter and buffer of ``inner`` copied into memory of its own.
    transformers maps the weights file and its tensors are views of that mapping: the
    mapping stays resident as long as one of them lives (the embeddings, a norm), so the
    pages of the weights re-laid here would stay resident beside their new copies (about
    430 MB more for SmolLM2). Once nothing views it, the mapping is released."""
    ours = {
        t.untyped_storage().data_ptr()
        for layer in layers
        for p in (layer.qkv, layer.o, layer.gate_up, layer.down)
        for t in (p.weight, p.lora_a, p.lora_b)
        if t is not None
    }
    with torch.no_grad():
        for tensor in [*inner.parameters(), *inner.buffers()]:
            if tensor.untyped_storage().data_ptr() not in ours:
                old = tensor.data
                tensor.data = old.clone()
                pages.drop(old)


class _FilePages:
    """Drops a copied tensor's pages of a mapped weights file from this process as soon as
    it is copied (``madvise(MADV_DONTNEED)`` on the whole pages inside its bytes, where they
    lie in a private mapping of a ``.safetensors`` file), so that the build does not hold
    the file's pages and their copies at once (a peak of twice the weights). On a private
    file mapping the call only discards this process's view of the pages: read again, they
    come back from the file, so a tensor that still viewed them would read the file's
    weights, which the copy holds. Anywhere else (anonymous memory, another platform),
    nothing."""

    MADV_DONTNEED = 4

    def __init__(self) -> None:
        self._maps: list[tuple[int, int]] = []
        self._libc: Any = None
        try:
            import ctypes

            with open("/proc/self/maps") as maps:
                for line in maps:
                    parts = line.split()
                    if len(parts) >= 6 and parts[1].endswith("p") and parts[5].endswith(".safetensors"):
                        start, end = (int(x, 16) for x in parts[0].split("-"))
                        self._maps.append((start, end))
            libc = ctypes.CDLL("libc.so.6", use_errno=True)
            libc.madvise.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int)
            self._libc = libc
            self._page = os.sysconf("SC_PAGE_SIZE")
        except (OSError, AttributeError, ValueError):
            self._maps = []

    def drop(self, tensor: torch.Tensor) -> None:
        if not self._maps or not tensor.is_contiguous():
            return
        start = tensor.data_ptr()
        end = start + tensor.numel() * tensor.element_size()
        if not any(lo <= start and end <= hi for lo, hi in self._maps):
            return
        first = -(-start // self._page) * self._page  # whole pages only: a neighbour may share the edges
        last = end // self._page * self._page
        if last > first:
            self._libc.madvise(first, last - first, self.MADV_DONTNEED)


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def _group(modules: list[Any], pages: _FilePages) -> _Projection:
    """One :class:`_Projection` for ``modules`` side by side (outputs concatenated, in
    order), its weights stored once: each module's base weight becomes a view of the
    group's matrix (rows of it); the old weights'
    pages of the weights file are dropped (:class:`_FilePages`)."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    bases: list[Any] = [m.get_base_layer() if isinstance(m, BaseTunerLayer) else m for m in modules]
    olds = [m.weight.detach() for m in bases]
    with torch.no_grad():
        if len(bases) == 1:
            weight = bases[0].weight.detach().clone()
            bases[0].weight.data = weight
        else:
            weight = torch.cat([m.weight.detach() for m in bases]).contiguous()
            at = 0
            for m in bases:
                n = m.weight.shape[0]
                m.weight.data = weight[at : at + n]
                at += n
        biases = [m.bias for m in bases]
        bias = None
        if any(bi is not None for bi in biases):
            bias = torch.cat(
                [
                    bi.detach() if bi is not None else m.weight.new_zeros(m.weight.shape[0])
                    for m, bi in zip(bases, biases, strict=True)
                ]
            )
        lora_a, lora_b = _lora(modules, bases)
    for old in olds:
        pages.drop(old)
    return _Projection(weight=weight, bias=bias, lora_a=lora_a, lora_b=lora_b)


def _lora(modules: list[Any], bases: list[Any]) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """The group's LoRA factors: ``A`` stacked ``[R, in]``, ``B`` block-diagonal ``[out, R]``
    (each module's ``B`` times its scaling in its own rows and rank columns; zero rows for a
    module without an adapter); ``(None, None)`` where no module of the group has one."""
    from peft.tuners.lora.layer import Linear as LoraLinear

    parts: list[tuple[torch.Tensor, torch.Tensor] | None] = []
    for m in modules:
        if isinstance(m, LoraLinear):
            name = m.active_adapters[0]
            a_factor: Any = m.lora_A[name]
            b_factor: Any = m.lora_B[name]
            parts.append((a_factor.weight.detach(), b_factor.weight.detach() * m.scaling[name]))
        else:
            parts.append(None)
    if all(p is None for p in parts):
        return None, None
    rank = sum(p[0].shape[0] for p in parts if p is not None)
    outs = [m.weight.shape[0] for m in bases]
    a = torch.cat([p[0] for p in parts if p is not None])
    b = a.new_zeros((sum(outs), rank))
    row = col = 0
    for p, n in zip(parts, outs, strict=True):
        if p is not None:
            r = p[0].shape[0]
            b[row : row + n, col : col + r] = p[1]
            col += r
        row += n
    return a, b
