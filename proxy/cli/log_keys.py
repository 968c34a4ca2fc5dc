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
from proxy.gateway.request_log import verify


def verify_log(args: argparse.Namespace) -> int:
    """0 when the chain verifies, 1 when it is broken (the first bad line on stderr)."""
    result = verify(args.file, expected_head=args.head)
    if result.incomplete_tail_bytes:
        print(
            f"note: {result.incomplete_tail_bytes} bytes after the last newline (a write cut off by a crash) "
            "are not part of the chain",
            file=sys.stderr,
        )
    if not result.ok:
        print(f"deltaproxy: verify-log: {args.file}: {result.error} ({result.lines} lines verify)", file=sys.stderr)
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
