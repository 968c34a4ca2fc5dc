"""Client API keys and the models each key may use.

**Auth** (when ``server.keys`` is set): ``Authorization: Bearer <key>`` on
every ``/v1/`` route. The key's sha256 is compared with every configured
hash in constant time (``hmac.compare_digest``), so timing shows neither
which key nor how much of it matched. No key or an unknown key: 401 with
OpenAI's body; a model the key may not use: 403, before anything reaches
the upstream.
"""

from __future__ import annotations

import hashlib
import hmac
from typing import Any

from aiohttp import web

from proxy.config import ClientKey, ServerConfig
from proxy.protocol.errors import ProxyError

CLIENT_KEY = web.RequestKey("client_key", ClientKey)
"""The authenticated key; absent when the server has no keys."""


def find_key(settings: ServerConfig, authorization: str | None) -> ClientKey:
    """The configured key for an ``Authorization`` header value.

    Raises:
        ProxyError: 401, no bearer key or an unknown one (the key is never echoed).
    """
    scheme, _, token = (authorization or "").strip().partition(" ")
    token = token.strip()
    if scheme.lower() != "bearer" or not token:
        raise ProxyError(
            401,
            "You didn't provide an API key. You need to provide your API key in an Authorization header "
            "using Bearer auth (i.e. Authorization: Bearer YOUR_KEY).",
            "invalid_request_error",
            None,
            None,
        )
    digest = hashlib.sha256(token.encode("utf-8", "surrogateescape")).hexdigest()
    found = None
    for key in settings.keys:  # every hash is compared: the time does not depend on which matched
        if hmac.compare_digest(digest, key.sha256):
            found = key
    if found is None:
        raise ProxyError(401, "Incorrect API key provided.", "invalid_request_error", None, "invalid_api_key")
    return found


def check_model(request: web.Request, model: str) -> None:
    """Raise 403 when the request's key may not use ``model``."""
    key = request.get(CLIENT_KEY)
    if key is not None and not key.allows(model):
        raise ProxyError(
            403,
            f"This API key is not allowed to use the model '{model}'",
            "invalid_request_error",
            "model",
            "model_not_allowed",
        )


def allowed_models(request: web.Request, names: Any) -> list[str]:
    key = request.get(CLIENT_KEY)
    return [n for n in names if key is None or key.allows(n)]
