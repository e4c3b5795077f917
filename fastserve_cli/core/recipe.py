"""Typed recipes: one pydantic model per section (recipe_build.py, recipe_ship.py), unknown keys rejected
with a suggestion.

A recipe is YAML; relative paths resolve against the recipe file, `{stdlib}` expands to the running
Python's standard library directory, and `--set a.b=c` overrides are applied before validation so
they are typed and checked exactly like keys in the file.
"""

from __future__ import annotations

import difflib
import sysconfig
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, Field, ValidationError

from fastserve_cli.core.errors import UserError
from fastserve_cli.core.recipe_build import (  # noqa: F401 (the sections are imported from here)
    CleanConfig,
    DataConfig,
    DeepSpeedConfig,
    LoraConfig,
    ModelConfig,
    NearDedupConfig,
    Section,
    TokenizerConfig,
    TrainConfig,
)
from fastserve_cli.core.recipe_ship import (  # noqa: F401
    AutoscalingConfig,
    EvalConfig,
    EvalSourceConfig,
    ExportConfig,
    GatesConfig,
    OptimizeConfig,
    ServeConfig,
    VariantConfig,
)

PATH_VARIABLES = {"stdlib": lambda: sysconfig.get_paths()["stdlib"]}


class Recipe(Section):
    name: str = "run"
    run_dir: str | None = Field(
        None,
        description="Run directory (relative to the recipe file); ./runs/<name> under the current directory when unset.",
    )
    seed: int = 42
    data: DataConfig = Field(default_factory=DataConfig)
    tokenizer: TokenizerConfig = Field(default_factory=TokenizerConfig)
    model: ModelConfig = Field(default_factory=ModelConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    optimize: OptimizeConfig = Field(default_factory=OptimizeConfig)
    export: ExportConfig = Field(default_factory=ExportConfig)
    serve: ServeConfig = Field(default_factory=ServeConfig)
    eval: EvalConfig = Field(default_factory=EvalConfig)
    gates: GatesConfig = Field(default_factory=GatesConfig)

    def section_dump(self, *names: str) -> dict[str, Any]:
        """JSON-able dump of some top-level keys, used for stage fingerprints."""
        return {
            n: (
                getattr(self, n).model_dump(mode="json")
                if isinstance(getattr(self, n), BaseModel)
                else getattr(self, n)
            )
            for n in names
        }


# ---------------------------------------------------------------- loading


def expand_variables(text: str) -> str:
    for name, value in PATH_VARIABLES.items():
        text = text.replace("{" + name + "}", value())
    return text


def _resolve(base: Path, value: str | None) -> str | None:
    if value is None:
        return None
    path = Path(expand_variables(value)).expanduser()
    return str(path if path.is_absolute() else (base / path).resolve())


def resolve_paths(recipe: Recipe, base: Path) -> Recipe:
    """Make every path absolute relative to the recipe's directory."""
    recipe.data.paths = [_resolve(base, p) for p in recipe.data.paths]  # type: ignore[misc]
    recipe.tokenizer.path = _resolve(base, recipe.tokenizer.path)
    recipe.model.pretrained = _resolve(base, recipe.model.pretrained)
    recipe.eval.tasks = [
        _resolve(base, t) if t.endswith((".yaml", ".yml")) or "/" in t else t for t in recipe.eval.tasks
    ]
    recipe.run_dir = _resolve(base, recipe.run_dir) if recipe.run_dir else str(Path("runs", recipe.name).resolve())
    return recipe


def _field_names(loc: tuple[Any, ...]) -> list[str]:
    """Valid keys of the model reached by following `loc` from Recipe (for did-you-mean)."""
    model: Any = Recipe
    for part in loc:
        if isinstance(part, int):
            continue
        field = getattr(model, "model_fields", {}).get(part)
        if field is None:
            break
        annotation = field.annotation
        candidates = [annotation, *getattr(annotation, "__args__", ())]
        for candidate in candidates:
            args = getattr(candidate, "__args__", ())
            for c in (candidate, *args):
                if isinstance(c, type) and issubclass(c, BaseModel):
                    model = c
                    break
            else:
                continue
            break
        else:
            return []
    return list(getattr(model, "model_fields", {}))


def format_validation_error(err: ValidationError, origin: str) -> str:
    """One line per problem: `section.key: what is wrong, how to fix it`."""
    lines = []
    for item in err.errors():
        loc = tuple(item["loc"])
        path = ".".join(str(p) for p in loc) or "(recipe)"
        if item["type"] == "extra_forbidden":
            valid = _field_names(loc[:-1])
            close = difflib.get_close_matches(str(loc[-1]), valid, n=1, cutoff=0.5)
            hint = f"did you mean {close[0]}?" if close else f"valid keys: {', '.join(valid)}"
            lines.append(f"{path}: unknown key, {hint}")
        else:
            message = item["msg"].removeprefix("Value error, ")
            got = item.get("input")
            shown = "" if isinstance(got, (dict, list)) or got is None else f" (got {got!r})"
            lines.append(f"{path}: {message}{shown}")
    first = lines[0]
    more = f" (and {len(lines) - 1} more problem{'s' if len(lines) > 2 else ''})" if len(lines) > 1 else ""
    return f"{origin}: {first}{more}"


def apply_override(raw: dict[str, Any], override: str) -> None:
    """Apply one `a.b=c` override to the raw recipe mapping; the value is parsed as YAML."""
    if "=" not in override:
        raise UserError(f"--set {override!r}: expected KEY=VALUE, e.g. --set train.learning_rate=3e-4")
    key, _, value = override.partition("=")
    parts = [p for p in key.strip().split(".") if p]
    if not parts:
        raise UserError(f"--set {override!r}: empty key, e.g. --set train.max_steps=100")
    node = raw
    for i, part in enumerate(parts[:-1]):
        child = node.get(part)
        if child is None:
            child = node[part] = {}
        if not isinstance(child, dict):
            raise UserError(f"--set {override!r}: {'.'.join(parts[: i + 1])} is not a section")
        node = child
    try:
        node[parts[-1]] = yaml.safe_load(value) if value.strip() else None
    except yaml.YAMLError:
        node[parts[-1]] = value


def validate_recipe(raw: dict[str, Any], origin: str) -> Recipe:
    try:
        return Recipe.model_validate(raw)
    except ValidationError as err:
        raise UserError(format_validation_error(err, origin)) from None


def read_yaml(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise UserError(f"{path}: recipe file not found; pass the path of a recipe YAML (see recipes/quickstart.yaml)")
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark else ""
        raise UserError(f"{path}:{where} is not valid YAML ({getattr(err, 'problem', err)}); fix the syntax") from None
    except UnicodeDecodeError:
        raise UserError(f"{path}: recipe is not valid UTF-8 text") from None
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise UserError(
            f"{path}: a recipe must be a mapping of sections (data:, train:, ...), got {type(raw).__name__}"
        )
    return raw


def load_recipe(path: str | Path, overrides: list[str] | tuple[str, ...] = ()) -> Recipe:
    """Read, override, validate and resolve a recipe file."""
    path = Path(path)
    raw = read_yaml(path)
    raw.setdefault("name", path.stem)
    for override in overrides:
        apply_override(raw, override)
    origin = f"{path.name}" + (" with --set" if overrides else "")
    recipe = validate_recipe(raw, origin)
    return resolve_paths(recipe, path.resolve().parent)


def dump_recipe(recipe: Recipe) -> str:
    return yaml.safe_dump(recipe.model_dump(mode="json"), sort_keys=False)


def recipe_schema() -> dict[str, Any]:
    return Recipe.model_json_schema()
