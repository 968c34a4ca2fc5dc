"""A llama.cpp vocabulary's exact token bytes (:func:`token_piece`), for the embedded remote
(:mod:`adapters.llama_inprocess`)."""

from __future__ import annotations

import ctypes
from typing import Any


def token_piece(llama_cpp: Any, vocab: Any, token: int) -> bytes:
    """A token's exact bytes (``llama_token_to_piece``, special tokens not rendered).
    ``Llama.detokenize`` uses a 32-byte buffer and returns nothing for longer tokens, such as
    runs of spaces or dashes; this grows the buffer to the size llama.cpp asks for."""
    size = 64
    while True:
        buf = ctypes.create_string_buffer(size)
        n = llama_cpp.llama_token_to_piece(vocab, token, buf, size, 0, False)
        if n >= 0:
            return buf.raw[:n]
        size = -n  # the piece needs this many bytes
