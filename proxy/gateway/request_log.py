"""The request audit log: append-only JSONL, one line per request, hash-chained.

Each line is a JSON object whose ``prev_sha256`` is the sha256 (hex) of the
previous line's bytes (without its newline); the first line's is 64 zeros.
Editing or removing a line breaks the chain at the next line, which
:func:`verify` (``deltaproxy verify-log FILE``) reports with its number. A
chain cannot show that its *end* was cut off or that its last line was
edited: keep the last line's hash elsewhere (the server logs it when it
closes the log) and pass it to ``verify-log --head``.

Durability: each line is written with one ``write(2)`` on an ``O_APPEND``
descriptor, so a process killed at any point leaves whole lines plus at most
one incomplete last line (it never held a complete record). ``fsync`` per line is
optional (``fsync=True``), for power loss rather than process death.

When the log is opened again after a crash, that incomplete tail is cut off
and an ``{"event": "recovered_incomplete_line", "truncated_bytes": n}`` line
records it.

One writer at a time: the file is locked (``flock``) while open; a second
server on the same file gets :class:`AuditLogError`. Replicas each write their own file
(``server.replica``, ``{replica}`` in ``server.audit_log``), every line naming its
replica; :func:`verify_chains` checks several such files together.
"""

from __future__ import annotations

import datetime as dt
import fcntl
import hashlib
import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from proxy.common.jsontext import json_bytes

log = logging.getLogger(__name__)

GENESIS = "0" * 64


class AuditLogError(RuntimeError):
    """The audit log cannot be opened or written."""


def utc_now() -> str:
    """The time of a log line: ISO 8601, UTC, milliseconds."""
    return dt.datetime.now(dt.UTC).isoformat(timespec="milliseconds")


def _dumps(record: dict[str, Any]) -> bytes:
    return json_bytes(record, sort_keys=True, separators=(",", ":"))


def _last_complete(path: Path) -> tuple[str, int, int]:
    """(sha256 of the last complete line, number of complete lines, size up to its end)."""
    prev, n, end = GENESIS, 0, 0
    with path.open("rb") as f:
        pos = 0
        for raw in f:
            pos += len(raw)
            if not raw.endswith(b"\n"):
                break
            line = raw[:-1]
            prev, n, end = hashlib.sha256(line).hexdigest(), n + 1, pos
    return prev, n, end


