"""Running OpenAI batches in the background of the server's event loop: validating a
``POST /v1/batches`` body, the batch's life (validating, in_progress, finalizing,
completed, failed, cancelling, cancelled) and its output and error files.

A restarted server resumes every batch that was validating, in progress or finalizing
(the run itself resumes line by line, :mod:`proxy.jobs.batch`). With a shared store
(``server.batch_storage``), a replica runs a batch only while it holds the batch's lease,
and every replica watches for unfinished batches whose lease has expired (their replica
died) and takes them over (:mod:`proxy.server.batch_store_redis`). When a batch ends, its
lines with status 200 go to ``output_file_id`` and the others to ``error_file_id``, as
OpenAI splits them. Bad input lines do not fail the batch; each gets its own error line
(``tests/test_batch_api.py``).
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from pathlib import Path
from typing import Any

from proxy.common.jsontext import json_bytes
from proxy.jobs.batch import ENDPOINTS, BatchRunner, Summary, iter_output
from proxy.protocol.errors import ProxyError, invalid
from proxy.server.batch_store import UNFINISHED, BatchStore
from proxy.server.batch_store_redis import RedisBatchStore

log = logging.getLogger(__name__)


class BatchService:
    """Runs batches in the background of the server's event loop."""

    def __init__(
        self,
        store: BatchStore | RedisBatchStore,
        runner: BatchRunner,
        *,
        concurrency: int = 4,
        owner: str | None = None,
        lease_seconds: float = 15.0,
    ) -> None:
        self.store = store
        self.runner = runner
        self.concurrency = concurrency
        self.owner = f"{owner or 'replica'}:{uuid.uuid4().hex[:12]}"
        """The name on the leases this process holds: the replica's name and a random part,
        so that two processes given the same name never share a lease."""
        self.lease_ms = int(lease_seconds * 1000)
        self.tasks: dict[str, asyncio.Task[None]] = {}
        self._watcher: asyncio.Task[None] | None = None

    def create(self, body: dict[str, Any], key_id: str | None = None) -> dict[str, Any]:
        """Validate a ``POST /v1/batches`` body and start the batch; ``key_id`` (the client
        key that created it) names each of its lines in the audit log.

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
            and all(
                isinstance(k, str) and len(k) <= 64 and isinstance(v, str) and len(v) <= 512
                for k, v in metadata.items()
            )
        ):
            # OpenAI's limits: 16 pairs, keys of at most 64 characters, values of at most 512
            raise invalid(
                "metadata must be an object of at most 16 pairs, keys of at most 64 characters and string "
                "values of at most 512",
                "metadata",
            )
        try:
            f = self.store.get_file(body["input_file_id"])
        except ProxyError as err:
            err.param = "input_file_id"
            raise
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
            "_key_id": key_id,  # kept with the record, never shown (public())
        }
        self.store.put_batch(batch)
        self.start(batch["id"])
        return batch

    @staticmethod
    def public(batch: dict[str, Any]) -> dict[str, Any]:
        """A batch record as the API shows it: without the fields kept for the server alone
        (named with a leading ``_``)."""
        return {k: v for k, v in batch.items() if not k.startswith("_")}

    def start(self, batch_id: str) -> bool:
        """Run the batch here if its lease can be taken; False when another replica holds it."""
        if batch_id in self.tasks or not self.store.acquire(batch_id, self.owner, self.lease_ms):
            return False
        self.tasks[batch_id] = asyncio.get_running_loop().create_task(self._run(batch_id))
        return True

    def resume_unfinished(self) -> None:
        for batch in self.store.list_batches():
            if batch["status"] in UNFINISHED and batch["id"] not in self.tasks and self.start(batch["id"]):
                log.info("resuming batch %s (%s)", batch["id"], batch["status"])

    def watch(self) -> None:
        """Shared store: take over, every half lease, the unfinished batches whose lease has
        expired (their replica died); one process: resume its own at start."""
        try:
            self.resume_unfinished()
        except Exception:  # noqa: BLE001 - a shared store that does not answer yet: the watcher retries
            if not self.store.shared:
                raise
            log.warning("batches: the batch storage does not answer; looking again every %g s", self.lease_ms / 2000)
        if self.store.shared and self._watcher is None:
            self._watcher = asyncio.get_running_loop().create_task(self._watch())

    async def _watch(self) -> None:
        while True:
            await asyncio.sleep(self.lease_ms / 2000)
            try:
                self.resume_unfinished()
            except Exception as exc:  # noqa: BLE001 - Redis unreachable: try again at the next tick
                log.warning("batches: could not look for batches to take over: %s", exc)

    async def _keep_lease(self, batch_id: str, task: asyncio.Task[None]) -> None:
        """Renew the lease every third of its time to live; cancel the run when it is lost or
        when a cancel was asked on another replica."""
        while not task.done():
            await asyncio.sleep(self.lease_ms / 3000)
            try:
                held = self.store.renew(batch_id, self.owner, self.lease_ms)
                cancel = self.store.cancel_requested(batch_id)
            except Exception as exc:  # noqa: BLE001 - the store does not answer: the lease cannot be trusted
                log.warning("batch %s: its lease could not be renewed (%s); stopping here", batch_id, exc)
                held, cancel = False, False
            if not held:
                log.warning("batch %s: lease lost; another replica continues it", batch_id)
                task.cancel()
                return
            if cancel:
                task.cancel()
                return

    def cancel(self, batch_id: str) -> dict[str, Any]:
        batch = self.store.get_batch(batch_id)
        if batch["status"] not in UNFINISHED:
            raise ProxyError(
                409, f"Cannot cancel a batch with status {batch['status']!r}", "invalid_request_error", None, None
            )
        batch.update(status="cancelling", cancelling_at=batch["cancelling_at"] or int(time.time()))
        self.store.put_batch(batch)
        self.store.request_cancel(batch_id)  # the replica running it, if another, cancels it
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
                if self.store.cancel_requested(batch_id):  # asked on another replica: keep it shown
                    batch["status"] = "cancelling"
                self.store.put_batch(batch)

        keeper = asyncio.get_running_loop().create_task(self._keep_lease(batch_id, asyncio.current_task()))  # type: ignore[arg-type]
        try:
            if batch["status"] == "cancelling" or self.store.cancel_requested(batch_id):
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
                key_id=batch.get("_key_id"),
            )
            _counts(batch, summary)
            batch.update(status="finalizing", finalizing_at=int(time.time()))
            self.store.put_batch(batch)
            self._finalize(batch, work)
            batch.update(status="completed", completed_at=int(time.time()))
        except asyncio.CancelledError:
            stored = self.store.get_batch(batch_id)
            if stored["status"] != "cancelling" and not self.store.cancel_requested(batch_id):
                raise  # shutting down, or the lease was lost: the batch resumes, here or elsewhere
            batch.update(status="cancelling", cancelling_at=stored["cancelling_at"] or int(time.time()))
            self._finalize(batch, work)
            batch.update(status="cancelled", cancelled_at=int(time.time()))
        except Exception as exc:  # noqa: BLE001 - the batch fails, the server goes on
            if type(exc).__module__.startswith("redis."):
                # the shared store does not answer: stop here without a verdict; the lease
                # expires and this replica or another resumes the batch from its work file
                log.warning("batch %s: the batch storage does not answer (%s); it resumes later", batch_id, exc)
                return
            log.exception("batch %s failed", batch_id)
            message = f"the batch stopped on an internal error ({type(exc).__name__}); see the server log"
            if isinstance(exc, FileNotFoundError):
                message = (
                    "the batch's input file is not in this server's data_dir (with batch_storage, every replica "
                    "must mount the same data_dir)"
                )
            try:  # what was answered before the error is published, not lost
                batch["status"] = "failed"
                self._finalize(batch, work)
                message += "; the lines answered before it are in its output and error files"
            except Exception:  # noqa: BLE001 - the failure itself is what the batch reports
                log.exception("batch %s: its answered lines could not be published", batch_id)
            batch.update(
                status="failed",
                failed_at=int(time.time()),
                errors={"object": "list", "data": [{"code": "batch_failed", "message": message, "line": None}]},
            )
        finally:
            keeper.cancel()
            self.tasks.pop(batch_id, None)
        self.store.put_batch(batch)
        self.store.release(batch_id, self.owner)
        if batch["status"] in ("completed", "cancelled") or batch.get("output_file_id") or batch.get("error_file_id"):
            # its lines are in the published output and error files now
            for leftover in (work, work.with_name(work.name + ".progress.json")):
                leftover.unlink(missing_ok=True)

    def _finalize(self, batch: dict[str, Any], work: Path) -> None:
        """Split the run's output into the output file (status 200) and the error file (the rest)."""
        ok_tmp, err_tmp = work.with_suffix(".output.tmp"), work.with_suffix(".errors.tmp")
        total = ok = failed = 0
        seen: set[Any] = set()
        with open(ok_tmp, "wb") as ok_f, open(err_tmp, "wb") as err_f:
            if work.exists():
                for line in iter_output(work):
                    if line.get("custom_id") in seen:  # written twice across a lease handover
                        continue
                    seen.add(line.get("custom_id"))
                    good = (line.get("response") or {}).get("status_code") == 200
                    (ok_f if good else err_f).write(json_bytes(line) + b"\n")
                    total, ok, failed = total + 1, ok + good, failed + (not good)
        stem = batch["id"]
        if ok:
            batch["output_file_id"] = self.store.add_file(ok_tmp, f"{stem}_output.jsonl", "batch_output")["id"]
        if failed:
            batch["error_file_id"] = self.store.add_file(err_tmp, f"{stem}_error.jsonl", "batch_output")["id"]
        ok_tmp.unlink(missing_ok=True)
        err_tmp.unlink(missing_ok=True)
        if batch["status"] not in ("cancelling", "failed"):
            batch["request_counts"]["total"] = max(batch["request_counts"]["total"], total)
        batch["request_counts"].update(completed=ok, failed=failed)

    async def close(self) -> None:
        """Stop running batches; they stay unfinished in the store and resume at the next start."""
        if self._watcher is not None:
            self._watcher.cancel()
        ids, tasks = list(self.tasks), list(self.tasks.values())
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        for batch_id in ids:  # another replica may continue them at once
            try:
                self.store.release(batch_id, self.owner)
            except Exception:  # noqa: BLE001 - the lease then expires by itself
                log.warning("batch %s: its lease could not be released", batch_id)


def _counts(batch: dict[str, Any], summary: Summary) -> None:
    batch["request_counts"] = {"total": summary.total, "completed": summary.completed, "failed": summary.failed}
