"""OpenAI's Files and Batches endpoints, so that the official SDK's batch
round trip works against the proxy:

    POST /v1/files                  (multipart: file, purpose="batch")
    GET  /v1/files, /v1/files/{id}, /v1/files/{id}/content;  DELETE /v1/files/{id}
    POST /v1/batches                (input_file_id, endpoint, completion_window="24h", metadata)
    GET  /v1/batches, /v1/batches/{id};  POST /v1/batches/{id}/cancel

Objects follow the OpenAI API reference ("The file object", "The batch
object"). Files live under ``<data_dir>/files``; file and batch records in
SQLite (``<data_dir>/batches.sqlite3``), so a restarted server resumes every
batch that was validating, in progress or finalizing (the run itself resumes
line by line, :mod:`proxy.jobs.batch`). When a batch ends, its lines with status
200 go to ``output_file_id`` and the others to ``error_file_id``, as OpenAI
splits them. Bad input lines do not fail the batch; each gets its own error
line (``tests/test_batch_api.py``).
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import sqlite3
import time
import uuid
from pathlib import Path
from typing import Any

from aiohttp import BodyPartReader, web

from proxy.api.bodies import read_json_body
from proxy.api.errors import ProxyError, invalid
from proxy.jobs.batch import ENDPOINTS, BatchRunner, Summary, iter_output

log = logging.getLogger(__name__)

UNFINISHED = ("validating", "in_progress", "finalizing", "cancelling")
FILE_PURPOSES = ("batch",)
"""Purposes a client may upload; ``batch_output`` files are the server's own."""

_SCHEMA = """
CREATE TABLE IF NOT EXISTS files (
    id TEXT PRIMARY KEY, filename TEXT NOT NULL, purpose TEXT NOT NULL,
    bytes INTEGER NOT NULL, created_at INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS batches (
    id TEXT PRIMARY KEY, object TEXT NOT NULL  -- the batch object, JSON
);
"""


def _not_found(kind: str, ident: str) -> ProxyError:
    return ProxyError(404, f"No such {kind}: {ident}", "invalid_request_error", "id", "not_found")


class BatchStore:
    """File and batch records (SQLite) and file bytes (a folder); used from
    the event loop's thread only."""

    def __init__(self, folder: str | os.PathLike[str]) -> None:
        self.folder = Path(folder)
        (self.folder / "files").mkdir(parents=True, exist_ok=True)
        (self.folder / "work").mkdir(exist_ok=True)
        self.db = sqlite3.connect(self.folder / "batches.sqlite3", isolation_level=None, check_same_thread=False)
        self.db.execute("PRAGMA journal_mode=WAL")
        self.db.executescript(_SCHEMA)

    def close(self) -> None:
        self.db.close()

    # ------------------------------------------------------------ files
    def file_path(self, file_id: str) -> Path:
        return self.folder / "files" / file_id

    def add_file(self, tmp: Path, filename: str, purpose: str) -> dict[str, Any]:
        """Register a complete file (moved from ``tmp``, on the same file system)."""
        file_id = f"file-{uuid.uuid4().hex}"
        size = tmp.stat().st_size
        os.replace(tmp, self.file_path(file_id))
        self.db.execute(
            "INSERT INTO files VALUES (?, ?, ?, ?, ?)", (file_id, filename, purpose, size, int(time.time()))
        )
        return self.get_file(file_id)

    def get_file(self, file_id: str) -> dict[str, Any]:
        row = self.db.execute("SELECT * FROM files WHERE id = ?", (file_id,)).fetchone()
        if row is None:
            raise _not_found("file", file_id)
        return _file_object(row)

    def list_files(self, purpose: str | None) -> list[dict[str, Any]]:
        rows = self.db.execute(
            "SELECT * FROM files WHERE ? IS NULL OR purpose = ? ORDER BY created_at DESC", (purpose, purpose)
        )
        return [_file_object(r) for r in rows]

    def delete_file(self, file_id: str) -> None:
        self.get_file(file_id)
        self.db.execute("DELETE FROM files WHERE id = ?", (file_id,))
        self.file_path(file_id).unlink(missing_ok=True)

    # ------------------------------------------------------------ batches
    def put_batch(self, batch: dict[str, Any]) -> None:
        self.db.execute("INSERT OR REPLACE INTO batches VALUES (?, ?)", (batch["id"], json.dumps(batch)))

    def get_batch(self, batch_id: str) -> dict[str, Any]:
        row = self.db.execute("SELECT object FROM batches WHERE id = ?", (batch_id,)).fetchone()
        if row is None:
            raise _not_found("batch", batch_id)
        return dict(json.loads(row[0]))

    def list_batches(self) -> list[dict[str, Any]]:
        rows = self.db.execute("SELECT object FROM batches ORDER BY rowid DESC")
        return [json.loads(r[0]) for r in rows]


