"""Read finished runs (dealcl's or upstream's) into accuracy matrices and print them side by side.

Two layouts are understood:

* dealcl: `<run>/results.json` (written by `eval.metrics.summarize`) plus `<run>/run.yaml`.
* upstream O-LoRA/GORP/DEAL: `<run>/outputs/<k>-<task>/{predict_results,all_results}.json`,
  stage k = 1..T evaluated on the tasks seen so far (gorp_olora_spec.md §5.1, deal_spec.md §2.6).
  Per-task keys `predict_exact_match_for_<dataset>` fill the matrix; category keys (TC, SC, …)
  and the micro `predict_exact_match` are ignored (gorp_olora_spec.md §1.3). A `0-…` folder, as
  in a dealcl run, holds the zero-shot reference. A stage without predict keys gives a row of
  None (missing, never zero).
"""
from __future__ import annotations

import json
import re
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from ..errors import UserError
from ..eval import metrics
from .layout import (
    AA_BWT_PLOT, EFFICIENCY, PREDICT_RESULTS, REPORT, RESULTS, RUN_YAML, UPSTREAM_ALL_RESULTS,
)

_STAGE_DIR = re.compile(r"^(\d+)-(.+)$")
_MISSING = "—"
_WIDTH = 100  # terminal columns the report is laid out for


@dataclass
class RunSummary:
    name: str
    task_order: list[str]
    matrix: list[list[float | None]]
    reference: list[float | None] | None
    method: str | None
    model: str | None
    source: str  # "dealcl" or "upstream"
    joint: bool = False
    # run.yaml `provenance.packages` (python, torch, transformers, …), None where not recorded.
    packages: dict[str, str] | None = None
    # efficiency.json: (stage task, its training step losses) per stage, None without the file.
    step_losses: list[tuple[str, list[float]]] | None = None

    @property
    def average_accuracy(self) -> float | None:
        return metrics.average_accuracy(self.matrix)

    @property
    def backward_transfer(self) -> float | None:
        return None if self.joint else metrics.backward_transfer(self.matrix)

    @property
    def forward_transfer(self) -> float | None:
        return None if self.joint else metrics.forward_transfer(self.matrix, self.reference)

    @property
    def missing(self) -> list[list]:
        """[stage, task] pairs of the last row and diagonal that are None."""
        return metrics.missing_entries(self.task_order, self.matrix, joint=self.joint)


# --- loading -------------------------------------------------------------------------------------

def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        raise UserError(f"{path} is unreadable or not valid JSON") from None


def _run_yaml(run_dir: Path) -> dict:
    """run.yaml as a mapping; {} when there is none."""
    config_path = run_dir / RUN_YAML
    if not config_path.is_file():
        return {}
    try:
        data = yaml.safe_load(config_path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, yaml.YAMLError):
        raise UserError(f"{config_path} is unreadable or not valid YAML") from None
    return data if isinstance(data, dict) else {}


def _method_and_model(run_dir: Path, results: dict) -> tuple[str | None, str | None]:
    """results.json's own keys first, then run.yaml at top level or under `config`."""
    method, model = results.get("method"), results.get("model")
    data = _run_yaml(run_dir)
    for source in (data, data.get("config")):
        if isinstance(source, dict):
            method = method or source.get("method")
            model = model or source.get("model")
    return (str(method) if method is not None else None, str(model) if model is not None else None)


def _packages(run_dir: Path) -> dict[str, str] | None:
    """run.yaml's `provenance.packages`: the versions the run was made with."""
    provenance = _run_yaml(run_dir).get("provenance")
    packages = provenance.get("packages") if isinstance(provenance, dict) else None
    if not isinstance(packages, dict):
        return None
    return {str(name): str(version) for name, version in packages.items() if version is not None}


def _step_losses(run_dir: Path) -> list[tuple[str, list[float]]] | None:
    """Per stage of efficiency.json, its task and training step losses (empty for a stage that
    trains nothing); None when the run has no efficiency.json."""
    path = run_dir / EFFICIENCY
    if not path.is_file():
        return None
    data = _read_json(path)
    stages = data.get("stages") if isinstance(data, dict) else None
    if not isinstance(stages, list):
        raise UserError(f"{path} has no list of `stages`")
    out = []
    for k, stage in enumerate(stages, 1):
        losses = stage.get("step_losses") if isinstance(stage, dict) else None
        if not isinstance(losses, list) or not all(isinstance(v, (int, float)) for v in losses):
            losses = []
        out.append((str(stage.get("task", k)) if isinstance(stage, dict) else str(k), [float(v) for v in losses]))
    return out


def _load_dealcl(run_dir: Path) -> RunSummary:
    results_path = run_dir / RESULTS
    results = _read_json(results_path)
    try:
        task_order = list(results["task_order"])
        matrix = [list(row) for row in results["accuracy_matrix"]]
    except (TypeError, KeyError):
        raise UserError(f"{results_path} is not a dealcl results.json (no task_order/accuracy_matrix)") from None
    method, model = _method_and_model(run_dir, results)
    return RunSummary(
        name=run_dir.name, task_order=task_order, matrix=matrix, reference=results.get("reference"),
        method=method, model=model, source="dealcl", joint=bool(results.get("joint", False)),
        packages=_packages(run_dir), step_losses=_step_losses(run_dir),
    )


