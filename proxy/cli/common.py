"""What the commands share: the config that the model options resolve to, the served models
(the demo offset trained on first use), one served model by name, and logging."""

from __future__ import annotations

import argparse
import logging
from typing import Literal

from proxy.config import Config, ConfigError, embedded_default, load_config
from proxy.decoding.served import ServedModel
from proxy.gateway.logs import MalformedRequestFilter, RequestIdFilter
from proxy.registry import build_models
from proxy.training.demo import demo_offset, resolve_offset


def config_of(args: argparse.Namespace) -> Config:
    """The config file, or the embedded default with the demo offset (trained on first use).

    Raises:
        ConfigError: a bad file, or embedded-default options beside ``--config``.
    """
    if args.config:
        if args.offset or args.no_offset or args.alpha is not None or args.offset_threshold is not None:
            raise ConfigError(
                "--offset, --no-offset, --alpha and --offset-threshold apply to the embedded default; "
                "set them in the config file instead"
            )
        return load_config(args.config)
    if args.offset and args.no_offset:
        raise ConfigError("--offset and --no-offset exclude each other")
    tau: float | Literal["auto", "off"] = "auto" if args.offset_threshold is None else args.offset_threshold
    config = embedded_default(args.offset, args.alpha, tau)  # bad values stop here
    if not args.offset and not args.no_offset:
        config = embedded_default(str(demo_offset()), args.alpha, tau)
    return config


def served_models(config: Config) -> dict[str, ServedModel]:
    """Every model of ``config``, the demo offset trained on first use."""
    return build_models(config, resolve_offset=resolve_offset)


def one_model(args: argparse.Namespace, config: Config) -> tuple[str, ServedModel]:
    """``--model`` (or the config's only model) and that model alone, built.

    Raises:
        ConfigError: no such model, or several and none named.
    """
    name = args.model or (next(iter(config.models)) if len(config.models) == 1 else None)
    if name is None or name not in config.models:
        raise ConfigError(f"--model: name one of {', '.join(config.models)}")
    return name, served_models(config.model_copy(update={"models": {name: config.models[name]}}))[name]


def setup_logging(level: str, fmt: str) -> None:
    """Root logging as text or JSON lines, each with the request id (``-`` outside requests)."""
    handler = logging.StreamHandler()
    handler.addFilter(RequestIdFilter())
    if fmt == "json":
        from pythonjsonlogger.json import JsonFormatter

        handler.setFormatter(
            JsonFormatter(
                "%(asctime)s %(levelname)s %(name)s %(request_id)s %(message)s",
                rename_fields={"levelname": "level", "asctime": "time", "name": "logger"},
            )
        )
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s [%(request_id)s]: %(message)s"))
    root = logging.getLogger()
    for h in list(root.handlers):
        root.removeHandler(h)
    root.addHandler(handler)
    root.setLevel(getattr(logging, level))
    server = logging.getLogger("aiohttp.server")
    if not any(isinstance(f, MalformedRequestFilter) for f in server.filters):
        server.addFilter(MalformedRequestFilter())
