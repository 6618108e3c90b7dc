"""Ctrl-C: SIGINT during training or evaluation stops a run with one line saying how to resume
(exit code 130), and `dealcl resume` then ends with exactly the uninterrupted run's results."""
from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

from dealcl.cli import main
from dealcl.runs.store import verify_stage_dir

# 24 training examples in batches of 2 over 2 epochs: 24 steps per task, so a signal sent at
# stage 2's second step finds the run still training.
ARGS = ["--tasks", "toyA,toyB", "--model", "tiny-llama", "--precision", "fp32", "--batch-size", "2", "--epochs", "2",
        "--lr", "5e-3", "--test-per-task", "4", "--quiet", "method.dropout=0.0"]
STEPS_PER_TASK = 24


def _args(data: Path, out: Path) -> list[str]:
    return ["run", "--data", str(data), "--output", str(out), *ARGS]


def _stopped_cleanly(proc: subprocess.CompletedProcess | subprocess.Popen, stderr: str, out: Path, phase: str) -> None:
    assert proc.returncode == 130, stderr
    assert "Traceback" not in stderr
    errors = [line for line in stderr.splitlines() if line.startswith("error:")]
    assert errors == [stderr.strip().splitlines()[-1]], stderr
    assert re.fullmatch(rf"error: interrupted during {phase}; finished stages are kept in {re.escape(str(out))}: "
                        rf"continue with `dealcl resume {re.escape(str(out))}`", errors[0]), errors[0]
    assert not [p for p in out.rglob("*") if p.name.endswith(".tmp")], "temporary files left behind"
    for group in ("adapters", "outputs"):
        for stage in (out / group).glob("[0-9]*"):
            assert verify_stage_dir(stage) is None, stage


def test_ctrl_c_during_training_and_evaluation_then_resume_gives_the_uninterrupted_results(toy_data, tmp_path):
    clean = tmp_path / "clean"
    assert main(_args(toy_data, clean)) == 0
    expected = (clean / "results.json").read_bytes()

    # SIGINT from outside, as a terminal's Ctrl-C sends it, once stage 2 has begun training.
    out, log = tmp_path / "training", tmp_path / "points.log"
    env = {**os.environ, "DEALCL_FAULT_LOG": str(log)}
    proc = subprocess.Popen([sys.executable, "-m", "dealcl", *_args(toy_data, out)], env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and proc.poll() is None:
        if log.exists() and log.read_text().count("train-step") >= STEPS_PER_TASK + 2:
            proc.send_signal(signal.SIGINT)
            break
        time.sleep(0.01)
    _, stderr = proc.communicate(timeout=300)
    _stopped_cleanly(proc, stderr, out, r"training of stage 2 \(toyB\)")
    assert verify_stage_dir(out / "adapters" / "1-toyA") is None and not (out / "adapters" / "2-toyB").exists()
    assert main(["resume", str(out)]) == 0
    assert (out / "results.json").read_bytes() == expected

    # Ctrl-C at an exact evaluation batch: stage 1's first (stage 0 evaluates nothing here: its
    # answers are borrowed from the identical finished stage 0 of the sibling runs).
    out = tmp_path / "evaluation"
    env = {**os.environ, "DEALCL_FAULT": "eval-batch:1:int"}
    done = subprocess.run([sys.executable, "-m", "dealcl", *_args(toy_data, out)], env=env, text=True,
                          capture_output=True, timeout=300)
    _stopped_cleanly(done, done.stderr, out, r"evaluation of stage 1 \(toyA\)")
    assert verify_stage_dir(out / "adapters" / "1-toyA") is None and not (out / "outputs" / "1-toyA").exists()
    assert main(["resume", str(out)]) == 0
    assert (out / "results.json").read_bytes() == expected
