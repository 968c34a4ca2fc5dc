"""A JSON answer of OpenAI's chat or completions API as the server-sent events of a stream
(the openai SDK's ``ChatCompletionChunk`` and streamed ``Completion`` shapes), for mock
upstreams whose requests may be streamed drafts (:mod:`adapters.draft_stream`)."""

from __future__ import annotations

import json

import httpx2 as httpx


def answer_as(request: dict, answer: dict) -> httpx.Response:
    """``answer`` as JSON, or for a ``stream`` request as the server-sent events of its chunks
    (``chat.completion.chunk`` / ``text_completion``): a token per chunk with its logprobs,
    the finish reason, and the usage in a last chunk without choices where asked."""
    if not request.get("stream"):
        return httpx.Response(200, json=answer)
    choice = answer["choices"][0]
    chat = "message" in choice
    head = {"id": answer.get("id", "x"), "object": "chat.completion.chunk" if chat else "text_completion", "created": 1}
    head["model"] = answer.get("model", "m")
    events = []
    if chat:
        entries = (choice["logprobs"] or {}).get("content") or []
        for e in entries:
            lp = {"content": [e], "refusal": None}
            events.append({**head, "choices": [{"index": 0, "delta": {"content": e["token"]}, "logprobs": lp}]})
    else:
        lp = choice["logprobs"] or {"tokens": []}
        for i, t in enumerate(lp["tokens"]):
            one = {"tokens": [t], "token_logprobs": [lp["token_logprobs"][i]], "top_logprobs": [lp["top_logprobs"][i]]}
            events.append({**head, "choices": [{"index": 0, "text": t, "logprobs": {**one, "text_offset": [0]}}]})
    end = {"index": 0, "finish_reason": choice.get("finish_reason"), **({"delta": {}} if chat else {"text": ""})}
    events.append({**head, "choices": [end]})
    if (request.get("stream_options") or {}).get("include_usage") and answer.get("usage"):
        events.append({**head, "choices": [], "usage": answer["usage"]})
    data = "".join(f"data: {json.dumps(e)}\n\n" for e in events) + "data: [DONE]\n\n"
    return httpx.Response(200, headers={"content-type": "text/event-stream"}, content=data.encode())


def streaming(handler):
    """``handler(request) -> Response`` whose JSON answers to ``stream`` requests become
    their streams (:func:`answer_as`); other answers (errors, raw text) pass unchanged."""

    def wrapped(request: httpx.Request) -> httpx.Response:
        response = handler(request)
        body = json.loads(request.content) if request.content else {}
        if isinstance(body, dict) and body.get("stream") and response.status_code == 200:
            try:
                answer = json.loads(response.content)
            except ValueError:
                return response
            if isinstance(answer, dict) and answer.get("choices"):
                return answer_as(body, answer)
        return response

    return wrapped
