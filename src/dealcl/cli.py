"""`dealcl` command line. A mistake in the user's input is one `error:` line and exit code 2."""
from __future__ import annotations

import argparse
import json
import os
import sys
import warnings
from pathlib import Path

from .errors import RunInterrupted, UserError
from .runs.paths import check_file, check_folder

EPILOG = "Docs: README.md and docs/ in the dealcl repository."


class Parser(argparse.ArgumentParser):
    """argparse prints usage plus an error on bad flags; we print just one `error:` line."""

    def error(self, message: str):  # type: ignore[override]
        raise UserError(f"{message} (see `{self.prog} --help`)")


def _add_run_flags(p: argparse.ArgumentParser) -> None:
    from .runs.config import RunConfig

    # One flag per RunConfig field marked `flag(...)`; values stay text here and are checked
    # with the YAML and key=value ones by the config (runs/config.py).
    for spec in RunConfig.flag_fields():
        name = "--" + spec.name.replace("_", "-")
        if spec.type in (bool, "bool"):
            p.add_argument(name, dest=spec.name, action="store_const", const=True, help=spec.metadata["help"])
        else:
            p.add_argument(name, dest=spec.name, type=str, help=spec.metadata["help"])
    p.add_argument("--output", "-o", help="run directory (default runs/<benchmark>-<method>)")
    p.add_argument("--config", help="YAML config file (a run.yaml works too)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.add_argument("--num-processes", dest="num_processes", type=int, default=1,
                   help="data-parallel processes on this machine (runs itself under torchrun)")
    p.add_argument("overrides", nargs="*", help="key=value config overrides, method.KEY=VALUE for method options")


def build_parser() -> Parser:
    parser = Parser(prog="dealcl", description="Continual low-rank fine-tuning of language models.", epilog=EPILOG)
    sub = parser.add_subparsers(dest="command", parser_class=Parser, metavar="COMMAND")
    sub.required = True

    run = sub.add_parser("run", help="run a whole continual task sequence")
    _add_run_flags(run)

    compare = sub.add_parser("compare", help="several methods over one or more task orders, side by side")
    _add_run_flags(compare)
    compare.add_argument("--methods", required=True, help="comma-separated method names")
    compare.add_argument("--orders", help="comma-separated task orders of the benchmark (default: --order or none)")
    compare.add_argument("--lrs-from", dest="lrs_from",
                         help="folder of `dealcl sweep` outputs (<folder>/<method>/sweep.json): each method runs at "
                              "the rate its sweep chose")

    sweep = sub.add_parser("sweep", help="choose a method's learning rate on held-out training examples")
    _add_run_flags(sweep)
    sweep.add_argument("--lrs", default="1e-4,5e-4,1e-3", help="comma-separated learning rates (default 1e-4,5e-4,1e-3)")

    resume = sub.add_parser("resume", help="continue a run after its last finished stage")
    resume.add_argument("run_dir")
    resume.add_argument("--quiet", action="store_true")
    resume.add_argument("--num-processes", dest="num_processes", type=int, default=1,
                        help="data-parallel processes on this machine (as for `run`)")

    report = sub.add_parser("report", help="accuracy matrix, AA and BWT of one or several runs")
    report.add_argument("run_dirs", nargs="+")
    report.add_argument("--output", help="write report.md and plots here (default: into a single dealcl run)")

    predict = sub.add_parser("predict", help="answer new inputs with a run's final model")
    predict.add_argument("run_dir")
    predict.add_argument("--input", required=True, help="JSON, JSONL or CSV file with a `sentence` field")
    predict.add_argument("--task", help="which task's prompt to use (default: the run's last task)")
    predict.add_argument("--output", help="write JSONL here instead of standard output")

    demo = sub.add_parser("demo", help="the TC sequence with SeqLoRA and zero-shot on the embedded model, sized to this machine")
    demo.add_argument("--output", default="runs/demo", help="folder for the two runs (default runs/demo)")
    demo.add_argument("--quiet", action="store_true", help="no progress bars")
    sub.add_parser("methods", help="list the continual methods")
    sub.add_parser("benchmarks", help="list the benchmarks and their task orders")
    sub.add_parser("models", help="list the model short names")
    recipes = sub.add_parser("recipes", help="list the recipes of upstream settings (or show one)")
    recipes.add_argument("name", nargs="?", help="a recipe to show in full")
    recipes.add_argument("--markdown", action="store_true", help="print the table of docs/METHODS.md")

    export = sub.add_parser("export", help="write a run's final model as a stock PEFT adapter or merged weights")
    export.add_argument("run_dir")
    export.add_argument("--to", required=True, dest="to", help="destination folder (new or empty)")

    data = sub.add_parser("data", help="benchmark data")
    data_sub = data.add_subparsers(dest="data_command", parser_class=Parser, metavar="ACTION")
    data_sub.required = True
    download = data_sub.add_parser("download", help="fetch CL_Benchmark from the O-LoRA repository (needs internet)")
    download.add_argument("dest", nargs="?", default="data/CL_Benchmark")
    return parser


