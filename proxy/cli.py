"""``deltaproxy`` command line.

    deltaproxy serve [--config FILE] [--offset DIR] [--alpha A] [--host H] [--port P]

``serve`` prints ``base_url: http://HOST:PORT/v1`` once it accepts requests.
Without ``--config`` it serves the embedded default, model ``smollm2-demo``.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import signal
import sys

from . import __version__
from .config import ConfigError, embedded_default, load_config


def _port(text: str) -> int:
    port = int(text)
    if not 0 <= port <= 65535:
        raise argparse.ArgumentTypeError(f"{port} is not a port (0 to 65535)")
    return port


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="deltaproxy", description="Offset unlearning (δ-unlearning) proxy for black-box LLMs"
    )
    p.add_argument("--version", action="version", version=f"deltaproxy {__version__}")
    sub = p.add_subparsers(dest="command", required=True)
    s = sub.add_parser("serve", help="serve the OpenAI-compatible API")
    s.add_argument("--config", help="TOML config (default: the embedded default, model smollm2-demo)")
    s.add_argument("--offset", help="offset artifact folder for the embedded default")
    s.add_argument("--alpha", type=float, help="offset strength α for the embedded default (0 disables it)")
    s.add_argument("--host", help="listen address (default 127.0.0.1)")
    s.add_argument("--port", type=_port, help="listen port (default 8000; 0 picks a free one)")
    s.add_argument("--log-level", default="INFO", choices=["DEBUG", "INFO", "WARNING", "ERROR"])
    return p


async def _serve(args: argparse.Namespace) -> int:
    from aiohttp import web

    from .registry import build_models
    from .server import create_app

    if args.config:
        if args.offset or args.alpha is not None:
            raise ConfigError("--offset and --alpha apply to the embedded default; set them in the config file instead")
        config = load_config(args.config)
    else:
        config = embedded_default(args.offset, args.alpha)
    settings = config.server.model_copy(
        update={k: v for k, v in (("host", args.host), ("port", args.port)) if v is not None}
    )
    models = build_models(config)
    app = create_app(models, settings)
    # handler_cancellation: a client that disconnects cancels its request's decoding loop.
    runner = web.AppRunner(app, handle_signals=False, handler_cancellation=True)
    await runner.setup()
    site = web.TCPSite(runner, settings.host, settings.port)
    await site.start()
    port = runner.addresses[0][1] if runner.addresses else settings.port
    print(f"base_url: http://{settings.host}:{port}/v1  models: {', '.join(models)}", flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    await runner.cleanup()
    return 0


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    logging.basicConfig(
        level=getattr(logging, args.log_level), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    try:
        if args.command == "serve":
            return asyncio.run(_serve(args))
    except ConfigError as exc:
        print(f"deltaproxy: configuration error: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:
        print(f"deltaproxy: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
