"""schemathesis hooks for :mod:`bench.fuzz_api` (loaded through ``SCHEMATHESIS_HOOKS``):
a check that no response body holds a Python traceback."""

from __future__ import annotations

from typing import Any

import schemathesis


@schemathesis.check
def no_traceback(ctx: Any, response: Any, case: Any) -> bool | None:
    """Fail a response whose body shows a Python traceback (an error must be an OpenAI
    error body). ``GET /v1/files/{file_id}/content`` is left out: it returns an uploaded
    file's bytes as they were sent, which the fuzzer may have written the words into."""
    if case.operation.path.endswith("/content"):
        return None
    if b"Traceback (most recent call last)" in response.content:
        raise AssertionError("a Python traceback in the response body")
    return None
