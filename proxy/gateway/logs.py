"""Log lines with the request's id: the filter that adds it to every record, and the
aiohttp access log line (also for a request whose client went away).
"""

from __future__ import annotations

import contextvars
import logging

from aiohttp import web
from aiohttp.abc import AbstractAccessLogger
from aiohttp.http_exceptions import HttpProcessingError

from proxy.gateway.record import REQUEST_ID

request_id_var: contextvars.ContextVar[str] = contextvars.ContextVar("request_id", default="-")
"""The id of the request being served, for log lines (:class:`RequestIdFilter`)."""


class RequestIdFilter(logging.Filter):
    """Adds ``record.request_id`` (``-`` outside a request) to every log record."""

    def filter(self, record: logging.LogRecord) -> bool:
        if not hasattr(record, "request_id"):  # the access log passes its own
            record.request_id = request_id_var.get()
        return True


class MalformedRequestFilter(logging.Filter):
    """On ``aiohttp.server``: a request the HTTP parser refused (a NUL in a header, a bad
    request line) is the client's error, answered 400 by aiohttp; its record becomes one
    warning line without a traceback. Other records pass unchanged."""

    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        if isinstance(exc, HttpProcessingError) and 400 <= exc.code < 500:
            record.msg, record.args = "malformed HTTP request refused (%d): %s", (exc.code, exc.message.strip())
            record.levelno, record.levelname = logging.WARNING, "WARNING"
            record.exc_info = record.exc_text = None
        return True


class AccessLogger(AbstractAccessLogger):
    """aiohttp's access log line, with the request's id (its context is gone by then).
    The path is logged without its query string."""

    def log(self, request: web.BaseRequest, response: web.StreamResponse, time: float) -> None:
        _access_line(self.logger, request, response.status, time)


def _access_line(logger: logging.Logger, request: web.BaseRequest, status: int, seconds: float, note: str = "") -> None:
    logger.info(
        '%s "%s %s" %d %.3fs%s',
        request.remote,
        request.method,
        request.path,
        status,
        seconds,
        note,
        extra={"request_id": request.get(REQUEST_ID, "-")},
    )


def log_client_closed(request: web.BaseRequest, seconds: float) -> None:
    """The access-log line of a request whose client went away before its answer was done:
    aiohttp cancels the handler and logs nothing, so it is written here, in
    :class:`AccessLogger`'s format, with nginx's status 499 ("client closed request")."""
    _access_line(logging.getLogger("aiohttp.access"), request, 499, seconds, " (client closed the request)")
