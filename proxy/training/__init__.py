"""Training an offset: forget and retain sets, the unlearning objectives (GradAscent, NPO,
…), the scope sets (broad retain set, neighbours), the self-check and the demo offset.

May import: :mod:`proxy.common`, :mod:`proxy.decoding`, :mod:`proxy.pair`, :mod:`proxy.evaluation`
metrics, :mod:`adapters`. Serving never imports it."""
