"""The declared shape of the YAMLs ``lits run``, ``lits study`` and ``lits sweep`` read, checked with pydantic.

``read_yaml`` reads a file (malformed YAML: one line with the file and the line); ``validate`` checks the value
against a schema (``Experiment``, ``Study``, ``Sweep``) and turns pydantic's report into one ``ConfigError`` line:
``<file>: <key path>: expected <type>, got <value>``, or, for a key the schema does not have, a "did you mean" hint.
Types are strict: ``seeds: "10"`` or ``args: "--x=1"`` are refused, not coerced.
"""

from __future__ import annotations

import difflib
import re
from pathlib import Path
from typing import Annotated, Any, Literal, Optional, Union, get_args

import yaml
from pydantic import AfterValidator, BaseModel, ConfigDict, Field, ValidationError

from datamodules.errors import ConfigError
from experiments.commands.names import LABEL, LABEL_RULE, NAME, NAME_RULE


def _matching(pattern, rule: str, what: str):
    def check(value: str) -> str:
        if not pattern.fullmatch(value):
            raise ValueError(f"{what} has only {rule}")
        return value
    return AfterValidator(check)


Name = Annotated[str, _matching(NAME, NAME_RULE, "a name")]
Label = Annotated[str, _matching(LABEL, LABEL_RULE, "a model label")]
Strings = Union[str, list[str]]  # one, or a list


class Schema(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)


class Stage(Schema):
    name: Name
    config: Strings = []
    args: list[str] = []
    weights_from: Optional[str] = None
    weights_arg: Optional[str] = None
    weights: dict[str, Strings] = {}


class Experiment(Schema):
    """A ``lits run`` file (experiments/commands/stages.py)."""

    name: Optional[Name] = None
    stages: list[Stage]


class Study(Schema):
    """A ``lits study`` file (experiments/commands/study_config.py)."""

    name: Optional[Name] = None
    models: dict[Label, str]
    baseline: Optional[str] = None
    seeds: Union[Annotated[int, Field(ge=1)], list[Annotated[int, Field(ge=0)]]] = 3
    # per_seed: each seed draws its own split; fixed: one split (drawn by split_seed) for every seed, as the papers ran
    split: Literal["per_seed", "fixed"] = "per_seed"
    split_seed: Optional[Annotated[int, Field(ge=0)]] = None
    args: list[str] = []
    inc: bool = False
    table: str = "segmentation"
    rows: Optional[dict[Label, str]] = None
    share_stages: bool = False
    jobs: Optional[int] = None
    runs_per_device: Optional[int] = None
    launcher: Optional[str] = None  # local (this machine), slurm or submitit_local: experiments/commands/study_slurm.py
    slurm: dict[str, Any] = {}  # the jobs' resources when launched on SLURM


class Sweep(Schema):
    """The top level of a W&B sweep YAML (the keys of the sweep engine's schema, ``sweeps/config/schema.json``); the
    engine's own schema then checks what lies inside them (``sweep_engine.load_sweep``)."""

    method: str
    parameters: dict[str, dict[str, Any]]
    metric: Optional[dict[str, Any]] = None
    command: list[Any] = []
    program: Optional[str] = None
    early_terminate: Optional[dict[str, Any]] = None
    name: Optional[str] = None
    description: Optional[str] = None
    project: Optional[str] = None
    entity: Optional[str] = None
    run_cap: Optional[int] = None
    controller: Optional[dict[str, Any]] = None
    # W&B Launch's keys, unused offline but valid for `wandb sweep`
    apiVersion: Optional[Any] = None
    kind: Optional[Any] = None
    job: Optional[Any] = None
    image_uri: Optional[Any] = None
    metrics: Optional[Any] = None
    scheduler: Optional[Any] = None


def read_yaml(path: str | Path):
    """The YAML value of ``path``; a malformed file is one ConfigError line naming the file and the line."""
    path = Path(path)
    try:
        return yaml.safe_load(path.read_text())
    except yaml.YAMLError as error:
        mark = getattr(error, "problem_mark", None)
        where = f"{path}:{mark.line + 1}" if mark is not None else str(path)
        problem = getattr(error, "problem", None) or str(error).splitlines()[0]
        raise ConfigError(f"{where}: not valid YAML ({problem})") from None


