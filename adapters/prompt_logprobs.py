"""vLLM's teacher-forced scores of given text (``prompt_logprobs``) read as a
:class:`~adapters.base.ScoredText`.

vLLM's OpenAI-compatible server (``SamplingParams.prompt_logprobs``) gives, for each
prompt position, the top-k and the prompt's own token, ``{id: {logprob, rank,
decoded_token}}``, with ``return_token_ids`` the prompt's token ids; its ``POST /tokenize``
gives the ids of the prompt without the answer. The answer's positions are those after
the prompt's ids, which must be a prefix of the whole text's ids.
"""

from __future__ import annotations

from typing import Any

from .base import Candidate, Position, RemoteBadResponse, ScoredText
from .utf8 import answer_token_bytes
from .wire import candidate_from_wire, wire_logprob


def scored_text(
    response: Any, head: Any, text: str, top_k: int, *, eot_tokens: frozenset[str], name: str
) -> ScoredText:
    """The answer ``text``'s positions from vLLM's completion ``response`` (chat: the
    ``prompt_logprobs`` on the response; completions: on the first choice), ``head`` the
    ``/tokenize`` answer for the prompt alone (``{"tokens": [...]}``). Candidates are the
    entries of rank ≤ ``top_k``, best first, with their ids; the answer's own token has its
    bytes from the text where they can be known (:func:`adapters.utf8.answer_token_bytes`).
    ``name`` is the served model's, for messages.

    Raises:
        RemoteBadResponse: no choices, no ``prompt_logprobs`` or token ids (not vLLM), the
            answer's first token merges with the prompt's last, or a malformed entry.
    """
    dump = response.model_dump() if hasattr(response, "model_dump") else dict(response)
    if dump.get("prompt_logprobs") is not None:  # chat: on the response
        where = dump
    elif dump.get("choices"):  # completions: on the choice
        where = dump["choices"][0]
    else:
        raise RemoteBadResponse(f"model {name!r}: upstream returned no choices")
    ids, entries = where.get("prompt_token_ids"), where.get("prompt_logprobs")
    prefix = head.get("tokens") if isinstance(head, dict) else None
    if not isinstance(ids, list) or not isinstance(entries, list) or not isinstance(prefix, list):
        raise RemoteBadResponse(f"model {name!r}: the upstream gave no prompt_logprobs / token ids (is it vLLM?)")
    n = len(prefix)
    if ids[:n] != prefix or len(entries) != len(ids):
        raise RemoteBadResponse(
            f"model {name!r}: the answer's first token merges with the prompt's last; its positions cannot be told apart"
        )
    try:
        answer_ids = [int(t) for t in ids[n:]]
        rows = entries[n:]
        if any(not isinstance(r, dict) or str(t) not in r for t, r in zip(answer_ids, rows, strict=True)):
            raise RemoteBadResponse(f"model {name!r}: prompt_logprobs lack the answer's own tokens")
        strings = [str(r[str(t)].get("decoded_token") or "") for t, r in zip(answer_ids, rows, strict=True)]
        data = answer_token_bytes(strings, text.encode("utf-8"))
        positions: list[Position] = []
        for t, row, own in zip(answer_ids, rows, data, strict=True):
            cands = [
                Candidate(c.data, c.logprob, c.token, int(key), c.is_eot)
                for key, v in row.items()
                if int(v.get("rank") or 10**9) <= top_k
                for c in [
                    candidate_from_wire(
                        str(v.get("decoded_token") or ""), v.get("logprob"), None, eot_tokens=eot_tokens
                    )
                ]
            ]
            lp = row[str(t)].get("logprob")
            tok = strings[len(positions)]
            sampled = Candidate(own, wire_logprob(lp), tok, t)
            positions.append(Position(tuple(sorted(cands, key=lambda c: c.logprob, reverse=True)), sampled))
        return ScoredText(tuple(answer_ids), tuple(positions), tuple(int(t) for t in prefix))
    except (ValueError, TypeError, AttributeError, KeyError) as exc:
        raise RemoteBadResponse(f"model {name!r}: malformed prompt_logprobs: {exc}") from exc
