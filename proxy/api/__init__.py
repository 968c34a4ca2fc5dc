"""The HTTP API: OpenAI wire schemas, error bodies, the aiohttp routes and the shaping of
responses (chat completions, completions, responses, models, files and batches).

May import: :mod:`proxy.config`, :mod:`proxy.common`, :mod:`proxy.decoding`, :mod:`proxy.gateway`,
:mod:`proxy.jobs`, :mod:`adapters.base`. Not :mod:`proxy.training`, :mod:`proxy.evaluation`, torch."""
