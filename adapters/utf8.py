"""Bytes of remote tokens that split a UTF-8 character.

Servers print such tokens as U+FFFD, as an empty string, or (vLLM's detokenizer) hold
their bytes back and release the whole character with its last token. Here: the bytes
of a scored answer's tokens recovered from the printed strings and the known text
(:func:`answer_token_bytes`), and a context that ends inside a character healed on
both sides of the call: the candidates conditioned on bytes the remote could not be
sent (:func:`heal`), and candidates that repeat bytes already accepted cut back
(:func:`strip_held_back`).
"""

from __future__ import annotations

from collections.abc import Sequence

from .base import Candidate, Position, RemoteBadResponse, split_incomplete_utf8

#: bytes that servers such as vLLM and Ollama send for a token that holds only
#: part of a multi-byte UTF-8 character (``tests/test_cases.py``).
REPLACEMENT_BYTES = "\ufffd".encode()


def answer_token_bytes(tokens: Sequence[str], text: bytes) -> list[bytes | None]:
    """The bytes of each remote token of ``text``, from the token strings a server
    printed (``decoded_token``) and the known text.

    A token string without U+FFFD is its own UTF-8. Tokens that hold part of a
    multi-byte character are printed as U+FFFD by vLLM (``tests/test_cases.py``):
    a run of them covers the bytes up to where the next clean token matches the
    text; a run of one token gets them all, a longer run cannot be split from the
    strings alone and its tokens get ``None``. A token that does not match the
    text (a server that normalises) ends the recovery: it and the rest get ``None``.
    """
    out: list[bytes | None] = []
    off = 0
    i = 0
    while i < len(tokens):
        tok = tokens[i]
        if "\ufffd" not in tok:
            data = tok.encode("utf-8")
            if not text.startswith(data, off):
                return out + [None] * (len(tokens) - i)
            out.append(data)
            off += len(data)
            i += 1
            continue
        j = i
        while j < len(tokens) and "\ufffd" in tokens[j]:
            j += 1
        if j < len(tokens):
            nxt = tokens[j].encode("utf-8")
            end = next(
                (e for e in range(off + 1, len(text) + 1) if text.startswith(nxt, e) and _complete(text[off:e])), None
            )
        else:
            end = len(text) if _complete(text[off:]) else None
        if end is None:
            return out + [None] * (len(tokens) - i)
        out.extend([text[off:end]] if j - i == 1 else [None] * (j - i))
        off = end
        i = j
    return out


def _complete(data: bytes) -> bool:
    try:
        data.decode("utf-8")
    except UnicodeDecodeError:
        return False
    return bool(data)


def heal(positions: Sequence[Position], pending: bytes) -> tuple[Position, ...]:
    """Condition a remote answer on ``pending`` bytes it could not be sent.

    A prefix that ends inside a UTF-8 character cannot be sent as text; the
    adapter sends the complete characters and the remote proposes the next
    token from there. Only candidates whose bytes start with ``pending`` are
    consistent with what was accepted: they are kept with ``pending`` stripped
    (their logprobs share one normaliser, which cancels in the decoder's
    softmax). Positions after the first are dropped unless the remote's own
    sampled token was consistent.
    """
    if not pending or not positions:
        return tuple(positions)
    first = positions[0]

    def strip(c: Candidate) -> Candidate | None:
        if c.data is None or c.is_eot or not c.data.startswith(pending):
            return None
        return Candidate(c.data[len(pending) :], c.logprob, c.token, c.token_id)

    kept = tuple(s for c in first.candidates if (s := strip(c)) is not None and s.data)
    if not kept:
        raise RemoteBadResponse(f"upstream offered no candidate that completes the partial character {pending!r}")
    sampled = strip(first.sampled)
    rest = tuple(positions[1:]) if sampled is not None and sampled.data else ()
    return (Position(kept, sampled if sampled is not None and sampled.data else kept[0]), *rest)


def strip_held_back(positions: Sequence[Position], prefix: bytes) -> tuple[Position, ...]:
    """Undo servers that print a token completing a multi-byte character with the
    character's *whole* bytes (vLLM's detokenizer holds the earlier partial bytes back and
    releases them with the last token): where the text so far ends inside a character,
    a candidate that starts with that character's bytes and with a lead byte (a real
    continuation starts with a continuation byte) has them removed. Without this, every
    candidate repeats bytes already accepted and none is representable (a 502)."""
    try:
        tail = split_incomplete_utf8(prefix)[1]
    except UnicodeDecodeError:
        return tuple(positions)
    out: list[Position] = []
    for i, pos in enumerate(positions):
        if tail:

            def fix(c: Candidate, tail: bytes = tail) -> Candidate:
                if c.data is None or len(c.data) <= len(tail) or not c.data.startswith(tail):
                    return c
                return Candidate(c.data[len(tail) :], c.logprob, c.token, c.token_id, c.is_eot)

            pos = Position(tuple(fix(c) for c in pos.candidates), fix(pos.sampled))
        out.append(pos)
        try:
            if pos.sampled.data is not None:
                tail = split_incomplete_utf8(tail + pos.sampled.data)[1]
                continue
        except UnicodeDecodeError:
            pass
        return (*out, *positions[i + 1 :])  # the text goes on from bytes nobody knows: the rest as sent
    return tuple(out)
