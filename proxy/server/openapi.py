"""The server's OpenAPI 3.1 document (``GET /openapi.json``).

Request bodies are the JSON schemas of the models that validate them
(:mod:`proxy.protocol.schemas`, :mod:`proxy.protocol.responses`), so the document cannot
drift from what the server accepts. Response bodies are the openai SDK's own types
(``openai.types``: ``ChatCompletion``, ``Completion``, ``Response``, ``Model``,
``FileObject``, ``Batch`` …), the shapes OpenAI's clients parse. Both are rendered by
pydantic (:func:`pydantic.json_schema.models_json_schema`) into one
``components.schemas`` with names made unique. Errors are OpenAI's error body
(:mod:`proxy.protocol.errors`). Streams (``stream: true``) are ``text/event-stream``.
"""

from __future__ import annotations

import functools
from importlib.metadata import PackageNotFoundError, version
from typing import Any

from openai.types import Batch, Completion, FileDeleted, FileObject, Model
from openai.types.chat import ChatCompletion
from openai.types.responses import Response
from pydantic import BaseModel
from pydantic.json_schema import models_json_schema

from proxy.protocol.responses import ResponsesRequest
from proxy.protocol.schemas import ChatCompletionRequest, CompletionRequest

REF = "#/components/schemas/{model}"

ERROR: dict[str, Any] = {
    "type": "object",
    "required": ["error"],
    "properties": {
        "error": {
            "type": "object",
            "required": ["message", "type"],
            "properties": {
                "message": {"type": "string"},
                "type": {"type": "string"},
                "param": {"type": ["string", "null"]},
                "code": {"type": ["string", "null"]},
            },
        }
    },
}

BATCH_CREATE: dict[str, Any] = {
    "type": "object",
    "additionalProperties": False,
    "required": ["input_file_id", "endpoint", "completion_window"],
    "properties": {
        "input_file_id": {"type": "string"},
        "endpoint": {"type": "string", "enum": ["/v1/chat/completions", "/v1/completions"]},
        "completion_window": {"type": "string", "enum": ["24h"]},
        "metadata": {
            "type": ["object", "null"],
            "maxProperties": 16,
            "propertyNames": {"maxLength": 64},
            "additionalProperties": {"type": "string", "maxLength": 512},
        },
    },
}


def _list_of(ref: str) -> dict[str, Any]:
    """OpenAI's list envelope (``{"object": "list", "data": [...]}``, cursor fields optional)."""
    return {
        "type": "object",
        "required": ["object", "data"],
        "properties": {
            "object": {"const": "list"},
            "data": {"type": "array", "items": {"$ref": ref}},
            "first_id": {"type": ["string", "null"]},
            "last_id": {"type": ["string", "null"]},
            "has_more": {"type": "boolean"},
        },
    }


def _json(schema: dict[str, Any]) -> dict[str, Any]:
    return {"application/json": {"schema": schema}}


def _errors(*statuses: int) -> dict[str, Any]:
    reasons = {
        400: "invalid request (OpenAI error body naming the parameter)",
        401: "missing or unknown API key",
        403: "the key may not use this model or endpoint",
        404: "no such model, file or batch",
        409: "the resource is busy or in another state (a batch that has ended, a file a batch reads)",
        413: "body or file too large",
        429: "the key's rate or concurrency limit (Retry-After)",
        502: "the upstream failed or answered something unusable",
        503: "the upstream, the rate-limit storage or the batch storage does not answer, or the server is "
        "shutting down (retry)",
        504: "the upstream timed out",
    }
    return {
        str(s): {"description": reasons[s], "content": _json({"$ref": "#/components/schemas/Error"})} for s in statuses
    }


UPSTREAM = (400, 401, 403, 404, 413, 429, 502, 503, 504)


