"""Experiment trackers (`report_to`): accelerate's TensorBoard, W&B and MLflow trackers, fed by the driver.

Every value is logged against one step axis, the optimizer steps counted across the whole
sequence (stage 1's steps are 1..n1, stage 2's n1+1..n1+n2, ...):

    train/loss                 the step's loss, as efficiency.json's step_losses
    train/loss/<term>          each part of it: `task`, and every term the method's `extra_losses`
                               adds (O-LoRA's orth and l2, DEAL's reg, EWC's ewc, LwF's lwf), as added
    train/lr                   the learning rate of the optimizer's first parameter group
    eval/em/<task>             exact match after each stage's evaluation, at the stage's last step
    eval/rouge1/<task>, eval/rougeL/<task>   the same for ROUGE (with_rouge=true)
    eval/stage                 the stage those values belong to (0: the untouched model, step 0)
    final/average_accuracy, final/backward_transfer, final/forward_transfer, and the accuracy
    matrix (TensorBoard: a text table; W&B: a table; MLflow: an artifact), once the run finishes

Only the main process logs. The packages are optional (`pip install 'dealcl[trackers]'`) and are
imported by accelerate's tracker classes only; one that is missing stops the run before its
first stage (`check_installed`). Everything is written under `<run>/tracking/` (layout.TRACKING):
tensorboard/ (event files), wandb/ (offline runs or W&B's sync cache), mlflow.db (MLflow's
SQLite store, unless MLFLOW_TRACKING_URI names another) and state.json.

Resume continues the step counter: state.json records how many optimizer steps each trained
stage took and the W&B/MLflow run ids, so a resumed run logs into the same runs at the steps an
uninterrupted one would. Steps an interrupted stage had logged are logged again when it is
retrained: TensorBoard discards the old ones (SummaryWriter's purge_step), W&B ignores steps
below its current one, and for MLflow steps up to the last one it holds are skipped.
"""
from __future__ import annotations

import dataclasses
import importlib.util
import json
import os
import uuid
from pathlib import Path
from typing import Any

from ..errors import UserError
from .config import RunConfig
from .layout import TRACKING_STATE, RunStore
from .store import atomic_write_json, atomic_write_text

PACKAGES = {"tensorboard": "tensorboard", "wandb": "wandb", "mlflow": "mlflow-skinny"}
# MLflow's store inside the run is SQLite (its file store is deprecated), which needs these.
MLFLOW_SQL = ("sqlalchemy", "alembic")


def check_installed(report_to: list[str] | None) -> None:
    """One UserError naming the pip command when a tracker asked for is not installed."""
    if not report_to:
        return
    from accelerate.utils import is_mlflow_available, is_tensorboard_available, is_wandb_available

    available = {"tensorboard": is_tensorboard_available, "wandb": is_wandb_available, "mlflow": is_mlflow_available}
    missing = [name for name in report_to if not available[name]()]
    if missing:
        names = " ".join(PACKAGES[name] for name in missing)
        raise UserError(f"report_to={','.join(missing)} needs {names}, which is not installed: "
                        f"pip install 'dealcl[trackers]' (or pip install {names})")
    if "mlflow" in report_to and not os.environ.get("MLFLOW_TRACKING_URI"):
        lacking = [m for m in MLFLOW_SQL if importlib.util.find_spec(m) is None]
        if lacking:
            raise UserError(f"report_to=mlflow keeps its runs in <run>/tracking/mlflow.db, which needs "
                            f"{' and '.join(lacking)}: pip install 'dealcl[trackers]' (or pip install "
                            f"{' '.join(lacking)}), or set MLFLOW_TRACKING_URI to your MLflow server")


def _flat_config(config: RunConfig) -> dict[str, Any]:
    """The config as the scalar values trackers take as hyperparameters (lists and maps as JSON)."""
    out = {}
    for key, value in dataclasses.asdict(config).items():
        if value is None:
            value = "none"
        elif not isinstance(value, (bool, int, float, str)):
            value = json.dumps(value, sort_keys=True)
        out[key] = value
    return out


