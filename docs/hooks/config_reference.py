"""MkDocs hook: the configuration reference, generated from the pydantic models of
``proxy.config``.

On the page that holds the marker ``<!-- config-reference -->`` the marker is replaced by
one Markdown table per TOML table (``[server]``, ``[[server.keys]]``, ``[models."NAME"]``):
key, type (with its bounds), default and description. Types, defaults and bounds come from
pydantic's ``model_fields``; descriptions from the field's attribute docstring (read with
``ast``, as the models do not set ``use_attribute_docstrings``) or its
``Field(description=...)``. A few fields have no docstring yet: :data:`FALLBACK` describes
them, and a docstring added in ``proxy/config.py`` takes precedence.

The TOML tables are found by walking :class:`proxy.config.Config`: a field whose type is a
model is a table, ``dict[str, Model]`` a table per name, ``tuple[Model, ...]`` an array of
tables. A model class that ``Config`` does not reach is listed at the end under its class
name, so that nothing in ``proxy.config`` is left out.
"""

from __future__ import annotations

import ast
import importlib
import inspect
import re
import types
import typing
from pathlib import Path
from typing import Any

MARKER = "<!-- config-reference -->"
REPO = Path(__file__).resolve().parents[2]

#: Descriptions for fields that ``proxy/config.py`` leaves undocumented (a docstring there wins).
FALLBACK: dict[tuple[str, str], str] = {
    ("Config", "server"): "The `[server]` table.",
    ("Config", "models"): 'The served models, one `[models."NAME"]` table each; NAME is the `model` clients ask for.',
    ("ServerConfig", "port"): "Listen port (0 picks a free one).",
    ("ServerConfig", "max_body_bytes"): "Largest request body accepted.",
    ("ModelConfig", "backend"): "The kind of remote: see [Backends and providers](backends.md).",
    (
        "ModelConfig",
        "base_url",
    ): "HTTP backends (required): the upstream's OpenAI-compatible base URL, ending in `/v1`.",
    ("ModelConfig", "api_key_env"): (
        "HTTP backends: the environment variable that holds the upstream's API key (it must be set "
        "when the server starts; the key is never logged)."
    ),
    ("ModelConfig", "eot_tokens"): (
        "HTTP backends: the token strings that end a turn in the upstream's logprobs "
        "(default: the common ones, such as `<|im_end|>`, `<end_of_turn>`, `<|eot_id|>`)."
    ),
    ("ModelConfig", "connect_timeout"): "HTTP backends: seconds to connect to the upstream.",
    ("ModelConfig", "read_timeout"): "HTTP backends: seconds to wait for the upstream's answer.",
    ("ModelConfig", "retry_attempts"): "HTTP backends: most attempts per upstream call (retries included).",
    ("ModelConfig", "retry_seconds"): "HTTP backends: most seconds spent retrying one upstream call.",
    ("ModelConfig", "gguf"): "llama-inprocess (required): a GGUF path or a packaged model name.",
    ("ModelConfig", "n_ctx"): "llama-inprocess: the context length in tokens.",
    ("ModelConfig", "pair"): "The local pair's base model B: a folder, a `.gguf` path or a packaged name.",
}


def _attribute_docstrings(cls: type) -> dict[str, str]:
    """``{field: docstring}`` for the string literals that follow annotated assignments."""
    source = Path(inspect.getsourcefile(cls) or "").read_text(encoding="utf-8")
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.ClassDef) and node.name == cls.__name__:
            docs: dict[str, str] = {}
            body = node.body
            for stmt, nxt in zip(body, body[1:], strict=False):
                if (
                    isinstance(stmt, ast.AnnAssign)
                    and isinstance(stmt.target, ast.Name)
                    and isinstance(nxt, ast.Expr)
                    and isinstance(nxt.value, ast.Constant)
                    and isinstance(nxt.value.value, str)
                ):
                    docs[stmt.target.id] = inspect.cleandoc(nxt.value.value)
            return docs
    return {}


def _outside_md_reference(match: re.Match[str]) -> str:
    """Drop a parenthetical that cites a Markdown file which is in neither the repository's
    root nor the docs."""
    name = match.group(1)
    return match.group(0) if (REPO / name).is_file() or (REPO / "docs" / name).is_file() else ""


def _markdown(text: str) -> str:
    """A docstring as one table cell: reST literals and roles as code, one line, pipes escaped.
    A parenthetical citing a Markdown file outside the repository is left out (not a link's
    target: those follow a ``]``)."""
    text = re.sub(r"\s*(?<!\])\((?:[^()]*?\b)?([A-Za-z0-9_-]+\.md)\b[^()]*\)", _outside_md_reference, text)
    text = re.sub(r":(?:class|mod|func|data|attr|meth):`~?([^`]+)`", r"`\1`", text)
    text = text.replace("``", "`")
    return _escape_pipes(" ".join(text.split()))


def _escape_pipes(text: str) -> str:
    """Escape ``|`` for a table cell, outside code spans (the tables extension leaves those alone)."""
    parts = re.split(r"(`[^`]*`)", text)
    return "".join(p if p.startswith("`") else p.replace("|", "\\|") for p in parts)


