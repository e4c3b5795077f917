"""Recipe validation: unknown keys with suggestions, types, overrides, path resolution."""

from __future__ import annotations

import sysconfig
from pathlib import Path

import pytest

from fastserve_cli.core.errors import UserError
from fastserve_cli.core.recipe import Recipe, apply_override, dump_recipe, load_recipe, recipe_schema


def write(tmp_path: Path, text: str, name: str = "r.yaml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def test_ten_line_recipe_gets_defaults(tmp_path):
    recipe = load_recipe(write(tmp_path, "data:\n  paths: [corpus.txt]\n"))
    assert recipe.name == "r"
    assert recipe.train.learning_rate > 0 and recipe.data.block_size == 256
    assert recipe.data.paths == [str(tmp_path / "corpus.txt")]  # relative to the recipe file
    assert recipe.run_dir == str(Path("runs/r").resolve())


def test_unknown_key_suggests_closest(tmp_path):
    with pytest.raises(UserError, match=r"train\.learning_rat: unknown key, did you mean learning_rate\?"):
        load_recipe(write(tmp_path, "train:\n  learning_rat: 0.1\n"))


def test_unknown_section_suggests_closest(tmp_path):
    with pytest.raises(UserError, match=r"trian: unknown key, did you mean train\?"):
        load_recipe(write(tmp_path, "trian: {}\n"))


def test_nested_and_list_keys_get_suggestions(tmp_path):
    with pytest.raises(UserError, match=r"optimize\.variants\.0\.sparsty: unknown key, did you mean sparsity\?"):
        load_recipe(write(tmp_path, "optimize:\n  variants:\n  - {name: a, method: magnitude, sparsty: 0.5}\n"))


def test_wrong_type_names_field_and_value(tmp_path):
    with pytest.raises(UserError, match=r"train\.max_steps: .*integer.*'many'"):
        load_recipe(write(tmp_path, "train:\n  max_steps: many\n"))


def test_override_is_typed_by_schema(tmp_path):
    path = write(tmp_path, "train:\n  max_steps: 10\n")
    recipe = load_recipe(path, ["train.max_steps=25", "train.lora.r=4", "data.paths=[a.txt, b.txt]"])
    assert recipe.train.max_steps == 25 and recipe.train.lora.r == 4
    assert recipe.data.paths == [str(tmp_path / "a.txt"), str(tmp_path / "b.txt")]


@pytest.mark.parametrize(
    "override, message",
    [
        ("train.max_step=3", r"train\.max_step: unknown key, did you mean max_steps\?"),
        ("train.max_steps=abc", r"train\.max_steps: .*integer"),
        ("train.max_steps", r"expected KEY=VALUE"),
        ("train.max_steps.x=1", r"train\.max_steps is not a section"),
    ],
)
def test_bad_override(tmp_path, override, message):
    with pytest.raises(UserError, match=message):
        load_recipe(write(tmp_path, "train:\n  max_steps: 10\n"), [override])


def test_missing_and_invalid_files(tmp_path):
    with pytest.raises(UserError, match="recipe file not found"):
        load_recipe(tmp_path / "nope.yaml")
    with pytest.raises(UserError, match="not valid YAML"):
        load_recipe(write(tmp_path, "train: [unclosed\n"))
    with pytest.raises(UserError, match="must be a mapping"):
        load_recipe(write(tmp_path, "- a\n- b\n"))


def test_stdlib_variable_expands(tmp_path):
    recipe = load_recipe(write(tmp_path, "data:\n  paths: ['{stdlib}/json/*.py']\n"))
    assert recipe.data.paths == [sysconfig.get_paths()["stdlib"] + "/json/*.py"]


def test_cross_field_rules():
    with pytest.raises(Exception, match="messages_column"):
        Recipe.model_validate({"data": {"mode": "sft"}})
    with pytest.raises(Exception, match="unique"):
        Recipe.model_validate({"optimize": {"variants": [{"name": "a", "method": "dynamic_int8"}] * 2}})


def test_dump_round_trips(tmp_path):
    recipe = load_recipe(write(tmp_path, "train:\n  max_steps: 7\n"))
    again = load_recipe(write(tmp_path, dump_recipe(recipe), "again.yaml"))
    assert again.model_dump() == recipe.model_dump()


def test_schema_lists_every_section():
    schema = recipe_schema()
    assert {"data", "tokenizer", "model", "train", "optimize", "export", "serve", "gates"} <= set(schema["properties"])


def test_apply_override_creates_sections():
    raw: dict = {}
    apply_override(raw, "serve.port=9000")
    assert raw == {"serve": {"port": 9000}}