def matrix_table(summary: dict[str, Any]) -> tuple[list[str], list[list[Any]]]:
    """results.json's accuracy matrix as (columns, rows): one row per stage, the zero-shot row first."""
    order = summary["task_order"]
    rows = []
    if summary.get("reference") is not None:
        rows.append(["zero-shot", *summary["reference"]])
    for k, row in enumerate(summary["accuracy_matrix"], 1):
        label = "joint" if summary.get("joint") else f"after {k}-{order[k - 1] if k <= len(order) else '?'}"
        rows.append([label, *row])
    return ["stage", *order], rows


def matrix_markdown(summary: dict[str, Any]) -> str:
    columns, rows = matrix_table(summary)
    cell = lambda v: "—" if v is None else (f"{v:.2f}" if isinstance(v, float) else str(v))  # noqa: E731
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


class RunTracker:
    """The run's trackers and the step bookkeeping that makes one step axis over all stages."""

    def __init__(self, store: RunStore, config: RunConfig, efficiency: list[dict]) -> None:
        self.store = store
        self.directory = store.tracking_dir
        self.state_path = self.directory / TRACKING_STATE
        resumed = self.state_path.is_file()
        self.state = store.read_json(self.state_path, None) or {"stage_steps": {}, "logged": [], "final": False}
        # A run that gained trackers on resume: its finished stages' steps come from efficiency.json.
        for entry in efficiency:
            self.state["stage_steps"].setdefault(str(entry["stage"]), len(entry.get("step_losses", [])))
        self.offset = 0  # global steps before the stage being trained
        self.directory.mkdir(parents=True, exist_ok=True)
        from accelerate import PartialState

        PartialState()  # accelerate's trackers log through its logger, which needs the state
        first_new_step = sum(self.state["stage_steps"].values()) + 1
        self.mlflow_logged_up_to = 0
        hyperparameters = _flat_config(config)
        self.trackers = [self._start(name, hyperparameters, first_new_step) for name in config.report_to or []]
        self._save()
        if not resumed:
            for tracker in self.trackers:
                if tracker.name != "wandb":  # W&B takes them at init (see _start)
                    tracker.store_init_configuration(hyperparameters)

    def _start(self, name: str, hyperparameters: dict[str, Any], first_new_step: int):
        from accelerate import tracking

        if name == "tensorboard":
            folder = self.directory / "tensorboard"
            # Events an interrupted stage logged past the last finished training are superseded.
            kwargs = {"purge_step": first_new_step} if folder.is_dir() else {}
            tracker = tracking.TensorBoardTracker("", str(folder), **kwargs)
        elif name == "wandb":
            run_id = self.state.setdefault("wandb_id", uuid.uuid4().hex[:12])
            # The config goes to wandb.init: after `wandb.config.update` (the tracker's
            # store_init_configuration) wandb 0.31 leaves an offline run's file unwritten until exit.
            tracker = tracking.WandBTracker(os.environ.get("WANDB_PROJECT", "dealcl"), dir=str(self.directory),
                                            id=run_id, resume="allow", name=self.store.root.name,
                                            config=hyperparameters)
        else:
            import mlflow

            if not os.environ.get("MLFLOW_TRACKING_URI"):
                mlflow.set_tracking_uri(f"sqlite:///{(self.directory / 'mlflow.db').resolve()}")
            tracker = tracking.MLflowTracker(
                experiment_name=os.environ.get("MLFLOW_EXPERIMENT_NAME", "dealcl"),
                logging_dir=str((self.directory / "mlflow-artifacts").resolve()),
                run_id=self.state.get("mlflow_run_id"), run_name=self.store.root.name)
        start = getattr(tracker, "start", None)
        if callable(start):  # accelerate >= 1.3 starts trackers here, older ones in __init__
            start()
        if name == "mlflow":
            run_id = tracker.active_run.info.run_id
            if self.state.get("mlflow_run_id") == run_id:
                history = mlflow.tracking.MlflowClient().get_metric_history(run_id, "train/loss")
                self.mlflow_logged_up_to = max((m.step for m in history), default=0)
            self.state["mlflow_run_id"] = run_id
        return tracker

    def _save(self) -> None:
        atomic_write_json(self.state_path, self.state)

    def _log(self, values: dict[str, Any], step: int, *, again: bool = True) -> None:
        """`again`: values a resumed run may log a second time (training steps)."""
        for tracker in self.trackers:
            if again and tracker.name == "mlflow" and step <= self.mlflow_logged_up_to:
                continue
            tracker.log(values, step=step)

    def _stage_end_step(self, index: int) -> int:
        return sum(n for k, n in self.state["stage_steps"].items() if int(k) <= index)

    # ---- what the driver calls ------------------------------------------------------------
    def begin_stage(self, index: int) -> None:
        """Stage `index` trains next: its steps follow every earlier stage's."""
        self.offset = sum(n for k, n in self.state["stage_steps"].items() if int(k) < index)

    def log_step(self, step: int, loss_terms: dict[str, float], lr: float) -> None:
        """One optimizer step of the current stage (`step` counts from 1 within the stage)."""
        values = {"train/loss": sum(loss_terms.values()), "train/lr": lr}
        values.update({f"train/loss/{name}": value for name, value in loss_terms.items()})
        self._log(values, self.offset + step)

    def trained(self, index: int, steps: int) -> None:
        """Stage `index` finished training after `steps` optimizer steps (before its checkpoint is
        written: a resumed run that does not retrain it still knows them)."""
        self.state["stage_steps"][str(index)] = steps
        self._save()

    def log_evaluation(self, index: int, results: dict[str, dict]) -> None:
        """Scores per task after stage `index` (0: the untouched model), once per stage."""
        if index in self.state["logged"]:
            return
        values: dict[str, Any] = {"eval/stage": index}
        for task, scores in results.items():
            for key, tag in (("exact_match", "em"), ("rouge1", "rouge1"), ("rougeL", "rougeL")):
                if scores.get(key) is not None:
                    values[f"eval/{tag}/{task}"] = scores[key]
        self._log(values, self._stage_end_step(index), again=False)
        self.state["logged"].append(index)
        self._save()

    def log_final(self, summary: dict[str, Any]) -> None:
        """AA, BWT, FWT and the accuracy matrix of the finished run, once."""
        if self.state.get("final") or not summary:
            return
        step = self._stage_end_step(len(summary.get("accuracy_matrix", [])))
        values = {f"final/{key}": summary[key] for key in ("average_accuracy", "backward_transfer", "forward_transfer")
                  if summary.get(key) is not None}
        self._log(values, step, again=False)
        columns, rows = matrix_table(summary)
        for tracker in self.trackers:
            if tracker.name == "tensorboard":
                tracker.log({"final/accuracy_matrix": matrix_markdown(summary)}, step=step)
            elif tracker.name == "wandb":
                tracker.log_table("final/accuracy_matrix", columns=columns, data=rows, step=step)
            elif tracker.name == "mlflow":
                table = self.directory / "accuracy_matrix.md"
                atomic_write_text(table, matrix_markdown(summary) + "\n")
                tracker.log_artifact(str(table))
                tracker.log_artifact(str(self.store.results_path))
        self.state["final"] = True
        self._save()

    def close(self) -> None:
        for tracker in self.trackers:
            tracker.finish()
            if tracker.name == "wandb":
                import wandb

                # wandb 0.31 writes an offline run's file from its service process, sometimes only
                # when that stops (measured: 3 of 6 runs held just the header after finish()); a
                # run read or synced before the program exits (a notebook) would look empty.
                if wandb.run is None:  # no other run of the caller's is using the service
                    wandb.teardown()


def open_tracker(store: RunStore, config: RunConfig, efficiency: list[dict]) -> RunTracker | None:
    """The run's trackers (main process only), or None when report_to asks for none."""
    if not config.report_to:
        return None
    return RunTracker(store, config, efficiency)
