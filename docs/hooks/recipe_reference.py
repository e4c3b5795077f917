"""Generate the recipe reference page from the pydantic `Recipe` model, so the docs cannot drift from the code.

Used two ways:
- as an MkDocs hook (`hooks:` in mkdocs.yml): `on_files` adds `recipe-reference.md` to the build, rendered
  from the installed `fastserve_cli.core.recipe.Recipe`; nothing is written into docs/;
- as a script: `python docs/hooks/recipe_reference.py [OUT.md]` prints (or writes) the same Markdown.

Every field of every section gets a row: key, type (with its bounds), default and description. A field
without a description shows only the rest; the section's docstring introduces each table.
"""

from __future__ import annotations

import enum
import inspect
import json
import sys
import types
import typing
from typing import Any

from pydantic import BaseModel
from pydantic.fields import FieldInfo

PAGE = "recipe-reference.md"

INTRO = """\
# Recipe reference

Generated from the pydantic model `fastserve_cli.core.recipe.Recipe` on every docs build
(`docs/hooks/recipe_reference.py`), so it lists exactly what the installed code accepts.
`fastserve recipe schema` prints the same schema as JSON; `fastserve recipe validate RECIPE` checks a file.
How recipes are written, overridden and resolved: [Recipes](recipes.md).

Every key has a default unless marked **required**. Unknown keys are rejected with the closest valid name.
"""

_BOUNDS = {"ge": "≥", "gt": ">", "le": "≤", "lt": "<"}


def _models_in(annotation: Any) -> list[type[BaseModel]]:
    """The BaseModel classes inside an annotation (`X`, `X | None`, `list[X]`, `list[X | Y]`), in order."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return [annotation]
    found: list[type[BaseModel]] = []
    for arg in typing.get_args(annotation):
        found += [m for m in _models_in(arg) if m not in found]
    return found


def _model_in(annotation: Any) -> type[BaseModel] | None:
    """The first BaseModel class inside an annotation, if any."""
    models = _models_in(annotation)
    return models[0] if models else None


def _type_name(annotation: Any) -> str:
    """A short, readable type: `int`, `"a" | "b"`, `list[str]`, `int | null`."""
    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    if annotation is type(None):
        return "null"
    if origin is typing.Literal:
        return " | ".join(json.dumps(a) for a in args)
    if origin in (typing.Union, types.UnionType):
        return " | ".join(_type_name(a) for a in args)
    if origin is not None:
        name = getattr(origin, "__name__", str(origin))
        return f"{name}[{', '.join(_type_name(a) for a in args)}]" if args else name
    if annotation is Any:
        return "any"
    if isinstance(annotation, type) and issubclass(annotation, enum.Enum):
        return " | ".join(json.dumps(m.value) for m in annotation)
    return getattr(annotation, "__name__", str(annotation))


def _bounds(field: FieldInfo) -> str:
    """Numeric and pattern constraints from the field's metadata, e.g. `≥ 1`, `> 0, < 0.5`."""
    parts = []
    for meta in field.metadata:
        for attr, symbol in _BOUNDS.items():
            value = getattr(meta, attr, None)
            if value is not None:
                parts.append(f"{symbol} {value}")
        pattern = getattr(meta, "pattern", None)
        if pattern:
            parts.append(f"matches `{pattern}`")
    return ", ".join(parts)


def _default(field: FieldInfo) -> str:
    if field.is_required():
        return "**required**"
    value = field.get_default(call_default_factory=True)
    if isinstance(value, BaseModel):
        return "(section)"
    if isinstance(value, enum.Enum):
        value = value.value
    return f"`{json.dumps(value, ensure_ascii=False)}`"


def _cell(text: str) -> str:
    """Table-safe text: outside code spans, escape pipes (they would end the cell) and `<`/`>` (raw HTML)."""
    parts = " ".join(text.split()).split("`")
    for i in range(0, len(parts), 2):  # even parts are outside code spans; pipes inside them are safe
        parts[i] = parts[i].replace("|", "\\|").replace("<", "&lt;").replace(">", "&gt;")
    return "`".join(parts)


def _doc(model: type[BaseModel]) -> str:
    doc = inspect.getdoc(model) or ""
    inherited = {inspect.getdoc(base) for base in model.__mro__[1:]}
    return "" if doc in inherited else _cell(doc)


def _row(key: str, field: FieldInfo, nested: list[tuple[str, str, type[BaseModel]]]) -> str:
    """One table row; a field holding sections links to their tables (queued in `nested`: heading, key, model)."""
    type_text = f"`{_type_name(field.annotation)}`"
    bounds = _bounds(field)
    if bounds:
        type_text += f" ({bounds})"
    description = field.description or ""
    models = _models_in(field.annotation)
    child = f"{key}[]" if typing.get_origin(field.annotation) in (list, dict) else key
    links = []
    for model in models:
        heading = child if len(models) == 1 else f"{child} ({model.__name__})"
        nested.append((heading, child, model))
        links.append(f"[`{heading}`](#{_anchor(heading)})")
    if links:
        description = (description + " " if description else "") + f"See {', '.join(links)}."
    return f"| `{key}` | {_cell(type_text)} | {_cell(_default(field))} | {_cell(description)} |"


def _table(rows: list[str]) -> list[str]:
    return ["| key | type | default | description |", "|---|---|---|---|", *rows, ""]


def _anchor(heading: str) -> str:
    """The id MkDocs' toc extension gives a heading: lower case, punctuation dropped, spaces to dashes."""
    return "".join(c for c in heading.lower() if c.isalnum() or c in "-_ ").replace(" ", "-")


def render() -> str:
    """The whole page as Markdown: top-level keys, then each section (nested sections right after their parent)."""
    from fastserve_cli.core.recipe import Recipe

    out = [INTRO, "## Top level\n"]
    plain = [name for name, field in Recipe.model_fields.items() if not _models_in(field.annotation)]
    out += _table([_row(name, Recipe.model_fields[name], []) for name in plain])
    sections = [(name, name, _model_in(f.annotation)) for name, f in Recipe.model_fields.items() if name not in plain]
    while sections:
        heading, prefix, model = sections.pop(0)
        out.append(f"## `{heading}`\n")
        doc = _doc(model)
        if doc:
            out.append(doc + "\n")
        nested: list[tuple[str, str, type[BaseModel]]] = []
        out += _table([_row(f"{prefix}.{name}", field, nested) for name, field in model.model_fields.items()])
        sections[0:0] = nested
    return "\n".join(out).rstrip() + "\n"


def on_files(files, config):  # MkDocs hook
    from mkdocs.structure.files import File

    files.append(File.generated(config, PAGE, content=render()))
    return files


if __name__ == "__main__":
    text = render()
    if len(sys.argv) > 1:
        with open(sys.argv[1], "w", encoding="utf-8") as handle:
            handle.write(text)
    else:
        sys.stdout.write(text)
