"""``GET /openapi.json``: the server's OpenAPI document covers every route it serves,
its request schemas accept and refuse what the server does, and a schemathesis run
against it (bench.fuzz_api) gets no 5xx and no traceback."""

from __future__ import annotations

import re

import pytest
from fakes import FakeRemote

from proxy.config import ServerConfig
from proxy.decoding.served import ServedModel
from proxy.server.app import create_app
from proxy.server.openapi import openapi_document


def _routes(app) -> set[tuple[str, str]]:  # noqa: ANN001 (aiohttp's Application)
    out = set()
    for route in app.router.routes():
        info = route.resource.get_info() if route.resource is not None else {}
        path = info.get("path") or info.get("formatter")
        if route.method != "HEAD" and path and path != "/openapi.json":
            out.add((route.method.lower(), path))
    return out


@pytest.mark.parametrize("batches", [True, False])
async def test_the_document_lists_every_route_and_is_served(aiohttp_client, tmp_path, batches):
    settings = ServerConfig(data_dir=str(tmp_path))
    app = create_app({"m": ServedModel("m", FakeRemote(lambda prefix: []))}, settings, batches=batches)
    client = await aiohttp_client(app)
    r = await client.get("/openapi.json")
    assert r.status == 200 and r.content_type == "application/json"
    doc = await r.json()
    assert doc["openapi"].startswith("3.1")
    documented = {(method, path) for path, ops in doc["paths"].items() for method in ops}
    assert documented == _routes(app)
    # every reference resolves inside the document
    refs = set(re.findall(r'"\$ref":\s*"#/components/schemas/([^"]+)"', await r.text()))
    assert refs and refs <= set(doc["components"]["schemas"])


def test_request_schemas_are_the_validating_models():
    from proxy.protocol.schemas import ChatCompletionRequest

    doc = openapi_document()
    chat = doc["components"]["schemas"]["ChatCompletionRequest"]
    assert set(chat["required"]) == {"model", "messages"}
    assert set(chat["properties"]) == set(ChatCompletionRequest.model_json_schema()["properties"])
    body = doc["paths"]["/v1/chat/completions"]["post"]["responses"]["200"]["content"]
    assert body["application/json"]["schema"] == {"$ref": "#/components/schemas/ChatCompletion"}
    assert "text/event-stream" in body


@pytest.mark.process
@pytest.mark.timeout(900)
def test_schemathesis_finds_no_server_error_and_no_traceback(tmp_path):
    from bench.fuzz_api import run

    r = run(cases=400, work=tmp_path)
    assert r["requests_sent"] >= 300, r
    assert r["server_errors"] == 0, r["schemathesis_summary"]
    assert r["tracebacks_in_log"] == 0
    assert r["schemathesis_exit"] == 0, r["schemathesis_summary"]
    assert r["proxy_exit"] == 0
