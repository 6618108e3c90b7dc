"""Experiment trackers (report_to): what they log is what the run's files hold, on one step axis.

TensorBoard is in the test extra: its event files are read back with TensorBoard's own reader.
W&B (offline) and MLflow (SQLite store in the run) are optional: skipped where not installed.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from conftest import tiny_run_config
from dealcl.errors import UserError
from dealcl.runs.driver import run_continual

REPO = Path(__file__).resolve().parents[1]


def _olora(data: Path, **overrides):
    # 12 examples at batch 4: 3 optimizer steps per stage; O-LoRA adds its `orth` term in stage 2.
    values = dict(method="olora", train_per_task=12, test_per_task=4, report_to=["tensorboard"],
                  method_options={"dropout": 0.0, "lambda2": 0.0})
    values.update(overrides)
    return tiny_run_config(data, **values)


def _events(run_dir: Path, purge: bool = True):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(run_dir / "tracking" / "tensorboard"), purge_orphaned_data=purge)
    events.Reload()
    return events


def _scalars(events, tag: str) -> list[tuple[int, float]]:
    return [(e.step, e.value) for e in events.Scalars(tag)]


def _files(run_dir: Path) -> tuple[dict, list[dict]]:
    results = json.loads((run_dir / "results.json").read_text())
    stages = json.loads((run_dir / "efficiency.json").read_text())["stages"]
    return results, stages


def _check_run(run_dir: Path, events) -> None:
    """Every logged value against results.json and efficiency.json."""
    results, stages = _files(run_dir)
    losses = [loss for stage in stages for loss in stage["step_losses"]]
    assert len(losses) == 6
    logged = _scalars(events, "train/loss")
    assert [step for step, _ in logged] == list(range(1, 7))  # one axis over both stages, no repeats
    assert [v for _, v in logged] == pytest.approx(losses, rel=1e-6)  # event files hold float32
    # The method's own term under its own tag: stage 2's steps 4..6, as efficiency.json has it.
    orth = stages[1]["step_loss_terms"]["orth"]
    assert min(orth) > 0 and "orth" not in stages[0]["step_loss_terms"]
    assert _scalars(events, "train/loss/orth") == [(4 + k, pytest.approx(v, rel=1e-6)) for k, v in enumerate(orth)]
    task = [v for stage in stages for v in stage["step_loss_terms"]["task"]]
    assert [v for _, v in _scalars(events, "train/loss/task")] == pytest.approx(task, rel=1e-6)
    assert [v for _, v in _scalars(events, "train/lr")] == pytest.approx([5e-3] * 6)
    # Exact match per task after each stage, at the stage's last step (the untouched model at 0).
    matrix, reference = results["accuracy_matrix"], results["reference"]
    assert _scalars(events, "eval/em/toyA") == [(0, reference[0]), (3, matrix[0][0]), (6, matrix[1][0])]
    assert _scalars(events, "eval/em/toyB") == [(0, reference[1]), (6, matrix[1][1])]
    assert _scalars(events, "eval/stage") == [(0, 0), (3, 1), (6, 2)]
    assert _scalars(events, "final/average_accuracy") == [(6, pytest.approx(results["average_accuracy"]))]
    assert _scalars(events, "final/backward_transfer") == [(6, pytest.approx(results["backward_transfer"]))]
    assert "final/accuracy_matrix/text_summary" in events.Tags()["tensors"]


def test_tensorboard_logs_what_the_run_files_hold(toy_data, tmp_path):
    run_dir = tmp_path / "run"
    run_continual(_olora(toy_data), run_dir, progress=False)
    _check_run(run_dir, _events(run_dir))
    assert yaml.safe_load((run_dir / "run.yaml").read_text())["config"]["report_to"] == ["tensorboard"]


def _cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "dealcl", *args]


def test_resume_continues_the_step_counter(toy_data, tmp_path):
    """Killed in stage 2 after its first step was logged, resumed: steps 1..6 once each, the
    values of the resumed run's files; the killed session's step 4 is in the files, superseded."""
    run_dir = tmp_path / "run"
    env = {**os.environ, "PYTHONPATH": str(REPO / "src"), "OMP_NUM_THREADS": "1", "DEALCL_FAULT": "train-step:5"}
    args = ["run", "--method", "olora", "--model", "tiny-llama", "--tasks", "toyA,toyB", "--data", str(toy_data),
            "--precision", "fp32", "--batch-size", "4", "--lr", "5e-3", "--seed", "0", "--train-per-task", "12",
            "--test-per-task", "4", "--report-to", "tensorboard", "--output", str(run_dir), "--quiet",
            "method.dropout=0.0", "method.lambda2=0.0", "max_source_length=256", "eval_batch_size=8"]
    killed = subprocess.run(_cli(*args), env=env, capture_output=True, text=True)
    assert killed.returncode == -9, killed.stderr
    assert [step for step, _ in _scalars(_events(run_dir), "train/loss")] == [1, 2, 3, 4]
    del env["DEALCL_FAULT"]
    resumed = subprocess.run(_cli("resume", str(run_dir), "--quiet"), env=env, capture_output=True, text=True)
    assert resumed.returncode == 0, resumed.stderr
    _check_run(run_dir, _events(run_dir))
    raw = [step for step, _ in _scalars(_events(run_dir, purge=False), "train/loss")]
    assert raw.count(4) == 2  # without TensorBoard's purge the retrained step would show twice


def test_a_missing_tracker_package_stops_the_run_before_it_starts(toy_data, tmp_path, monkeypatch):
    import accelerate.utils

    monkeypatch.setattr(accelerate.utils, "is_wandb_available", lambda: False)
    with pytest.raises(UserError, match=r"report_to=wandb needs wandb.*pip install 'dealcl\[trackers\]'"):
        run_continual(_olora(toy_data, report_to=["wandb"]), tmp_path / "run", progress=False)
    assert not (tmp_path / "run").exists()


def test_an_unknown_tracker_is_one_error_line(toy_data, tmp_path):
    env = {**os.environ, "PYTHONPATH": str(REPO / "src")}
    out = subprocess.run(_cli("run", "--model", "tiny-llama", "--tasks", "toyA", "--data", str(toy_data),
                              "--report-to", "tensorbord", "--output", str(tmp_path / "run")),
                         env=env, capture_output=True, text=True)
    assert out.returncode == 2
    assert out.stderr.strip().splitlines() == [
        "error: config key 'report_to' takes none or tensorboard, wandb, mlflow, got 'tensorbord' "
        "(did you mean 'tensorboard'?)"]
    assert not (tmp_path / "run").exists()


def test_report_to_none_is_no_tracker(toy_data):
    from dealcl.runs.config import apply_values, validate

    for value in ("none", ["none"], "", None):
        assert validate(apply_values(_olora(toy_data), {"report_to": value})).report_to is None
    assert validate(apply_values(_olora(toy_data), {"report_to": "TensorBoard,mlflow,tensorboard"})).report_to == [
        "tensorboard", "mlflow"]


def test_wandb_offline_run_in_the_run_directory(toy_data, tmp_path, monkeypatch):
    pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    run_dir = tmp_path / "run"
    run_continual(_olora(toy_data, report_to=["wandb"]), run_dir, progress=False)
    results, stages = _files(run_dir)
    state = json.loads((run_dir / "tracking" / "state.json").read_text())
    (offline,) = (run_dir / "tracking" / "wandb").glob(f"offline-run-*-{state['wandb_id']}")
    # W&B ships no reader of its offline run file: its history records hold each key and each
    # value's JSON text as plain protobuf strings, so they are looked for in its bytes.
    data = (offline / f"run-{state['wandb_id']}.wandb").read_bytes()
    for tag in ("train/loss", "train/loss/orth", "train/loss/task", "train/lr", "eval/em/toyA", "eval/em/toyB",
                "final/average_accuracy"):
        assert tag.encode() in data, tag
    for value in [v for stage in stages for v in stage["step_losses"]] + stages[1]["step_loss_terms"]["orth"]:
        assert repr(value).encode() in data, value
    (table,) = (offline / "files" / "media" / "table" / "final").glob("accuracy_matrix_6_*.table.json")  # at step 6
    logged = json.loads(table.read_text())
    assert logged["columns"] == ["stage", "toyA", "toyB"]
    assert [row[1:] for row in logged["data"]] == [results["reference"], *results["accuracy_matrix"]]


def test_mlflow_run_in_the_run_directory(toy_data, tmp_path, monkeypatch):
    pytest.importorskip("mlflow")
    pytest.importorskip("sqlalchemy")
    pytest.importorskip("alembic")
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    from mlflow.tracking import MlflowClient

    run_dir = tmp_path / "run"
    run_continual(_olora(toy_data, report_to=["mlflow"]), run_dir, progress=False)
    results, stages = _files(run_dir)
    state = json.loads((run_dir / "tracking" / "state.json").read_text())
    client = MlflowClient(tracking_uri=f"sqlite:///{run_dir / 'tracking' / 'mlflow.db'}")

    def history(tag):
        return [(m.step, m.value) for m in sorted(client.get_metric_history(state["mlflow_run_id"], tag),
                                                  key=lambda m: m.step)]

    losses = [loss for stage in stages for loss in stage["step_losses"]]
    assert history("train/loss") == [(k + 1, pytest.approx(v)) for k, v in enumerate(losses)]
    orth = stages[1]["step_loss_terms"]["orth"]
    assert history("train/loss/orth") == [(4 + k, pytest.approx(v)) for k, v in enumerate(orth)]
    matrix = results["accuracy_matrix"]
    assert history("eval/em/toyA") == [(0, results["reference"][0]), (3, matrix[0][0]), (6, matrix[1][0])]
    artifacts = {a.path for a in client.list_artifacts(state["mlflow_run_id"])}
    assert {"accuracy_matrix.md", "results.json"} <= artifacts


def test_only_the_main_process_logs(toy_data, tmp_path):
    """2 processes: one TensorBoard writer (rank 0's), each step once, the run's own losses."""
    from test_distributed import _run

    run_dir = tmp_path / "two"
    done = _run(toy_data, run_dir, "olora", 2, tmp_path / "shards", "--report-to", "tensorboard")
    assert done.returncode == 0, done.stderr[-6000:]
    assert len(list((run_dir / "tracking" / "tensorboard").glob("events.out.tfevents.*"))) == 1
    stages = _files(run_dir)[1]
    losses = [loss for stage in stages for loss in stage["step_losses"]]
    logged = _scalars(_events(run_dir), "train/loss")
    assert [step for step, _ in logged] == list(range(1, len(losses) + 1))
    assert [v for _, v in logged] == pytest.approx(losses, rel=1e-6)
