"""OpenAI's wire protocol: request schemas, error bodies, reading a JSON body, and running
the choices of one request and shaping OpenAI responses and stream chunks from them.

May import: :mod:`proxy.config`, :mod:`proxy.common`, :mod:`proxy.decoding`, :mod:`adapters.base`,
aiohttp (to read a request body). No routes (those are :mod:`proxy.server`), no torch, nothing of training."""
