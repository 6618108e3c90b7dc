"""`dealcl` command line. A mistake in the user's input is one `error:` line and exit code 2."""
from __future__ import annotations

import argparse
import json
import os
import sys
import warnings
from pathlib import Path

from . import __version__
from .errors import RunInterrupted, UserError
from .runs.paths import check_file, check_folder

EPILOG = "Docs: README.md and docs/ in the dealcl repository."

# Nothing above `main` imports torch, transformers or a method module: flags, config files and
# method names are checked first (`_check_before_loading`), so a mistake answers at once
# (tests/test_cli.py times it). Each command imports what it runs.


class HelpFormatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    """Examples kept as written; every default shown, except where the help says it already
    or there is none to show (a run flag left unset takes the config file's or recipe's value)."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if "default" in text or action.default in (None, argparse.SUPPRESS) or isinstance(action, argparse._VersionAction):
            return text
        return super()._get_help_string(action)


class Parser(argparse.ArgumentParser):
    """argparse prints usage plus an error on bad flags; we print just one `error:` line that
    points to the help of the command that was given."""

    def __init__(self, *args, **kwargs) -> None:
        kwargs.setdefault("formatter_class", HelpFormatter)
        super().__init__(*args, **kwargs)

    def error(self, message: str):  # type: ignore[override]
        raise UserError(f"{message} (see `{self.prog} --help`)")


def _examples(*lines: str) -> str:
    return "examples:\n" + "\n".join(f"  {line}" for line in lines) + "\n\n" + EPILOG


# Per command: (one-line help, description, examples). The examples are parsed by tests/test_readme.py.
COMMAND_DOCS: dict[str, tuple[str, str, tuple[str, ...]]] = {
    "run": ("run a whole continual task sequence",
            "Train a method on a sequence of tasks, one after another, evaluating after every stage; writes a run\n"
            "directory (results.json, efficiency.json, per-stage adapters and outputs) that `resume`, `report`,\n"
            "`predict` and `export` read. Settings: defaults < --recipe < --config FILE < flags < key=value.",
            ("dealcl run --benchmark tc --method seqlora --train-per-task 64 --test-per-task 32 --output runs/tc-seqlora",
             "dealcl run --tasks dbpedia,agnews --method deal --model smollm2-135m epochs=2 method.lambda1=0.05")),
    "compare": ("several methods over one or more task orders, side by side",
                "Run several methods (and task orders) as ordinary resumable runs in one folder, then write\n"
                "comparison.json/.md with AA, BWT and FWT per method (bootstrap intervals over examples) and plots.",
                ("dealcl compare --benchmark tc --methods seqlora,olora,deal --train-per-task 64 --output runs/cmp-tc",
                 "dealcl compare --benchmark standard --orders 1,2,3 --methods seqlora,gorp --lrs-from runs/sweeps")),
    "sweep": ("choose a method's learning rate on held-out training examples",
              "Run one method at several learning rates, each scored on --val-per-task examples held out of the\n"
              "training files (never the test set); writes sweep.json/.md with the chosen rate.",
              ("dealcl sweep --benchmark tc --method seqlora --val-per-task 32 --train-per-task 128",
               "dealcl sweep --tasks dbpedia,amazon --method deal --lrs 1e-4,5e-4,1e-3 --val-per-task 50 --output runs/sweeps/deal")),
    "resume": ("continue a run after its last finished stage",
               "Continue a run after its last stage whose files verify against their manifests. A run with a\n"
               "damaged stage folder is refused with the file named; --retrain-stage K redoes stage K and the\n"
               "later ones (0: the zero-shot reference evaluation).",
               ("dealcl resume runs/tc-seqlora",
                "dealcl resume runs/tc-seqlora --retrain-stage 3")),
    "report": ("accuracy matrix, AA and BWT of one or several runs",
               "Print each run's accuracy matrix, AA, BWT and FWT (dealcl runs or upstream output folders), then a\n"
               "side-by-side table; writes report.md and plots (into a single dealcl run, or --output).",
               ("dealcl report runs/tc-seqlora",
                "dealcl report runs/tc-seqlora runs/tc-deal --output runs/report-tc")),
    "predict": ("answer new inputs with a run's final model",
                "Answer the inputs of a JSON, JSONL or CSV file (a `sentence` field; with `label`, also scored) with\n"
                "the model after the run's last stage, prompted as the run's task. An unfinished or damaged run is an\n"
                "error; an earlier stage's model is used only when named with --stage K.",
                ("dealcl predict runs/tc-seqlora --input new.jsonl",
                 "dealcl predict runs/tc-seqlora --input new.csv --task agnews --stage 2 --output answers.jsonl")),
    "export": ("write a run's final model for use outside dealcl",
               "Write the model after the run's last stage (or --stage K) to a new folder, with the tokenizer and\n"
               "dealcl_export.json (task list, prompt template and labels per task, answer rule):\n"
               "  seqlora, inclora, olora, lwf, ewc, replay, mtl: a stock PEFT LoRA adapter (peft.PeftModel.from_pretrained)\n"
               "  gorp, seqft: merged full weights (transformers' from_pretrained)\n"
               "  deal, deal-code: the base model's weights, deal_adapter.safetensors and deal_loader.py (torch +\n"
               "    safetensors only; its MLP between LoRA's A and B has a ReLU, so no exact PEFT adapter or merge exists)\n"
               "  pertask, zero-shot: refused (one adapter per task / nothing trained)",
               ("dealcl export runs/tc-seqlora --to exports/tc-seqlora",
                "dealcl export runs/tc-deal --to exports/tc-deal-stage2 --stage 2")),
    "demo": ("the TC sequence with SeqLoRA and zero-shot on the embedded model, sized to this machine",
             "Probe this machine, pick the largest caps per task that fit the time budget, then run the 3-task TC\n"
             "sequence with seqlora and zero-shot on the embedded SmolLM2-135M and report them side by side.",
             ("dealcl demo", "dealcl demo --output runs/my-demo --quiet")),
    "methods": ("list the continual methods", "The registered methods (and installed plugins), one line each, with their paper.",
                ("dealcl methods", "dealcl run --method path/to/my_method.py:MyMethod --benchmark tc")),
    "benchmarks": ("list the benchmarks and their task orders", "The named task sequences and their orders.",
                   ("dealcl benchmarks", "dealcl run --benchmark standard --order 2 --method seqlora")),
    "models": ("list the model short names", "Short model names; a Hugging Face id, a local folder or a .gguf file work too.",
               ("dealcl models", "dealcl run --benchmark tc --model t5-small --method seqlora")),
    "recipes": ("list the recipes of upstream settings (or show one)",
                "Upstream settings per method, benchmark and model family; `--recipe NAME` (or `upstream`) starts a\n"
                "run from one.",
                ("dealcl recipes", "dealcl recipes --markdown")),
    "data": ("benchmark data", "Fetch the CL_Benchmark data.",
             ("dealcl data download", "dealcl data download data/CL_Benchmark")),
}


def _sub(sub, name: str) -> Parser:
    help_text, description, examples = COMMAND_DOCS[name]
    return sub.add_parser(name, help=help_text, description=description, epilog=_examples(*examples))


def _flag_help(spec) -> str:
    text = spec.metadata["help"]
    if "default" in text:
        return text
    if spec.type in (bool, "bool"):
        return f"{text} (default: off)"
    return text if spec.default is None else f"{text} (default: {spec.default})"


def _add_run_flags(p: argparse.ArgumentParser, *, skip: tuple[str, ...] = (), output_help: str) -> None:
    from .domains import OneOf, domain_of
    from .runs.config import RunConfig

    # A flag whose declared domain is a set of values (domains.py) lists them in --help.
    choices = {spec.name: tuple(domain.choices) for spec in RunConfig.flag_fields()
               if isinstance(domain := domain_of(spec), OneOf)}
    # One flag per RunConfig field marked `flag(...)`, left out of the namespace when not given
    # (SUPPRESS), so a config file's or recipe's value is not overwritten by a default; the
    # values stay text and are checked with the YAML and key=value ones by the config.
    for spec in RunConfig.flag_fields():
        if spec.name in skip:
            continue
        name = "--" + spec.name.replace("_", "-")
        if spec.type in (bool, "bool"):
            p.add_argument(name, dest=spec.name, action="store_const", const=True, default=argparse.SUPPRESS,
                           help=_flag_help(spec))
        else:
            p.add_argument(name, dest=spec.name, type=str, default=argparse.SUPPRESS, choices=choices.get(spec.name),
                           metavar=None if spec.name in choices else spec.name.upper(), help=_flag_help(spec))
    p.add_argument("--output", "-o", help=output_help)
    p.add_argument("--config", help="YAML config file (a run.yaml works too)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.add_argument("--num-processes", dest="num_processes", type=int, default=1,
                   help="data-parallel processes on this machine (runs itself under torchrun)")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE",
                   help="config overrides (any RunConfig key), method.KEY=VALUE for method options")


def build_parser() -> Parser:
    parser = Parser(prog="dealcl", description="Continual low-rank fine-tuning of language models.",
                    epilog=_examples("dealcl run --benchmark tc --method seqlora --train-per-task 64",
                                     "dealcl run --help"))
    parser.add_argument("--version", action="version", version=f"dealcl {__version__}")
    sub = parser.add_subparsers(dest="command", parser_class=Parser, metavar="COMMAND")
    sub.required = True

    run = _sub(sub, "run")
    _add_run_flags(run, output_help="run directory (default: runs/<benchmark>-<method>)")

    compare = _sub(sub, "compare")
    compare.add_argument("--methods", required=True, help="comma-separated method names (`dealcl methods`)")
    compare.add_argument("--orders", help="comma-separated task orders of the benchmark (default: the config file's order, or none)")
    compare.add_argument("--lrs-from", dest="lrs_from",
                         help="folder of `dealcl sweep` outputs (<folder>/<method>/sweep.json): each method runs at "
                              "the rate its sweep chose")
    _add_run_flags(compare, skip=("method", "order"),
                   output_help="comparison folder, one run per method and order inside (default: runs/compare-<benchmark>)")

    sweep = _sub(sub, "sweep")
    sweep.add_argument("--lrs", default="1e-4,5e-4,1e-3", help="comma-separated learning rates")
    _add_run_flags(sweep, skip=("lr",), output_help="sweep folder, one run per rate inside (default: runs/sweep-<method>)")

    resume = _sub(sub, "resume")
    resume.add_argument("run_dir", metavar="RUN_DIR")
    resume.add_argument("--retrain-stage", dest="retrain_stage", type=int, metavar="K",
                        help="discard stage K and the later ones and do them again (0: the zero-shot reference "
                             "evaluation): how to repair a run whose stage K is damaged")
    resume.add_argument("--quiet", action="store_true", help="no progress bars")
    resume.add_argument("--num-processes", dest="num_processes", type=int, default=1,
                        help="data-parallel processes on this machine (as for `run`)")

    report = _sub(sub, "report")
    report.add_argument("run_dirs", nargs="+", metavar="RUN_DIR", help="dealcl run directories or upstream output folders")
    report.add_argument("--output", help="write report.md and plots here (default: into a single dealcl run; none for several)")

    predict = _sub(sub, "predict")
    predict.add_argument("run_dir", metavar="RUN_DIR")
    predict.add_argument("--input", required=True, help="JSON, JSONL or CSV file with a `sentence` field (and `label`: scored)")
    predict.add_argument("--task", help="which task's prompt to use (default: the run's last task)")
    predict.add_argument("--stage", type=int, metavar="K", help="use the model after stage K (default: the run's last stage)")
    predict.add_argument("--output", help="write JSONL here (default: standard output)")

    demo = _sub(sub, "demo")
    demo.add_argument("--output", default="runs/demo", help="folder for the two runs")
    demo.add_argument("--quiet", action="store_true", help="no progress bars")
    _sub(sub, "methods")
    _sub(sub, "benchmarks")
    _sub(sub, "models")
    recipes = _sub(sub, "recipes")
    recipes.add_argument("name", nargs="?", help="a recipe to show in full (default: list them all)")
    recipes.add_argument("--markdown", action="store_true", help="print the table of docs/METHODS.md")

    export = _sub(sub, "export")
    export.add_argument("run_dir", metavar="RUN_DIR")
    export.add_argument("--to", required=True, dest="to", metavar="DIR", help="destination folder (new or empty)")
    export.add_argument("--stage", type=int, metavar="K", help="export the model after stage K (default: the run's last stage)")

    data = _sub(sub, "data")
    data_sub = data.add_subparsers(dest="data_command", parser_class=Parser, metavar="ACTION")
    data_sub.required = True
    download = data_sub.add_parser("download", help="fetch CL_Benchmark from the O-LoRA repository (needs internet)",
                                   description="Fetch CL_Benchmark from the public O-LoRA repository (a sparse git clone).",
                                   epilog=_examples("dealcl data download", "dealcl data download data/CL_Benchmark"))
    download.add_argument("dest", nargs="?", default="data/CL_Benchmark", metavar="DEST", help="destination folder")
    return parser


def _flags(args: argparse.Namespace) -> dict:
    from .runs.config import RunConfig

    return {spec.name: getattr(args, spec.name, None) for spec in RunConfig.flag_fields()}


def _check_before_loading(config) -> None:
    """What can be checked without torch: the method name, the task sequence and the data folder."""
    from .data.benchmarks import resolve_sequence
    from .data.loading import default_data_dir
    from .methods import check_method_name

    check_method_name(config.method)
    resolve_sequence(config.benchmark, config.order, config.tasks)
    data_dir = Path(config.data).expanduser() if config.data else default_data_dir()
    if not data_dir.is_dir():
        raise UserError(f"data directory does not exist: {data_dir}")


def _existing_run_config(run_dir: Path):
    """A run directory's recorded config, checked as a new one would be, before loading anything."""
    from .runs.layout import RunStore
    from .runs.config import config_from_dict

    store = RunStore(run_dir)
    if not store.is_run():
        raise UserError(f"{run_dir} is not a dealcl run directory (no run.yaml)")
    config = config_from_dict(store.read_run_yaml()["config"])
    _check_before_loading(config)
    return config


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

    config = build_config(Path(args.config) if args.config else None, _flags(args), args.overrides)
    output = Path(args.output) if args.output else Path("runs") / f"{config.benchmark or 'custom'}-{config.method.replace('/', '_')}"
    check_folder(output, "--output", kind="run")
    _check_before_loading(config)
    from .runs.driver import run_continual
    from .runs.report import format_report, load_run
    from .train.distributed import launched_processes

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
    from .methods import check_method_name
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
        check_method_name(method)
    _check_before_loading(base)
    if args.lrs_from and base.lr is not None:
        raise UserError("give either --lr or --lrs-from, not both")
    from .methods import resolve_method
    from .runs.compare import compare, swept_rates

    rates = None
    if args.lrs_from:  # a method that trains nothing (zero-shot) needs no rate
        rates = swept_rates(Path(args.lrs_from), [m for m in methods if resolve_method(m).trains])
    compare(base, methods, orders, output, progress=not args.quiet, say=lambda m: print(m, file=sys.stderr),
            rates=rates, user_keys=user_keys)
    from .runs.layout import COMPARISON, COMPARISON_MD

    print((output / COMPARISON_MD).read_text())
    print(f"comparison: {output / COMPARISON_MD}, {output / COMPARISON}")
    return 0


