"""Paired comparison of methods: A − B in AA, BWT and FT, with a paired bootstrap interval.

Methods of one comparison answer the same test examples, so their difference is measured on the
same resampled examples (eval/bootstrap.py): an example both methods get right, or both get
wrong, moves neither's score relative to the other. The per-example answers come from each
stage's predictions.json (or the upstream-layout predictions file), so finished runs, the
committed ones under results/ included, are compared without being trained or evaluated again.

The rule, also written under every table (`rule`):

* a method is compared with another on the (task order, seed) settings both have run;
* A − B is the mean over task orders of the mean over that order's seeds of A's metric minus
  B's; a resample draws every task's test examples once, with replacement, and uses the same
  draw for every stage of both methods; where an order has several seeds, the seeds are drawn
  with replacement too (the same seeds for both);
* the interval is the 2.5 and 97.5 percentiles of the resampled A − B (10 000 resamples,
  bootstrap seed 0, so a table is reproducible); it "excludes 0" when both ends have one sign;
* a pair is skipped, with the reason, when it has no setting in common, when a run has no
  per-example answers, or when the two runs of a setting did not answer the same test examples
  (another test file, cap, sampling or label sequence).
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import yaml

from ..eval.bootstrap import (
    DEFAULT_RESAMPLES, DEFAULT_SEED, LEVEL, METRICS, PairedDifference, RunHits, paired_difference, resample_runs,
)
from ..eval.metrics import exact_match
from .layout import PREDICTIONS, RUN_YAML, UPSTREAM_PREDICTIONS

def rule(resamples: int = DEFAULT_RESAMPLES, level: float = LEVEL) -> str:
    """The module docstring's rule in a sentence, written under every pairwise table."""
    return (f"A − B per pair of methods, over the task orders and seeds both ran (the mean over orders of the "
            f"mean over seeds); brackets: paired bootstrap {level:.0%} interval ({_thousands(resamples)} resamples of the "
            "test examples, the same examples for both methods and every stage, and of the seeds where an order "
            "has several); * = the interval excludes 0. FT = forgetting (mean over earlier tasks of their best "
            "score minus the final one): lower is better; AA and BWT: higher is better.")


def _thousands(n: int) -> str:
    return f"{n:,}".replace(",", " ")

SHORT_NAMES = {"average_accuracy": "AA", "backward_transfer": "BWT", "forgetting": "FT"}


# --- per-example answers of one run ------------------------------------------------------------------

def _stage_answers(stage_dir: Path) -> dict[str, dict[str, list[str]]] | None:
    """Per task, the answers and labels of one stage, in test-set order; None without either file.
    A file that cannot be read as answers raises ValueError (the caller notes it, never fails)."""
    try:
        if (stage_dir / PREDICTIONS).is_file():
            answers = json.loads((stage_dir / PREDICTIONS).read_text(encoding="utf-8"))
            return {str(name): {"predictions": [str(p) for p in task["predictions"]],
                                "labels": [str(y) for y in task["labels"]]} for name, task in answers.items()}
        if (stage_dir / UPSTREAM_PREDICTIONS).is_file():
            answers = {}
            for line in (stage_dir / UPSTREAM_PREDICTIONS).read_text(encoding="utf-8").splitlines():
                if line.strip():
                    record = json.loads(line)
                    task = answers.setdefault(str(record["Dataset"]), {"predictions": [], "labels": []})
                    task["predictions"].append(str(record["prediction"]))
                    task["labels"].append(str(record["label"]))
            return answers
    except (OSError, UnicodeDecodeError, ValueError, KeyError, TypeError, AttributeError):
        raise ValueError(f"unreadable answers in {stage_dir}") from None
    return None


def _test_source(run_yaml: dict, task: str) -> dict[str, Any] | None:
    """What decides which examples task `task` was scored on, as run.yaml records it: the file
    (by content), the split, the cap and how the cap picks. None for a run without run.yaml."""
    config = run_yaml.get("config")
    if not isinstance(config, dict):
        return None
    split = config.get("eval_split", "test")
    provenance = run_yaml.get("provenance") if isinstance(run_yaml.get("provenance"), dict) else {}
    files = (provenance.get("data_files") or {}).get(task) or {}
    source: dict[str, Any] = {"split": split, "sample": config.get("sample", "first")}
    if split == "test":
        source.update(file=(files.get("test") or {}).get("sha256"), cap=config.get("test_per_task"))
    else:  # validation examples are held out of the training file, after the training pick
        source.update(file=(files.get("train") or {}).get("sha256"), cap=config.get("val_per_task"),
                      train_cap=config.get("train_per_task"))
    if source["sample"] != "first" or split != "test":
        source["seed"] = config.get("seed")  # the seeded pick
    return source


def _test_set_key(task: str, labels: list[str], source: dict[str, Any] | None) -> str:
    text = json.dumps({"task": task, "labels": labels, "source": source}, sort_keys=True, ensure_ascii=False)
    return hashlib.sha256(text.encode()).hexdigest()


