"""Is a run intact? Every command that reads a run checks the files it is about to use.

A stage folder under its final name (`adapters/<k>-<task>/`, `outputs/<k>-<task>/`) is only ever
made by renaming a complete temporary folder with its manifest (store.py), so one that exists
and does not match its manifest was damaged after it was written. Such a run is reported in one
`error:` line naming the file, and nothing is redone or read around it silently:

* `resume` (and `run` on an existing directory) refuses it and says how to retrain the stage:
  `dealcl resume RUN --retrain-stage K` discards stage K and the later ones and trains them
  again (K = 0: the zero-shot reference evaluation is redone);
* `predict` and `export` use the model after the last stage, and an older one only when asked
  by name (`--stage K`);
* `report` and `compare` read only stage outputs that verify.

A folder that is absent is not damage: a killed run has not written it yet, and a finished run
may have had its adapters deleted to save space (results/ keeps none). Nothing here imports
torch: the CLI runs these checks before loading anything.
"""
from __future__ import annotations

import re
import shutil
from pathlib import Path
from typing import Any, Sequence

from ..errors import UserError
from .layout import REFERENCE, UPSTREAM_PREDICTIONS, RunStore, outputs_verify
from .store import sha256_file, stage_dir_damage

_STAGE_DIR = re.compile(r"^(\d+)-(.+)$")
# A stage as these checks need it: (index, name); the driver's Stage objects have both.
StageId = tuple[int, str]


def _ids(stages: Sequence[Any]) -> list[StageId]:
    return [(s.index, s.name) if hasattr(s, "index") else (int(s[0]), str(s[1])) for s in stages]


def folder_damage(directory: Path, outputs: bool) -> str | None:
    """None when `directory` is absent or verifies; else "<directory>/<file> <what is wrong>".

    An outputs folder may lack the upstream-layout predictions file (it quotes the benchmark's
    sentences, so results/ does not keep it), never have it altered."""
    directory = Path(directory)
    if not directory.exists():
        return None
    damage = stage_dir_damage(directory, optional=(UPSTREAM_PREDICTIONS,) if outputs else ())
    if damage is None:
        return None
    name, why = damage
    return f"{directory / name if name else directory} {why}"


def stage_folders(root: Path) -> list[tuple[int, str, Path, bool]]:
    """Every stage folder of a run on disk: (index, task, path, is an outputs folder), by index."""
    found = []
    for kind in ("adapters", "outputs"):
        folder = Path(root) / kind
        if not folder.is_dir():
            continue
        for child in folder.iterdir():
            match = _STAGE_DIR.match(child.name)
            if match and child.is_dir():
                found.append((int(match.group(1)), match.group(2), child, kind == "outputs"))
    return sorted(found, key=lambda item: (item[0], not item[3], item[1]))


def first_damage(root: Path) -> tuple[int, str] | None:
    """(stage index, message) of the first damaged stage folder of a run, else None."""
    for index, _, path, outputs in stage_folders(root):
        problem = folder_damage(path, outputs)
        if problem is not None:
            return index, problem
    return None


def check_outputs(root: Path) -> None:
    """`report` and `compare`: every stage's outputs a dealcl run holds verify."""
    for index, _, path, outputs in stage_folders(root):
        if not outputs:
            continue
        problem = folder_damage(path, outputs=True)
        if problem is not None:
            raise UserError(f"{problem}: run {root} is damaged; its scores cannot be trusted "
                            f"(redo that stage with `dealcl resume {root} --retrain-stage {index}`)")


def check_resumable(root: Path, stages: Sequence[Any], retrain_stage: int | None = None) -> None:
    """`resume` (and `run` into an existing run directory): refuse a damaged run, naming the
    first damaged file, unless `retrain_stage` discards it (see `discard_stages`)."""
    ids = _ids(stages)
    if retrain_stage is not None:
        check_retrain_stage(root, ids, retrain_stage)
    for index, _, path, outputs in stage_folders(root):
        if retrain_stage is not None and index >= retrain_stage:
            continue  # discarded and redone
        problem = folder_damage(path, outputs)
        if problem is not None:
            what = "the zero-shot reference evaluation" if index == 0 else f"stage {index} and the ones after it"
            raise UserError(f"{problem}: run {root} is damaged; nothing was changed. To redo {what}, run "
                            f"`dealcl resume {root} --retrain-stage {index}`")


