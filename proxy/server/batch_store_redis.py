"""File and batch records in Redis, shared by replicas, with a lease per running batch.

The store of ``server.batch_storage = "redis://…"`` (:class:`RedisBatchStore`); the
records' interface is :class:`proxy.server.batch_store.BatchStore`'s. The files' bytes and
the batches' work files stay under ``data_dir``, which every replica must share (a
volume): Redis holds what must change atomically (the records and the leases), the volume
what is large.

Keys (prefix ``deltaproxy:``): ``files`` and ``batches`` (hashes, id → the object as
JSON), ``files:order`` and ``batches:order`` (sorted sets, score: creation order), and
``lease:<batch id>`` (the replica running the batch, with a time to live).

**Leases.** A replica runs a batch only while it holds the batch's lease
(:meth:`RedisBatchStore.acquire`, ``SET NX PX``), renews it at a third of its time to
live (:meth:`renew`, compare-and-expire in one Lua script), and releases it when the batch
ends (:meth:`release`, compare-and-delete). A replica that dies stops renewing; once the
lease expires another replica takes the batch and resumes it line by line from its work
file (:mod:`proxy.jobs.batch`). A replica that cannot renew (Redis unreachable, or the
lease expired and was taken) stops its run at once. The lease is not a fence: a replica
paused for longer than the time to live (a stopped VM) could write a line the new owner
also writes; the output is then deduplicated by ``custom_id`` when the batch ends.
"""

from __future__ import annotations

import json
import os
import time
import uuid
from pathlib import Path
from typing import Any

from proxy.protocol.errors import ProxyError
from proxy.server.batch_store import UNFINISHED, placed

PREFIX = "deltaproxy:"

_RENEW = """
if redis.call('get', KEYS[1]) == ARGV[1] then
    return redis.call('pexpire', KEYS[1], ARGV[2])
end
return 0
"""
_RELEASE = """
if redis.call('get', KEYS[1]) == ARGV[1] then
    return redis.call('del', KEYS[1])
end
return 0
"""


def _not_found(kind: str, ident: str) -> ProxyError:
    return ProxyError(404, f"No such {kind}: {ident}", "invalid_request_error", "id", "not_found")


