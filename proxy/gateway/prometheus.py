"""The server's Prometheus metrics (``GET /metrics``, prometheus-client, one registry per
app): requests, latency, tokens, upstream errors, the local pairs' counters.

Operational metrics only; the unlearning metrics (ROUGE-L recall, probability, truth
ratio, ...) are :mod:`proxy.evaluation.metrics`.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator, Mapping
from typing import Any

from prometheus_client import CollectorRegistry, Gauge, Histogram, ProcessCollector
from prometheus_client import Counter as PromCounter
from prometheus_client.core import CounterMetricFamily

from proxy.gateway.record import RequestRecord


class Metrics:
    """The Prometheus metrics of one app (its own registry).

    ``deltaproxy_requests_total{model,key,status}``,
    ``deltaproxy_request_seconds{model}``,
    ``deltaproxy_time_to_first_token_seconds{model}`` (streams),
    ``deltaproxy_remote_calls_per_request{model}``,
    ``deltaproxy_completion_tokens_total{model}``,
    ``deltaproxy_offset_changed_tokens_total{model}`` (tokens whose choice
    the offset changed), ``deltaproxy_upstream_errors_total{kind}``,
    ``deltaproxy_asyncio_tasks`` and the ``process_*`` metrics (open file
    descriptors, resident memory) of prometheus-client's process collector.
    """

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = PromCounter(
            "deltaproxy_requests",
            "Completion requests by model, key and HTTP status",
            ["model", "key", "status"],
            registry=r,
        )
        self.seconds = Histogram("deltaproxy_request_seconds", "Request wall time", ["model"], registry=r)
        self.ttft = Histogram(
            "deltaproxy_time_to_first_token_seconds", "Time to the first streamed token", ["model"], registry=r
        )
        self.remote_calls = Histogram(
            "deltaproxy_remote_calls_per_request",
            "Upstream calls per request",
            ["model"],
            buckets=(1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 5000),
            registry=r,
        )
        self.tokens = PromCounter("deltaproxy_completion_tokens", "Generated tokens", ["model"], registry=r)
        self.changed = PromCounter(
            "deltaproxy_offset_changed_tokens",
            "Generated tokens whose choice the offset changed",
            ["model"],
            registry=r,
        )
        self.upstream_errors = PromCounter(
            "deltaproxy_upstream_errors", "Failed requests caused by the upstream, by kind", ["kind"], registry=r
        )
        ProcessCollector(registry=r)  # process_open_fds, process_resident_memory_bytes, ...
        tasks = Gauge("deltaproxy_asyncio_tasks", "asyncio tasks alive (read while serving /metrics)", registry=r)
        tasks.set_function(_task_count)

    def observe(self, rec: RequestRecord, status: int, served: bool = True) -> None:
        model = rec.model if rec.model and served else "-"
        self.requests.labels(model, rec.key_id or "-", str(status)).inc()
        self.seconds.labels(model).observe(time.monotonic() - rec.started)
        if rec.first_token is not None:
            self.ttft.labels(model).observe(rec.first_token - rec.started)
        if rec.stats:
            self.remote_calls.labels(model).observe(sum(s.remote_calls for s in rec.stats))
            self.tokens.labels(model).inc(sum(s.completion_tokens for s in rec.stats))
            self.changed.labels(model).inc(sum(s.offset_changed for s in rec.stats))
        # a failed request, or a 200 stream that failed inside; client mistakes (4xx) are not counted
        if (status >= 500 or status == 200) and rec.error and rec.error.startswith(("upstream", "bad_upstream")):
            self.upstream_errors.labels(rec.error).inc()


class PairCollector:
    """The local pairs' counters, read at each scrape (one series per pair and offset):
    ``deltaproxy_pair_passes_total`` (forward passes of the pair's tree batcher, each one
    per model), ``deltaproxy_pair_tree_jobs_total`` (requests' tree passes run in them:
    jobs / passes is the mean batch), ``deltaproxy_pair_prefix_cache_hits_total`` and
    ``deltaproxy_pair_prefix_cache_tokens_total`` (prompts that began like a cached one,
    and the tokens they did not run again)."""

    def __init__(self, models: Mapping[str, Any]) -> None:
        self.models = models

    def collect(self) -> Iterator[CounterMetricFamily]:
        labels = ["pair", "offset"]
        families = {
            "passes": CounterMetricFamily(
                "deltaproxy_pair_passes", "Batched forward passes of the pair", labels=labels
            ),
            "jobs": CounterMetricFamily(
                "deltaproxy_pair_tree_jobs", "Requests' tree passes run in batched passes", labels=labels
            ),
            "hits": CounterMetricFamily(
                "deltaproxy_pair_prefix_cache_hits", "Prompts that began like a cached one", labels=labels
            ),
            "tokens": CounterMetricFamily(
                "deltaproxy_pair_prefix_cache_tokens", "Prompt tokens taken from the prefix cache", labels=labels
            ),
        }
        seen: set[int] = set()
        for model in self.models.values():
            pair: Any = getattr(model, "pair", None)
            batcher = getattr(pair, "batcher", None)
            if batcher is None or id(pair) in seen:
                continue
            seen.add(id(pair))
            offset = pair.offset.sha256[:12] if pair.offset is not None else "-"
            values = {"passes": batcher.passes, "jobs": batcher.jobs, "hits": 0, "tokens": 0}
            if pair.prefix_cache is not None:
                values.update(hits=pair.prefix_cache.hits, tokens=pair.prefix_cache.tokens_reused)
            for name, family in families.items():
                family.add_metric([pair.name, offset], values[name])
        yield from families.values()


def _task_count() -> float:
    try:
        return float(len(asyncio.all_tasks()))
    except RuntimeError:  # no running loop (a scrape outside the server)
        return float("nan")
