"""Fault injection, measured: SIGKILL a run at seeded random moments, resume, compare.

    python bench/faults.py [--kills 20] [--seed 0] [--method seqlora] [--workdir DIR]

A clean run of a 3-task sequence on the tiny random LLaMA counts how often each fault point
is reached (training steps, checkpoint writes, evaluation batches, results writes). Then each
trial starts the same run, lets it SIGKILL itself at a seeded random occurrence of one point
(`DEALCL_FAULT`, see src/dealcl/faults.py), resumes it with `dealcl resume`, and checks:
results.json and every prediction file are byte-identical to the clean run's, every stage
folder matches its manifest, and no temporary file is left. Phases are taken in turn, so
every phase gets at least one kill.
"""
from __future__ import annotations

import argparse
import collections
import os
import random
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from dealcl.data.toy import write_toy_benchmark
from dealcl.faults import POINTS
from dealcl.runs.store import verify_stage_dir


@dataclass
class Campaign:
    kills: collections.Counter = field(default_factory=collections.Counter)
    survived: int = 0
    identical: bool = True
    corrupt: list[str] = field(default_factory=list)
    failures: list[str] = field(default_factory=list)


def _run(args: list[str], env: dict[str, str]) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "dealcl", *args], env=env, capture_output=True, text=True)


def run_args(data: Path, output: Path, method: str) -> list[str]:
    return ["run", "--tasks", "toyA,toyB,toyC", "--model", "tiny-llama", "--data", str(data), "--output", str(output),
            "--method", method, "--precision", "fp32", "--batch-size", "4", "--lr", "5e-3", "--seed", "3",
            "--train-per-task", "16", "--test-per-task", "8", "--quiet", "epochs=2"]


def outputs_of(run_dir: Path) -> dict[str, bytes]:
    """The files whose bytes must not depend on kills: metrics and predictions."""
    files = {"results.json": (run_dir / "results.json").read_bytes()}
    for path in sorted((run_dir / "outputs").rglob("*.json*")):
        if path.name != "manifest.json":
            files[str(path.relative_to(run_dir))] = path.read_bytes()
    return files


def problems_in(run_dir: Path) -> list[str]:
    found = []
    for group in ("adapters", "outputs"):
        for stage in sorted((run_dir / group).iterdir()):
            problem = verify_stage_dir(stage)
            if problem is not None:
                found.append(f"{stage.relative_to(run_dir)}: {problem}")
    found += [str(p.relative_to(run_dir)) for p in run_dir.rglob("*") if p.name.endswith((".tmp", ".stale"))]
    return found


def campaign(workdir: Path, kills: int, seed: int, method: str = "seqlora",
             phases: tuple[str, ...] = POINTS, echo=print) -> Campaign:
    data = write_toy_benchmark(workdir / "CL_Benchmark")
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "TOKENIZERS_PARALLELISM": "false"}
    env.pop("DEALCL_FAULT", None)
    trace = workdir / "points.log"
    clean = workdir / "clean"
    done = _run(run_args(data, clean, method), {**env, "DEALCL_FAULT_LOG": str(trace)})
    if done.returncode != 0:
        raise SystemExit(f"the clean run failed: {done.stderr.strip().splitlines()[-1:]}")
    occurrences = collections.Counter(trace.read_text().split())
    reference = outputs_of(clean)
    rng = random.Random(seed)
    order = [phases[i % len(phases)] for i in range(kills)]
    rng.shuffle(order)
    result = Campaign()
    for trial, phase in enumerate(order, 1):
        at = rng.randint(1, occurrences[phase])
        run_dir = workdir / f"trial-{trial}"
        shutil.rmtree(run_dir, ignore_errors=True)
        killed = _run(run_args(data, run_dir, method), {**env, "DEALCL_FAULT": f"{phase}:{at}"})
        if killed.returncode != -9:
            result.failures.append(f"trial {trial}: expected a SIGKILL at {phase}:{at}, got exit {killed.returncode}")
            continue
        result.kills[phase] += 1
        resumed = _run(["resume", str(run_dir), "--quiet"], env)
        if resumed.returncode != 0:
            result.failures.append(f"trial {trial}: resume after {phase}:{at} failed: {resumed.stderr.strip()[-300:]}")
            continue
        result.survived += 1
        if outputs_of(run_dir) != reference:
            result.identical = False
            result.failures.append(f"trial {trial}: outputs differ after a kill at {phase}:{at}")
        result.corrupt += [f"trial {trial}: {p}" for p in problems_in(run_dir)]
        echo(f"trial {trial:>2}: killed at {phase}:{at}/{occurrences[phase]}, resumed, "
             f"{'identical' if outputs_of(run_dir) == reference else 'DIFFERENT'}")
        shutil.rmtree(run_dir, ignore_errors=True)
    return result


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--kills", type=int, default=20)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--method", default="seqlora")
    parser.add_argument("--workdir", type=Path, help="keep the runs here (default: a temporary folder)")
    args = parser.parse_args()
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="dealcl-faults-"))
    workdir.mkdir(parents=True, exist_ok=True)
    try:
        result = campaign(workdir, args.kills, args.seed, args.method)
    finally:
        if args.workdir is None:
            shutil.rmtree(workdir, ignore_errors=True)
    print("kills per phase: " + ", ".join(f"{p} {result.kills[p]}" for p in POINTS))
    for failure in result.failures:
        print(f"  {failure}")
    print(f"kills survived: {result.survived}, results identical: {'yes' if result.identical else 'no'}, "
          f"corrupt files: {len(result.corrupt)}")
    ok = result.survived == args.kills and result.identical and not result.corrupt
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
