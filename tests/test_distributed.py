"""Data parallel on CPU (gloo): 2 processes give the same losses and results as 1 process
with the same global batch, the ranks see disjoint halves, and only rank 0 writes. With the
base weights sharded (fsdp=true) the same holds, uneven shards included."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from dealcl.methods import REGISTRY

METHODS = [m for m in ("seqlora", "olora", "gorp", "deal") if m in REGISTRY]


def _run(data: Path, out: Path, method: str, processes: int, shard_log: Path, *extra: str,
         env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    option = ["method.dropout=0.0"] if "dropout" in {f.name for f in REGISTRY[method].options()} else []
    args = ["run", "--tasks", "toyA,toyB", "--model", "tiny-llama", "--data", str(data), "--output", str(out),
            "--method", method, "--precision", "fp32", "--batch-size", "4", "--grad-accum", "2", "--lr", "5e-3",
            "--train-per-task", "16", "--test-per-task", "7", "--quiet", "--num-processes", str(processes)]
    overrides = [a for a in extra if "=" in a and not a.startswith("-")]
    args += [a for a in extra if a not in overrides] + option + overrides  # key=value overrides last
    env = {**os.environ, "DEALCL_SHARD_LOG": str(shard_log), "OMP_NUM_THREADS": "1", **(env or {})}
    return subprocess.run([sys.executable, "-m", "dealcl", *args], env=env, capture_output=True, text=True, timeout=600)


@pytest.mark.parametrize("method", METHODS)
def test_two_processes_equal_one_process(toy_data, tmp_path, method):
    one = _run(toy_data, tmp_path / "one", method, 1, tmp_path / "shards-one")
    assert one.returncode == 0, one.stderr[-6000:]
    two = _run(toy_data, tmp_path / "two", method, 2, tmp_path / "shards-two")
    assert two.returncode == 0, two.stderr[-6000:]

    stages_one = json.loads((tmp_path / "one" / "efficiency.json").read_text())["stages"]
    stages_two = json.loads((tmp_path / "two" / "efficiency.json").read_text())["stages"]
    assert [s["world_size"] for s in stages_two] == [2, 2]
    for a, b in zip(stages_one, stages_two):
        assert len(a["step_losses"]) == len(b["step_losses"]) > 0
        assert b["step_losses"] == pytest.approx(a["step_losses"], abs=1e-5)
    results = [json.loads((tmp_path / name / "results.json").read_text()) for name in ("one", "two")]
    for key in ("accuracy_matrix", "average_accuracy", "backward_transfer", "invalid_rate_matrix"):
        assert results[0][key] == results[1][key], key

    # Disjoint halves of every global batch, together the whole of it.
    rank0 = (tmp_path / "shards-two.0").read_text().splitlines()
    rank1 = (tmp_path / "shards-two.1").read_text().splitlines()
    single = (tmp_path / "shards-one.0").read_text().splitlines()
    assert len(rank0) == len(rank1) == len(single)
    for a, b, whole in zip(rank0, rank1, single):
        ia, ib, iw = (set(line.split()[1:]) for line in (a, b, whole))
        assert ia and ib and not ia & ib and ia | ib == iw


def test_only_rank_zero_writes(toy_data, tmp_path):
    """A second rank that wrote anything would leave files the manifests do not list, or
    duplicated log lines; the run directory of 2 processes has exactly the 1-process files."""
    for processes, name in ((1, "one"), (2, "two")):
        done = _run(toy_data, tmp_path / name, "seqlora", processes, tmp_path / f"shards-{name}")
        assert done.returncode == 0, done.stderr[-6000:]
    files = [sorted(str(p.relative_to(tmp_path / n)) for p in (tmp_path / n).rglob("*")) for n in ("one", "two")]
    assert files[0] == files[1]
    log_two = (tmp_path / "two" / "logs" / "train_and_infer.log").read_text()
    assert log_two.count("stage 1 toyA done") == 1


FSDP_METHODS = [m for m in ("seqlora", "olora", "deal") if m in REGISTRY]


@pytest.mark.parametrize("method", FSDP_METHODS)
def test_sharded_base_weights_equal_one_process(toy_data, tmp_path, method):
    """fsdp=true on 2 ranks vs 1 process. 17 examples at a global batch of 8 (micro-batches of
    2) leave a last step of one example, so rank 1 has no micro-batch and must run a filler;
    7 test examples give shards of 4 and 3, so evaluation pads. A rank that ran one forward
    fewer would hang the other in FSDP's all-gather (the subprocess timeout would fail this)."""
    shape = ["--batch-size", "2", "--grad-accum", "4", "--train-per-task", "17"]
    one = _run(toy_data, tmp_path / "one", method, 1, tmp_path / "shards-one", *shape)
    assert one.returncode == 0, one.stderr[-6000:]
    two = _run(toy_data, tmp_path / "two", method, 2, tmp_path / "shards-two", *shape, "fsdp=true")
    assert two.returncode == 0, two.stderr[-6000:]

    assert yaml.safe_load((tmp_path / "two" / "run.yaml").read_text())["effective"]["fsdp"] is True
    stages = [json.loads((tmp_path / name / "efficiency.json").read_text())["stages"] for name in ("one", "two")]
    for a, b in zip(*stages):
        assert len(a["step_losses"]) == len(b["step_losses"]) == 3
        assert b["step_losses"] == pytest.approx(a["step_losses"], abs=1e-5)
    rank1 = (tmp_path / "shards-two.1").read_text().splitlines()
    assert any(len(line.split()) == 1 for line in rank1), "no step left rank 1 without examples"
    for stage in ("1-toyA", "2-toyB"):
        answers = [json.loads((tmp_path / name / "outputs" / stage / "predictions.json").read_text())
                   for name in ("one", "two")]
        assert answers[0] == answers[1]
        assert all(len(a["predictions"]) == 7 for a in answers[1].values())