class RedisBatchStore:
    """File and batch records in Redis (module docstring); bytes under ``folder``.

    Raises (from every method): ``redis.exceptions.RedisError`` when Redis does not answer.
    """

    shared = True
    """Replicas share it: a batch runs where its lease is held."""

    def __init__(self, url: str, folder: str | os.PathLike[str]) -> None:
        import redis

        self.folder = Path(folder)
        (self.folder / "files").mkdir(parents=True, exist_ok=True)
        (self.folder / "work").mkdir(exist_ok=True)
        self.redis = redis.Redis.from_url(url, socket_timeout=5, decode_responses=True)
        self._renew = self.redis.register_script(_RENEW)
        self._release = self.redis.register_script(_RELEASE)

    def close(self) -> None:
        self.redis.close()

    def check(self) -> None:
        """Raise unless Redis answers and ``folder`` is the data folder the other replicas
        use (``GET /ready``, and once at start).

        The first replica to check writes a random id into ``<data_dir>/.batch-storage-id``
        and into Redis; a replica whose folder holds another id, or none while Redis has
        one, is looking at another folder than the others: its files and batches would not
        be found by them, nor theirs by it.

        Raises:
            redis.exceptions.RedisError: Redis does not answer.
            RuntimeError: ``folder`` is not the shared one.
        """
        self.redis.ping()
        mark = self.folder / ".batch-storage-id"
        local = mark.read_text().strip() if mark.is_file() else None
        if self.redis.set(PREFIX + "data_dir_id", local or uuid.uuid4().hex, nx=True):
            if local is None:  # the first replica: the folder takes Redis's new id
                mark.write_text(str(self.redis.get(PREFIX + "data_dir_id")) + "\n")
            return
        shared = str(self.redis.get(PREFIX + "data_dir_id"))
        if local != shared:
            raise RuntimeError(
                f"data_dir {self.folder} is not the folder the other replicas use (batch_storage needs one "
                "data_dir that every replica mounts, a shared volume)"
            )

    def _order(self) -> float:
        return float(time.time_ns())

    # ------------------------------------------------------------ files
    def file_path(self, file_id: str) -> Path:
        return self.folder / "files" / file_id

    def add_file(self, tmp: Path, filename: str, purpose: str) -> dict[str, Any]:
        """Register a complete file (moved from ``tmp``, on the same file system)."""
        file_id = f"file-{uuid.uuid4().hex}"
        size = tmp.stat().st_size
        obj = {
            "id": file_id,
            "object": "file",
            "bytes": size,
            "created_at": int(time.time()),
            "filename": filename,
            "purpose": purpose,
            "status": "processed",
            "status_details": None,
        }
        with placed(tmp, self.file_path(file_id)), self.redis.pipeline() as p:
            p.hset(PREFIX + "files", file_id, json.dumps(obj))
            p.zadd(PREFIX + "files:order", {file_id: self._order()})
            p.execute()
        return obj

    def get_file(self, file_id: str) -> dict[str, Any]:
        raw = self.redis.hget(PREFIX + "files", file_id)
        if raw is None:
            raise _not_found("file", file_id)
        return dict(json.loads(str(raw)))

    def list_files(self, purpose: str | None) -> list[dict[str, Any]]:
        ids = [str(i) for i in self.redis.zrevrange(PREFIX + "files:order", 0, -1)]
        raws = self.redis.hmget(PREFIX + "files", ids) if ids else []
        files = [json.loads(str(r)) for r in raws if r is not None]
        return [f for f in files if purpose is None or f["purpose"] == purpose]

    def delete_file(self, file_id: str) -> None:
        """Delete a file's record and bytes.

        Raises:
            ProxyError: 404, no such file; 409, a batch that has not ended reads it.
        """
        self.get_file(file_id)
        for batch in self.list_batches():
            if batch["input_file_id"] == file_id and batch["status"] in UNFINISHED:
                raise ProxyError(
                    409,
                    f"file {file_id} is the input of batch {batch['id']}, which has not ended; cancel it or wait for it",
                    "invalid_request_error",
                    "file_id",
                    "file_in_use",
                )
        with self.redis.pipeline() as p:
            p.hdel(PREFIX + "files", file_id)
            p.zrem(PREFIX + "files:order", file_id)
            p.execute()
        self.file_path(file_id).unlink(missing_ok=True)

    # ------------------------------------------------------------ batches
    def put_batch(self, batch: dict[str, Any]) -> None:
        with self.redis.pipeline() as p:
            p.hset(PREFIX + "batches", batch["id"], json.dumps(batch))
            p.zadd(PREFIX + "batches:order", {batch["id"]: self._order()}, nx=True)  # creation order kept
            p.execute()

    def get_batch(self, batch_id: str) -> dict[str, Any]:
        raw = self.redis.hget(PREFIX + "batches", batch_id)
        if raw is None:
            raise _not_found("batch", batch_id)
        return dict(json.loads(str(raw)))

    def list_batches(self) -> list[dict[str, Any]]:
        ids = [str(i) for i in self.redis.zrevrange(PREFIX + "batches:order", 0, -1)]
        raws = self.redis.hmget(PREFIX + "batches", ids) if ids else []
        return [json.loads(str(r)) for r in raws if r is not None]

    # ------------------------------------------------------------ leases
    def acquire(self, batch_id: str, owner: str, ttl_ms: int) -> bool:
        """Take the batch's lease for ``owner`` unless another holds it."""
        return bool(self.redis.set(PREFIX + "lease:" + batch_id, owner, nx=True, px=ttl_ms))

    def renew(self, batch_id: str, owner: str, ttl_ms: int) -> bool:
        """Extend ``owner``'s lease; False when it no longer holds it."""
        return bool(self._renew(keys=[PREFIX + "lease:" + batch_id], args=[owner, ttl_ms]))

    def release(self, batch_id: str, owner: str) -> None:
        """Give the lease back, if ``owner`` still holds it."""
        self._release(keys=[PREFIX + "lease:" + batch_id], args=[owner])

    def request_cancel(self, batch_id: str) -> None:
        """Ask the replica running the batch, whichever it is, to cancel it."""
        self.redis.set(PREFIX + "cancel:" + batch_id, "1", ex=7 * 24 * 3600)

    def cancel_requested(self, batch_id: str) -> bool:
        return bool(self.redis.exists(PREFIX + "cancel:" + batch_id))
