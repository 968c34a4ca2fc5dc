"""``deltaproxy serve``: the OpenAI-compatible API until SIGINT or SIGTERM."""

from __future__ import annotations

import argparse
import asyncio
import logging
import signal
import sys

from aiohttp import web

from adapters.base import RemoteError, RemoteRejected
from proxy.cli.common import config_of, served_models, setup_logging
from proxy.config import Config
from proxy.decoding.served import ServedModel
from proxy.gateway.logs import AccessLogger
from proxy.server.app import create_app

log = logging.getLogger(__name__)

HTTP_BACKENDS = ("openai-chat", "openai-completions", "openai-responses")


async def probe_models(config: Config, models: dict[str, ServedModel], timeout: float = 30.0) -> list[str]:
    """``probe = true`` models' start-up probes (:meth:`proxy.decoding.served.ServedModel.probe`):
    one message per model whose upstream refused (an upstream that does not answer is logged
    and left to ``/ready``)."""
    failed = []
    for name, cfg in config.models.items():
        if not cfg.probe or cfg.remote_backend not in HTTP_BACKENDS:
            continue
        try:
            await asyncio.wait_for(models[name].probe(), timeout)
        except RemoteRejected as exc:
            failed.append(
                f"models.{name}: the upstream refused the start-up probe ({models[name].mode} mode): {exc}. "
                "Set this model's logprobs = false, max_top_logprobs or prefill = \"none\" to what it can do "
                "(docs/providers.md)"
            )
        except (RemoteError, TimeoutError) as exc:
            log.warning("models.%s: start-up probe got no answer (%s); /ready reports the upstream", name, exc)
    return failed


async def run(args: argparse.Namespace) -> int:
    """Serve until a signal; prints ``base_url: http://HOST:PORT/v1`` once requests are accepted."""
    config = config_of(args)
    settings = config.server.model_copy(
        update={k: v for k, v in (("host", args.host), ("port", args.port)) if v is not None}
    )
    setup_logging(args.log_level, args.log_format or settings.log_format)
    if not settings.keys and settings.host not in ("127.0.0.1", "::1", "localhost"):
        log.warning("serving on %s without client keys: anyone who reaches it can use it", settings.host)
    models = served_models(config)
    failed = await probe_models(config, models)
    if failed:
        for line in failed:
            print(f"error: {line}", file=sys.stderr)
        for model in models.values():
            await model.aclose()
        return 2
    app = create_app(models, settings)
    # handler_cancellation: a client that disconnects cancels its request's decoding loop.
    # The grace period for requests in flight is the app's own (Gateway.shutdown, on_shutdown);
    # aiohttp's shutdown_timeout only bounds what is left after it (other routes).
    runner = web.AppRunner(
        app, handle_signals=False, handler_cancellation=True, shutdown_timeout=5.0, access_log_class=AccessLogger
    )
    await runner.setup()
    site = web.TCPSite(runner, settings.host, settings.port)
    await site.start()
    bound = runner.addresses[0][1] if runner.addresses else settings.port
    print(f"base_url: http://{settings.host}:{bound}/v1  models: {', '.join(models)}", flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    log.info("shutting down: no new requests; in-flight ones get up to %g s", settings.shutdown_timeout)
    await runner.cleanup()
    return 0
