"""What an operator adds around the routes: client keys, per-key limits, request ids,
Prometheus metrics, JSON logs and the hash-chained request log.

May import: :mod:`proxy.config`, :mod:`proxy.common`, :mod:`proxy.protocol.errors`. Not torch."""
