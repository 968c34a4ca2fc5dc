"""``deltaproxy verify-log`` (the request log's hash chain) and ``deltaproxy hash-key`` (a
client key and its ``[[server.keys]]`` entry)."""

from __future__ import annotations

import argparse
import hashlib
import json
import secrets
import sys

from pydantic import ValidationError

from proxy.config import ClientKey
from proxy.gateway.request_log import verify, verify_chains


def verify_log(args: argparse.Namespace) -> int:
    """0 when every chain verifies, 1 when one is broken or the files are not one chain per
    replica (each problem on stderr), 2 for ``--head`` with several files."""
    files = list(args.file)
    if args.head is not None and len(files) > 1:
        print("deltaproxy: verify-log: --head names the end of one chain; give one file with it", file=sys.stderr)
        return 2
    if len(files) == 1:
        return _verify_one(files[0], args.head)
    reports, problems = verify_chains(files)
    bad = False
    for r in reports:
        who = f"replica {r.replica}" if r.replica else "no replica named"
        if r.result.incomplete_tail_bytes:
            print(
                f"note: {r.path}: {r.result.incomplete_tail_bytes} bytes after the last newline are not part of the chain",
                file=sys.stderr,
            )
        if r.result.ok:
            print(f"ok: {r.path}: {r.result.lines} lines ({who}), last line sha256 {r.result.head}")
        else:
            bad = True
            print(
                f"deltaproxy: verify-log: {r.path}: {r.result.error} ({r.result.lines} lines verify)", file=sys.stderr
            )
    for p in problems:
        print(f"deltaproxy: verify-log: {p}", file=sys.stderr)
    return 1 if bad or problems else 0


def _verify_one(path: str, head: str | None) -> int:
    result = verify(path, expected_head=head)
    if result.incomplete_tail_bytes:
        print(
            f"note: {result.incomplete_tail_bytes} bytes after the last newline (a write cut off by a crash) "
            "are not part of the chain",
            file=sys.stderr,
        )
    if not result.ok:
        print(f"deltaproxy: verify-log: {path}: {result.error} ({result.lines} lines verify)", file=sys.stderr)
        return 1
    print(f"ok: {result.lines} lines, last line sha256 {result.head}")
    return 0


def hash_key(args: argparse.Namespace) -> int:
    """Prints a new key (once) and the TOML entry with its SHA-256; 2 on a bad id or empty stdin."""
    if args.stdin:
        key = sys.stdin.readline().strip()
        if not key:
            print("deltaproxy: hash-key: no key on stdin", file=sys.stderr)
            return 2
    else:
        key = "dp-" + secrets.token_urlsafe(32)
    models = tuple(m.strip() for m in args.models.split(",") if m.strip()) or ("*",)
    try:
        entry = ClientKey(id=args.id, sha256=hashlib.sha256(key.encode()).hexdigest(), models=models)
    except ValidationError as exc:
        print(f"deltaproxy: hash-key: {exc.errors(include_url=False)[0]['msg']}", file=sys.stderr)
        return 2
    if not args.stdin:
        print(f"# the key (shown once; give it to the client): {key}")
    print("[[server.keys]]")  # JSON strings are valid TOML basic strings
    print(f"id = {json.dumps(entry.id)}")
    print(f"sha256 = {json.dumps(entry.sha256)}")
    print("models = [" + ", ".join(json.dumps(m) for m in entry.models) + "]")
    return 0
