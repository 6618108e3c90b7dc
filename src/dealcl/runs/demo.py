"""`dealcl demo` (`make demo`): the TC sequence with SeqLoRA and the zero-shot reference on the
embedded model, sized to this machine.

A quick probe (two training steps and one answer batch on the real model, ~10 s) measures
what a training example and an answer cost here; the demo then takes the largest caps whose
expected time fits its budget, says at the start how long it expects to take, and shows one
progress bar for each whole run. A demo folder that already holds a run keeps its caps, so
running the demo again continues or re-reads it instead of starting over.
"""
from __future__ import annotations

import sys
import time
from pathlib import Path

import torch

from ..data.benchmarks import resolve_sequence
from ..data.loading import default_data_dir, load_task
from .config import RunConfig, config_from_dict
from .layout import RunStore
from .progress import Workload

# (training, test) examples per task, largest first: the demo takes the first that fits.
CAPS = [(96, 40), (64, 32), (48, 24), (32, 16), (24, 12), (16, 8)]
# The runs' expected time, after loading and the probe: the demo should take at most 5 minutes
# where the CPU has bf16 units and 10 where it trains in fp32 (AVX2-only hosts, ~10x slower).
BUDGET_SECONDS = {"bf16": 240, "fp32": 480}
MODEL = "smollm2-135m"


def _print_err(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def probe(loaded, task_name: str, precision: str = "auto") -> tuple[float, float, str]:
    """(seconds per training example, seconds per answer, precision) on this machine: two
    LoRA steps of batch 8 after a warm-up one, and one answer batch of 8, on `task_name`.
    The LoRA is removed afterwards: `loaded.model` is the untouched model again."""
    from ..methods import Stage
    from ..train.loop import train_stage
    from .session import build_session

    config = RunConfig(method="seqlora", model=loaded.name, tasks=[task_name], train_per_task=24, test_per_task=8,
                       precision=precision, lr=1e-4, eval_batch_size=8)
    with torch.random.fork_rng(devices=[]):
        session = build_session(config, loaded, prepare_model=False)
        task = session.tasks[0]
        started = time.perf_counter()
        answers, _ = session.evaluator().answers(loaded.model, task, None)
        answer_seconds = (time.perf_counter() - started) / len(answers)
        model = session.prepare_model()
        items = [(task, e) for e in task.train]
        settings = session.settings(Stage(1, task.name, [task]))
        train_stage(model, session.method, Stage(1, task.name, [task]), items[:8], settings, session.services,
                    progress=False)
        stats = train_stage(model, session.method, Stage(2, task.name, [task]), items[8:], settings, session.services,
                            progress=False)
    loaded.model = model.unload()
    return stats["train_seconds"] / stats["train_examples"], answer_seconds, session.prep.precision


def task_sizes(tasks: list[str]) -> dict[str, tuple[int, int]]:
    """(training, test) examples in each task's files, each task read once."""
    data = default_data_dir()
    return {t: (len(task.train), len(task.test)) for t in tasks for task in [load_task(t, data)]}


def workload(tasks: list[str], train: int, test: int, sizes: dict[str, tuple[int, int]]) -> Workload:
    """SeqLoRA's run over `tasks` at the caps (the zero-shot run re-reads its stage 0)."""
    n_train = [min(train, sizes[t][0]) for t in tasks]
    n_test = [min(test, sizes[t][1]) for t in tasks]
    seen = sum(sum(n_test[: k + 1]) for k in range(len(tasks)))
    return Workload(sum(n_train), sum(n_test) + seen)


def existing_caps(run_dir: Path) -> tuple[int, int] | None:
    store = RunStore(run_dir)
    if not store.is_run():
        return None
    config = config_from_dict(store.read_run_yaml()["config"])
    return config.train_per_task, config.test_per_task


def choose_caps(tasks: list[str], sizes: dict[str, tuple[int, int]], costs: tuple[float, float],
                budget: float) -> tuple[int, int, float]:
    """The largest caps whose expected time fits `budget` (the smallest ones otherwise)."""
    for train, test in CAPS:
        expected = workload(tasks, train, test, sizes).seconds(*costs)
        if expected <= budget:
            return train, test, expected
    train, test = CAPS[-1]
    return train, test, workload(tasks, train, test, sizes).seconds(*costs)


def run_demo(output: Path, *, model: str = MODEL, progress: bool = True, say=_print_err) -> list[Path]:
    """Run the demo into `output`/{seqlora,zero-shot}; returns the two run folders."""
    from ..models.loading import load_model
    from ..train.hardware import host_description
    from .driver import run_continual

    tasks = resolve_sequence("tc", None, None)
    runs = [output / "seqlora", output / "zero-shot"]
    caps = existing_caps(runs[0])
    say(f"this machine: {host_description()}")
    if caps is None:
        sizes = task_sizes(tasks)
        say("probing this machine's speed on the embedded model (two training steps, one answer batch) …")
        loaded = load_model(model)  # the probe's model is the first run's: one copy in memory
        train_cost, answer_cost, precision = probe(loaded, tasks[0])
        train, test, expected = choose_caps(tasks, sizes, (train_cost, answer_cost), BUDGET_SECONDS[precision])
        say(f"measured {train_cost:.2f} s per training example and {answer_cost:.2f} s per answer ({precision}): "
            f"{train} training and {test} test examples per task, about {expected / 60:.0f} min for the runs")
        costs = (train_cost, answer_cost)
    else:
        train, test = caps
        costs, loaded = None, None
        say(f"continuing the demo in {output} ({train} training and {test} test examples per task)")
    for method, run_dir in zip(("seqlora", "zero-shot"), runs):
        config = RunConfig(method=method, model=model, benchmark="tc", train_per_task=train, test_per_task=test)
        say(f"== {method}: {' → '.join(tasks)}")
        run_continual(config, run_dir, progress=progress, costs=costs, loaded=loaded)
        loaded = None  # the next run loads its own untouched model
    return runs
