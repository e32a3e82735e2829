"""Config files with stages (progressive extension as one command): their schema, `--set` over them, and every
problem of every stage in one line. The stages runner (stages.py) runs what this returns.
"""

from __future__ import annotations

import difflib
import re
from pathlib import Path
from typing import Any

from pydantic import ValidationError, field_validator, model_validator

from longrope_search.config import Config, RopeFactors, Section, apply_overrides, check_length, from_dict, read_yaml
from longrope_search.errors import ConfigError


class ExportStage(Section):
    """A stage `{name: ..., export: {...}}`: the model of the stages before written as a Hugging Face directory, with
    the last search stage's factors (factors: run) or a baseline at `target` (the end of a baseline's route)."""

    factors: RopeFactors = "run"
    target: str | int | None = None  # a baseline's target (16x, 32k)

    _target = field_validator("target")(classmethod(lambda cls, v: v if v is None else check_length(v)))

    @model_validator(mode="after")
    def _combination(self) -> "ExportStage":
        if (self.target is None) != (self.factors == "run"):
            raise ValueError("an export stage sets factors: yarn (pi, ntk) with a target, or neither (the last search "
                             "stage's factors)")
        return self


STAGE_KEYS = ("model", "data", "search", "finetune", "export")  # what a stage may set; it runs in <output.dir>/<name>
FINETUNE_STAGE_KEYS = ("model", "finetune")  # a stage that sets finetune trains the model of the stage before
_STAGE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")


def _merge(base: dict[str, Any], update: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in update.items():
        out[key] = _merge(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


def stages_with_overrides(raw: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """`--set` on a config with stages: the shared sections, and every stage that sets the key itself
    (the command line wins over the file, stage settings included)."""
    raw = apply_overrides(raw, overrides)
    stages = raw.get("stages")
    if isinstance(stages, list):
        for i, stage in enumerate(stages):
            if not isinstance(stage, dict):
                continue
            mine = []
            for item in overrides:
                parts = item.partition("=")[0].strip().split(".")
                node: Any = stage
                for part in parts[:-1]:
                    node = node.get(part) if isinstance(node, dict) else None
                if isinstance(node, dict) and parts[-1] in node:
                    mine.append(item)
            stages[i] = apply_overrides(stage, mine)
    return raw


def has_stages(path: str | Path) -> bool:
    return "stages" in read_yaml(path)


def load_stages(path: str | Path, overrides: list[str] | None = None) -> tuple[Config, list[tuple[str, Config]]]:
    """A progressive config: shared sections plus `stages`, each a name and overrides of model/data/search.

    Returns the shared config (its output.dir is the pipeline's folder) and each stage's full config, in
    order. Every problem in every stage is reported at once, in one line.
    """
    raw = stages_with_overrides(read_yaml(path), overrides or [])
    stages = raw.pop("stages")
    shared = from_dict(raw, source=str(path))
    if not isinstance(stages, list) or not stages:
        raise ConfigError(f"{path}: stages must be a non-empty list of {{name: ..., search: {{...}}}} entries.")
    problems, names, out = [], set(), []
    for i, stage in enumerate(stages):
        where = f"stages[{i}]"
        if not isinstance(stage, dict):
            problems.append(f"{where}: must be a mapping with a name and model/data/search overrides")
            continue
        name = str(stage.get("name", ""))
        unknown = sorted(set(stage) - {"name", *STAGE_KEYS})
        if not _STAGE_NAME.match(name):
            problems.append(f"{where}.name: give each stage a folder-safe name (letters, digits, . _ -)")
        elif name in names:
            problems.append(f"{where}.name: {name!r} is used twice")
        names.add(name)
        for key in unknown:
            near = difflib.get_close_matches(key, STAGE_KEYS, n=1)
            hint = f"did you mean '{near[0]}'?" if near else f"a stage sets name, {', '.join(STAGE_KEYS)}"
            problems.append(f"{where}.{key}: unknown key ({hint}; output.dir is shared, each stage runs in a subfolder)")
        if stage_kind(stage) == "export":
            problems += _export_stage_problems(stages, i, where)
        elif is_finetune_stage(stage):
            problems += [f"{where}.{key}: a finetune stage trains the model of the stage before on finetune.source; "
                         f"it sets only {', '.join(FINETUNE_STAGE_KEYS)} (put {key} settings in the search stages)"
                         for key in sorted(set(stage) & set(STAGE_KEYS) - set(FINETUNE_STAGE_KEYS))]
            method = (_merge(raw, stage).get("finetune") or {}).get("factors", "run")  # a baseline needs no search first
            if method == "run" and i == 0:
                problems.append(f"{where}: a finetune stage trains the factors of the search stage before it; put a "
                                "search stage first (or set finetune.factors: yarn and a target)")
            elif method == "run" and stage_kind(stages[i - 1]) != "search":
                problems.append(f"{where}: the stage before is not a search stage; a fine-tune trains the factors of "
                                "a search stage (or set finetune.factors: yarn and a target)")
            if isinstance(stage.get("finetune"), dict) and "run" in stage["finetune"]:
                problems.append(f"{where}.finetune.run: a finetune stage trains the stage before it; drop run")
        merged = _merge(raw, {k: stage[k] for k in STAGE_KEYS if k in stage and k != "export"})
        try:
            out.append((name, from_dict(merged, source=where)))
        except ConfigError as exc:
            problems.append(str(exc))
    if problems:
        raise ConfigError(f"{path}: {'; '.join(problems)}")
    return shared, out


def _export_stage_problems(stages: list[Any], i: int, where: str) -> list[str]:
    """An export stage sets name and export only, after a stage whose model or factors it writes."""
    stage = stages[i]
    problems = [f"{where}.{key}: an export stage writes the model of the stages before; it sets only name and export"
                for key in sorted(set(stage) & set(STAGE_KEYS) - {"export"})]
    if not isinstance(stage.get("export"), dict):
        return problems + [f"{where}.export: a mapping ({{}} for the last search stage's factors, or factors: yarn "
                           "with a target)"]
    try:
        settings = ExportStage.model_validate(stage["export"])
    except ValidationError as exc:
        return problems + [f"{where}.export{''.join('.' + str(x) for x in e['loc'])}: "
                           f"{e['msg'].removeprefix('Value error, ')}" for e in exc.errors()]
    if i == 0 or (settings.factors == "run" and not any(stage_kind(s) == "search" for s in stages[:i])):
        problems.append(f"{where}: an export stage writes what the stages before it made; put it after them")
    return problems


def stage_kind(stage: Any) -> str:
    """search, finetune (the stage sets `finetune`, {} for the shared settings) or export (it sets `export`)."""
    if isinstance(stage, dict) and "export" in stage:
        return "export"
    return "finetune" if isinstance(stage, dict) and "finetune" in stage else "search"


def is_finetune_stage(stage: Any) -> bool:
    return stage_kind(stage) == "finetune"


def non_search_stages(path: str | Path) -> set[str]:
    """The names of a stages config's stages that do not search (fine-tunes and exports)."""
    stages = read_yaml(path).get("stages")
    return {str(s.get("name")) for s in stages if stage_kind(s) != "search"} if isinstance(stages, list) else set()
