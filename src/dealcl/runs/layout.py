"""What is where in a run directory: every file name and format of a run, in one place.

    run.yaml                        effective config + provenance (provenance.py)
    logs/train_and_infer.log
    adapters/<k>-<task>/            the method's state after stage k (safetensors + json)
    outputs/0-reference/            the untouched model on every task (zero-shot b_j), + reference_keys.json
    outputs/<k>-<task>/             predict_results.json (upstream keys), predict_eval_predictions.jsonl
                                    (upstream layout, quotes the test sentences), predictions.json
                                    (answers and labels only), eval_fingerprints.json
    results.json                    metrics only: identical for identical runs
    efficiency.json                 wall time, throughput, memory, step losses per stage
    report.md, *.png                `dealcl report`
    tracking/                       experiment trackers (report_to, tracking.py): tensorboard/ event files,
                                    wandb/, mlflow.db, state.json (steps per stage, tracker run ids)
A comparison folder holds comparison.json/.md and one run per method and order; a sweep folder
sweep.json/.md and one run per rate. Stage folders are written atomically with a manifest
(store.py); a stage is finished when its manifest verifies.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import yaml

from ..data.types import Task
from ..errors import UserError
from .store import atomic_write_json, atomic_write_text, dumps_json, verify_stage_dir, write_stage_dir

RUN_YAML = "run.yaml"
LOG = "logs/train_and_infer.log"
RESULTS = "results.json"
EFFICIENCY = "efficiency.json"
REPORT = "report.md"
AA_BWT_PLOT = "aa_bwt.png"
COMPARISON = "comparison.json"
COMPARISON_MD = "comparison.md"
SWEEP = "sweep.json"
SWEEP_MD = "sweep.md"
TRACKING = "tracking"  # what the experiment trackers write (runs/tracking.py)
TRACKING_STATE = "state.json"  # inside TRACKING: optimizer steps per stage, tracker run ids

REFERENCE = "reference"  # the name of stage 0
PREDICT_RESULTS = "predict_results.json"  # upstream's keys (predict_exact_match_for_<task>, ...)
UPSTREAM_ALL_RESULTS = "all_results.json"  # upstream's other scores file (read by `dealcl report`)
UPSTREAM_PREDICTIONS = "predict_eval_predictions.jsonl"  # upstream layout, quotes the test sentences
PREDICTIONS = "predictions.json"  # answers and labels per task, no sentences
FINGERPRINTS = "eval_fingerprints.json"  # per task: the key of the model it was answered with
REFERENCE_KEYS = "reference_keys.json"  # per task: what the untouched model's answers depend on


class RunStore:
    """Paths and writers for one run directory."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)

    @property
    def config_path(self) -> Path:
        return self.root / RUN_YAML

    @property
    def log_path(self) -> Path:
        return self.root / LOG

    @property
    def results_path(self) -> Path:
        return self.root / RESULTS

    @property
    def efficiency_path(self) -> Path:
        return self.root / EFFICIENCY

    @property
    def tracking_dir(self) -> Path:
        return self.root / TRACKING

    def stage_name(self, index: int, name: str) -> str:
        return f"{index}-{name}"

    def adapter_dir(self, index: int, name: str) -> Path:
        return self._inside(self.root / "adapters" / self.stage_name(index, name))

    def output_dir(self, index: int, name: str) -> Path:
        return self._inside(self.root / "outputs" / self.stage_name(index, name))

    def _inside(self, path: Path) -> Path:
        # Task names are validated when read; this is the last line of defence against a name
        # that would write outside the run directory.
        resolved = path.resolve()
        if not resolved.is_relative_to(self.root.resolve()):
            raise UserError(f"refusing to write outside the run directory: {path}")
        return path

    def remove_temporaries(self) -> list[Path]:
        """Delete the temporary files and folders a killed writer leaves (`.<name>.*.tmp`)."""
        removed = []
        for folder in (self.root, self.root / "adapters", self.root / "outputs"):
            if not folder.is_dir():
                continue
            for path in folder.iterdir():
                if path.name.startswith(".") and (path.name.endswith(".tmp") or path.name.endswith(".stale")):
                    if path.is_dir():
                        shutil.rmtree(path, ignore_errors=True)
                    else:
                        path.unlink(missing_ok=True)
                    removed.append(path)
        return removed

    def is_run(self) -> bool:
        return self.config_path.is_file()

    def read_run_yaml(self) -> dict[str, Any]:
        try:
            data = yaml.safe_load(self.config_path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, yaml.YAMLError):
            raise UserError(f"{self.config_path} is unreadable or not valid YAML") from None
        if not isinstance(data, dict) or not isinstance(data.get("config"), dict):
            raise UserError(f"{self.config_path} is not a dealcl run.yaml (no 'config' mapping)")
        return data

    def write_run_yaml(self, data: dict[str, Any]) -> None:
        atomic_write_text(self.config_path, yaml.safe_dump(data, sort_keys=False, allow_unicode=True))

    def read_json(self, path: Path, default: Any = None) -> Any:
        try:
            return json.loads(Path(path).read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return default


# ---- a stage's evaluation outputs --------------------------------------------------------------
def predict_results(tasks: list[Task], results: dict[str, dict]) -> dict[str, Any]:
    """The upstream `predict_results.json` keys, so existing tooling keeps working.

    `predict_exact_match` is upstream's sample-weighted (micro) mean; our AA is the macro mean."""
    out: dict[str, Any] = {}
    total = correct = 0.0
    by_type: dict[str, list[float]] = {}
    for task in tasks:
        if task.name not in results:
            continue
        r = results[task.name]
        n = len(r["predictions"])
        total += n
        correct += r["exact_match"] * n
        by_type.setdefault(task.task_type, [0.0, 0.0])
        by_type[task.task_type][0] += r["exact_match"] * n
        by_type[task.task_type][1] += n
    out["predict_exact_match"] = round(correct / total, 4) if total else None
    for task_type, (c, n) in by_type.items():
        out[f"predict_exact_match_for_{task_type}"] = round(c / n, 4)
    for task in tasks:
        if task.name not in results:
            continue
        r = results[task.name]
        out[f"predict_exact_match_for_{task.name}"] = round(r["exact_match"], 4)
        out[f"predict_invalid_rate_for_{task.name}"] = round(r["invalid_rate"], 4)
        out[f"predict_samples_for_{task.name}"] = len(r["predictions"])
        out[f"predict_unknown_labels_for_{task.name}"] = task.unknown_test_labels
        if "rougeL" in r:
            out[f"predict_rougeL_for_{task.name}"] = round(r["rougeL"], 4)
        if "rouge1" in r:
            out[f"predict_rouge1_for_{task.name}"] = round(r["rouge1"], 4)
    out["predict_samples"] = int(total)
    return out


def write_stage_outputs(directory: Path, tasks: list[Task], results: dict[str, dict],
                        fingerprints: dict[str, str | None], reference_keys: dict[str, str] | None = None) -> None:
    """One stage's outputs folder, atomically (see the module docstring for its files)."""
    def fill(tmp: Path) -> None:
        if reference_keys is not None:
            atomic_write_json(tmp / REFERENCE_KEYS, reference_keys)
        atomic_write_json(tmp / PREDICT_RESULTS, predict_results(tasks, results))
        lines = []
        for task in tasks:
            if task.name not in results:
                continue
            for example, prediction in zip(task.test, results[task.name]["predictions"]):
                lines.append(dumps_json({
                    "Task": task.task_type, "Dataset": task.name, "sentence": example.sentence,
                    "label": example.label, "prediction": prediction,
                }).replace("\n", " ").strip())
        atomic_write_text(tmp / UPSTREAM_PREDICTIONS, "\n".join(lines) + "\n")
        # The same answers without the test sentences: small, free of benchmark text, so
        # results/ can commit it and resume and compare can work from it alone.
        atomic_write_json(tmp / PREDICTIONS, {
            task.name: {"predictions": results[task.name]["predictions"], "labels": [e.label for e in task.test]}
            for task in tasks if task.name in results
        })
        atomic_write_json(tmp / FINGERPRINTS, fingerprints)

    write_stage_dir(directory, fill)


def read_stage_outputs(directory: Path) -> tuple[dict[str, dict], dict[str, str | None]]:
    """A finished stage's scores and answers per task, and the fingerprints they were made with."""
    scores = json.loads((directory / PREDICT_RESULTS).read_text())
    fingerprints = json.loads((directory / FINGERPRINTS).read_text())
    answers = json.loads((directory / PREDICTIONS).read_text())
    results = {}
    for name, answer in answers.items():
        results[name] = {
            "exact_match": scores[f"predict_exact_match_for_{name}"],
            "invalid_rate": scores.get(f"predict_invalid_rate_for_{name}"),
            "predictions": answer["predictions"],
        }
        for rouge in ("rouge1", "rougeL"):  # with_rouge runs only
            if f"predict_{rouge}_for_{name}" in scores:
                results[name][rouge] = scores[f"predict_{rouge}_for_{name}"]
    return results, fingerprints


def outputs_verify(directory: Path) -> bool:
    """A stage's evaluation outputs are complete. The upstream-layout predictions file quotes
    the benchmark sentences, so results/ does not keep it: it may be missing, never wrong."""
    return verify_stage_dir(directory, optional=(UPSTREAM_PREDICTIONS,)) is None


def sibling_reference_answers(run_root: Path, keys: dict[str, str]) -> dict[str, list[str]]:
    """The untouched model's answers, per task, from the finished stage 0 of runs next to this
    one (the other methods and orders of a `dealcl compare`, and the runs of comparisons next to
    that one) wherever the task's reference key matches. Saves a whole evaluation per run: an
    untuned model often talks until the token limit."""
    own = RunStore(run_root).output_dir(0, REFERENCE)
    siblings = run_root.parent
    found: dict[str, list[str]] = {}
    try:
        folders = [siblings] + [f for f in sorted(siblings.parent.iterdir()) if f != siblings and
                                (f / COMPARISON).is_file()]
        candidates = [d for folder in folders for d in sorted(folder.iterdir()) if d.is_dir()]
    except OSError:  # an unreadable neighbour: nothing to borrow, evaluate as usual
        return found
    for directory in candidates:
        reference = RunStore(directory).output_dir(0, REFERENCE) if (directory / "outputs").is_dir() else None
        if reference is None or reference == own or not (reference / REFERENCE_KEYS).is_file():
            continue
        if not outputs_verify(reference):
            continue
        theirs = json.loads((reference / REFERENCE_KEYS).read_text())
        answers = json.loads((reference / PREDICTIONS).read_text())
        for name, key in keys.items():
            if name not in found and theirs.get(name) == key and name in answers:
                found[name] = answers[name]["predictions"]
    return found
