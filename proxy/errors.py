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

from .decoding import DecodingError


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


def from_validation_error(exc: ValidationError) -> ProxyError:
    """The first schema error as a 400 naming the field."""
    err = exc.errors(include_url=False)[0]
    loc = [str(p) for p in err.get("loc", ()) if not isinstance(p, int)]
    msg = str(err.get("msg", "invalid request"))
    if err.get("type") == "extra_forbidden" and loc:
        return invalid(f"Unrecognized request argument supplied: {loc[-1]}", loc[-1])
    if err.get("type") == "missing" and loc:
        return invalid(f"Missing required parameter: '{'.'.join(loc)}'", loc[0], "missing_required_parameter")
    m = _FIELD_PREFIX.match(msg)
    if m:
        return invalid(f"{m.group(1)}: {msg[m.end() :]}", m.group(1))
    where = ".".join(loc)
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
