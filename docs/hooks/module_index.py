"""MkDocs hook: the module index of the architecture page, generated from the code.

On the page that holds the marker ``<!-- module-index -->`` the marker is replaced by one
table per package of ``proxy`` and for ``adapters``: each module and the first paragraph of
its docstring. Sources are read with ``ast``, never imported, so the index follows the code
as modules are added, moved or renamed, and building the docs runs none of it.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path
from typing import Any

MARKER = "<!-- module-index -->"
REPO = Path(__file__).resolve().parents[2]


def _outside_md_reference(match: re.Match[str]) -> str:
    name = match.group(1)
    return match.group(0) if (REPO / name).is_file() or (REPO / "docs" / name).is_file() else ""


def _paragraph(text: str) -> str:
    """One docstring paragraph as one line of Markdown."""
    # A parenthetical that cites a Markdown file outside the repository says nothing here.
    text = re.sub(r"\s*(?<!\])\((?:[^()]*?\b)?([A-Za-z0-9_-]+\.md)\b[^()]*\)", _outside_md_reference, text)
    text = re.sub(r":(?:class|mod|func|data|attr|meth):`~?\.?([^`]+)`", r"`\1`", text)
    return " ".join(text.replace("``", "`").split())


def _docstring(path: Path) -> list[str]:
    try:
        doc = ast.get_docstring(ast.parse(path.read_text(encoding="utf-8"))) or ""
    except (OSError, SyntaxError):
        return []
    return [_paragraph(p) for p in doc.split("\n\n") if p.strip()]


def _summary(path: Path) -> str:
    """The first paragraph of a module's docstring, as one Markdown table cell."""
    paragraphs = _docstring(path)
    if not paragraphs:
        return ""
    first = paragraphs[0]
    if first.endswith(":"):  # a paragraph that introduces a list or an example
        first = first[:-1].rstrip() + "."
    parts = re.split(r"(`[^`]*`)", first)  # the tables extension leaves pipes in code spans alone
    return "".join(p if p.startswith("`") else p.replace("|", "\\|") for p in parts)


def _dotted(path: Path) -> str:
    parts = path.relative_to(REPO).with_suffix("").parts
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def _table(modules: list[Path]) -> str:
    rows = ["| module | what it holds |", "|---|---|"]
    rows += [f"| `{_dotted(m)}` | {_summary(m)} |" for m in modules]
    return "\n".join(rows)


def index() -> str:
    """The whole generated index, as Markdown."""
    sections = []
    top = sorted(p for p in (REPO / "proxy").glob("*.py") if p.name != "__init__.py")
    if top:
        sections.append("### `proxy` (top-level modules)\n\n" + _table(top))
    for package in sorted(p.parent for p in (REPO / "proxy").glob("*/__init__.py")):
        modules = sorted(m for m in package.rglob("*.py") if m.name != "__init__.py")
        intro = "".join(f"{p}\n\n" for p in _docstring(package / "__init__.py"))
        sections.append(f"### `{_dotted(package)}`\n\n{intro}" + (_table(modules) if modules else ""))
    adapters = sorted(p for p in (REPO / "adapters").glob("*.py") if p.name != "__init__.py")
    intro = "".join(f"{p}\n\n" for p in _docstring(REPO / "adapters" / "__init__.py"))
    sections.append(f"### `adapters`\n\n{intro}" + _table(adapters))
    return "\n\n".join(sections)


def on_page_markdown(markdown: str, page: Any, config: Any, files: Any) -> str:
    if MARKER not in markdown:
        return markdown
    return markdown.replace(MARKER, index())
