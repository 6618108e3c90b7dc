"""Where a run's memory goes, phase by phase: peak RSS while loading, during the reference
stage, during each stage's training (with the shape of its largest micro-batch) and during each
stage's evaluation.

    python bench/memory.py [--method seqlora] [--train 200] [--test 100] [--longest]

Runs standard order 1 on smollm2-135m (the embedded Q4_1 GGUF, dequantized) in this process,
resetting the kernel's peak-RSS counter (VmHWM) at each phase boundary. `--longest` trains
each task on its longest training examples (the prompts that reach 512 tokens), which is where
a run's peak comes from, at a fraction of the time.
"""
from __future__ import annotations

import argparse
import ctypes
import gc
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))
sys.path.insert(0, str(REPO / "bench"))

import dealcl.eval.evaluator as evaluator  # noqa: E402
import dealcl.runs.driver as driver  # noqa: E402
import dealcl.runs.session as session  # noqa: E402
import dealcl.train.services as services  # noqa: E402
from dealcl.runs.config import RunConfig  # noqa: E402
from host import host_line  # noqa: E402


def _status(key: str) -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key):
            return int(line.split()[1]) / 1024
    return 0.0


class Phases:
    """Peak RSS per named phase (VmHWM reset at each boundary, freed heap trimmed first)."""

    def __init__(self) -> None:
        self.rows: list[tuple[str, float, float, str]] = []
        self.name, self.start = "start", 0.0
        self.widest = (0, 0)

    def begin(self, name: str) -> None:
        self.end()
        gc.collect()
        ctypes.CDLL("libc.so.6").malloc_trim(0)
        Path("/proc/self/clear_refs").write_text("5")
        self.name, self.widest, self.start = name, (0, 0), _status("VmRSS")

    def end(self) -> None:
        detail = f"largest micro-batch {self.widest[0]} x {self.widest[1]} tokens" if self.widest[0] else ""
        self.rows.append((self.name, self.start, _status("VmHWM"), detail))


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--method", default="seqlora")
    parser.add_argument("--train", type=int, default=200)
    parser.add_argument("--test", type=int, default=100)
    parser.add_argument("--longest", type=int, default=0, help="train on the N longest of the first --train examples")
    args = parser.parse_args()
    print(host_line())
    phases = Phases()

    real_loss = services.TrainingServices.task_loss_sum
    real_train = session.train_stage
    real_evaluate = evaluator.Evaluator.evaluate
    real_prepare = session.prepare

    def task_loss_sum(self, model, batch):
        rows, width = batch["input_ids"].shape
        if rows * width > phases.widest[0] * phases.widest[1]:
            phases.widest = (rows, width)
        return real_loss(self, model, batch)

    def train_stage(model, method, stage, items, settings, services, progress=True):
        phases.begin(f"stage {stage.index} training ({stage.name})")
        return real_train(model, method, stage, items, settings, services, progress)

    evaluations = []

    def evaluate(self, model, tasks, *args, **kwargs):
        phases.begin(f"stage {len(evaluations)} evaluation ({len(tasks)} tasks)")  # stage 0 comes first
        evaluations.append(len(tasks))
        return real_evaluate(self, model, tasks, *args, **kwargs)

    def prepare(config, loaded=None):
        phases.begin("loading")
        prep = real_prepare(config, loaded)
        if args.longest:
            for task in prep.tasks:
                task.train = sorted(task.train, key=lambda e: -len(e.sentence))[: args.longest]
        return prep

    services.TrainingServices.task_loss_sum = task_loss_sum
    session.train_stage, evaluator.Evaluator.evaluate, session.prepare = train_stage, evaluate, prepare
    config = RunConfig(method=args.method, model="smollm2-135m", benchmark="standard", order=1,
                       train_per_task=args.train, test_per_task=args.test)
    started = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        driver.run_continual(config, Path(tmp) / "run", progress=False)
    phases.end()
    print(f"method {args.method}, {args.train} train ({'the ' + str(args.longest) + ' longest' if args.longest else 'all'})"
          f" / {args.test} test per task, {time.perf_counter() - started:.0f} s")
    print("| phase | RSS at start MB | peak RSS MB | |\n|---|---|---|---|")
    for name, start, peak, detail in phases.rows[1:]:
        print(f"| {name} | {start:.0f} | {peak:.0f} | {detail} |")
    print(f"| whole run | | {max(p for _, _, p, _ in phases.rows[1:]):.0f} | |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
