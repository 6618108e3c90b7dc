"""A small study through the Python API: two methods on one task sequence, side by side.

    python examples/api_study.py                       # SmolLM2-135M (embedded, offline) on the toy benchmark
    python examples/api_study.py --model tiny-llama    # a tiny random model: seconds, numbers meaningless
    python examples/api_study.py --data ../shared/CL_Benchmark --tasks dbpedia,amazon,yahoo,agnews

Every run is an ordinary, resumable run directory under --output: run the script again and
finished runs are only read back. `dealcl report <output>/compare/<run>` shows one of them again.
"""
from __future__ import annotations

import argparse
from pathlib import Path

import dealcl


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--methods", default="seqlora,olora", help="comma-separated (default seqlora,olora)")
    parser.add_argument("--model", default="smollm2-135m", help="short name, hub id, folder or .gguf file")
    parser.add_argument("--data", help="a CL_Benchmark folder (default: the toy benchmark, written under --output)")
    parser.add_argument("--tasks", default="toyA,toyB", help="comma-separated task sequence (default toyA,toyB)")
    parser.add_argument("--train-per-task", type=int, default=24)
    parser.add_argument("--test-per-task", type=int, default=8)
    parser.add_argument("--output", default="runs/api-study")
    return parser.parse_args(argv)


def _points(value: float | None) -> str:
    return "     —" if value is None else f"{value:6.2f}"


def main(argv: list[str] | None = None, **settings) -> dict:
    """Run the study; returns comparison.json's content. `settings`: further run settings
    (RunConfig keys, as `dealcl.run` takes them)."""
    args = parse_args(argv)
    output = Path(args.output)
    data = args.data
    if data is None:
        from dealcl.data.toy import write_toy_benchmark

        data = write_toy_benchmark(output / "data" / "CL_Benchmark")
    methods = args.methods.split(",")
    comparison = dealcl.compare(methods, output / "compare", tasks=args.tasks.split(","), model=args.model,
                                data=str(data), train_per_task=args.train_per_task,
                                test_per_task=args.test_per_task, **settings)
    run_dirs = [output / "compare" / row["run"] for row in comparison["runs"]]
    print(dealcl.report(*run_dirs))
    for run_dir in run_dirs:
        summary = dealcl.load_run(run_dir)  # the same numbers as results.json
        print(f"{summary.method:>10}: AA {_points(summary.average_accuracy)}  BWT {_points(summary.backward_transfer)}")
    return comparison


if __name__ == "__main__":
    main()
