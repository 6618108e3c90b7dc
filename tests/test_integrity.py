"""A finished run whose files were damaged afterwards: every command that reads it says so in
one `error:` line naming the file and exits 2; nothing answers or exports with an older stage
unless asked by name (`--stage K`); `resume --retrain-stage K` repairs it."""
from __future__ import annotations

import json
import shutil

import pytest

from conftest import tiny_run_config
from dealcl.cli import main
from dealcl.runs.driver import run_continual

ADAPTER = "adapters/2-toyB/adapter_model.safetensors"


@pytest.fixture(scope="module")
def finished_run(toy_data_session, tmp_path_factory):
    root = tmp_path_factory.mktemp("finished") / "run"
    run_continual(tiny_run_config(toy_data_session, test_per_task=4, train_per_task=8), root, progress=False)
    return root


@pytest.fixture
def damaged(finished_run, tmp_path):
    """A copy of the finished run with one byte of its final adapter flipped."""
    run = tmp_path / "run"
    shutil.copytree(finished_run, run)
    path = run / ADAPTER
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))
    return run


def _one_error(capsys) -> str:
    err = [line for line in capsys.readouterr().err.strip().splitlines() if line]
    assert len(err) == 1 and err[0].startswith("error:"), err
    return err[0]


def _inputs(tmp_path):
    path = tmp_path / "in.jsonl"
    path.write_text('{"sentence": "a red plum"}\n{"sentence": "the sun apple"}\n')
    return path


def test_resume_refuses_a_damaged_final_adapter_and_says_how_to_retrain(damaged, capsys):
    before = (damaged / "results.json").read_text()
    assert main(["resume", str(damaged), "--quiet"]) == 2
    line = _one_error(capsys)
    assert ADAPTER in line and "does not match its manifest" in line and "--retrain-stage 2" in line
    assert (damaged / "results.json").read_text() == before  # nothing was changed


def test_retrain_stage_repairs_the_run(damaged, finished_run, capsys):
    assert main(["resume", str(damaged), "--quiet", "--retrain-stage", "2"]) == 0
    assert "discarded" in capsys.readouterr().err
    # The stage is trained again from stage 1's checkpoint: the same bytes as the undamaged run.
    assert (damaged / ADAPTER).read_bytes() == (finished_run / ADAPTER).read_bytes()
    assert (damaged / "results.json").read_text() == (finished_run / "results.json").read_text()
    assert main(["resume", str(damaged), "--quiet"]) == 0


def test_retrain_stage_out_of_range_is_one_error_line(damaged, capsys):
    assert main(["resume", str(damaged), "--quiet", "--retrain-stage", "7"]) == 2
    assert "has stages 1-2" in _one_error(capsys)


def test_predict_and_export_refuse_a_damaged_final_adapter(damaged, tmp_path, capsys):
    assert main(["predict", str(damaged), "--input", str(_inputs(tmp_path))]) == 2
    line = _one_error(capsys)
    assert ADAPTER in line and "--retrain-stage 2" in line and "--stage 1" in line
    assert capsys.readouterr().out == ""  # no answers from another model
    assert main(["export", str(damaged), "--to", str(tmp_path / "out")]) == 2
    assert ADAPTER in _one_error(capsys)
    assert not (tmp_path / "out").exists()


def test_an_older_stage_only_when_asked_by_name(damaged, tmp_path, capsys):
    assert main(["predict", str(damaged), "--input", str(_inputs(tmp_path)), "--stage", "1"]) == 0
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert len(rows) == 2
    assert main(["export", str(damaged), "--to", str(tmp_path / "out"), "--stage", "1"]) == 0
    record = json.loads((tmp_path / "out" / "dealcl_export.json").read_text())
    assert record["stage"] == {"index": 1, "name": "toyA"}
    capsys.readouterr()
    assert main(["predict", str(damaged), "--input", str(_inputs(tmp_path)), "--stage", "2"]) == 2
    assert ADAPTER in _one_error(capsys)


def test_an_unfinished_run_is_not_used_silently(finished_run, tmp_path, capsys):
    run = tmp_path / "run"
    shutil.copytree(finished_run, run)
    shutil.rmtree(run / "adapters" / "2-toyB")
    shutil.rmtree(run / "outputs" / "2-toyB")
    assert main(["predict", str(run), "--input", str(_inputs(tmp_path))]) == 2
    line = _one_error(capsys)
    assert "not finished" in line and "--stage 1" in line and "dealcl resume" in line


def test_report_and_compare_refuse_damaged_outputs(finished_run, toy_data_session, tmp_path, capsys):
    run = tmp_path / "cmp" / "custom-seqlora"
    shutil.copytree(finished_run, run)
    scores = run / "outputs" / "1-toyA" / "predict_results.json"
    scores.write_text(scores.read_text().replace('"predict_samples": 4', '"predict_samples": 5'))
    assert main(["report", str(run)]) == 2
    line = _one_error(capsys)
    assert str(scores) in line and "does not match its manifest" in line
    # compare re-reads its finished runs: the damaged one stops it before anything is written
    args = ["compare", "--tasks", "toyA,toyB", "--methods", "seqlora", "--model", "tiny-llama",
            "--data", str(toy_data_session), "--test-per-task", "4", "--quiet", "--output", str(tmp_path / "cmp")]
    assert main(args) == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "1-toyA/predict_results.json" in errors[0]


def test_stage_0_is_logged_and_each_stage_records_its_own_peak(finished_run):
    log = (finished_run / "logs" / "train_and_infer.log").read_text()
    assert "stage 0 (zero-shot reference) done: 2 tasks evaluated" in log
    stages = json.loads((finished_run / "efficiency.json").read_text())["stages"]
    assert [s["peak_memory_scope"] for s in stages] == ["stage", "stage"]


def test_the_peak_memory_count_is_reset_per_stage():
    import numpy as np
    import torch

    from dealcl.runs.memory import peak_memory_mb, reset_peak_memory

    cpu = torch.device("cpu")
    assert reset_peak_memory(cpu)
    block = np.ones(64 * 2**20 // 8)  # 64 MiB, touched
    high = peak_memory_mb(cpu)
    del block
    assert reset_peak_memory(cpu)
    assert peak_memory_mb(cpu) < high - 40  # the next stage no longer sees the earlier peak


def test_the_multi_run_chart_warns_when_task_sets_differ(tmp_path, capsys):
    from dealcl.runs.report import RunSummary, format_report, write_report

    runs = [RunSummary("a", ["t1", "t2"], [[50.0, None], [40.0, 60.0]], None, "seqlora", "m", "dealcl"),
            RunSummary("b", ["t1", "t3"], [[50.0, None], [45.0, 70.0]], None, "seqlora", "m", "dealcl"),
            RunSummary("c", ["t2", "t1"], [[50.0, None], [45.0, 70.0]], None, "seqlora", "m", "dealcl")]
    format_report(runs)
    err = capsys.readouterr().err
    assert "different task sets" in err and "t3" in err
    assert "different task sets" in write_report(runs, tmp_path).read_text()
    format_report([runs[0], runs[2]])  # the same tasks in another order compare fine
    assert "task sets" not in capsys.readouterr().err


def test_counts_are_pluralised():
    from dealcl.runs.driver import _count

    assert _count(1, "task") == "1 task" and _count(2, "task") == "2 tasks"