def cmd_sweep(args: argparse.Namespace) -> int:
    from .runs.config import build_config

    config = build_config(Path(args.config) if args.config else None, _flags(args), args.overrides)
    _check_before_loading(config)
    from .runs.sweep import parse_rates, sweep

    rates = parse_rates(args.lrs)
    output = check_folder(Path(args.output) if args.output else Path("runs") / f"sweep-{config.method.replace('/', '_')}",
                          "--output")
    summary = sweep(config, rates, output, progress=not args.quiet, say=lambda m: print(m, file=sys.stderr))
    from .runs.layout import SWEEP_MD

    print((output / SWEEP_MD).read_text())
    print(f"chosen lr: {summary['chosen_lr']:g}" if summary["chosen_lr"] else "no run produced a validation score")
    return 0


def cmd_resume(args: argparse.Namespace) -> int:
    run_dir = Path(args.run_dir)
    _existing_run_config(run_dir)
    if args.retrain_stage is not None and args.retrain_stage < 0:
        raise UserError(f"--retrain-stage must be 0 or a stage number, got {args.retrain_stage}")
    from .runs.driver import resume_config, run_continual
    from .runs.report import format_report, load_run
    from .train.distributed import launched_processes

    config = resume_config(run_dir)
    check_folder(run_dir, "run directory", kind="run")
    if args.num_processes != 1 and "WORLD_SIZE" not in os.environ:
        return _relaunch(args.argv, args.num_processes)
    run_continual(config, run_dir, progress=not args.quiet, retrain_stage=args.retrain_stage)
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
    from .data.loading import read_inputs

    _existing_run_config(Path(args.run_dir))
    read_inputs(Path(args.input))  # a malformed input file answers before the model loads
    from .runs.predict import predict_file

    if args.output:
        check_file(Path(args.output), "--output")
    predict_file(Path(args.run_dir), Path(args.input), task_name=args.task, output=Path(args.output) if args.output else None,
                 stage=args.stage)
    return 0