def validate(schema: type[Schema], value, path: str | Path) -> Schema:
    """``value`` checked against ``schema``; the first mistake as one ConfigError line naming ``path`` and the key."""
    try:
        return schema.model_validate(value)
    except ValidationError as error:
        raise ConfigError(f"{path}: {describe(error, schema)}") from None


# pydantic's error types -> what was expected, in words
EXPECTED = {"int_type": "an integer", "int_parsing": "an integer", "int_from_float": "an integer", "string_type": "a string",
            "list_type": "a list", "dict_type": "a mapping", "model_type": "a mapping", "model_attributes_type": "a mapping",
            "bool_type": "true or false", "float_type": "a number", "greater_than_equal": "a number >= {ge}",
            "literal_error": "{expected}"}


def describe(error: ValidationError, schema: type[Schema]) -> str:
    """The deepest mistake of pydantic's report as ``<key path>: expected <type>, got <value>``; the alternatives of a
    ``Union`` (``seeds: 3`` or ``seeds: [0, 1]``) are reported at that key as ``expected A or B``."""
    found: dict[str, list[dict]] = {}
    depth: dict[str, int] = {}
    for item in error.errors():
        key = key_path(item["loc"])
        found.setdefault(key, []).append(item)
        depth[key] = sum(not UNION_TAG.fullmatch(str(part)) for part in item["loc"])
    key = max(found, key=lambda k: (depth[k], -list(found).index(k)))  # the deepest; of equals, pydantic's first
    items = found[key]
    first = items[0]
    where = f"{key}: " if key else ""
    if first["type"] == "missing":
        parent = key_path(first["loc"][:-1])
        return f"{parent + ': ' if parent else ''}missing key {str(first['loc'][-1])!r}"
    if first["type"] == "extra_forbidden":
        name = str(first["loc"][-1])
        hint = difflib.get_close_matches(name, field_names(schema), n=1)
        parent = key_path(first["loc"][:-1])
        where = f"{parent}: " if parent else ""
        return f"{where}unknown key {name!r}" + (f" (did you mean {hint[0]!r}?)" if hint else "")
    if first["type"] == "value_error":
        return f"{where}{first['msg'].removeprefix('Value error, ')}; got {shown(first['input'])}"
    expected = " or ".join(dict.fromkeys(EXPECTED.get(i["type"], i["msg"]).format(**i.get("ctx", {})) for i in items))
    return f"{where}expected {expected}, got {shown(first['input'])}"


# the names pydantic gives a Union's alternatives in an error's location: `int`, `list[int]`, `constrained-int`, ...
UNION_TAG = re.compile(r"(int|str|bool|float|(list|dict)\[.*\]|constrained-\w+|function-[\w-]+\[.*\])")


def key_path(loc: tuple) -> str:
    """``('stages', 0, 'args')`` -> ``stages[0].args``, without the names of a Union's alternatives; a mapping's keys
    are plain segments (``models.U-Net``)."""
    segments: list[str] = []
    for part in loc:
        if isinstance(part, int) and segments:
            segments[-1] += f"[{part}]"
        elif part == "[key]":  # a mapping's key itself is wrong: the error names the mapping, the value shows the key
            segments.pop()
        elif not UNION_TAG.fullmatch(str(part)):
            segments.append(str(part))
    return ".".join(segments)


def field_names(schema: type[BaseModel]) -> list[str]:
    """Every key the schema and the schemas inside it know."""
    names: set[str] = set()
    for field in schema.model_fields.values():
        names.add(field.alias or "")
        names |= set(schema.model_fields)
        names |= {name for model in _models_in(field.annotation) for name in field_names(model)}
    return sorted(n for n in names if n)


def _models_in(annotation) -> list[type[BaseModel]]:
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return [annotation]
    return [m for arg in get_args(annotation) for m in _models_in(arg)]


def shown(value) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."
