"""The Python API: what the CLI does, as functions (`import dealcl; dealcl.run(...)`).

Settings are RunConfig's keys (runs/config.py) as keyword arguments, checked exactly as the
CLI's flags and YAML are; method options go in `method_options={...}`. Errors in the user's
input raise `dealcl.errors.UserError` (the CLI prints them as one `error:` line).
"""
from __future__ import annotations

from pathlib import Path
from typing import Any


def _config(settings: dict[str, Any], recipe: bool = True):
    from .runs.config import RunConfig, apply_values, validate, with_recipe

    config = apply_values(RunConfig(), settings, source="argument")
    if recipe and config.recipe is not None:
        keys = {k for k in settings if k != "method_options"} | {f"method.{k}" for k in settings.get("method_options", {})}
        config = with_recipe(config, keys)
    return validate(config)


def run(output: str | Path, *, progress: bool = False, **settings: Any) -> dict[str, Any]:
    """Run (or resume, if `output` holds the same run) a whole task sequence; returns results.json."""
    from .runs.driver import run_continual
    from .runs.paths import check_folder

    config = _config(settings)
    return run_continual(config, check_folder(Path(output), "output", kind="run"), progress=progress)


def resume(run_dir: str | Path, *, progress: bool = False, retrain_stage: int | None = None) -> dict[str, Any]:
    """Continue a run after its last finished stage; returns results.json. `retrain_stage` K
    discards stage K and the later ones and does them again (a damaged run's way out)."""
    from .runs.driver import resume_config, run_continual

    return run_continual(resume_config(Path(run_dir)), Path(run_dir), progress=progress, retrain_stage=retrain_stage)


def compare(methods: list[str], output: str | Path, *, orders: list[int | None] | None = None,
            progress: bool = False, **settings: Any) -> dict[str, Any]:
    """Several methods (and orders) side by side, each a resumable run under `output`; returns
    comparison.json."""
    from .runs.compare import compare as compare_runs
    from .runs.paths import check_folder

    check_folder(Path(output), "output")
    # A recipe is applied per method and order inside the comparison, as the CLI does.
    base = _config({**settings, "method": methods[0]}, recipe=False)
    return compare_runs(base, list(methods), list(orders) if orders else [base.order], Path(output),
                        progress=progress, say=lambda message: None, user_keys=set(settings))


def load_run(run_dir: str | Path):
    """A run's accuracy matrix, AA, BWT, … (`RunSummary`); dealcl's layout or upstream's."""
    from .runs.report import load_run as load

    return load(Path(run_dir))


def report(*run_dirs: str | Path) -> str:
    """The text report `dealcl report` prints for these runs."""
    from .runs.report import format_report, load_run as load

    return format_report([load(Path(d)) for d in run_dirs])


def registered_methods() -> dict[str, type]:
    """The registered continual methods by name."""
    from .methods import list_methods

    return {m.name: m for m in list_methods()}
