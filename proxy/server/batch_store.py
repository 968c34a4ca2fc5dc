"""The Files and Batches endpoints' storage: file and batch records in SQLite
(``<data_dir>/batches.sqlite3``) and the files' bytes under ``<data_dir>/files``.

Records survive a restart, so the server can resume every batch that was unfinished
(:mod:`proxy.server.batch_service`). Objects follow the OpenAI API reference ("The file
object", "The batch object").
"""

from __future__ import annotations

import contextlib
import json
import os
import sqlite3
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from proxy.protocol.errors import ProxyError

_SCHEMA = """
CREATE TABLE IF NOT EXISTS files (
    id TEXT PRIMARY KEY, filename TEXT NOT NULL, purpose TEXT NOT NULL,
    bytes INTEGER NOT NULL, created_at INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS batches (
    id TEXT PRIMARY KEY, object TEXT NOT NULL  -- the batch object, JSON
);
"""


UNFINISHED = ("validating", "in_progress", "finalizing", "cancelling")
"""Batch statuses of a batch that has not ended."""


@contextlib.contextmanager
def placed(tmp: Path, target: Path) -> Iterator[None]:
    """Move the complete file ``tmp`` onto ``target`` (same file system) for the record that
    the block writes; when the block fails, the file is removed again: no bytes without
    their record."""
    os.replace(tmp, target)
    try:
        yield
    except BaseException:
        target.unlink(missing_ok=True)
        raise


def _not_found(kind: str, ident: str) -> ProxyError:
    return ProxyError(404, f"No such {kind}: {ident}", "invalid_request_error", "id", "not_found")


class BatchStore:
    """File and batch records (SQLite) and file bytes (a folder); used from
    the event loop's thread only. One process: its leases are always granted (a shared
    store, :class:`proxy.server.batch_store_redis.RedisBatchStore`, has real ones)."""

    shared = False

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
        with placed(tmp, self.file_path(file_id)):
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
            "SELECT * FROM files WHERE ? IS NULL OR purpose = ? ORDER BY created_at DESC, rowid DESC",
            (purpose, purpose),
        )
        return [_file_object(r) for r in rows]

    def delete_file(self, file_id: str) -> None:
        """Delete a file's record and bytes.

        Raises:
            ProxyError: 404, no such file; 409, a batch that has not ended reads it (its
                input), so that the batch can still run, and resume after a restart.
        """
        self.get_file(file_id)
        busy = self.db.execute(
            "SELECT id FROM batches WHERE json_extract(object, '$.input_file_id') = ?"
            f" AND json_extract(object, '$.status') IN ({', '.join('?' * len(UNFINISHED))})",
            (file_id, *UNFINISHED),
        ).fetchone()
        if busy is not None:
            raise ProxyError(
                409,
                f"file {file_id} is the input of batch {busy[0]}, which has not ended; cancel it or wait for it",
                "invalid_request_error",
                "file_id",
                "file_in_use",
            )
        self.db.execute("DELETE FROM files WHERE id = ?", (file_id,))
        self.file_path(file_id).unlink(missing_ok=True)

    # ------------------------------------------------------------ batches
    def put_batch(self, batch: dict[str, Any]) -> None:
        # An update keeps the row (and its rowid, the listing's order): a replace would move it.
        self.db.execute(
            "INSERT INTO batches VALUES (?, ?) ON CONFLICT(id) DO UPDATE SET object = excluded.object",
            (batch["id"], json.dumps(batch)),
        )

    def get_batch(self, batch_id: str) -> dict[str, Any]:
        row = self.db.execute("SELECT object FROM batches WHERE id = ?", (batch_id,)).fetchone()
        if row is None:
            raise _not_found("batch", batch_id)
        return dict(json.loads(row[0]))

    # ------------------------------------------------------------ leases (one process: trivial)
    def acquire(self, batch_id: str, owner: str, ttl_ms: int) -> bool:
        return True

    def renew(self, batch_id: str, owner: str, ttl_ms: int) -> bool:
        return True

    def release(self, batch_id: str, owner: str) -> None:
        return None

    def request_cancel(self, batch_id: str) -> None:
        return None  # the one process cancels its own task

    def cancel_requested(self, batch_id: str) -> bool:
        return False

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