class AuditLog:
    """An open audit log (see the module docstring).

    Raises:
        AuditLogError: the file cannot be opened, is locked by another
            process, or a write fails.
    """

    def __init__(self, path: str | os.PathLike[str], *, fsync: bool = False, replica: str | None = None) -> None:
        self.path = Path(path)
        self.fsync = fsync
        self.replica = replica
        """Written into every line (``"replica"``) when set: the chain's writer."""
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._fd = os.open(self.path, os.O_RDWR | os.O_APPEND | os.O_CREAT, 0o640)
        except OSError as exc:
            raise AuditLogError(f"cannot open the audit log {self.path}: {exc.strerror}") from exc
        try:
            fcntl.flock(self._fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            os.close(self._fd)
            raise AuditLogError(f"the audit log {self.path} is in use by another process") from exc
        self.head, self.lines, self._size = _last_complete(self.path)
        cut = os.fstat(self._fd).st_size - self._size
        if cut:
            log.warning("audit log %s: cut an incomplete last line (%d bytes) left by a crash", self.path, cut)
            os.ftruncate(self._fd, self._size)
            self.append({"time": utc_now(), "event": "recovered_incomplete_line", "truncated_bytes": cut})

    def append(self, record: dict[str, Any]) -> str:
        """Write one record (JSON-serialisable, without ``prev_sha256``); returns its line's sha256.

        A failed or short write (a full disk) is undone: the file is cut back
        to its last whole line, so the chain stays valid for the next append.

        Raises:
            AuditLogError: the log is closed or the line could not be written.
        """
        if self._fd < 0:
            raise AuditLogError(f"the audit log {self.path} is closed")
        extra = {"replica": self.replica} if self.replica is not None else {}
        line = _dumps(dict(record, **extra, prev_sha256=self.head))
        try:
            written = os.write(self._fd, line + b"\n")
            if written != len(line) + 1:
                raise OSError(0, f"short write ({written} of {len(line) + 1} bytes; is the disk full?)")
            if self.fsync:
                os.fsync(self._fd)
        except OSError as exc:
            try:
                os.ftruncate(self._fd, self._size)
            except OSError:
                log.error("audit log %s: could not cut a partial line back to byte %d", self.path, self._size)
            raise AuditLogError(f"cannot write the audit log {self.path}: {exc.strerror or exc}") from exc
        self._size += len(line) + 1
        self.head = hashlib.sha256(line).hexdigest()
        self.lines += 1
        return self.head

    def close(self) -> None:
        if self._fd >= 0:
            log.info("audit log %s closed: %d lines, last line sha256 %s", self.path, self.lines, self.head)
            os.close(self._fd)
            self._fd = -1


@dataclass(frozen=True)
class Verification:
    """The result of :func:`verify`."""

    ok: bool
    lines: int
    """Complete lines that verified (all of them when ``ok``)."""
    head: str
    """sha256 of the last verified line (64 zeros for an empty log)."""
    error: str | None = None
    bad_line: int | None = None
    """1-based number of the first line that breaks the chain."""
    incomplete_tail_bytes: int = 0
    """Bytes after the last newline: a write cut off by a crash, not part of the chain."""


def verify(path: str | os.PathLike[str], expected_head: str | None = None) -> Verification:
    """Check the hash chain of an audit log, line by line; with
    ``expected_head`` (a last line's sha256 kept elsewhere, e.g. from the
    server's shutdown log line), also that the log still ends there.

    Raises:
        OSError: the file cannot be read.
    """
    data = Path(path).read_bytes()
    *lines, tail = data.split(b"\n")
    prev = GENESIS
    for i, line in enumerate(lines, 1):
        try:
            rec = json.loads(line)
        except (ValueError, RecursionError) as exc:
            return Verification(False, i - 1, prev, f"line {i} is not JSON: {exc}", i, len(tail))
        if not isinstance(rec, dict) or rec.get("prev_sha256") != prev:
            why = (
                "the log does not start at the chain's beginning (lines were removed from the start)"
                if i == 1
                else f"line {i - 1} was edited, or lines were removed between lines {i - 1} and {i}"
            )
            return Verification(False, i - 1, prev, f"line {i}: prev_sha256 does not match: {why}", i, len(tail))
        prev = hashlib.sha256(line).hexdigest()
    if expected_head is not None and prev != expected_head.strip().lower():
        msg = f"the last line's sha256 is {prev}, not the expected {expected_head}: the end was edited or cut off"
        return Verification(False, len(lines), prev, msg, len(lines), len(tail))
    return Verification(True, len(lines), prev, None, None, len(tail))


@dataclass(frozen=True)
class ChainReport:
    """One file of :func:`verify_chains`: its :class:`Verification` and the replica its lines name."""

    path: str
    result: Verification
    replica: str | None


def verify_chains(paths: list[str | os.PathLike[str]]) -> tuple[list[ChainReport], list[str]]:
    """Verify each replica's audit log (:func:`verify`) and that the files are one chain
    per replica: every line of a file names the same replica (or none), and no two files
    name the same one. Returns the per-file reports and the problems across files (empty
    when all is well; a broken chain is in its report).

    Raises:
        OSError: a file cannot be read.
    """
    reports: list[ChainReport] = []
    problems: list[str] = []
    owners: dict[str, str] = {}
    for p in paths:
        result = verify(p)
        names: set[str] = set()
        data = Path(p).read_bytes()
        for raw in data.split(b"\n")[:-1]:  # every complete line, verified or not
            try:
                rec = json.loads(raw)
            except ValueError:
                continue
            if isinstance(rec, dict) and rec.get("event") is None and isinstance(rec.get("replica"), str):
                names.add(rec["replica"])
        if len(names) > 1:
            problems.append(f"{p}: lines of several replicas ({', '.join(sorted(names))}) in one chain")
        replica = next(iter(names)) if len(names) == 1 else None
        if replica is not None:
            if replica in owners:
                problems.append(f"{p} and {owners[replica]} both hold replica {replica}'s lines")
            owners[replica] = str(p)
        reports.append(ChainReport(str(p), result, replica))
    return reports, problems