def _file_object(row: tuple[Any, ...]) -> dict[str, Any]:
    file_id, filename, purpose, size, created = row
    return {
        "id": file_id,
        "object": "file",
        "bytes": size,
        "created_at": created,
        "filename": filename,
        "purpose": purpose,
        "status": "processed",
        "status_details": None,
    }


class BatchService:
    """Runs batches in the background of the server's event loop."""

    def __init__(self, store: BatchStore, runner: BatchRunner, *, concurrency: int = 4) -> None:
        self.store = store
        self.runner = runner
        self.concurrency = concurrency
        self.tasks: dict[str, asyncio.Task[None]] = {}

    def create(self, body: dict[str, Any]) -> dict[str, Any]:
        """Validate a ``POST /v1/batches`` body and start the batch.

        Raises:
            ProxyError: 400 naming the bad field; 404 for an unknown input file.
        """
        extra = set(body) - {"input_file_id", "endpoint", "completion_window", "metadata"}
        if extra:
            raise invalid(f"Unrecognized request argument supplied: {sorted(extra)[0]}", sorted(extra)[0])
        for key in ("input_file_id", "endpoint", "completion_window"):
            if not isinstance(body.get(key), str):
                raise invalid(f"Missing required parameter: '{key}'", key, "missing_required_parameter")
        if body["endpoint"] not in ENDPOINTS:
            raise invalid(f"endpoint must be one of {', '.join(ENDPOINTS)}", "endpoint")
        if body["completion_window"] != "24h":
            raise invalid("completion_window must be '24h'", "completion_window")
        metadata = body.get("metadata")
        if metadata is not None and not (
            isinstance(metadata, dict)
            and len(metadata) <= 16
            and all(isinstance(k, str) and isinstance(v, str) for k, v in metadata.items())
        ):
            raise invalid("metadata must be an object of at most 16 string values", "metadata")
        f = self.store.get_file(body["input_file_id"])
        if f["purpose"] != "batch":
            raise invalid(f"file {f['id']} has purpose {f['purpose']!r}, not 'batch'", "input_file_id")
        now = int(time.time())
        batch = {
            "id": f"batch_{uuid.uuid4().hex}",
            "object": "batch",
            "endpoint": body["endpoint"],
            "errors": None,
            "input_file_id": f["id"],
            "completion_window": "24h",
            "status": "validating",
            "output_file_id": None,
            "error_file_id": None,
            "created_at": now,
            "in_progress_at": None,
            "expires_at": now + 24 * 3600,
            "finalizing_at": None,
            "completed_at": None,
            "failed_at": None,
            "expired_at": None,
            "cancelling_at": None,
            "cancelled_at": None,
            "request_counts": {"total": 0, "completed": 0, "failed": 0},
            "metadata": metadata,
        }
        self.store.put_batch(batch)
        self.start(batch["id"])
        return batch

    def start(self, batch_id: str) -> None:
        self.tasks[batch_id] = asyncio.get_running_loop().create_task(self._run(batch_id))

    def resume_unfinished(self) -> None:
        for batch in self.store.list_batches():
            if batch["status"] in UNFINISHED and batch["id"] not in self.tasks:
                log.info("resuming batch %s (%s)", batch["id"], batch["status"])
                self.start(batch["id"])

    def cancel(self, batch_id: str) -> dict[str, Any]:
        batch = self.store.get_batch(batch_id)
        if batch["status"] not in UNFINISHED:
            raise ProxyError(
                409, f"Cannot cancel a batch with status {batch['status']!r}", "invalid_request_error", None, None
            )
        batch.update(status="cancelling", cancelling_at=batch["cancelling_at"] or int(time.time()))
        self.store.put_batch(batch)
        task = self.tasks.get(batch_id)
        if task is not None:
            task.cancel()
        return batch

    async def _run(self, batch_id: str) -> None:
        batch = self.store.get_batch(batch_id)
        work = self.store.folder / "work" / f"{batch_id}.jsonl"
        last = 0.0

        def on_line(summary: Summary) -> None:
            nonlocal last
            now = time.monotonic()
            if now - last > 0.5:  # request counts: a cheap update, not one per line
                last = now
                _counts(batch, summary)
                self.store.put_batch(batch)

        try:
            if batch["status"] == "cancelling":
                raise asyncio.CancelledError
            if batch["status"] == "validating":
                batch.update(status="in_progress", in_progress_at=int(time.time()))
            self.store.put_batch(batch)
            summary = await self.runner.run(
                self.store.file_path(batch["input_file_id"]),
                work,
                concurrency=self.concurrency,
                progress=False,
                on_line=on_line,
            )
            _counts(batch, summary)
            batch.update(status="finalizing", finalizing_at=int(time.time()))
            self.store.put_batch(batch)
            self._finalize(batch, work)
            batch.update(status="completed", completed_at=int(time.time()))
        except asyncio.CancelledError:
            stored = self.store.get_batch(batch_id)
            if stored["status"] != "cancelling":
                raise  # the server is shutting down: the batch resumes at the next start
            batch.update(status="cancelling", cancelling_at=stored["cancelling_at"])
            self._finalize(batch, work)
            batch.update(status="cancelled", cancelled_at=int(time.time()))
        except Exception as exc:  # noqa: BLE001 - the batch fails, the server goes on
            log.exception("batch %s failed", batch_id)
            batch.update(
                status="failed",
                failed_at=int(time.time()),
                errors={"object": "list", "data": [{"code": "batch_failed", "message": str(exc), "line": None}]},
            )
        finally:
            self.tasks.pop(batch_id, None)
        self.store.put_batch(batch)

    def _finalize(self, batch: dict[str, Any], work: Path) -> None:
        """Split the run's output into the output file (status 200) and the error file (the rest)."""
        ok_tmp, err_tmp = work.with_suffix(".output.tmp"), work.with_suffix(".errors.tmp")
        total = ok = failed = 0
        with open(ok_tmp, "wb") as ok_f, open(err_tmp, "wb") as err_f:
            if work.exists():
                for line in iter_output(work):
                    good = (line.get("response") or {}).get("status_code") == 200
                    (ok_f if good else err_f).write((json.dumps(line, ensure_ascii=False) + "\n").encode())
                    total, ok, failed = total + 1, ok + good, failed + (not good)
        stem = batch["id"]
        if ok:
            batch["output_file_id"] = self.store.add_file(ok_tmp, f"{stem}_output.jsonl", "batch_output")["id"]
        if failed:
            batch["error_file_id"] = self.store.add_file(err_tmp, f"{stem}_error.jsonl", "batch_output")["id"]
        ok_tmp.unlink(missing_ok=True)
        err_tmp.unlink(missing_ok=True)
        if batch["status"] != "cancelling":
            batch["request_counts"]["total"] = max(batch["request_counts"]["total"], total)
        batch["request_counts"].update(completed=ok, failed=failed)

    async def close(self) -> None:
        """Stop running batches; they stay unfinished in the store and resume at the next start."""
        tasks = list(self.tasks.values())
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


