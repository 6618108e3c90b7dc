"""Learning-rate selection on held-out training examples, never on the test set.

`dealcl sweep --method M --lrs 1e-4,5e-4,1e-3 --val-per-task N …` runs the method once per
learning rate, each as a normal resumable run (in `<output>/lr-<value>`) that is evaluated on
the N examples per task held out of the training files (`eval_split=validation`). The chosen
rate is the one with the highest validation AA; ties go to the smaller rate. It writes
`sweep.json` and `sweep.md`. Upstream's dev split is its test split, hence this protocol.
"""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

from ..data.benchmarks import resolve_sequence
from ..errors import UserError
from ..methods import resolve_method
from .config import RunConfig, validate
from .driver import run_continual
from .layout import RESULTS, SWEEP, SWEEP_MD
from .paths import make_folder
from .store import atomic_write_json, atomic_write_text


def parse_rates(text: str) -> list[float]:
    try:
        rates = [float(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise UserError(f"--lrs must be comma-separated numbers, got {text!r}") from None
    if not rates or any(rate <= 0 for rate in rates):
        raise UserError(f"--lrs must list positive learning rates, got {text!r}")
    return sorted(set(rates))


def sweep(base: RunConfig, rates: list[float], output: Path, *, progress: bool = True, say=print) -> dict[str, Any]:
    if not base.val_per_task:
        raise UserError("sweep selects on held-out training examples: set --val-per-task N (N > 0)")
    # The swept rate is every stage's: a recipe's per-stage lr would hide it.
    per_stage = {s: {k: v for k, v in e.items() if k != "lr"} for s, e in base.task_overrides.items()}
    base = dataclasses.replace(base, task_overrides={s: e for s, e in per_stage.items() if e})
    configs = [validate(dataclasses.replace(base, lr=rate, eval_split="validation")) for rate in rates]
    # What would stop every run, checked before the first one is announced or started.
    resolve_sequence(base.benchmark, base.order, base.tasks)
    resolve_method(base.method)
    make_folder(output)
    rows = []
    for config in configs:
        run_dir = output / f"lr-{config.lr:g}"
        say(f"== {run_dir.name}")
        results = run_continual(config, run_dir, progress=progress) or json.loads((run_dir / RESULTS).read_text())
        rows.append({"lr": config.lr, "run": run_dir.name, "validation_aa": results.get("average_accuracy"),
                     "validation_bwt": results.get("backward_transfer")})
    scored = [r for r in rows if r["validation_aa"] is not None]
    best = max(scored, key=lambda r: (r["validation_aa"], -r["lr"])) if scored else None
    summary = {"method": base.method, "model": base.model, "tasks": configs[0].tasks, "benchmark": base.benchmark,
               "order": base.order, "train_per_task": base.train_per_task, "val_per_task": base.val_per_task,
               "runs": rows, "chosen_lr": best and best["lr"],
               # The best rate at either end of the grid: the optimum may lie outside it.
               "chosen_at_edge": bool(best) and len(rates) > 1 and best["lr"] in (min(rates), max(rates))}
    atomic_write_json(output / SWEEP, summary)
    lines = [f"# Learning-rate sweep: {base.method} on {base.model}", "",
             f"Evaluated on {base.val_per_task} examples per task held out of the training files (not the test set).", "",
             "| lr | validation AA | validation BWT |", "|---|---|---|"]
    for r in rows:
        mark = " (chosen)" if best is not None and r["lr"] == best["lr"] else ""
        aa = "—" if r["validation_aa"] is None else f"{r['validation_aa']:.2f}"
        bwt = "—" if r["validation_bwt"] is None else f"{r['validation_bwt']:.2f}"
        lines.append(f"| {r['lr']:g}{mark} | {aa} | {bwt} |")
    if summary["chosen_at_edge"]:
        lines += ["", f"The chosen rate is at the end of the grid: a rate beyond {best['lr']:g} may score higher."]
    atomic_write_text(output / SWEEP_MD, "\n".join(lines) + "\n")
    return summary