def read_hits(summary) -> tuple[RunHits | None, str | None]:
    """A loaded run's (runs.report.RunSummary) per-example exact-match hits, or (None, why not).

    Refused when a stage's answers are missing, when a task's labels change between stages (not one
    test set), or when the answers do not reproduce the run's accuracy matrix (they would not be
    the answers its metrics came from)."""
    outputs = summary.outputs
    if outputs is None or not outputs.is_dir():
        return None, "no stage outputs"
    stage_dirs = {}
    for child in outputs.iterdir():
        head = child.name.split("-", 1)[0]
        if child.is_dir() and head.isdigit() and int(head) > 0:
            stage_dirs[int(head)] = child
    run_yaml = {}
    if (outputs.parent / RUN_YAML).is_file():
        run_yaml = yaml.safe_load((outputs.parent / RUN_YAML).read_text(encoding="utf-8")) or {}
    column = {name: j for j, name in enumerate(summary.task_order)}
    hits: dict[tuple[int, int], np.ndarray] = {}
    labels_of: dict[int, list[str]] = {}
    for stage in range(1, len(summary.matrix) + 1):
        try:
            answers = _stage_answers(stage_dirs[stage]) if stage in stage_dirs else None
        except ValueError as unreadable:
            return None, str(unreadable)
        if answers is None:
            return None, f"no per-example answers for stage {stage}"
        for name, task in answers.items():
            if name not in column:
                continue
            j = column[name]
            if labels_of.setdefault(j, task["labels"]) != task["labels"]:
                return None, f"task {name} has other test labels at stage {stage}"
            correct = np.array([exact_match(p, y) for p, y in zip(task["predictions"], task["labels"])], dtype=bool)
            recorded = summary.matrix[stage - 1][j] if j < len(summary.matrix[stage - 1]) else None
            if len(correct) == 0 or recorded is None or abs(100.0 * correct.mean() - recorded) > 0.01:
                return None, f"its answers for {name} at stage {stage} do not reproduce its accuracy matrix"
            hits[(stage - 1, j)] = correct
        unanswered = [name for j, name in enumerate(summary.task_order)
                      if j < len(summary.matrix[stage - 1]) and summary.matrix[stage - 1][j] is not None
                      and (stage - 1, j) not in hits]
        if unanswered:
            return None, f"no per-example answers for {', '.join(unanswered)} at stage {stage}"
    test_sets = [_test_set_key(name, labels_of.get(j, []), _test_source(run_yaml, name))
                 for j, name in enumerate(summary.task_order)]
    return RunHits(n_rows=len(summary.matrix), test_sets=test_sets, hits=hits, joint=summary.joint), None


# --- the pairwise table ------------------------------------------------------------------------------

@dataclass
class PairedRun:
    """One run as an arm of the comparison sees it: its method (or another label), its setting."""
    arm: str
    name: str
    task_order: tuple[str, ...]
    seed: int | None
    hits: RunHits | None
    note: str | None = None  # why `hits` is None


def paired_run(summary, arm: str | None = None) -> PairedRun:
    """A loaded run (runs.report.RunSummary) as one arm's run; the arm defaults to its method."""
    hits, note = read_hits(summary)
    return PairedRun(arm=arm or summary.method or summary.name, name=summary.name,
                     task_order=tuple(summary.task_order), seed=summary.seed, hits=hits, note=note)


def _difference_json(value: PairedDifference | None) -> dict[str, Any] | None:
    if value is None:
        return None
    return {"difference": round(value.difference, 2), "interval": [round(value.low, 2), round(value.high, 2)],
            "excludes_zero": value.excludes_zero}


