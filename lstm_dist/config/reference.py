"""The configuration reference: docs/configuration.md's table of every setting, made from `schema.py` itself (each
field's type, default and the `#:` comment above it). `python -m lstm_dist.config --reference` prints
it; a test keeps the copy in docs/configuration.md in step."""

from __future__ import annotations

import inspect
from typing import Any, Literal, get_args, get_origin

from lstm_dist.config.schema import Config, is_section, leaf_fields, section_fields, value_at


def field_docs() -> dict[str, str]:
    """Dotted key -> the `#:` comment above the field where its section is declared (schema.py)."""
    docs: dict[str, str] = {}

    def walk(cls: type, prefix: str) -> None:
        lines = inspect.getsource(cls).splitlines()
        pending = ""
        for line in lines:
            s = line.strip()
            if s.startswith("#:"):
                pending = s[2:].strip()
                continue
            if ":" in s and not s.startswith(("class", "@", "#", "def", "return")) and pending:
                name = s.split(":", 1)[0].strip()
                docs[f"{prefix}{name}"] = pending
            pending = ""
        for name, tp in section_fields(cls).items():
            if is_section(tp):
                walk(tp, f"{prefix}{name}.")

    walk(Config, "")
    return docs


def _type_name(tp: Any) -> str:
    if get_origin(tp) is Literal:
        return " \\| ".join(f"`{a}`" for a in get_args(tp))
    return getattr(tp, "__name__", str(tp))


def reference_markdown() -> str:
    """The configuration reference as a Markdown table (docs/configuration.md holds a copy; a test compares)."""
    defaults = Config()
    rows = ["| key | type | default | what it does |", "| --- | --- | --- | --- |"]
    docs = field_docs()
    for key, tp in leaf_fields().items():
        value = value_at(defaults, key)
        shown = f"`{value}`" if value != "" else '`""`'
        rows.append(f"| `{key}` | {_type_name(tp)} | {shown} | {docs[key]} |")
    return "\n".join(rows) + "\n"
