"""A local tokenizer seen as bytes.

Alignment across tokenizers works in bytes, never in token strings (``Ġ``,
``▁``, ``<0x..>``; docs/concepts.md, "Byte alignment across tokenizers"). :class:`ByteVocab` gives
every local token id its exact bytes, finds all tokens whose bytes *start
with* a given byte string (one contiguous range of the vocabulary sorted by
bytes), and tokenises arbitrary bytes (also ones that end inside a UTF-8
character) canonically.
"""

from __future__ import annotations

import bisect
import hashlib
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from adapters.hf_vocab import hf_eot_ids, hf_token_bytes

_SURROGATES = re.compile("([\udc80-\udcff]+)")


@dataclass
class ByteVocab:
    """Bytes of every token of a local tokenizer.

    ``token_bytes[i]`` is token ``i``'s bytes, or ``None`` for special and
    control tokens (they never match text). ``eot_ids`` are the end-of-turn /
    end-of-sequence ids, best first.
    """

    token_bytes: list[bytes | None]
    eot_ids: tuple[int, ...]
    tokenizer: Any = field(repr=False, default=None)
    sorted_ids: np.ndarray = field(init=False, repr=False)
    _sorted: list[bytes] = field(init=False, repr=False)
    exact: dict[bytes, int] = field(init=False, repr=False)
    byte_ids: list[int | None] = field(init=False, repr=False)

    def __post_init__(self) -> None:
        ids = [i for i, b in enumerate(self.token_bytes) if b]
        ids.sort(key=lambda i: self.token_bytes[i])  # type: ignore[arg-type, return-value]
        self.sorted_ids = np.asarray(ids, dtype=np.int64)
        self._sorted = [self.token_bytes[i] for i in ids]  # type: ignore[misc]
        self.exact = {}
        for i in ids:
            self.exact.setdefault(self.token_bytes[i], i)  # type: ignore[arg-type]
        self.byte_ids = [self.exact.get(bytes([b])) for b in range(256)]

    @classmethod
    def from_tokenizer(cls, tokenizer: Any, eot_tokens: Iterable[str] = ()) -> ByteVocab:
        """Read a Hugging Face fast tokenizer (byte-level BPE or SentencePiece-style):
        :func:`adapters.hf_vocab.hf_token_bytes`, and the end-of-turn ids of ``eot_tokens``
        and then of :data:`adapters.base.EOT_TOKENS` (:func:`adapters.hf_vocab.hf_eot_ids`).

        Raises:
            ValueError: not a fast tokenizer.
        """
        return cls(hf_token_bytes(tokenizer), hf_eot_ids(tokenizer, eot_tokens), tokenizer)

    def __len__(self) -> int:
        return len(self.token_bytes)

    def fingerprint(self) -> str:
        """sha256 over every token's bytes and the EOT ids: equal for equal tokenizers,
        however they were loaded (GGUF or a transformers folder)."""
        h = hashlib.sha256()
        for b in self.token_bytes:
            h.update(b"\x00" if b is None else b"\x01" + len(b).to_bytes(2, "little") + b)
        h.update(repr(self.eot_ids).encode())
        return h.hexdigest()

    def cover_range(self, prefix: bytes) -> tuple[int, int]:
        """``[lo, hi)`` in :attr:`sorted_ids` of the tokens whose bytes start with ``prefix``."""
        lo = bisect.bisect_left(self._sorted, prefix)
        hi = bisect.bisect_left(self._sorted, prefix + b"\xff" * 8, lo)
        while hi < len(self._sorted) and self._sorted[hi].startswith(prefix):
            hi += 1
        return lo, hi

    def encode(self, data: bytes) -> list[int]:
        """Canonical local tokenisation of ``data``. Bytes that are not UTF-8
        text (an unfinished character at the end, or invalid bytes a remote
        produced) become single-byte tokens; the text between them is
        tokenised as text.

        Raises:
            ValueError: such a byte has no token (no byte fallback in this tokenizer).
        """
        ids: list[int] = []
        # surrogateescape maps each non-UTF-8 byte b to the lone surrogate U+DC00 + b.
        for run in _SURROGATES.split(data.decode("utf-8", "surrogateescape")):
            if not run:
                continue
            if "\udc80" <= run[0] <= "\udcff":
                for ch in run:
                    b = ord(ch) - 0xDC00
                    tid = self.byte_ids[b]
                    if tid is None:
                        raise ValueError(f"byte 0x{b:02x} has no token in the local vocabulary")
                    ids.append(tid)
            else:
                ids.extend(text_ids(self.tokenizer, run))
        return ids

    def bytes_of(self, ids: Sequence[int]) -> bytes:
        return b"".join(self.token_bytes[i] or b"" for i in ids)


def text_ids(tokenizer: Any, text: str) -> list[int]:
    """``text``'s token ids read as plain text: a special token's string in it (``"<|im_end|>"``)
    is characters, as in served message content (:func:`adapters.templates.hf_chat_ids`)."""
    return list(tokenizer.encode(text, add_special_tokens=False, split_special_tokens=True))
