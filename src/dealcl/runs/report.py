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
    # The folder of the stage outputs (per-example answers, for the paired comparison) and the
    # run's seed (run.yaml), None where unknown.
    outputs: Path | None = None
    seed: int | None = None
    # ROUGE-1 (x100) laid out as `matrix`, and its zero-shot row: runs scored with_rouge (dealcl's
    # results.json `rouge1_matrix`, upstream's predict_rouge1_for_<task>); None otherwise.
    rouge1: list[list[float | None]] | None = None
    rouge1_reference: list[float | None] | None = None

    @property
    def average_accuracy(self) -> float | None:
        return metrics.average_accuracy(self.matrix)

    @property
    def backward_transfer(self) -> float | None:
        return None if self.joint else metrics.backward_transfer(self.matrix)

    @property
    def forgetting(self) -> float | None:
        """FT (new_methods_spec.md §5), from the matrix: runs whose results.json predates it load too."""
        return None if self.joint else metrics.mean_forgetting(self.matrix)

    @property
    def forward_transfer(self) -> float | None:
        return None if self.joint else metrics.forward_transfer(self.matrix, self.reference)

    @property
    def average_rouge1(self) -> float | None:
        """Macro mean ROUGE-1 of the last row, as AA is of exact match."""
        return metrics.average_accuracy(self.rouge1) if self.rouge1 is not None else None

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


