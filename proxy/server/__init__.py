"""The aiohttp server: the routes (chat completions, completions, models, health, readiness,
Prometheus metrics, files and batches) over :mod:`proxy.protocol`, with the operator's
:mod:`proxy.gateway` around them and the Batches API's store and service.

May import: :mod:`proxy.protocol`, :mod:`proxy.gateway`, :mod:`proxy.jobs`, :mod:`proxy.config`,
:mod:`proxy.decoding`, :mod:`proxy.common`, :mod:`adapters.base`. Never :mod:`proxy.training`."""
