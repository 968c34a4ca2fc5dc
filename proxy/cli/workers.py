"""The Ray workers of ``batch``, ``redact`` and ``audit --engine ray``
(:mod:`proxy.jobs.ray_engine`): each builds its own served model from the config (pickled,
as Ray sends arguments) and answers a line with the function the single-process run
calls, so a line's answer does not depend on the engine.

The factories pickle by reference to these classes: a worker imports ``proxy`` (installed
in the environment the cluster's workers run in: on a real cluster every node runs the
same image, see docs/batches.md)."""

from __future__ import annotations

import argparse
import functools
from typing import Any

from proxy.cli.common import served_models
from proxy.common.files import cache_dir
from proxy.config import Config, ConfigError
from proxy.decoding.scoring import PromptLogprobsCache
from proxy.decoding.served import ServedModel
from proxy.evaluation.items import AuditSettings
from proxy.evaluation.scoring import QScorer
from proxy.evaluation.summary import evaluate_item, sample_gate
from proxy.jobs.batch import BatchRunner, request_of
from proxy.jobs.ray_engine import RaySettings, WorkerFactory, connect
from proxy.redaction.redact import item_of, redact_one


def _one(config: Config, name: str) -> ServedModel:
    return served_models(config.model_copy(update={"models": {name: config.models[name]}}))[name]


class BatchWorker:
    """Every model of the config, answering batch requests (:meth:`BatchRunner.answer`)."""

    def __init__(self, config: Config) -> None:
        self.models = served_models(config)
        self.runner = BatchRunner(self.models, config.server)

    async def answer(self, payload: dict[str, Any]) -> dict[str, Any]:
        return await self.runner.answer(request_of(payload))

    async def aclose(self) -> None:
        for model in self.models.values():
            await model.aclose()


class RedactWorker:
    """One model, redacting lines (:func:`proxy.redaction.redact.redact_one`)."""

    def __init__(self, config: Config, name: str, threshold: float, mode: str, marker: str, max_tokens: int) -> None:
        self.model = _one(config, name)
        self.args = (threshold, mode, marker, max_tokens)

    async def answer(self, payload: dict[str, Any]) -> dict[str, Any]:
        return await redact_one(self.model, item_of(payload), *self.args)

    async def aclose(self) -> None:
        await self.model.aclose()


class AuditWorker:
    """One model and its :class:`QScorer`, evaluating audit items
    (:func:`proxy.evaluation.summary.evaluate_item`)."""

    def __init__(self, config: Config, name: str, settings: AuditSettings) -> None:
        self.model = _one(config, name)
        self.settings = settings
        self.scorer = QScorer(self.model, settings.system_prompt, PromptLogprobsCache(cache_dir() / "prompt_logprobs"))
        self.gate = sample_gate(settings)

    async def answer(self, payload: dict[str, Any]) -> dict[str, Any]:
        split, index = payload["split"], int(payload["index"])
        return await evaluate_item(self.model, self.scorer, split, index, payload["item"], self.settings, self.gate)

    async def aclose(self) -> None:
        await self.model.aclose()


def on_ray(
    args: argparse.Namespace, config: Config, concurrency: int, worker: type, *worker_args: Any
) -> tuple[RaySettings, WorkerFactory] | None:
    """``None`` for ``--engine local``; for ``--engine ray`` its settings and a factory of
    ``worker(config, *worker_args)``.

    Raises:
        ConfigError: bad Ray settings.
        EngineError: Ray is missing, or no cluster can be joined at the address given.
    """
    if args.engine != "ray":
        return None
    settings = RaySettings(args.ray_address, args.workers, concurrency, args.cpus_per_worker)
    try:
        settings.check()
    except ValueError as exc:
        raise ConfigError(str(exc)) from exc
    # Joined (or a local cluster started) here, before any output is opened, so that a
    # cluster that cannot be joined leaves no file behind; Ray stops a cluster it started
    # when the process exits.
    connect(settings)  # checks first that Ray is there and the address answers (check_reachable)
    return settings, functools.partial(worker, config, *worker_args)