def _bounds(metadata: list[Any]) -> str:
    low: tuple[str, float] | None = None
    high: tuple[str, float] | None = None
    parts: list[str] = []
    for m in metadata:
        for attr, sign in (("ge", "≥"), ("gt", ">"), ("le", "≤"), ("lt", "<")):
            value = getattr(m, attr, None)
            if value is not None:
                if sign in ("≥", ">"):
                    low = (sign, value)
                else:
                    high = (sign, value)
        if getattr(m, "min_length", None) is not None:
            parts.append(f"length ≥ {m.min_length}")
        if getattr(m, "max_length", None) is not None:
            parts.append(f"length ≤ {m.max_length}")
        if getattr(m, "pattern", None):
            parts.append(f"matches `{m.pattern}`")
    if low and high and low[0] == "≥" and high[0] == "≤":
        parts.insert(0, f"{_number(low[1])} to {_number(high[1])}")
    else:
        parts[:0] = [f"{b[0]} {_number(b[1])}" for b in (low, high) if b is not None]
    return ", ".join(parts)


def _number(value: float) -> str:
    return str(int(value)) if float(value).is_integer() else str(value)


def _type(annotation: Any) -> str:
    from pydantic import BaseModel

    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    if origin is typing.Literal:
        return " \\| ".join(f'`"{a}"`' if isinstance(a, str) else f"`{a}`" for a in args)
    if origin in (typing.Union, types.UnionType):
        # None is the "unset" of the default column
        return " or ".join(_type(a) for a in args if a is not type(None))
    if origin is typing.Annotated:
        inner, *extra = args
        bounds = _bounds([m for e in extra for m in getattr(e, "metadata", [e])])
        return _type(inner) + (f" ({bounds})" if bounds else "")
    if origin is tuple:
        item = args[0]
        if isinstance(item, type) and issubclass(item, BaseModel):
            return "array of tables"
        return f"array of {_type(item)}s"
    if origin is dict:
        return "one table per name"
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return "table"
    names = {str: "string", int: "integer", float: "number", bool: "boolean"}
    return names.get(annotation, getattr(annotation, "__name__", str(annotation)))


def _default(field: Any) -> str:
    from pydantic import BaseModel
    from pydantic_core import PydanticUndefined

    value = field.default
    if value is PydanticUndefined:
        return "*required*" if field.default_factory is None else "(computed)"
    if isinstance(value, BaseModel):
        return "(its defaults)"
    return _toml(value)


def _toml(value: Any) -> str:
    if value is None:
        return "unset"
    if isinstance(value, bool):
        return f"`{str(value).lower()}`"
    if isinstance(value, str):
        return f'`"{value}"`'
    if isinstance(value, tuple | list):
        return "`[" + ", ".join(f'"{v}"' if isinstance(v, str) else str(v) for v in value) + "]`"
    if isinstance(value, int) and value >= 1024 * 1024 and value % (1024 * 1024) == 0:
        return f"`{value}` ({value // (1024 * 1024)} MiB)"
    return f"`{value}`"


def _tables(root: type) -> list[tuple[str, type]]:
    """``(TOML heading, model class)`` for every table reachable from ``root``, depth first."""
    from pydantic import BaseModel

    found: list[tuple[str, type]] = []

    def visit(cls: type, heading: str) -> None:
        found.append((heading, cls))
        prefix = "" if heading == "(top level)" else heading.strip("[]") + "."
        for name, field in cls.model_fields.items():  # type: ignore[attr-defined]
            annotation = field.annotation
            origin, args = typing.get_origin(annotation), typing.get_args(annotation)
            if isinstance(annotation, type) and issubclass(annotation, BaseModel):
                visit(annotation, f"[{prefix}{name}]")
            elif origin is dict and isinstance(args[1], type) and issubclass(args[1], BaseModel):
                visit(args[1], f'[{prefix}{name}."NAME"]')
            elif origin is tuple and isinstance(args[0], type) and issubclass(args[0], BaseModel):
                visit(args[0], f"[[{prefix}{name}]]")

    visit(root, "(top level)")
    return found


def _table(cls: type) -> str:
    docs = _attribute_docstrings(cls)
    rows = ["| key | type | default | description |", "|---|---|---|---|"]
    for name, field in cls.model_fields.items():  # type: ignore[attr-defined]
        description = docs.get(name) or field.description or FALLBACK.get((cls.__name__, name), "")
        kind = _type(field.annotation)
        bounds = _bounds(field.metadata)
        if bounds:
            kind += f" ({bounds})"
        rows.append(f"| `{name}` | {kind} | {_default(field)} | {_markdown(description)} |")
    return "\n".join(rows)


def reference() -> str:
    """The whole generated reference, as Markdown."""
    from pydantic import BaseModel

    import proxy.config as config

    config = importlib.reload(config)  # `mkdocs serve` rebuilds in one process: read the current file
    sections = []
    seen: set[type] = set()
    for heading, cls in _tables(config.Config):
        seen.add(cls)
        title = "Top level" if heading == "(top level)" else f"`{heading}`"
        intro = (
            _markdown(inspect.cleandoc(cls.__doc__ or "")) if cls.__doc__ and cls.__doc__ != BaseModel.__doc__ else ""
        )
        sections.append(f"### {title}\n\n" + (f"{intro}\n\n" if intro else "") + _table(cls))
    for _, cls in inspect.getmembers(config, inspect.isclass):
        if (
            issubclass(cls, BaseModel)
            and cls is not BaseModel
            and cls.__module__ == config.__name__
            and cls not in seen
        ):
            sections.append(f"### `{cls.__name__}`\n\n" + _table(cls))
    return "\n\n".join(sections)


def on_page_markdown(markdown: str, page: Any, config: Any, files: Any) -> str:
    if MARKER not in markdown:
        return markdown
    return markdown.replace(MARKER, reference())