@functools.cache
def openapi_document(models: tuple[str, ...] = (), batches: bool = True) -> dict[str, Any]:
    """The OpenAPI 3.1 document of the routes :func:`proxy.server.app.create_app` serves;
    ``models``: the served model names, listed as the ``model`` field's ``enum`` (any
    string where empty); ``batches``: with the Files and Batches routes. Built once per
    process and arguments (a dict: do not modify it)."""
    inputs: list[type[BaseModel]] = [ChatCompletionRequest, CompletionRequest, ResponsesRequest]
    outputs: list[type[BaseModel]] = [ChatCompletion, Completion, Response, Model, FileObject, FileDeleted, Batch]
    keys, top = models_json_schema(
        [*((m, "validation") for m in inputs), *((m, "serialization") for m in outputs)], ref_template=REF
    )
    schemas: dict[str, Any] = dict(top.get("$defs", {}))
    if models:
        for request in ("ChatCompletionRequest", "CompletionRequest", "ResponsesRequest"):
            schemas[request]["properties"]["model"] = {"type": "string", "enum": list(models)}
    schemas["Error"] = ERROR
    schemas["BatchCreateRequest"] = BATCH_CREATE

    def ref(model: type[BaseModel], mode: str) -> dict[str, Any]:
        return dict(keys[(model, mode)])  # type: ignore[index]

    def completion(request: type[BaseModel], response: type[BaseModel], summary: str) -> dict[str, Any]:
        return {
            "post": {
                "summary": summary,
                "security": [{"bearer": []}, {}],
                "requestBody": {"required": True, "content": _json(ref(request, "validation"))},
                "responses": {
                    "200": {
                        "description": "the answer; with stream: true, server-sent events ending in data: [DONE]",
                        "content": {
                            **_json(ref(response, "serialization")),
                            "text/event-stream": {"schema": {"type": "string"}},
                        },
                    },
                    **_errors(*UPSTREAM),
                },
            }
        }

    model_id = [{"name": "model", "in": "path", "required": True, "schema": {"type": "string"}}]
    paths: dict[str, Any] = {
        "/v1/chat/completions": completion(ChatCompletionRequest, ChatCompletion, "Create a chat completion"),
        "/v1/completions": completion(CompletionRequest, Completion, "Create a completion"),
        "/v1/responses": completion(ResponsesRequest, Response, "Create a response (the Responses API)"),
        "/v1/models": {
            "get": {
                "summary": "List the served models",
                "security": [{"bearer": []}, {}],
                "responses": {
                    "200": {
                        "description": "the models",
                        "content": _json(_list_of(ref(Model, "serialization")["$ref"])),
                    },
                    **_errors(401),
                },
            }
        },
        "/v1/models/{model}": {
            "get": {
                "summary": "Retrieve a served model",
                "security": [{"bearer": []}, {}],
                "parameters": model_id,
                "responses": {
                    "200": {"description": "the model", "content": _json(ref(Model, "serialization"))},
                    **_errors(401, 404),
                },
            }
        },
        "/health": {"get": {"summary": "Liveness", "responses": {"200": {"description": "the process answers"}}}},
        "/ready": {
            "get": {
                "summary": "Readiness: every model loaded and its upstream answering",
                "responses": {
                    "200": {"description": "ready"},
                    "503": {
                        "description": "not ready: the reason per model, and for the rate-limit and batch storages"
                    },
                },
            }
        },
        "/metrics": {
            "get": {
                "summary": "Prometheus metrics",
                "responses": {
                    "200": {
                        "description": "text exposition format",
                        "content": {"text/plain": {"schema": {"type": "string"}}},
                    }
                },
            }
        },
    }
    if batches:
        paths.update(
            _files_and_batches(
                ref(FileObject, "serialization"), ref(FileDeleted, "serialization"), ref(Batch, "serialization")
            )
        )
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "deltaproxy",
            "version": _version(),
            "description": "An OpenAI-compatible proxy that applies an unlearning offset to a remote model's answers.",
        },
        "paths": paths,
        "components": {
            "schemas": schemas,
            "securitySchemes": {
                "bearer": {"type": "http", "scheme": "bearer", "description": "a client key, when keys are configured"}
            },
        },
    }