def _seed(run_dir: Path) -> int | None:
    config = _run_yaml(run_dir).get("config")
    seed = config.get("seed") if isinstance(config, dict) else None
    return seed if isinstance(seed, int) and not isinstance(seed, bool) else None


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
    from .integrity import check_outputs

    check_outputs(run_dir)  # results.json comes from these: a damaged stage is an error, not a score
    results_path = run_dir / RESULTS
    results = _read_json(results_path)
    try:
        task_order = list(results["task_order"])
        matrix = [list(row) for row in results["accuracy_matrix"]]
    except (TypeError, KeyError):
        raise UserError(f"{results_path} is not a dealcl results.json (no task_order/accuracy_matrix)") from None
    method, model = _method_and_model(run_dir, results)
    rouge1 = results.get("rouge1_matrix")  # absent in runs without with_rouge and in older runs
    return RunSummary(
        name=run_dir.name, task_order=task_order, matrix=matrix, reference=results.get("reference"),
        method=method, model=model, source="dealcl", joint=bool(results.get("joint", False)),
        packages=_packages(run_dir), step_losses=_step_losses(run_dir), outputs=run_dir / "outputs", seed=_seed(run_dir),
        rouge1=[list(row) for row in rouge1] if isinstance(rouge1, list) else None,
        rouge1_reference=results.get("reference_rouge1") if isinstance(rouge1, list) else None,
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


def _task_scores(scores: dict, task_order: list[str], metric: str = "exact_match") -> list[float | None]:
    row = []
    for task in task_order:
        value = scores.get(f"predict_{metric}_for_{task}")
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
    scores = {k: _stage_scores(stages[k]) for k in stages}
    matrix = [_task_scores(scores[k], task_order) for k in order]
    reference = _task_scores(scores[0], task_order) if 0 in stages else None
    rouge1 = [_task_scores(scores[k], task_order, "rouge1") for k in order]
    has_rouge = any(v is not None for row in rouge1 for v in row)
    method, model = _method_and_model(run_dir, {})
    return RunSummary(
        name=run_dir.name, task_order=task_order, matrix=matrix, reference=reference,
        method=method, model=model, source="upstream", packages=_packages(run_dir), outputs=outputs, seed=_seed(run_dir),
        rouge1=rouge1 if has_rouge else None,
        rouge1_reference=_task_scores(scores[0], task_order, "rouge1") if has_rouge and 0 in stages else None,
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


def _matrix_lines(run: RunSummary, matrix: list[list[float | None]] | None = None,
                  reference: list[float | None] | None = None) -> list[str]:
    """The accuracy matrix (or `matrix`, laid out as it is), split into column blocks that fit
    the terminal width."""
    if matrix is None:
        matrix, reference = run.matrix, run.reference
    labels = [_stage_label(run, k) for k in range(1, len(matrix) + 1)]
    if reference is not None:
        labels = ["zero-shot", *labels]
    rows = ([reference] if reference is not None else []) + matrix
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
        ft_terms = [v for v in metrics.forgetting(run.matrix) if v is not None]
        lines.append(f"FT  {_number(run.forgetting)}  (forgetting, {_over(len(ft_terms), max(n_tasks - 1, 0))})")
        if run.reference is not None:
            fwt_terms = metrics.forward_transfer_terms(run.matrix, run.reference)
            lines.append(f"FWT {_number(run.forward_transfer)}  ({_over(len(fwt_terms), max(n_tasks - 1, 0))})")
    if run.rouge1 is not None:
        lines += ["", "ROUGE-1 (rouge-score F-measure x100, stemmed)"]
        lines += _matrix_lines(run, run.rouge1, run.rouge1_reference)
        present = sum(v is not None for v in (run.rouge1[-1] if run.rouge1 else []))
        lines.append(f"R-1 {_number(run.average_rouge1)}  (macro mean {_over(present, n_tasks)})")
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


def task_set_mismatch(runs: list[RunSummary]) -> str | None:
    """One `warning:` line when runs shown side by side (the AA/BWT table and chart) were not
    scored on the same tasks: their AA and BWT average over different things."""
    by_tasks: dict[tuple[str, ...], list[str]] = {}
    for run in runs:
        by_tasks.setdefault(tuple(sorted(run.task_order)), []).append(run.name)
    if len(by_tasks) < 2:
        return None
    groups = "; ".join(f"{_names(names)}: {', '.join(tasks)}" for tasks, names in by_tasks.items())
    return f"warning: the runs compared were evaluated on different task sets ({groups}); their AA and BWT are not comparable"


def _report_text(runs: list[RunSummary]) -> str:
    sections = ["\n".join(_run_lines(run)) for run in runs]
    if len(runs) > 1:
        header = ["run", "method", "model", "AA", "BWT", "FT", "FWT"]
        rows = [
            [_shorten(r.name, 28), _shorten(r.method, 12), _shorten(r.model, 24),
             _number(r.average_accuracy), _number(r.backward_transfer), _number(r.forgetting),
             _number(r.forward_transfer)]
            for r in runs
        ]
        if any(r.rouge1 is not None for r in runs):  # the column DEAL's tables put next to EM
            header.append("R-1")
            rows = [row + [_number(r.average_rouge1)] for row, r in zip(rows, runs)]
        sections.append("\n".join(["== summary ==", *_table(header, rows, right_align_from=3)]))
        sections.append("\n".join(_paired_lines(runs)))
    return "\n\n".join(sections) + "\n"


def _paired_lines(runs: list[RunSummary]) -> list[str]:
    """The paired differences of the runs (runs/pairwise.py). Each method is an arm; when two
    runs share a method, order and seed (say, two learning rates), every run is its own arm."""
    import textwrap

    from . import pairwise

    settings = [(r.method, tuple(r.task_order), r.seed) for r in runs]
    by_run = any(r.method is None for r in runs) or len(set(settings)) < len(settings)
    names = [r.name if [q.name for q in runs].count(r.name) == 1 else f"{r.name}#{k + 1}" for k, r in enumerate(runs)]
    table = pairwise.pairwise([pairwise.paired_run(r, arm=name if by_run else r.method) for r, name in zip(runs, names)])

    def aligned(header: list[str], rows: list[list[str]]) -> list[str]:
        return _table(header, [[_shorten(row[0], 30), *row[1:]] for row in rows], right_align_from=1)

    lines = pairwise.text_lines(table, aligned)
    return [part for line in lines
            for part in ([line] if len(line) <= _WIDTH else textwrap.wrap(line, _WIDTH, subsequent_indent="  "))]


def format_report(runs: list[RunSummary], *, warn: bool = True) -> str:
    """Each run's matrix and metrics, then (for several runs) a side-by-side summary table.

    With several runs from different torch/transformers/peft versions, `warn` prints one
    `warning:` line on stderr (`version_mismatch`)."""
    if warn and len(runs) > 1:
        for warning in (version_mismatch(runs), task_set_mismatch(runs)):
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
    for warning in (version_mismatch(runs), task_set_mismatch(runs)) if len(runs) > 1 else ():
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