def _flags(args: argparse.Namespace) -> dict:
    from .runs.config import RunConfig

    return {spec.name: getattr(args, spec.name) for spec in RunConfig.flag_fields()}


def _relaunch(argv: list[str], processes: int) -> int:
    """`--num-processes N`: the same command as N processes on this machine, launched the way
    `torchrun --standalone` does it but in-process, so that a failing rank shows its own
    `error:` line and not the launcher's traceback."""
    import logging
    import uuid

    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.launcher.api import LaunchConfig, elastic_launch

    if processes < 1:
        raise UserError(f"--num-processes must be at least 1, got {processes}")
    rest, skip = [], False
    for arg in argv:
        if skip:
            skip = False
            continue
        if arg == "--num-processes":
            skip = True
            continue
        if arg.startswith("--num-processes="):
            continue
        rest.append(arg)
    # Share the cores between the processes (torchrun would give each one thread).
    os.environ.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // processes)))
    logging.getLogger("torch.distributed.elastic").setLevel(logging.CRITICAL)
    launch = LaunchConfig(
        min_nodes=1, max_nodes=1, nproc_per_node=processes, run_id=str(uuid.uuid4()), rdzv_backend="c10d",
        rdzv_endpoint="localhost:0", max_restarts=0, monitor_interval=0.1,
    )
    try:
        elastic_launch(launch, sys.executable)("-m", "dealcl", *rest)
    except ChildFailedError as exc:
        codes = sorted({failure.exitcode for failure in exc.failures.values()})
        if 2 in codes:
            return 2  # a user error: rank 0 printed its one line; the launcher stopped the others
        print(f"error: a training process failed (exit codes {codes}); rerun with --num-processes 1 to see why",
              file=sys.stderr)
        return 1
    return 0


def cmd_run(args: argparse.Namespace) -> int:
    from .runs.config import build_config
    from .runs.driver import run_continual
    from .runs.report import RunSummary, format_report, load_run

    from .train.distributed import launched_processes

    config = build_config(Path(args.config) if args.config else None, _flags(args), args.overrides)
    output = Path(args.output) if args.output else Path("runs") / f"{config.benchmark or 'custom'}-{config.method.replace('/', '_')}"
    check_folder(output, "--output", kind="run")
    if args.num_processes != 1 and "WORLD_SIZE" not in os.environ:
        return _relaunch(args.argv, args.num_processes)
    run_continual(config, output, progress=not args.quiet)
    ranks = launched_processes()
    if ranks.is_main:
        print(format_report([load_run(output)]))
        print(f"results: {output}/results.json")
    ranks.close()
    return 0


def cmd_compare(args: argparse.Namespace) -> int:
    from .methods import resolve_method
    from .runs.compare import compare, swept_rates
    from .runs.config import user_config, validate

    flags = _flags(args)
    orders: list[int | None] = [None]
    if args.orders:
        try:
            orders = [int(o) for o in args.orders.split(",") if o.strip()]
        except ValueError:
            raise UserError(f"--orders must be comma-separated integers, got {args.orders!r}") from None
        flags["order"] = orders[0]
    flags["method"] = args.methods.split(",")[0]
    # The recipe (if any) is applied per method and order in `plan`, each getting its own.
    base, user_keys = user_config(Path(args.config) if args.config else None, flags, args.overrides)
    base = validate(base)
    if args.orders is None:
        orders = [base.order]
    output = check_folder(Path(args.output) if args.output else Path("runs") / f"compare-{base.benchmark or 'custom'}",
                          "--output")
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    for method in methods:  # every name must resolve before any run starts
        resolve_method(method)
    if args.lrs_from and base.lr is not None:
        raise UserError("give either --lr or --lrs-from, not both")
    # A method that trains nothing (zero-shot) needs no rate.
    trained = [m for m in methods if resolve_method(m).trains]
    rates = swept_rates(Path(args.lrs_from), trained) if args.lrs_from else None
    compare(base, methods, orders, output, progress=not args.quiet, say=lambda m: print(m, file=sys.stderr),
            rates=rates, user_keys=user_keys)
    from .runs.layout import COMPARISON, COMPARISON_MD

    print((output / COMPARISON_MD).read_text())
    print(f"comparison: {output / COMPARISON_MD}, {output / COMPARISON}")
    return 0