def _counts(batch: dict[str, Any], summary: Summary) -> None:
    batch["request_counts"] = {"total": summary.total, "completed": summary.completed, "failed": summary.failed}


# ---------------------------------------------------------------- routes
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
            self._service = BatchService(
                BatchStore(self.folder), self.runner, concurrency=self.runner.settings.batch_concurrency
            )
        return self._service

    @property
    def store(self) -> BatchStore:
        return self.service.store

    async def start(self) -> None:
        if (self.folder / "batches.sqlite3").exists():
            self.service.resume_unfinished()

    async def stop(self) -> None:
        if self._service is not None:
            await self._service.close()
            self._service.store.close()


BATCHES = web.AppKey("batches", BatchEndpoints)


def _json(obj: Any, status: int = 200) -> web.Response:
    return web.Response(status=status, text=json.dumps(obj, ensure_ascii=False), content_type="application/json")


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
    reader = await request.multipart()
    purpose: str | None = None
    tmp: Path | None = None
    filename = "upload.jsonl"
    try:
        while (part := await reader.next()) is not None:
            if not isinstance(part, BodyPartReader):
                continue
            if part.name == "purpose":
                purpose = (await part.text()).strip()
            elif part.name == "file" and tmp is None:
                filename = os.path.basename(part.filename or filename)
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
    return web.FileResponse(store.file_path(f["id"]), headers={"Content-Type": "application/octet-stream"})


async def delete_file(request: web.Request) -> web.Response:
    file_id = request.match_info["file_id"]
    request.app[BATCHES].store.delete_file(file_id)
    return _json({"id": file_id, "object": "file", "deleted": True})


async def create_batch(request: web.Request) -> web.Response:
    return _json(request.app[BATCHES].service.create(await read_json_body(request)))


async def retrieve_batch(request: web.Request) -> web.Response:
    return _json(request.app[BATCHES].store.get_batch(request.match_info["batch_id"]))


async def list_batches(request: web.Request) -> web.Response:
    return _list(request.app[BATCHES].store.list_batches(), request)


async def cancel_batch(request: web.Request) -> web.Response:
    return _json(request.app[BATCHES].service.cancel(request.match_info["batch_id"]))


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