def test_a_killed_sharded_run_resumes_to_the_same_results(toy_data, tmp_path):
    """Both ranks killed in the middle of task 2 (SIGKILL at its first step); `dealcl resume
    --num-processes 2` retrains task 2 from the task-1 checkpoint and ends where an
    uninterrupted 1-process run ends."""
    shape = ["--batch-size", "2", "--grad-accum", "4", "--train-per-task", "17"]
    one = _run(toy_data, tmp_path / "one", "seqlora", 1, tmp_path / "s1", *shape)
    assert one.returncode == 0, one.stderr[-6000:]
    killed = _run(toy_data, tmp_path / "two", "seqlora", 2, tmp_path / "s2", *shape, "fsdp=true",
                  env={"DEALCL_FAULT": "train-step:4"})
    assert killed.returncode == 1 and not (tmp_path / "two" / "outputs" / "2-toyB").exists()
    assert killed.stderr.strip().splitlines()[-1].startswith("error: a training process failed")
    resumed = subprocess.run([sys.executable, "-m", "dealcl", "resume", str(tmp_path / "two"), "--num-processes", "2",
                              "--quiet"], env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True,
                             timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-6000:]
    stages = [json.loads((tmp_path / n / "efficiency.json").read_text())["stages"] for n in ("one", "two")]
    assert [s["world_size"] for s in stages[1]] == [2, 2]
    for a, b in zip(*stages):
        assert b["step_losses"] == pytest.approx(a["step_losses"], abs=1e-5)
    answers = [json.loads((tmp_path / n / "outputs" / "2-toyB" / "predictions.json").read_text()) for n in ("one", "two")]
    assert answers[0] == answers[1]


def test_a_method_that_trains_base_weights_is_refused_under_fsdp(toy_data, tmp_path):
    done = _run(toy_data, tmp_path / "x", "gorp", 2, tmp_path / "shards", "fsdp=true")
    assert done.returncode == 2
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: method gorp cannot run with fsdp"), done.stderr[-3000:]
    assert not (tmp_path / "x").exists()


def test_an_unsupported_backend_is_one_error_line(toy_data, tmp_path):
    env = {**os.environ, "ACCELERATE_USE_DEEPSPEED": "true"}
    done = subprocess.run([sys.executable, "-m", "dealcl", "run", "--tasks", "toyA", "--model", "tiny-llama",
                           "--data", str(toy_data), "--output", str(tmp_path / "x"), "--quiet"],
                          env=env, capture_output=True, text=True)
    assert done.returncode == 2
    assert done.stderr.strip().startswith("error: DeepSpeed ZeRO is not supported") and len(done.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "x").exists()


def test_a_user_error_on_rank_zero_stops_every_rank_with_one_line(toy_data, tmp_path):
    """Rank 0 alone opens the run directory; when it refuses (a run with another config is
    there), the other rank must stop too instead of waiting for it forever."""
    out = tmp_path / "taken"
    out.mkdir()
    (out / "notes.txt").write_text("not a run\n")
    done = _run(toy_data, out, "seqlora", 2, tmp_path / "shards")
    assert done.returncode == 2, done.stderr[-3000:]
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:") and str(out) in lines[0], done.stderr[-3000:]
    assert sorted(p.name for p in out.iterdir()) == ["notes.txt"]
