"""JSON bodies over HTTP: reading a request's body, with OpenAI-style errors for every way
it can be wrong, and writing a response's (:func:`dumps`)."""

from __future__ import annotations

import json
from typing import Any

from aiohttp import web
from aiohttp.http_exceptions import HttpProcessingError
from aiohttp.web_protocol import RequestPayloadError

from proxy.common.jsontext import json_text
from proxy.protocol.errors import ProxyError, invalid


async def read_json_body(request: web.Request) -> dict[str, Any]:
    """The request's body as a JSON object.

    Raises:
        ProxyError: 413 when the body is over the server's limit; 400 when it cannot be read,
            is not JSON (``NaN`` and ``Infinity`` included: RFC 8259 has no such values), is
            nested too deeply, or is not an object.
    """
    try:
        raw = await request.read()
    except web.HTTPRequestEntityTooLarge as exc:
        raise ProxyError(413, "request body is too large", "invalid_request_error", None, "request_too_large") from exc
    except (
        HttpProcessingError,
        RequestPayloadError,
    ) as exc:  # e.g. Content-Encoding: gzip over a body that is not gzip
        raise ProxyError(
            400,
            f"could not read the request body: {' '.join(str(exc).split())}",
            "invalid_request_error",
            None,
            "invalid_body",
            headers={"Connection": "close"},
        ) from exc
    except ConnectionError as exc:  # the client went away while sending
        raise invalid("the request body was cut off", None, "invalid_body") from exc
    try:
        body = json.loads(raw, parse_constant=_reject_constant)
    except RecursionError as exc:
        raise invalid("the JSON body is nested too deeply", None, "invalid_json") from exc
    except (json.JSONDecodeError, UnicodeDecodeError, ValueError) as exc:
        raise invalid(f"We could not parse the JSON body of your request: {exc}", None, "invalid_json") from exc
    if not isinstance(body, dict):
        raise invalid("The request body must be a JSON object", None, "invalid_json")
    return body


def _reject_constant(name: str) -> float:
    raise ValueError(f"{name} is not valid JSON")


def dumps(obj: Any) -> str:
    """JSON without NaN/Infinity (they are not JSON), lone surrogates escaped
    (:func:`proxy.common.jsontext.json_text`)."""
    return json_text(obj, separators=(",", ":"))
