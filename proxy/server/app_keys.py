"""What the aiohttp app holds for its routes (``web.AppKey``): the served models, the
server settings and the :class:`proxy.gateway.gateway.Gateway`."""

from __future__ import annotations

from aiohttp import web

from proxy.config import ServerConfig
from proxy.gateway.gateway import Gateway

MODELS = web.AppKey("models", dict)
SETTINGS = web.AppKey("settings", ServerConfig)
GATEWAY = web.AppKey("gateway", Gateway)
