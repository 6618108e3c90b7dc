"""`dealcl compare`: several methods over one or more task orders, each a normal resumable run.

Every (order, method) pair is an ordinary run directory under the comparison folder, so a
re-run resumes unfinished runs and only re-reads finished ones. The aggregates are computed
from each run's results.json, efficiency.json and prediction files, never kept separately.
"""
from __future__ import annotations

import dataclasses
import json
import statistics
from pathlib import Path
from typing import Any

from ..errors import UserError
from ..eval.bootstrap import METRICS, run_intervals
from . import pairwise
from .config import RunConfig, validate, with_recipe
from .driver import run_continual
from .layout import AA_BWT_PLOT, COMPARISON, COMPARISON_MD, EFFICIENCY, RESULTS, SWEEP
from .report import RunSummary, load_run
from .paths import make_folder
from .store import atomic_write_json, atomic_write_text


def run_name(config: RunConfig) -> str:
    where = f"order{config.order}" if config.order is not None else (config.benchmark or "custom")
    return f"{where}-{config.method.replace('/', '_').replace(':', '_')}"


def swept_rates(folder: Path, methods: list[str]) -> dict[str, float]:
    """Each method's learning rate as chosen by `dealcl sweep --output <folder>/<method>`."""
    rates = {}
    for method in methods:
        path = folder / method.replace("/", "_") / SWEEP
        try:
            chosen = json.loads(path.read_text()).get("chosen_lr")
        except (OSError, ValueError):
            raise UserError(f"--lrs-from: no readable sweep for method {method} ({path})") from None
        if not isinstance(chosen, (int, float)) or not chosen > 0:
            raise UserError(f"--lrs-from: the sweep in {path.parent} chose no learning rate")
        rates[method] = float(chosen)
    return rates


def plan(base: RunConfig, methods: list[str], orders: list[int | None],
         rates: dict[str, float] | None = None, user_keys: set[str] | None = None) -> list[RunConfig]:
    """One config per (order, method). With `base.recipe` (not yet applied: `user_config`),
    each pair gets the recipe that fits it, under the keys the user set (`user_keys`)."""
    if base.method_options:
        raise UserError("compare runs several methods: method.KEY=VALUE options are not allowed here")
    if not methods:
        raise UserError("compare needs --methods (comma-separated)")
    configs = []
    for order in orders:
        for method in methods:
            lr = (rates or {}).get(method, base.lr)
            config = dataclasses.replace(base, method=method, order=order, lr=lr)
            if config.recipe is not None:
                keys = (user_keys or set()) | {"method", "order"} | ({"lr"} if lr is not None else set())
                config = with_recipe(config, keys)
            configs.append(validate(config))
    return configs


def _rounded(interval: tuple[float, float] | None) -> list[float] | None:
    return None if interval is None else [round(interval[0], 2), round(interval[1], 2)]


def summarize_run(run_dir: Path) -> dict[str, Any]:
    """One run's row of comparison.json. Its intervals are the bootstrap over its test examples
    (eval/bootstrap.py) on the same draws as the paired table's, from its per-example answers."""
    summary: RunSummary = load_run(run_dir)
    results = json.loads((run_dir / RESULTS).read_text())
    efficiency = json.loads((run_dir / EFFICIENCY).read_text()).get("stages", [])
    speeds = [s["train_samples_per_second"] for s in efficiency if s.get("train_samples_per_second")]
    hits, _ = pairwise.read_hits(summary)
    intervals = run_intervals(hits) if hits is not None else dict.fromkeys(METRICS)
    invalid = results.get("invalid_rate_matrix") or [[]]
    last_invalid = [v for v in invalid[-1] if v is not None]
    return {
        "run": run_dir.name, "method": summary.method, "task_order": summary.task_order,
        "average_accuracy": summary.average_accuracy, "backward_transfer": summary.backward_transfer,
        "forgetting": summary.forgetting,
        "average_rouge1": summary.average_rouge1,  # None unless the run was scored with_rouge
        "aa_interval": _rounded(intervals["average_accuracy"]),
        "bwt_interval": None if summary.joint else _rounded(intervals["backward_transfer"]),
        "ft_interval": None if summary.joint else _rounded(intervals["forgetting"]),
        "final_invalid_rate": round(sum(last_invalid) / len(last_invalid), 2) if last_invalid else None,
        "train_samples_per_second": round(statistics.mean(speeds), 3) if speeds else None,
        "peak_memory_mb": max((s.get("peak_memory_mb") or 0 for s in efficiency), default=None),
        "trainable_parameters": max((s.get("trainable_parameters") or 0 for s in efficiency), default=None),
        "wall_seconds": round(sum(s.get("wall_seconds", 0) for s in efficiency), 1),
    }