def pairwise(runs: Sequence[PairedRun], *, resamples: int = DEFAULT_RESAMPLES, seed: int = DEFAULT_SEED,
             level: float = LEVEL) -> dict[str, Any]:
    """Every pair of arms: A − B in AA, BWT and FT with paired intervals (module docstring: the rule).

    Arms are listed by mean AA, highest first, and each pair is oriented so that A is the arm
    listed first (A − B in AA is then mostly positive). JSON-ready."""
    usable = [r for r in runs if r.hits is not None]
    notes = [f"{r.name}: {r.note}" for r in runs if r.hits is None]
    resampled = dict(zip(map(id, usable), resample_runs([r.hits for r in usable], resamples, seed)))
    settings: dict[str, dict[tuple[tuple[str, ...], int | None], PairedRun]] = {}
    for run in usable:
        mine = settings.setdefault(run.arm, {})
        if (run.task_order, run.seed) in mine:
            other = mine[(run.task_order, run.seed)].name
            raise ValueError(f"{run.arm} has two runs of one order and seed: {other}, {run.name}")
        mine[(run.task_order, run.seed)] = run

    def mean_aa(arm: str) -> float:
        values = [resampled[id(r)].point["average_accuracy"] for r in settings[arm].values()]
        values = [v for v in values if v is not None]
        return float(np.mean(values)) if values else float("-inf")

    arms = sorted(settings, key=lambda arm: -mean_aa(arm))  # stable: ties keep the given order
    pairs, skipped = [], []
    for a_index, a in enumerate(arms):
        for b in arms[a_index + 1:]:
            common = [s for s in settings[a] if s in settings[b]]
            if not common:
                skipped.append({"a": a, "b": b, "reason": "no task order and seed in common"})
                continue
            differing = [f"{settings[a][s].name} vs {settings[b][s].name}" for s in common
                         if list(settings[a][s].hits.test_sets) != list(settings[b][s].hits.test_sets)]
            if differing:
                skipped.append({"a": a, "b": b, "reason": "different test examples: " + ", ".join(differing)})
                continue
            # Sorted, so the seed resampling does not depend on the order the runs were given in.
            by_order: dict[tuple[str, ...], list] = {}
            for s in sorted(common, key=lambda s: (s[0], s[1] is None, s[1] or 0)):
                by_order.setdefault(s[0], []).append(s)
            groups = [[(resampled[id(settings[a][s])], resampled[id(settings[b][s])]) for s in seeds]
                      for seeds in by_order.values()]
            row: dict[str, Any] = {
                "a": a, "b": b, "orders": len(by_order), "runs": len(common),
                "run_pairs": [[settings[a][s].name, settings[b][s].name] for seeds in by_order.values() for s in seeds],
            }
            for metric in METRICS:
                row[metric] = _difference_json(paired_difference(groups, metric, seed=seed, level=level))
            pairs.append(row)
    return {"rule": rule(resamples, level), "resamples": resamples, "bootstrap_seed": seed, "level": level, "arms": arms,
            "pairs": pairs, "skipped": skipped, "notes": notes}


# --- formatting --------------------------------------------------------------------------------------

def difference_cell(value: dict[str, Any] | None) -> str:
    """`+4.2 [+1.0, +7.5] *`: A − B, its interval, * when the interval excludes 0; — if undefined."""
    if value is None:
        return "—"
    low, high = value["interval"]
    return f"{value['difference']:+.1f} [{low:+.1f}, {high:+.1f}]" + (" *" if value["excludes_zero"] else "")


def significant_counts(table: dict[str, Any]) -> str:
    """`intervals that exclude 0: AA 3 of 10 pairs, BWT 1 of 6, FT 2 of 6`, per metric."""
    parts = []
    for metric in METRICS:
        defined = [p[metric] for p in table["pairs"] if p[metric] is not None]
        if defined:
            significant = sum(d["excludes_zero"] for d in defined)
            parts.append(f"{SHORT_NAMES[metric]} {significant} of {len(defined)}" + (" pairs" if not parts else ""))
    return "intervals that exclude 0: " + ", ".join(parts)


def rows(table: dict[str, Any]) -> tuple[list[str], list[list[str]]]:
    """Header and one row per pair: A − B, the runs paired, then ΔAA, ΔBWT, ΔFT cells."""
    header = ["A − B", "run pairs", "Δ AA", "Δ BWT", "Δ FT"]
    body = [[f"{p['a']} − {p['b']}", str(p["runs"]), *(difference_cell(p[m]) for m in METRICS)] for p in table["pairs"]]
    return header, body


def _what_was_left_out(table: dict[str, Any]) -> list[str]:
    lines = [f"not compared: {s['a']} − {s['b']} ({s['reason']})" for s in table["skipped"]]
    return lines + [f"left out: {note}" for note in table["notes"]]


def markdown_lines(table: dict[str, Any], heading: str = "## Paired differences") -> list[str]:
    """The pairwise table as markdown, for comparison.md and docs/RESULTS.md."""
    header, body = rows(table)
    lines = [heading, "", table["rule"], ""]
    if body:
        lines += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        lines += ["| " + " | ".join(row) + " |" for row in body]
        lines += ["", significant_counts(table)[0].upper() + significant_counts(table)[1:] + ".", ""]
    else:
        lines += ["No pair of methods could be compared.", ""]
    left_out = _what_was_left_out(table)
    return lines + ([f"- {line}" for line in left_out] + [""] if left_out else [])


def text_lines(table: dict[str, Any], table_lines) -> list[str]:
    """The pairwise table for a terminal; `table_lines(header, rows)` aligns the columns."""
    header, body = rows(table)
    lines = ["== paired differences (A − B) =="]
    if body:
        lines += table_lines(header, body)
        lines += [significant_counts(table), f"* = the {table['level']:.0%} interval excludes 0 (paired bootstrap, "
                  f"{_thousands(table['resamples'])} resamples; the rule: runs/pairwise.py)"]
    else:
        lines.append("no pair of runs could be compared")
    return lines + _what_was_left_out(table)