def cmd_sweep(args: argparse.Namespace) -> int:
    from .runs.config import build_config
    from .runs.sweep import parse_rates, sweep

    rates = parse_rates(args.lrs)
    config = build_config(Path(args.config) if args.config else None, _flags(args), args.overrides)
    output = check_folder(Path(args.output) if args.output else Path("runs") / f"sweep-{config.method.replace('/', '_')}",
                          "--output")
    summary = sweep(config, rates, output, progress=not args.quiet, say=lambda m: print(m, file=sys.stderr))
    from .runs.layout import SWEEP_MD

    print((output / SWEEP_MD).read_text())
    print(f"chosen lr: {summary['chosen_lr']:g}" if summary["chosen_lr"] else "no run produced a validation score")
    return 0


def cmd_resume(args: argparse.Namespace) -> int:
    from .runs.driver import resume_config, run_continual
    from .runs.report import format_report, load_run

    from .train.distributed import launched_processes

    run_dir = Path(args.run_dir)
    config = resume_config(run_dir)
    check_folder(run_dir, "run directory", kind="run")
    if args.num_processes != 1 and "WORLD_SIZE" not in os.environ:
        return _relaunch(args.argv, args.num_processes)
    run_continual(config, run_dir, progress=not args.quiet)
    ranks = launched_processes()
    if ranks.is_main:
        print(format_report([load_run(run_dir)]))
    ranks.close()
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    from .runs.report import format_report, load_run, write_report

    runs = [load_run(Path(p)) for p in args.run_dirs]
    # One dealcl run: report.md goes into it. Several runs or upstream folders: only with --output.
    target = args.output or (args.run_dirs[0] if len(runs) == 1 and runs[0].source == "dealcl" else None)
    if target:
        check_folder(Path(target), "--output" if args.output else "run directory", kind="report")
    print(format_report(runs))
    if target:
        print(f"report: {write_report(runs, Path(target))}", file=sys.stderr)
    return 0


def cmd_predict(args: argparse.Namespace) -> int:
    from .runs.predict import predict_file

    if args.output:
        check_file(Path(args.output), "--output")
    predict_file(Path(args.run_dir), Path(args.input), task_name=args.task, output=Path(args.output) if args.output else None)
    return 0


def cmd_methods(args: argparse.Namespace) -> int:
    from .methods import list_methods

    methods = list_methods()
    width = max(len(m.name) for m in methods)
    for m in methods:
        print(f"{m.name:<{width}}  {m.description}")
        print(f"{'':<{width}}  paper: {m.paper}")
    return 0


def cmd_benchmarks(args: argparse.Namespace) -> int:
    from .data.benchmarks import list_benchmarks

    for name, order, tasks in list_benchmarks():
        label = name if order is None else f"{name} --order {order}"
        print(f"{label:<20} {len(tasks):>2} tasks: {' → '.join(tasks)}")
    return 0


def cmd_models(args: argparse.Namespace) -> int:
    from .models.registry import DEFAULT_MODEL, list_models

    for spec in list_models():
        mark = " (default)" if spec.name == DEFAULT_MODEL else ""
        print(f"{spec.name:<24} {spec.source:<40} {spec.description}{mark}")
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    import time

    from .runs.demo import run_demo
    from .runs.report import format_report, load_run, write_report

    check_folder(Path(args.output), "--output")
    started = time.perf_counter()
    runs = run_demo(Path(args.output), progress=not args.quiet)
    summaries = [load_run(run) for run in runs]
    print(format_report(summaries))
    write_report(summaries, Path(args.output))
    minutes = (time.perf_counter() - started) / 60
    from .runs.layout import REPORT

    print(f"demo done in {minutes:.1f} min; runs: {', '.join(map(str, runs))}; report: {Path(args.output) / REPORT}")
    return 0