def check_retrain_stage(root: Path, ids: list[StageId], stage: int) -> None:
    store = RunStore(root)
    indices = [index for index, _ in ids]
    if stage != 0 and stage not in indices:
        raise UserError(f"--retrain-stage {stage}: run {root} has stages {indices[0]}-{indices[-1]} "
                        "(0 redoes the zero-shot reference)")
    if stage >= 2:
        index, name = ids[indices.index(stage) - 1]
        directory = store.adapter_dir(index, name)
        problem = folder_damage(directory, outputs=False) or (None if directory.is_dir() else f"{directory} is missing")
        if problem is not None:
            raise UserError(f"--retrain-stage {stage} starts from the model after stage {index}, but {problem}; "
                            f"retrain from an earlier stage")


def discard_stages(root: Path, ids: Sequence[Any], stage: int) -> list[Path]:
    """`--retrain-stage K`: delete the folders of stage K and the later stages (K = 0: the
    reference evaluation's folder only), so that the driver redoes them. Returns what it deleted."""
    store = RunStore(root)
    doomed = [store.output_dir(0, REFERENCE)] if stage == 0 else [
        directory for index, name in _ids(ids) if index >= stage
        for directory in (store.adapter_dir(index, name), store.output_dir(index, name))]
    removed = [d for d in doomed if d.exists()]
    for directory in removed:
        shutil.rmtree(directory)
    return removed


def model_stage(root: Path, stages: Sequence[Any], stage: int | None = None) -> int:
    """`predict` and `export`: the index of the stage whose saved model to use, checked.

    Without `stage`, the run's last stage, whose adapter folder must verify; an older one only
    when the user names it (`--stage K`)."""
    store = RunStore(root)
    ids = _ids(stages)
    indices = [index for index, _ in ids]
    verified = [i for i, n in ids if store.adapter_dir(i, n).is_dir() and folder_damage(store.adapter_dir(i, n), False) is None]
    older = [i for i in verified if i != indices[-1]]
    alternative = f"; or use the model after stage {older[-1]} with --stage {older[-1]}" if older else ""
    if stage is not None:
        if stage not in indices:
            raise UserError(f"--stage {stage}: run {root} has stages {indices[0]}-{indices[-1]}")
        index, name = ids[indices.index(stage)]
        directory = store.adapter_dir(index, name)
        problem = folder_damage(directory, outputs=False)
        if problem is not None:
            raise UserError(f"{problem}: the model after stage {index} of run {root} is damaged")
        if not directory.is_dir():
            kept = f" (stages with a saved model: {', '.join(map(str, verified))})" if verified else ""
            raise UserError(f"run {root} has no saved model after stage {index} ({directory} is missing){kept}")
        return index
    index, name = ids[-1]
    directory = store.adapter_dir(index, name)
    problem = folder_damage(directory, outputs=False)
    if problem is not None:
        raise UserError(f"{problem}: the final model of run {root} is damaged; retrain its last stage with "
                        f"`dealcl resume {root} --retrain-stage {index}`{alternative}")
    if directory.is_dir():
        return index
    if outputs_verify(store.output_dir(index, name)):
        raise UserError(f"run {root} is finished but its final model was not kept ({directory} is missing)"
                        f"{alternative}")
    if not verified:
        raise UserError(f"{root} has no finished stage yet: run `dealcl resume {root}` first")
    raise UserError(f"run {root} is not finished (stage {index}, its last, has no saved model): continue it with "
                    f"`dealcl resume {root}`{alternative}")


def check_data_files(root: Path, recorded: dict[str, Any], tasks: Sequence[Any], roles: tuple[str, ...] | None = None) -> None:
    """The data files a run is read with are the ones it was made with: each one's sha256
    against run.yaml's `provenance.data_files` (`roles`: only these, e.g. the label files,
    which make the prompt). A file the run did not record is not checked."""
    files = ((recorded.get("provenance") or {}).get("data_files") or {}) if isinstance(recorded, dict) else {}
    for task in tasks:
        for role, path in task.files.items():
            if roles is not None and role not in roles:
                continue
            entry = (files.get(task.name) or {}).get(role)
            if not isinstance(entry, dict) or "sha256" not in entry:
                continue
            if sha256_file(Path(path)) != entry["sha256"]:
                raise UserError(f"data file {path} ({task.name} {role}) has changed since run {root} was made "
                                f"(its sha256 differs from run.yaml's); restore it, or start a new run")
