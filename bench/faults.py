"""Fault injection, measured: SIGKILL a run at seeded random moments, resume, compare.

    python bench/faults.py [--kills 20] [--seed 0] [--method seqlora] [--workdir DIR]

A clean run of a 3-task sequence on the tiny random LLaMA counts how often each fault point
is reached (training steps, checkpoint writes, evaluation batches, results writes) and which
occurrences fall inside stage 0, the zero-shot reference. Then each trial starts the same run,
lets it SIGKILL itself at a seeded random occurrence of one point (`DEALCL_FAULT`, see
src/dealcl/faults.py), resumes it with `dealcl resume`, and checks: the kill fired where it
was planned, results.json and every prediction file are byte-identical to the clean run's,
every stage folder matches its manifest, and no temporary file is left.

A trial runs under the conditions its points were counted in, so every planned kill is at a
point it reaches. Stage 0 is borrowed from a finished identical stage 0 in the run's parent
folder (or a sibling folder holding a comparison.json: `sibling_reference_answers` in runs/layout.py),
which skips its evaluation, so there are two kinds of trial:

- alone: in a folder of its own, nothing to borrow; it evaluates stage 0 itself. Counted by
  the clean run, alone in its folder the same way.
- borrowing: next to a finished copy of the clean run; stage 0 is answered from the copy and
  only written. Counted by a second clean run next to the same copy.

Phases are taken in turn, so every phase gets at least one kill. The first kill of each
phase that occurs in stage 0 lands there: in a borrowed stage 0 (its writes) where the phase
occurs in one, else in an alone trial's stage 0 (its evaluation). A kill inside stage 0 must
find stage 0 unfinished and nothing trained; an alone trial must never borrow, a borrowing
one must borrow before the kill and again on resume.
"""
from __future__ import annotations

import argparse
import collections
import json
import os
import random
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from dealcl.data.toy import write_toy_benchmark
from dealcl.faults import POINTS
from dealcl.runs.store import MANIFEST, verify_stage_dir

REFERENCE_DIR = Path("outputs") / "0-reference"  # RunStore.output_dir(0, "reference")
BORROWED = "answered by a sibling run's identical stage 0"  # what runs/driver.py says when it borrows
ALONE, BORROWING = "alone", "borrowing"


@dataclass(frozen=True)
class Kill:
    phase: str
    at: int  # the at-th occurrence of the point, counted in a clean run of the same kind
    kind: str = ALONE
    stage0: bool = False  # the occurrence falls inside stage 0

    @property
    def where(self) -> str:
        if not self.stage0:
            return ""
        if self.kind == BORROWING:
            return " (borrowed stage 0)"
        return " (stage 0 evaluation)" if self.phase == "eval-batch" else " (stage 0)"


@dataclass
class Counts:
    """Per kind of trial: occurrences of each point in a clean run, and those inside stage 0."""
    total: dict[str, collections.Counter] = field(default_factory=dict)
    stage0: dict[str, dict[str, list[int]]] = field(default_factory=dict)


@dataclass
class Campaign:
    kills: collections.Counter = field(default_factory=collections.Counter)
    planned: list[Kill] = field(default_factory=list)
    landed: list[Kill] = field(default_factory=list)
    survived: int = 0
    identical: bool = True
    corrupt: list[str] = field(default_factory=list)
    failures: list[str] = field(default_factory=list)


def _run(args: list[str], env: dict[str, str]) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "dealcl", *args], env=env, capture_output=True, text=True)


@dataclass(frozen=True)
class Setup:
    """The run every trial repeats: a 3-task toy sequence on the tiny random LLaMA."""
    data: Path
    method: str = "seqlora"

    def args(self, output: Path) -> list[str]:
        return ["run", "--tasks", "toyA,toyB,toyC", "--model", "tiny-llama", "--data", str(self.data),
                "--output", str(output), "--method", self.method, "--precision", "fp32", "--batch-size", "4",
                "--lr", "5e-3", "--seed", "3", "--train-per-task", "16", "--test-per-task", "8", "--quiet", "epochs=2"]


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