def _stage_scores(stage_dir: Path) -> dict:
    """Upstream keys of one stage; predict_results.json is preferred over all_results.json."""
    for name in (PREDICT_RESULTS, UPSTREAM_ALL_RESULTS):
        if (stage_dir / name).is_file():
            scores = _read_json(stage_dir / name)
            if not isinstance(scores, dict):
                raise UserError(f"{stage_dir / name} is not a JSON object")
            return scores
    return {}


def _task_scores(scores: dict, task_order: list[str]) -> list[float | None]:
    row = []
    for task in task_order:
        value = scores.get(f"predict_exact_match_for_{task}")
        row.append(float(value) if isinstance(value, (int, float)) else None)
    return row


def _load_outputs(outputs: Path, run_dir: Path) -> RunSummary | None:
    stages: dict[int, Path] = {}
    for child in outputs.iterdir():
        match = _STAGE_DIR.match(child.name)
        if not match or not child.is_dir():
            continue
        k = int(match.group(1))
        if k in stages:
            raise UserError(f"{outputs} has two stage folders numbered {k}: {stages[k].name}, {child.name}")
        stages[k] = child
    order = sorted(k for k in stages if k > 0)
    if not order:
        return None
    task_order = [_STAGE_DIR.match(stages[k].name).group(2) for k in order]
    matrix = [_task_scores(_stage_scores(stages[k]), task_order) for k in order]
    reference = _task_scores(_stage_scores(stages[0]), task_order) if 0 in stages else None
    method, model = _method_and_model(run_dir, {})
    return RunSummary(
        name=run_dir.name, task_order=task_order, matrix=matrix, reference=reference,
        method=method, model=model, source="upstream", packages=_packages(run_dir),
    )


def load_run(path: Path) -> RunSummary:
    """A dealcl run directory, an upstream run directory, or an upstream `outputs` folder."""
    path = Path(path)
    if (path / RESULTS).is_file():
        return _load_dealcl(path)
    if (path / "outputs").is_dir():
        summary = _load_outputs(path / "outputs", path)
    elif path.is_dir():
        summary = _load_outputs(path, path.parent if path.name == "outputs" else path)
    else:
        summary = None
    if summary is None:
        raise UserError(f"{path} is not a dealcl run or upstream output directory")
    return summary


# --- formatting ----------------------------------------------------------------------------------

def _number(value: float | None) -> str:
    return _MISSING if value is None else f"{value:.2f}"


def _table(header: list[str], rows: list[list[str]], right_align_from: int = 1) -> list[str]:
    widths = [max(len(r[c]) for r in [header, *rows]) for c in range(len(header))]

    def line(cells: list[str]) -> str:
        parts = [cell.rjust(w) if c >= right_align_from else cell.ljust(w) for c, (cell, w) in enumerate(zip(cells, widths))]
        return "  ".join(parts).rstrip()

    return [line(header), *(line(r) for r in rows)]


def _stage_label(run: RunSummary, stage: int) -> str:
    """Row label of 1-based stage `stage`, named like its output folder."""
    if run.joint:
        return "joint"
    task = run.task_order[stage - 1] if stage <= len(run.task_order) else "?"
    return f"after {stage}-{task}"


def _matrix_lines(run: RunSummary) -> list[str]:
    """The accuracy matrix, split into column blocks that fit the terminal width."""
    labels = [_stage_label(run, k) for k in range(1, len(run.matrix) + 1)]
    if run.reference is not None:
        labels = ["zero-shot", *labels]
    rows = ([run.reference] if run.reference is not None else []) + run.matrix
    label_width = max((len(s) for s in labels), default=0)
    blocks, block, used = [], [], label_width
    for j in range(len(run.task_order)):
        width = max(len(run.task_order[j]), 6) + 2
        if block and used + width > _WIDTH:
            blocks.append(block)
            block, used = [], label_width
        block.append(j)
        used += width
    blocks.append(block)

    lines = []
    for block in blocks:
        header = [""] + [run.task_order[j] for j in block]
        body = [[label] + [_number(row[j] if j < len(row) else None) for j in block] for label, row in zip(labels, rows)]
        lines += _table(header, body) + [""]
    return lines[:-1]


def _over(count: int, total: int) -> str:
    tasks = "task" if total == 1 else "tasks"
    return f"over {count} {tasks}" if count == total else f"over {count} of {total} {tasks}"


