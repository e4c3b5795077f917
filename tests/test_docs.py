"""The docs: the README stays a short front door with working links, and the generated recipe reference lists
every field of the Recipe model (the site itself is built with `mkdocs build --strict` by `make test`)."""

from __future__ import annotations

import importlib.util
import re
import typing
from pathlib import Path

from pydantic import BaseModel

from fastserve_cli.core.recipe import Recipe

ROOT = Path(__file__).resolve().parent.parent


def load_generator():
    spec = importlib.util.spec_from_file_location("recipe_reference", ROOT / "docs" / "hooks" / "recipe_reference.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def all_keys(model: type[BaseModel], prefix: str = "") -> list[str]:
    generator = load_generator()
    keys = []
    for name, field in model.model_fields.items():
        key = f"{prefix}{name}"
        keys.append(key)
        for sub in generator._models_in(field.annotation):
            many = typing.get_origin(field.annotation) in (list, dict)
            keys.extend(all_keys(sub, f"{key}[]." if many else f"{key}."))
    return keys


def test_readme_is_short_and_its_links_resolve():
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    assert len(text.splitlines()) <= 300
    targets = re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", text)
    local = [t for t in targets if "://" not in t]
    assert local, "the README links to the docs pages"
    missing = [t for t in local if not (ROOT / t).exists()]
    assert missing == []


def test_recipe_reference_lists_every_field_with_its_default():
    page = load_generator().render()
    keys = all_keys(Recipe)
    for key in keys:
        assert f"| `{key}` |" in page or f"## `{key}`" in page, key  # a top-level section is a heading
    assert '`"skip-join-mlfq"`' in page  # a default, rendered as JSON
    assert "**required**" in page  # VariantConfig.name has no default