def stage0_occurrences(trace: list[str], reference_files: int) -> dict[str, list[int]]:
    """Per point, its occurrence numbers inside stage 0. Stage 0's folder is the first stage
    folder written (the first checkpoint-write); it holds `reference_files` files, each one
    results-write, so the results-writes before those are the run's own (run.yaml) and stage 0
    starts after them: its evaluation batches, if it evaluates, then its writes."""
    if "checkpoint-write" not in trace:
        return {}
    end = trace.index("checkpoint-write")
    own_writes = trace[:end].count("results-write") - reference_files
    start = 0
    while own_writes > 0:
        own_writes -= trace[start] == "results-write"
        start += 1
    seen: collections.Counter = collections.Counter(trace[:start])
    inside: dict[str, list[int]] = {}
    for point in trace[start:end + 1]:
        seen[point] += 1
        inside.setdefault(point, []).append(seen[point])
    return inside


def plan_kills(counts: Counts, kills: int, seed: int, phases: tuple[str, ...] = POINTS) -> list[Kill]:
    """Phases in turn, shuffled; each at a uniform random occurrence in an alone trial, except
    the first kill of each phase that occurs in stage 0: inside a borrowed stage 0 where the
    phase occurs there, else inside an alone trial's own stage 0."""
    rng = random.Random(seed)
    order = [phases[i % len(phases)] for i in range(kills)]
    rng.shuffle(order)
    plan, pinned = [], set()
    for phase in order:
        kind = next((k for k in (BORROWING, ALONE) if counts.stage0.get(k, {}).get(phase)), None)
        if phase not in pinned and kind is not None:
            pinned.add(phase)
            plan.append(Kill(phase, rng.choice(counts.stage0[kind][phase]), kind, stage0=True))
            continue
        if not counts.total[ALONE][phase]:
            raise SystemExit(f"a clean run never reaches the fault point {phase}")
        at = rng.randint(1, counts.total[ALONE][phase])
        plan.append(Kill(phase, at, ALONE, stage0=at in counts.stage0[ALONE].get(phase, [])))
    return plan


def _traced(setup: Setup, run_dir: Path, env: dict[str, str]) -> tuple[subprocess.CompletedProcess, list[str]]:
    trace = run_dir.parent / f"{run_dir.name}.points.log"
    trace.unlink(missing_ok=True)
    done = _run(setup.args(run_dir), {**env, "DEALCL_FAULT_LOG": str(trace)})
    if done.returncode != 0:
        raise SystemExit(f"the clean run {run_dir} failed: {done.stderr.strip().splitlines()[-1:]}")
    return done, trace.read_text().split()


def count(workdir: Path, setup: Setup, env: dict[str, str]) -> tuple[Counts, dict[str, bytes], Path]:
    """Clean runs of both kinds; returns their counts, the reference outputs and the folder
    holding the copy that borrowing trials sit next to."""
    counts = Counts()
    clean = workdir / "clean" / "run"  # alone in its folder, as alone trials are
    done, trace = _traced(setup, clean, env)
    if BORROWED in done.stderr:
        raise SystemExit(f"the clean run borrowed its stage 0: {workdir} holds another run")
    reference = outputs_of(clean)
    manifest = clean / REFERENCE_DIR / MANIFEST
    files = len(json.loads(manifest.read_text())["files"]) if manifest.is_file() else 0  # 0: no stage 0
    counts.total[ALONE] = collections.Counter(trace)
    counts.stage0[ALONE] = stage0_occurrences(trace, files) if files else {}

    borrowing = workdir / "borrowing"
    shutil.copytree(clean, borrowing / "sibling")  # a finished run next to the trials: stage 0 to borrow
    done, trace = _traced(setup, borrowing / "count", env)
    if files and BORROWED not in done.stderr:
        raise SystemExit("a run next to a finished copy of the clean run did not borrow its stage 0")
    if outputs_of(borrowing / "count") != reference:
        raise SystemExit("a run that borrowed its stage 0 ended differently from the clean run")
    shutil.rmtree(borrowing / "count")
    counts.total[BORROWING] = collections.Counter(trace)
    counts.stage0[BORROWING] = stage0_occurrences(trace, files) if files else {}
    return counts, reference, borrowing


