"""OpenAI's Files and Batches endpoints, so that the official SDK's batch
round trip works against the proxy:

    POST /v1/files                  (multipart: file, purpose="batch")
    GET  /v1/files, /v1/files/{id}, /v1/files/{id}/content;  DELETE /v1/files/{id}
    POST /v1/batches                (input_file_id, endpoint, completion_window="24h", metadata)
    GET  /v1/batches, /v1/batches/{id};  POST /v1/batches/{id}/cancel

Objects follow the OpenAI API reference ("The file object", "The batch
object"). Files live under ``<data_dir>/files``; file and batch records in
SQLite (``<data_dir>/batches.sqlite3``, :mod:`proxy.server.batch_store`), so a
restarted server resumes every batch that was validating, in progress or
finalizing (:mod:`proxy.server.batch_service`; the run itself resumes line by line,
:mod:`proxy.jobs.batch`). When a batch ends, its lines with status 200 go to
``output_file_id`` and the others to ``error_file_id``, as OpenAI splits them.
Bad input lines do not fail the batch; each gets its own error line
(``tests/test_batch_api.py``).
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import uuid
from pathlib import Path
from typing import Any

from aiohttp import BodyPartReader, web
from aiohttp.http_exceptions import HttpProcessingError

from proxy.common.jsontext import json_text
from proxy.gateway.keys import CLIENT_KEY
from proxy.jobs.batch import BatchRunner
from proxy.protocol.bodies import read_json_body
from proxy.protocol.errors import ProxyError, invalid
from proxy.server.batch_service import BatchService
from proxy.server.batch_store import BatchStore
from proxy.server.batch_store_redis import RedisBatchStore

log = logging.getLogger(__name__)

FILE_PURPOSES = ("batch",)
"""Purposes a client may upload; ``batch_output`` files are the server's own."""


class BatchEndpoints:
    """The app's batch state; the store is opened on first use (or at start
    when it exists, to resume), so a server nobody sends batches writes nothing."""

    def __init__(self, runner: BatchRunner, folder: Path, max_file_bytes: int) -> None:
        self.runner = runner
        self.folder = folder
        self.max_file_bytes = max_file_bytes
        self._service: BatchService | None = None

    @property
    def service(self) -> BatchService:
        if self._service is None:
            s = self.runner.settings
            store = RedisBatchStore(s.batch_storage, self.folder) if s.batch_storage else BatchStore(self.folder)
            owner = s.replica or os.environ.get("DELTAPROXY_REPLICA") or f"{socket.gethostname()}-{os.getpid()}"
            self._service = BatchService(
                store, self.runner, concurrency=s.batch_concurrency, owner=owner, lease_seconds=s.batch_lease_seconds
            )
        return self._service

    @property
    def store(self) -> BatchStore | RedisBatchStore:
        return self.service.store

    async def start(self) -> None:
        if self.runner.settings.batch_storage:
            try:
                await asyncio.to_thread(getattr(self.service.store, "check", lambda: None))
            except Exception as exc:  # noqa: BLE001 - serve anyway: /ready says what is wrong
                log.error("batches: %s", exc)
        if self.runner.settings.batch_storage or (self.folder / "batches.sqlite3").exists():
            self.service.watch()

    async def stop(self) -> None:
        if self._service is not None:
            await self._service.close()
            self._service.store.close()


BATCHES = web.AppKey("batches", BatchEndpoints)


def _json(obj: Any, status: int = 200) -> web.Response:
    return web.Response(status=status, text=json_text(obj), content_type="application/json")


def _list(data: list[dict[str, Any]], request: web.Request) -> web.Response:
    """A cursor page (``after``, ``limit``) as OpenAI lists it."""
    after = request.query.get("after")
    try:
        limit = int(request.query.get("limit", "20"))
    except ValueError:
        raise invalid("limit must be an integer", "limit") from None
    if not 1 <= limit <= 100:
        raise invalid("limit must be between 1 and 100", "limit")
    ids = [d["id"] for d in data]
    start = ids.index(after) + 1 if after in ids else 0
    page = data[start : start + limit]
    return _json(
        {
            "object": "list",
            "data": page,
            "first_id": page[0]["id"] if page else None,
            "last_id": page[-1]["id"] if page else None,
            "has_more": start + limit < len(data),
        }
    )