def cmd_recipes(args: argparse.Namespace) -> int:
    from .recipes import all_recipes, get_recipe, recipes_markdown

    if args.markdown:
        print(recipes_markdown(), end="")
        return 0
    if args.name:
        recipe = get_recipe(args.name)
        print(f"{recipe.name}: {', '.join(recipe.methods)} on {recipe.benchmark}"
              + (f" orders {', '.join(map(str, recipe.orders))}" if recipe.orders else "") + f", {recipe.family} family")
        print(f"upstream: {recipe.source or 'none (no upstream settings)'}")
        print(f"basis: {recipe.basis}")
        if recipe.note:
            print(f"note: {recipe.note}")
        for key, value in recipe.settings.items():
            print(f"  {key} = {value}")
        for selector, entry in recipe.task_overrides.items():
            print(f"  [{selector}] " + ", ".join(f"{k} = {v}" for k, v in entry.items()))
        return 0
    rows = [(r.name, ",".join(r.methods), r.benchmark + (" " + ",".join(map(str, r.orders)) if r.orders else ""),
             r.family, r.source or "no upstream settings: derived (`dealcl recipes NAME` says how)") for r in all_recipes()]
    widths = [max(len(row[i]) for row in rows) for i in range(4)]
    for row in rows:
        print("  ".join(cell.ljust(w) for cell, w in zip(row, widths)) + "  " + row[4])
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from .runs.export import export_run

    check_folder(Path(args.to), "--to", kind="export")
    kind = export_run(Path(args.run_dir), Path(args.to))
    what = "a PEFT adapter (load with peft.PeftModel.from_pretrained on the base model)" if kind == "adapter" \
        else "merged model weights (load with transformers' from_pretrained)"
    print(f"exported {args.run_dir} to {args.to}: {what}")
    return 0


def cmd_data(args: argparse.Namespace) -> int:
    from .data.download import download_cl_benchmark

    check_folder(Path(args.dest), "destination", kind="export")
    download_cl_benchmark(Path(args.dest))
    print(f"CL_Benchmark downloaded to {args.dest}")
    return 0


COMMANDS = {
    "run": cmd_run, "compare": cmd_compare, "sweep": cmd_sweep, "resume": cmd_resume, "report": cmd_report, "predict": cmd_predict, "methods": cmd_methods,
    "benchmarks": cmd_benchmarks, "models": cmd_models, "recipes": cmd_recipes, "demo": cmd_demo, "export": cmd_export, "data": cmd_data,
}


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    # PEFT still calls this deprecated transformers property; the warning is noise to users.
    warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
    try:
        argv = sys.argv[1:] if argv is None else argv
        args = build_parser().parse_args(argv)
        args.argv = argv
        return COMMANDS[args.command](args)
    except UserError as exc:
        message = " ".join(str(exc).split())  # exactly one line
        if os.environ.get("RANK", "0") == "0":  # every rank raises it; one prints it
            print(f"error: {message}", file=sys.stderr)
        return 2
    except OSError as exc:
        if exc.filename is None:
            raise  # not about a path the user gave: a bug, with its traceback
        if os.environ.get("RANK", "0") == "0":  # a path the machine refuses (permissions, a full disk, …)
            print(f"error: {exc.filename}: {exc.strerror or exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as exc:
        # Ctrl-C: exit code 128 + SIGINT, as shells report it (docs/RELIABILITY.md).
        if os.environ.get("RANK", "0") == "0":
            print(f"error: {interrupted_line(exc)}", file=sys.stderr)
        return 130
    finally:
        _leave_process_group()


def interrupted_line(exc: KeyboardInterrupt) -> str:
    if isinstance(exc, RunInterrupted):
        return (f"interrupted during {exc.phase}; finished stages are kept in {exc.run_dir}: "
                f"continue with `dealcl resume {exc.run_dir}`")
    return "interrupted (no run was in progress; files are written whole or not at all)"


def _leave_process_group() -> None:
    """A rank that exits still in a gloo/NCCL group can abort ("terminate called without an
    active exception"); tear the group down on every way out."""
    if "torch" in sys.modules:
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
