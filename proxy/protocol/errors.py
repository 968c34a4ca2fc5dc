"""The one place where exceptions become OpenAI error bodies.

Body: ``{"error": {"message", "type", "param", "code"}}`` (OpenAI API
reference, "Error codes"). Statuses:

=====================================  ======  ==========================
exception                              status  type / code
=====================================  ======  ==========================
bad JSON, schema, settings             400     invalid_request_error
unknown model                          404     invalid_request_error / model_not_found
prompt longer than a context           400     invalid_request_error / context_length_exceeded
upstream refused the prompt (4xx)      400     invalid_request_error / upstream_rejected
upstream answer unusable               502     upstream_error / bad_upstream_response
upstream 5xx after retries             502     upstream_error / upstream_error
upstream 429/503/unreachable           503     upstream_error / upstream_unavailable
upstream timeout                       504     upstream_error / upstream_timeout
anything else                          500     server_error
=====================================  ======  ==========================
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from pydantic import ValidationError

from adapters.base import ContextExhausted, RemoteBadResponse, RemoteError, RemoteRejected, RemoteUnavailable
from proxy.decoding.types import DecodingError


@dataclass
class ProxyError(Exception):
    status: int
    message: str
    type: str = "invalid_request_error"
    param: str | None = None
    code: str | None = None
    headers: dict[str, str] | None = None
    """Extra response headers (``Retry-After`` on a 429)."""

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def invalid(message: str, param: str | None = None, code: str | None = None) -> ProxyError:
    return ProxyError(400, message, "invalid_request_error", param, code)


_FIELD_PREFIX = re.compile(r"^(?:Value error, )?([a-z_]+): ")


#: pydantic's names for the member of a union a value was tried against
#: (``str``, ``list[ContentPart]``, ``function-after[...]``): not part of the field's path.
_UNION_TAG = re.compile(r"^(?:str|int|float|bool|none|[A-Z]\w*|\w+\[.*\]|function-\w+\[.*\])$")


def _path(loc: tuple[Any, ...]) -> tuple[list[str], str]:
    """(the field names, the path as ``messages[0].content``) of an error location."""
    names: list[str] = []
    where = ""
    for p in loc:
        if isinstance(p, int):
            where += f"[{p}]"
        elif not _UNION_TAG.match(str(p)):
            names.append(str(p))
            where += f".{p}" if where else str(p)
    return names, where


def from_validation_error(exc: ValidationError) -> ProxyError:
    """A schema error as a 400 naming the field (``param``: the top-level field; the
    message gives the whole path, ``messages[0].content[0].type``). Of a union's
    errors the deepest is reported, and alternatives at the same place are joined
    ("a valid string or a valid list")."""
    errors = exc.errors(include_url=False)
    paths = [_path(tuple(e.get("loc", ()))) for e in errors]
    best = max(range(len(errors)), key=lambda i: (len(paths[i][1]), -i))
    err = errors[best]
    loc, where = paths[best]
    msg = str(err.get("msg", "invalid request"))
    if err.get("type") == "extra_forbidden" and loc:
        return invalid(f"Unrecognized request argument supplied: {loc[-1]}", loc[-1])
    if err.get("type") == "missing" and loc:
        return invalid(f"Missing required parameter: '{where}'", loc[0], "missing_required_parameter")
    m = _FIELD_PREFIX.match(msg)
    if m:
        return invalid(f"{m.group(1)}: {msg[m.end() :]}", m.group(1))
    others = [
        str(e.get("msg", "")).removeprefix("Input should be ")
        for i, e in enumerate(errors)
        if i != best and paths[i][1] == where and e.get("type") != "missing"
    ]
    for alt in others:
        if alt and alt not in msg:
            msg += f" or {alt}"
    param = loc[0] if loc else None
    return invalid(f"{where}: {msg}" if where else msg, param)


def from_exception(exc: BaseException) -> ProxyError:
    """Map any exception raised while serving a request to a :class:`ProxyError`."""
    if isinstance(exc, ProxyError):
        return exc
    if isinstance(exc, ValidationError):
        return from_validation_error(exc)
    if isinstance(exc, DecodingError):
        return invalid(str(exc), None, "unsupported_for_model")
    if isinstance(exc, ContextExhausted):
        return ProxyError(400, str(exc), "invalid_request_error", "messages", "context_length_exceeded")
    if isinstance(exc, RemoteRejected):
        if exc.status in (400, 413, 422):
            return ProxyError(400, str(exc), "invalid_request_error", None, "upstream_rejected")
        return ProxyError(502, str(exc), "upstream_error", None, "upstream_rejected")
    if isinstance(exc, RemoteUnavailable):
        if exc.timeout:
            return ProxyError(504, str(exc), "upstream_error", None, "upstream_timeout")
        if exc.status is not None and exc.status not in (429, 503):
            return ProxyError(502, str(exc), "upstream_error", None, "upstream_error")
        return ProxyError(503, str(exc), "upstream_error", None, "upstream_unavailable")
    if isinstance(exc, RemoteBadResponse):
        return ProxyError(502, str(exc), "upstream_error", None, "bad_upstream_response")
    if isinstance(exc, RemoteError):
        return ProxyError(502, str(exc), "upstream_error", None, "upstream_error")
    return ProxyError(500, "internal error; see the server log", "server_error", None, None)