def _spread(values: list[float]) -> float | None:
    return round(statistics.stdev(values), 2) if len(values) > 1 else None


def aggregate(runs: list[dict[str, Any]], methods: list[str], paired: dict[str, Any] | None = None) -> dict[str, Any]:
    """comparison.json: per method its runs and means; `paired` (runs/pairwise.py) the pairwise table."""
    per_method = {}
    for method in methods:
        mine = [r for r in runs if r["method"] == method]
        aa = [r["average_accuracy"] for r in mine if r["average_accuracy"] is not None]
        bwt = [r["backward_transfer"] for r in mine if r["backward_transfer"] is not None]
        ft = [r["forgetting"] for r in mine if r["forgetting"] is not None]
        per_method[method] = {
            "runs": [r["run"] for r in mine],
            "aa": {r["run"]: r["average_accuracy"] for r in mine}, "bwt": {r["run"]: r["backward_transfer"] for r in mine},
            "ft": {r["run"]: r["forgetting"] for r in mine},
            "aa_mean": round(statistics.mean(aa), 2) if aa else None, "aa_spread": _spread(aa),
            "bwt_mean": round(statistics.mean(bwt), 2) if bwt else None, "bwt_spread": _spread(bwt),
            "ft_mean": round(statistics.mean(ft), 2) if ft else None, "ft_spread": _spread(ft),
            "rouge1_mean": _mean_of(mine, "average_rouge1"),
            "train_samples_per_second": _mean_of(mine, "train_samples_per_second"),
            "peak_memory_mb": max((r["peak_memory_mb"] or 0 for r in mine), default=None),
            "trainable_parameters": max((r["trainable_parameters"] or 0 for r in mine), default=None),
        }
    return {"methods": per_method, "runs": runs, "pairwise": paired}


def _mean_of(rows: list[dict], key: str) -> float | None:
    values = [r[key] for r in rows if r.get(key) is not None]
    return round(statistics.mean(values), 3) if values else None


def _fmt(value, digits: int = 2) -> str:
    return "—" if value is None else f"{value:.{digits}f}"


def _interval(value) -> str:
    return "" if not value else f" [{value[0]:.1f}, {value[1]:.1f}]"