def _files_and_batches(file: dict[str, Any], deleted: dict[str, Any], batch: dict[str, Any]) -> dict[str, Any]:
    file_id = [{"name": "file_id", "in": "path", "required": True, "schema": {"type": "string"}}]
    batch_id = [{"name": "batch_id", "in": "path", "required": True, "schema": {"type": "string"}}]
    page = [
        {"name": "after", "in": "query", "required": False, "schema": {"type": "string"}},
        {
            "name": "limit",
            "in": "query",
            "required": False,
            "schema": {"type": "integer", "minimum": 1, "maximum": 100},
        },
    ]
    auth: list[dict[str, list[str]]] = [{"bearer": []}, {}]
    return {
        "/v1/files": {
            "post": {
                "summary": "Upload a file (JSONL batch input)",
                "security": auth,
                "requestBody": {
                    "required": True,
                    "content": {
                        "multipart/form-data": {
                            "schema": {
                                "type": "object",
                                "required": ["file", "purpose"],
                                "properties": {
                                    "file": {"type": "string", "format": "binary"},
                                    "purpose": {"type": "string", "enum": ["batch"]},
                                },
                            }
                        }
                    },
                },
                "responses": {
                    "200": {"description": "the file", "content": _json(file)},
                    **_errors(400, 401, 403, 413, 503),
                },
            },
            "get": {
                "summary": "List files",
                "security": auth,
                "parameters": [
                    *page,
                    {"name": "purpose", "in": "query", "required": False, "schema": {"type": "string"}},
                ],
                "responses": {
                    "200": {"description": "the files", "content": _json(_list_of(file["$ref"]))},
                    **_errors(400, 401, 403, 503),
                },
            },
        },
        "/v1/files/{file_id}": {
            "get": {
                "summary": "Retrieve a file's record",
                "security": auth,
                "parameters": file_id,
                "responses": {"200": {"description": "the file", "content": _json(file)}, **_errors(401, 403, 404)},
            },
            "delete": {
                "summary": "Delete a file",
                "security": auth,
                "parameters": file_id,
                "responses": {
                    "200": {"description": "deleted", "content": _json(deleted)},
                    **_errors(401, 403, 404, 409, 503),
                },
            },
        },
        "/v1/files/{file_id}/content": {
            "get": {
                "summary": "A file's bytes",
                "security": auth,
                "parameters": file_id,
                "responses": {
                    "200": {
                        "description": "the bytes",
                        "content": {"application/octet-stream": {"schema": {"type": "string", "format": "binary"}}},
                    },
                    **_errors(401, 403, 404, 503),
                },
            }
        },
        "/v1/batches": {
            "post": {
                "summary": "Create a batch over an uploaded JSONL file",
                "security": auth,
                "requestBody": {
                    "required": True,
                    "content": _json({"$ref": "#/components/schemas/BatchCreateRequest"}),
                },
                "responses": {
                    "200": {"description": "the batch", "content": _json(batch)},
                    **_errors(400, 401, 403, 404, 429, 503),
                },
            },
            "get": {
                "summary": "List batches",
                "security": auth,
                "parameters": page,
                "responses": {
                    "200": {"description": "the batches", "content": _json(_list_of(batch["$ref"]))},
                    **_errors(400, 401, 403, 503),
                },
            },
        },
        "/v1/batches/{batch_id}": {
            "get": {
                "summary": "Retrieve a batch",
                "security": auth,
                "parameters": batch_id,
                "responses": {"200": {"description": "the batch", "content": _json(batch)}, **_errors(401, 403, 404)},
            }
        },
        "/v1/batches/{batch_id}/cancel": {
            "post": {
                "summary": "Cancel a batch",
                "security": auth,
                "parameters": batch_id,
                "responses": {
                    "200": {"description": "the batch", "content": _json(batch)},
                    **_errors(400, 401, 403, 404, 409, 503),
                },
            }
        },
    }


def _version() -> str:
    try:
        return version("deltaproxy")
    except PackageNotFoundError:  # run from a source tree that is not installed
        return "0"
