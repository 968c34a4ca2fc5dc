"""Resumable work over JSONL files: batch runs in OpenAI Batch API format and the one
resumable line runner that batch, redaction and the audit share.

May import: :mod:`proxy.config`, :mod:`proxy.common`, :mod:`proxy.decoding`, :mod:`proxy.protocol`
(schemas, errors, choices), :mod:`proxy.gateway`. Not :mod:`proxy.training`."""