async def upload_file(request: web.Request) -> web.Response:
    batches = request.app[BATCHES]
    store, max_bytes = batches.store, batches.max_file_bytes
    if not request.content_type.startswith("multipart/"):
        raise invalid("files are uploaded as multipart/form-data with fields 'file' and 'purpose'", "file")
    purpose: str | None = None
    tmp: Path | None = None
    filename = "upload.jsonl"
    files = 0
    try:
        try:
            reader = await request.multipart()
            while (part := await reader.next()) is not None:
                if not isinstance(part, BodyPartReader):
                    continue
                if part.name == "purpose":
                    purpose = (await part.text()).strip()
                elif part.name == "file":
                    files += 1
                    if files > 1:
                        raise invalid("give one 'file' part per upload", "file")
                    # A name that is not valid UTF-8 keeps its readable part (U+FFFD for the rest).
                    filename = os.path.basename(part.filename or filename).encode("utf-8", "replace").decode("utf-8")
                    tmp = store.folder / "files" / f".upload-{uuid.uuid4().hex}"
                    size = 0
                    with open(tmp, "wb") as f:
                        while chunk := await part.read_chunk(1 << 20):
                            size += len(chunk)
                            if size > max_bytes:
                                raise ProxyError(
                                    413,
                                    f"file is larger than {max_bytes} bytes",
                                    "invalid_request_error",
                                    "file",
                                    "file_too_large",
                                )
                            f.write(chunk)
        except (KeyError, ValueError, LookupError, AssertionError, HttpProcessingError) as exc:
            # no boundary, a body that does not follow it, a part cut short, a charset that
            # does not exist or text that is not in it (UnicodeDecodeError is a ValueError)
            detail = exc.message if isinstance(exc, HttpProcessingError) else str(exc)
            raise invalid(f"malformed multipart/form-data body: {detail}", "file") from None
        if tmp is None:
            raise invalid("Missing required parameter: 'file'", "file", "missing_required_parameter")
        if purpose is None:
            raise invalid("Missing required parameter: 'purpose'", "purpose", "missing_required_parameter")
        if purpose not in FILE_PURPOSES:
            raise invalid(f"purpose must be one of {', '.join(FILE_PURPOSES)} on this server", "purpose")
        obj = store.add_file(tmp, filename, purpose)
        tmp = None
        return _json(obj)
    finally:
        if tmp is not None:
            tmp.unlink(missing_ok=True)


async def list_files(request: web.Request) -> web.Response:
    return _list(request.app[BATCHES].store.list_files(request.query.get("purpose")), request)


async def retrieve_file(request: web.Request) -> web.Response:
    return _json(request.app[BATCHES].store.get_file(request.match_info["file_id"]))


async def file_content(request: web.Request) -> web.StreamResponse:
    store = request.app[BATCHES].store
    f = store.get_file(request.match_info["file_id"])
    path = store.file_path(f["id"])
    if not path.is_file():  # the record is shared, the bytes are not here
        raise ProxyError(
            404,
            f"file {f['id']} has a record but its bytes are not in this server's data_dir "
            "(with batch_storage, every replica must mount the same data_dir)",
            "invalid_request_error",
            "file_id",
            "file_content_missing",
        )
    return web.FileResponse(path, headers={"Content-Type": "application/octet-stream"})


async def delete_file(request: web.Request) -> web.Response:
    file_id = request.match_info["file_id"]
    request.app[BATCHES].store.delete_file(file_id)
    return _json({"id": file_id, "object": "file", "deleted": True})


async def create_batch(request: web.Request) -> web.Response:
    key = request.get(CLIENT_KEY)
    batch = request.app[BATCHES].service.create(await read_json_body(request), None if key is None else key.id)
    return _json(BatchService.public(batch))


async def retrieve_batch(request: web.Request) -> web.Response:
    return _json(BatchService.public(request.app[BATCHES].store.get_batch(request.match_info["batch_id"])))


async def list_batches(request: web.Request) -> web.Response:
    return _list([BatchService.public(b) for b in request.app[BATCHES].store.list_batches()], request)


async def cancel_batch(request: web.Request) -> web.Response:
    return _json(BatchService.public(request.app[BATCHES].service.cancel(request.match_info["batch_id"])))


def add_batch_routes(app: web.Application, runner: BatchRunner, folder: Path, max_file_bytes: int) -> None:
    """Mount the Files and Batches endpoints; unfinished batches resume when the app starts."""
    app[BATCHES] = BatchEndpoints(runner, folder, max_file_bytes)
    app.router.add_post("/v1/files", upload_file)
    app.router.add_get("/v1/files", list_files)
    app.router.add_get("/v1/files/{file_id}", retrieve_file)
    app.router.add_delete("/v1/files/{file_id}", delete_file)
    app.router.add_get("/v1/files/{file_id}/content", file_content)
    app.router.add_post("/v1/batches", create_batch)
    app.router.add_get("/v1/batches", list_batches)
    app.router.add_get("/v1/batches/{batch_id}", retrieve_batch)
    app.router.add_post("/v1/batches/{batch_id}/cancel", cancel_batch)

    async def _start(app: web.Application) -> None:
        await app[BATCHES].start()

    async def _stop(app: web.Application) -> None:
        await app[BATCHES].stop()

    app.on_startup.append(_start)
    app.on_shutdown.append(_stop)