def trial(number: int, kill: Kill, total: int, setup: Setup, run_dir: Path, env: dict[str, str],
          reference: dict[str, bytes], result: Campaign) -> str | None:
    """One kill and its resume; returns the line to echo, or None after a failure."""
    name = f"trial {number}: {kill.phase}:{kill.at}{kill.where}"
    killed = _run(setup.args(run_dir), {**env, "DEALCL_FAULT": f"{kill.phase}:{kill.at}"})
    if killed.returncode != -9:
        result.failures.append(f"trial {number}: expected a SIGKILL at {kill.phase}:{kill.at}{kill.where} "
                               f"({kill.kind}), got exit {killed.returncode}")
        return None
    borrowed = BORROWED in killed.stderr
    if kill.kind == ALONE and borrowed:
        result.failures.append(f"{name}: an alone trial borrowed its stage 0")
        return None
    if kill.stage0:
        unfinished = verify_stage_dir(run_dir / REFERENCE_DIR) is not None
        trained = any((run_dir / "adapters").glob("[0-9]*"))
        if not unfinished or trained:
            result.failures.append(f"{name}: planned inside stage 0, but the kill came after it")
            return None
        if kill.kind == BORROWING and not borrowed:
            result.failures.append(f"{name}: planned inside a borrowed stage 0, but stage 0 was not borrowed")
            return None
    result.kills[kill.phase] += 1
    result.landed.append(kill)
    resumed = _run(["resume", str(run_dir), "--quiet"], env)
    if resumed.returncode != 0:
        result.failures.append(f"{name}: resume failed: {resumed.stderr.strip()[-300:]}")
        return None
    if kill.stage0 and (BORROWED in resumed.stderr) != (kill.kind == BORROWING):
        result.failures.append(f"{name}: the resume {'borrowed' if kill.kind == ALONE else 'did not borrow'} stage 0")
        return None
    result.survived += 1
    same = outputs_of(run_dir) == reference
    if not same:
        result.identical = False
        result.failures.append(f"{name}: outputs differ after the kill")
    result.corrupt += [f"trial {number}: {p}" for p in problems_in(run_dir)]
    return f"killed at {kill.phase}:{kill.at}/{total}{kill.where}, resumed, {'identical' if same else 'DIFFERENT'}"


def campaign(workdir: Path, kills: int, seed: int, method: str = "seqlora",
             phases: tuple[str, ...] = POINTS, echo=print) -> Campaign:
    setup = Setup(write_toy_benchmark(workdir / "CL_Benchmark"), method)
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "TOKENIZERS_PARALLELISM": "false"}
    for name in ("DEALCL_FAULT", "DEALCL_FAULT_LOG"):
        env.pop(name, None)
    counts, reference, borrowing = count(workdir, setup, env)
    result = Campaign(planned=plan_kills(counts, kills, seed, phases))
    for number, kill in enumerate(result.planned, 1):
        # Alone: a folder of its own, nothing to borrow. Borrowing: next to the clean run's copy.
        folder = workdir / f"trial-{number}" if kill.kind == ALONE else borrowing
        run_dir = folder / ("run" if kill.kind == ALONE else f"trial-{number}")
        shutil.rmtree(run_dir, ignore_errors=True)
        line = trial(number, kill, counts.total[kill.kind][kill.phase], setup, run_dir, env, reference, result)
        if line is not None:  # a failed trial's folder is kept, to look at
            echo(f"trial {number:>2} ({kill.kind}): {line}")
            shutil.rmtree(folder if kill.kind == ALONE else run_dir, ignore_errors=True)
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
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from host import host_line

    print(host_line(), flush=True)
    started = time.perf_counter()
    try:
        result = campaign(workdir, args.kills, args.seed, args.method)
    finally:
        if args.workdir is None:
            shutil.rmtree(workdir, ignore_errors=True)
    print("kills per phase: " + ", ".join(f"{p} {result.kills[p]}" for p in POINTS))
    inside = collections.Counter((k.kind, k.phase == "eval-batch") for k in result.landed if k.stage0)
    print(f"kills inside stage 0: {inside[ALONE, True]} in its evaluation, {inside[ALONE, False]} in its writes, "
          f"{inside[BORROWING, False]} in a borrowed stage 0's writes")
    for failure in result.failures:
        print(f"  {failure}")
    print(f"kills survived: {result.survived}, results identical: {'yes' if result.identical else 'no'}, "
          f"corrupt files: {len(result.corrupt)}")
    print(f"({len(result.planned)} kills planned, {len(result.landed)} landed where planned, "
          f"{time.perf_counter() - started:.0f} s)")
    ok = result.survived == args.kills and result.identical and not result.corrupt and not result.failures
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