def markdown(comparison: dict[str, Any], base: RunConfig) -> str:
    runs = comparison["runs"]
    orders = sorted({r["run"].split("-", 1)[0] for r in runs})
    rouge = any(m.get("rouge1_mean") is not None for m in comparison["methods"].values())
    lines = [
        "# dealcl compare", "",
        f"Model `{base.model}`, {base.train_per_task or 'all'} training and {base.test_per_task or 'all'} test examples "
        f"per task, seed {base.seed}, eval mode {base.eval_mode}. AA, BWT and FT (forgetting) in points of exact match; "
        "brackets: bootstrap 95% intervals over test examples.", "",
        "| method | " + " | ".join(f"{o} AA | {o} BWT | {o} FT" for o in orders)
        + " | mean AA (sd) | mean BWT (sd) | mean FT (sd) | " + ("mean R-1 | " if rouge else "")
        + "invalid % | train ex/s | peak MB | trainable |",
        "|---|" + "---|---|---|" * len(orders) + "---|---|---|" + ("---|" if rouge else "") + "---|---|---|---|",
    ]
    for method, m in comparison["methods"].items():
        cells = []
        for order in orders:
            run = next((r for r in runs if r["method"] == method and r["run"].startswith(order + "-")), None)
            cells += [_fmt(run and run["average_accuracy"]) + _interval(run and run["aa_interval"]),
                      _fmt(run and run["backward_transfer"]) + _interval(run and run["bwt_interval"]),
                      _fmt(run and run["forgetting"]) + _interval(run and run["ft_interval"])]
        invalid = _mean_of([r for r in runs if r["method"] == method], "final_invalid_rate")
        lines.append(
            f"| {method} | " + " | ".join(cells)
            + f" | {_fmt(m['aa_mean'])} ({_fmt(m['aa_spread'])}) | {_fmt(m['bwt_mean'])} ({_fmt(m['bwt_spread'])})"
            + f" | {_fmt(m['ft_mean'])} ({_fmt(m['ft_spread'])})"
            + (f" | {_fmt(m['rouge1_mean'])}" if rouge else "")
            + f" | {_fmt(invalid, 1)} | {_fmt(m['train_samples_per_second'])} | {_fmt(m['peak_memory_mb'], 0)}"
            + f" | {m['trainable_parameters'] or '—'} |"
        )
    if comparison.get("pairwise"):
        lines += [""] + pairwise.markdown_lines(comparison["pairwise"], heading="## Paired differences")
    lines += ["", f"![AA and BWT per method]({AA_BWT_PLOT})", ""]
    for run in runs:
        lines += [f"![{run['run']} accuracy matrix]({run['run']}_matrix.png) ![{run['run']} per-task accuracy]({run['run']}_curves.png)"]
    return "\n".join(lines) + "\n"


def _interval_bars(comparison: dict[str, Any], names: list[str], key: str) -> list[list[float]]:
    """Asymmetric error bars [below, above] from each method's single run's bootstrap interval."""
    runs = {row["run"]: row for row in comparison["runs"]}
    below, above = [], []
    for name in names:
        row = runs[comparison["methods"][name]["runs"][0]]
        value = row["average_accuracy" if key == "aa" else "backward_transfer"]
        interval = row[f"{key}_interval"]
        ok = value is not None and interval is not None
        below.append(value - interval[0] if ok else 0.0)
        above.append(interval[1] - value if ok else 0.0)
    return [below, above]


def compare(base: RunConfig, methods: list[str], orders: list[int | None], output: Path, *, progress: bool = True,
            say=print, rates: dict[str, float] | None = None, user_keys: set[str] | None = None) -> dict[str, Any]:
    """`rates`: a learning rate per method (from `swept_rates`), overriding `base.lr`;
    `user_keys`: the keys the user set, which a recipe (`base.recipe`) must not replace."""
    from . import plots

    configs = plan(base, methods, orders, rates, user_keys)
    make_folder(output)
    rows, paired_runs = [], []
    for config in configs:
        run_dir = output / run_name(config)
        say(f"== {run_dir.name}")
        run_continual(config, run_dir, progress=progress)
        rows.append(summarize_run(run_dir))
        summary = load_run(run_dir)
        paired_runs.append(pairwise.paired_run(summary, arm=config.method))
        plots.heatmap(summary, output / f"{run_dir.name}_matrix.png")
        plots.forgetting_curves(summary, output / f"{run_dir.name}_curves.png")
    comparison = aggregate(rows, methods, pairwise.pairwise(paired_runs))
    names = list(comparison["methods"])
    aa = [comparison["methods"][m]["aa_mean"] for m in names]
    bwt = [comparison["methods"][m]["bwt_mean"] for m in names]
    if len(orders) == 1:  # one run per method: no spread over orders, but sampling error
        what = "one order; bars: bootstrap 95% interval"
        aa_err, bwt_err = (_interval_bars(comparison, names, key) for key in ("aa", "bwt"))
    else:
        what = f"mean over {len(orders)} orders; bars: sd"
        aa_err, bwt_err = ([comparison["methods"][m][f"{key}_spread"] or 0 for m in names] for key in ("aa", "bwt"))
    plots.metric_bars(names, aa, bwt, output / AA_BWT_PLOT, f"AA and BWT per method on {base.model} ({what})",
                      aa_err=aa_err, bwt_err=bwt_err)
    atomic_write_json(output / COMPARISON, comparison)
    atomic_write_text(output / COMPARISON_MD, markdown(comparison, base))
    return comparison
