"""Recipes: the settings an upstream script fixed, shipped as data.

One YAML file per (method, benchmark or order group, model family) in this folder. A recipe
holds run settings (`lr`, `epochs`, `batch_size`, `grad_accum`, …), method options
(`method.KEY`) and `task_overrides`: values for some stages only, by task name (`MNLI`) or by
position (`stage 1`, `stages 2-4`, `stages 2-`). `dealcl run --recipe NAME` applies one
under the user's own config file, flags and overrides; `--recipe upstream` picks the one that
fits the method, the benchmark and order, and the model family (t5: encoder-decoder, llama:
decoder-only). Where upstream published no settings, the recipe says so (`source: null`) and
`basis` says where its values come from.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from ..errors import UserError

FOLDER = Path(__file__).parent
FAMILIES = ("t5", "llama")
UPSTREAM = "upstream"  # --recipe upstream: the recipe that fits the run


@dataclass(frozen=True)
class Recipe:
    name: str
    methods: tuple[str, ...]
    benchmark: str
    family: str
    orders: tuple[int, ...] | None  # the orders it covers (None: every order of the benchmark)
    source: str | None  # the upstream file(s) it reproduces; None when upstream gave no settings
    basis: str  # where the values come from, in a sentence
    settings: dict[str, Any] = field(default_factory=dict)
    task_overrides: dict[str, dict[str, Any]] = field(default_factory=dict)
    note: str = ""

    def covers(self, method: str, benchmark: str | None, order: int | None, family: str) -> bool:
        return (method in self.methods and benchmark == self.benchmark and family == self.family
                and (self.orders is None or order in self.orders))

    def overrides_for(self, sequence: list[str]) -> dict[str, dict[str, Any]]:
        """The task overrides that can apply to `sequence`: positions, and the tasks it holds."""
        return {k: dict(v) for k, v in self.task_overrides.items() if k.startswith("stage") or k in sequence}


def _parse(path: Path) -> Recipe:
    data = yaml.safe_load(path.read_text(encoding="utf-8"))
    methods = data["method"] if isinstance(data["method"], list) else [data["method"]]
    orders = data.get("orders")
    recipe = Recipe(
        name=data["name"], methods=tuple(methods), benchmark=data["benchmark"], family=data["family"],
        orders=tuple(orders) if orders else None, source=data.get("source"), basis=data["basis"].strip(),
        settings=dict(data.get("settings") or {}), task_overrides=dict(data.get("task_overrides") or {}),
        note=(data.get("note") or "").strip(),
    )
    if recipe.name != path.stem or recipe.family not in FAMILIES:
        raise ValueError(f"recipe file {path.name}: name must be the file name, family one of {FAMILIES}")
    return recipe


@functools.lru_cache(maxsize=1)
def all_recipes() -> tuple[Recipe, ...]:
    return tuple(_parse(path) for path in sorted(FOLDER.glob("*.yaml")))


def get_recipe(name: str) -> Recipe:
    for recipe in all_recipes():
        if recipe.name == name:
            return recipe
    raise UserError(f"unknown recipe {name!r} (`dealcl recipes` lists them, or use --recipe upstream)")


def resolve_recipe(name: str, method: str, benchmark: str | None, order: int | None, family: str | None) -> Recipe:
    """The recipe `name` (checked against the run), or the one that fits it for `upstream`."""
    if name == UPSTREAM:
        if benchmark is None:
            raise UserError("--recipe upstream needs --benchmark (recipes are per benchmark); name a recipe "
                            "to use its settings on a custom task sequence")
        if family is None:
            raise UserError("--recipe upstream cannot tell the model family (t5 or llama): name a recipe")
        fitting = [r for r in all_recipes() if r.covers(method, benchmark, order, family)]
        if not fitting:
            where = f"{benchmark}" + (f" order {order}" if order is not None else "")
            raise UserError(f"no recipe for method {method} on {where} with a {family}-family model "
                            "(`dealcl recipes` lists what exists)")
        return fitting[0]
    recipe = get_recipe(name)
    if method not in recipe.methods:
        raise UserError(f"recipe {recipe.name} is for {', '.join(recipe.methods)}, not method {method}")
    if benchmark is not None and benchmark != recipe.benchmark:
        raise UserError(f"recipe {recipe.name} is for the {recipe.benchmark} benchmark, not {benchmark}")
    if family is not None and family != recipe.family:
        raise UserError(f"recipe {recipe.name} is for {recipe.family}-family models; this model is {family}-family")
    return recipe


def _value(value: Any) -> str:
    return f"{value:g}" if isinstance(value, float) else str(value)


def recipes_markdown() -> str:
    """The recipe table of docs/METHODS.md (a test keeps the two equal)."""
    lines = ["| recipe | methods | benchmark | family | upstream file | lr | batch × accum | method options | per task |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in all_recipes():
        s = r.settings
        options = ", ".join(f"{k[7:]} {_value(v)}" for k, v in s.items() if k.startswith("method."))
        per_task = "; ".join(f"{sel}: " + ", ".join(f"{k.removeprefix('method.')} {_value(v)}" for k, v in e.items())
                             for sel, e in r.task_overrides.items())
        where = r.benchmark + (f" {','.join(map(str, r.orders))}" if r.orders else "")
        source = f"`{r.source}`" if r.source else f"none: {r.basis}"
        lines.append(f"| {r.name} | {', '.join(r.methods)} | {where} | {r.family} | {source} | {_value(s.get('lr', '—'))} "
                     f"| {s.get('batch_size', '—')} × {s.get('grad_accum', '—')} | {options or '—'} | {per_task or '—'} |")
    return "\n".join(lines) + "\n"


__all__ = ["Recipe", "UPSTREAM", "all_recipes", "get_recipe", "recipes_markdown", "resolve_recipe"]