def cmd_methods(args: argparse.Namespace) -> int:
    from .methods import method_catalog

    methods = method_catalog()
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
    _existing_run_config(Path(args.run_dir))
    destination = check_folder(Path(args.to), "--to", kind="export")
    from .runs.export import PROMPTS_FILE, export_run

    kind = export_run(Path(args.run_dir), destination, stage=args.stage)
    what = {
        "adapter": "a PEFT adapter (load with peft.PeftModel.from_pretrained on the base model)",
        "merged": "merged model weights (load with transformers' from_pretrained)",
        "module": "the base model's weights plus DEAL's adapter (load with deal_loader.load_deal, see its docstring)",
    }[kind]
    print(f"exported {args.run_dir} to {args.to}: {what}; prompts and labels: {destination / PROMPTS_FILE}")
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
        args = parse_args(argv)
        return COMMANDS[args.command](args)
    except UserError as exc:
        message = " ".join(str(exc).split())  # exactly one line
        if os.environ.get("RANK", "0") == "0":  # every rank raises it; one prints it
            print(f"error: {message}", file=sys.stderr)
        return 2
    except BrokenPipeError:  # `dealcl methods | head`: the reader left; nothing to say
        sys.stderr.close()
        return 0
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


def parse_args(argv: list[str]) -> argparse.Namespace:
    """The command line parsed and its flags checked; an unknown flag names the help of the
    command it was given to (`dealcl run --help`), not the top level's."""
    if argv and argv[0].startswith("-") and argv[0] not in ("-h", "--help", "--version"):
        raise UserError(f"unrecognized arguments: {argv[0]} (see `dealcl --help`; options go after the command)")
    parser = build_parser()
    args, unknown = parser.parse_known_args(argv)
    if unknown:
        command = " ".join(c for c in ("dealcl", args.command, getattr(args, "data_command", None)) if c)
        raise UserError(f"unrecognized arguments: {' '.join(unknown)} (see `{command} --help`)")
    args.argv = argv
    return args


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
