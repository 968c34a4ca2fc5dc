"""Offset decoding: the math (:mod:`.offset`), byte alignment across tokenizers
(:mod:`.alignment`, :mod:`.vocab`), the token-by-token and sequence decoders, scoring given
text, and the scope threshold τ.

May import: :mod:`proxy.common`, :mod:`adapters.base`, numpy. Never torch, transformers, aiohttp
or openai: what it needs of the local pair is the :class:`proxy.decoding.protocols.Pair`
protocol."""
