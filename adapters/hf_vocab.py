"""A Hugging Face fast tokenizer (byte-level BPE or SentencePiece-style) read as bytes: the
exact bytes of every token and the end-of-turn ids. The transformers remote
(:mod:`adapters.transformers_inprocess`) and the pair's
:class:`proxy.decoding.vocab.ByteVocab` read a tokenizer through these.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from typing import Any

from .base import EOT_TOKENS


def _gpt2_byte_decoder() -> dict[str, int]:
    """Inverse of GPT-2's ``bytes_to_unicode`` (Radford et al. 2019, encoder.py)."""
    printable = (
        list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    )
    codes = printable[:]
    n = 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            codes.append(256 + n)
            n += 1
    return {chr(c): b for b, c in zip(printable, codes, strict=True)}


_BYTE_DECODER = _gpt2_byte_decoder()


def _is_byte_level(tokenizer: Any) -> bool:
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        raise ValueError("a fast (tokenizers-backed) tokenizer is required")
    decoder = json.loads(backend.to_str()).get("decoder") or {}
    return "ByteLevel" in json.dumps(decoder)


def _piece_bytes(piece: str, byte_level: bool) -> bytes | None:
    if byte_level:
        try:
            return bytes(_BYTE_DECODER[ch] for ch in piece)
        except KeyError:
            return None
    if len(piece) == 6 and piece.startswith("<0x") and piece.endswith(">"):
        return bytes([int(piece[3:5], 16)])
    return piece.replace("\u2581", " ").encode("utf-8")


def hf_token_bytes(tokenizer: Any) -> list[bytes | None]:
    """Every token id's exact bytes (``len(tokenizer)`` entries), ``None`` for special and
    control tokens (they never match text).

    Raises:
        ValueError: not a fast tokenizer.
    """
    byte_level = _is_byte_level(tokenizer)
    special = set(tokenizer.all_special_ids)
    for tid, added in getattr(tokenizer, "added_tokens_decoder", {}).items():
        if getattr(added, "special", False):
            special.add(tid)
    pieces = tokenizer.convert_ids_to_tokens(list(range(len(tokenizer))))
    return [None if (i in special or p is None) else _piece_bytes(p, byte_level) for i, p in enumerate(pieces)]


def hf_eot_ids(tokenizer: Any, eot_tokens: Iterable[str] = ()) -> tuple[int, ...]:
    """The end-of-turn / end-of-sequence ids, best first: those of ``eot_tokens``, then of
    :data:`adapters.base.EOT_TOKENS`, that the vocabulary has (in that order), then the eos
    token's."""
    size = len(tokenizer)
    eot: list[int] = []
    for name in [*eot_tokens, *EOT_TOKENS]:
        tid = tokenizer.convert_tokens_to_ids(name)
        if isinstance(tid, int) and tid != tokenizer.unk_token_id and 0 <= tid < size and tid not in eot:
            eot.append(tid)
    if tokenizer.eos_token_id is not None and tokenizer.eos_token_id not in eot:
        eot.append(tokenizer.eos_token_id)
    return tuple(eot)