def _run_lines(run: RunSummary) -> list[str]:
    details = ", ".join(f"{key} {value}" for key, value in (("method", run.method), ("model", run.model)) if value)
    lines = [f"== {run.name} ({run.source}{', ' + details if details else ''}) =="]
    lines += _matrix_lines(run)
    lines.append(f"{_MISSING} = not evaluated or missing")
    if run.missing:
        listed = ", ".join(f"{_stage_label(run, stage)}: {task}" for stage, task in run.missing)
        lines.append(f"missing (needed for AA/BWT, not counted as zero): {listed}")

    n_tasks = len(run.task_order)
    last_row = run.matrix[-1] if run.matrix else []
    present = sum(v is not None for v in last_row)
    lines.append(f"AA  {_number(run.average_accuracy)}  (macro mean {_over(present, n_tasks)})")
    if not run.joint:
        bwt_terms = metrics.backward_transfer_terms(run.matrix)
        lines.append(f"BWT {_number(run.backward_transfer)}  ({_over(len(bwt_terms), max(n_tasks - 1, 0))})")
        if run.reference is not None:
            fwt_terms = metrics.forward_transfer_terms(run.matrix, run.reference)
            lines.append(f"FWT {_number(run.forward_transfer)}  ({_over(len(fwt_terms), max(n_tasks - 1, 0))})")
    return lines


def _shorten(text: str | None, width: int) -> str:
    text = text or "?"
    return text if len(text) <= width else "…" + text[-(width - 1):]


# Packages whose version changes numbers enough that runs made with different ones do not compare.
COMPARED_PACKAGES = ("torch", "transformers", "peft")


def _names(names: list[str], shown: int = 3) -> str:
    return ", ".join(names[:shown]) + (f" and {len(names) - shown} more" if len(names) > shown else "")


def version_mismatch(runs: list[RunSummary]) -> str | None:
    """One `warning:` line when runs come from different torch/transformers/peft versions, else None.

    Runs that recorded no version (upstream runs, old dealcl runs) are left out of the comparison."""
    parts = []
    for package in COMPARED_PACKAGES:
        by_version: dict[str, list[str]] = {}
        for run in runs:
            version = (run.packages or {}).get(package)
            if version is not None:
                by_version.setdefault(version, []).append(run.name)
        if len(by_version) > 1:
            parts.append(f"{package} " + " vs ".join(f"{v} ({_names(names)})" for v, names in by_version.items()))
    if not parts:
        return None
    return ("warning: the runs compared were made with different package versions: " + "; ".join(parts)
            + " (run.yaml provenance.packages); differences between them may come from that")


def _report_text(runs: list[RunSummary]) -> str:
    sections = ["\n".join(_run_lines(run)) for run in runs]
    if len(runs) > 1:
        header = ["run", "method", "model", "AA", "BWT", "FWT"]
        rows = [
            [_shorten(r.name, 28), _shorten(r.method, 12), _shorten(r.model, 30),
             _number(r.average_accuracy), _number(r.backward_transfer), _number(r.forward_transfer)]
            for r in runs
        ]
        sections.append("\n".join(["== summary ==", *_table(header, rows, right_align_from=3)]))
    return "\n\n".join(sections) + "\n"


def format_report(runs: list[RunSummary], *, warn: bool = True) -> str:
    """Each run's matrix and metrics, then (for several runs) a side-by-side summary table.

    With several runs from different torch/transformers/peft versions, `warn` prints one
    `warning:` line on stderr (`version_mismatch`)."""
    if warn and len(runs) > 1:
        warning = version_mismatch(runs)
        if warning:
            print(warning, file=sys.stderr)
    return _report_text(runs)


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", text).strip("_") or "run"


def write_report(runs: list[RunSummary], directory: Path) -> Path:
    """`report.md` with the text report and its plots (PNG, next to it) in `directory`."""
    from . import plots
    from .paths import make_folder
    from .store import atomic_write_text

    directory = make_folder(Path(directory))
    lines = ["# dealcl report", "", "```", _report_text(runs).rstrip(), "```", ""]
    warning = version_mismatch(runs) if len(runs) > 1 else None
    if warning:
        lines += [f"**{warning}**", ""]
    if len(runs) > 1:
        names = [_slug(r.name) for r in runs]
        plots.metric_bars(names, [r.average_accuracy for r in runs], [r.backward_transfer for r in runs],
                          directory / AA_BWT_PLOT, "AA and BWT per run")
        lines += [f"![AA and BWT per run]({AA_BWT_PLOT})", ""]
    for run in runs:
        slug = _slug(run.name) if len(runs) > 1 else "run"
        heat = plots.heatmap(run, directory / f"{slug}_matrix.png")
        curves = plots.forgetting_curves(run, directory / f"{slug}_curves.png")
        lines += [f"## {run.name}", "", f"![accuracy matrix]({heat.name})", "", f"![per-task accuracy]({curves.name})", ""]
        if run.step_losses and any(losses for _, losses in run.step_losses):
            loss = plots.loss_curve(run, directory / f"{slug}_loss.png")
            lines += [f"![training loss per step]({loss.name})", ""]
    path = directory / REPORT
    atomic_write_text(path, "\n".join(lines))
    return path
