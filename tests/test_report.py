"""Loading dealcl and upstream runs, checked against the committed O-LoRA logs (gorp_olora_spec.md §5.1)."""
import json
from pathlib import Path

import pytest
import yaml

from dealcl.errors import UserError
from dealcl.eval.metrics import summarize
from dealcl.runs.report import format_report, load_run

REFERENCE_RUNS = Path(__file__).resolve().parents[2] / "shared" / "reference-runs" / "olora-t5-large"
needs_reference_runs = pytest.mark.skipif(not REFERENCE_RUNS.is_dir(), reason="reference runs not available")


@needs_reference_runs
def test_order1_olora_matches_spec():
    run = load_run(REFERENCE_RUNS / "order1_olora")
    assert run.source == "upstream"
    assert run.task_order == ["dbpedia", "amazon", "yahoo", "agnews"]
    assert run.average_accuracy == pytest.approx(78.37, abs=0.01)
    assert run.backward_transfer == pytest.approx(-1.18, abs=0.01)
    assert run.forward_transfer is None  # upstream never evaluates a task before learning it
    assert run.missing == []


@needs_reference_runs
def test_order1_seqlora_stage3_is_missing_not_zero():
    run = load_run(REFERENCE_RUNS / "order1_seqlora")
    assert run.matrix[2] == [None, None, None, None]  # stage 3 (yahoo) has no predict keys
    assert run.missing == [[3, "yahoo"]]
    assert run.average_accuracy == pytest.approx(62.88, abs=0.01)
    assert run.backward_transfer == pytest.approx(-29.21, abs=0.01)  # dbpedia and amazon only
    text = format_report([run])
    assert "—" in text
    assert "missing" in text and "after 3-yahoo: yahoo" in text
    assert "over 2 of 3 tasks" in text


@needs_reference_runs
def test_long_olora_macro_not_micro():
    run = load_run(REFERENCE_RUNS / "long_olora" / "outputs")  # the outputs folder itself works too
    assert run.name == "long_olora"
    assert len(run.task_order) == 15 and run.task_order[8] == "SST-2"
    assert "TC" not in run.task_order
    assert run.average_accuracy == pytest.approx(72.17, abs=0.01)  # micro would be 73.88


@needs_reference_runs
def test_report_of_several_runs_fits_100_columns():
    runs = [load_run(REFERENCE_RUNS / name) for name in ("order1_olora", "order1_seqlora", "long_olora")]
    text = format_report(runs)
    assert max(len(line) for line in text.splitlines()) <= 100
    assert "== summary ==" in text and "78.37" in text and "72.17" in text


def _write_json(path: Path, obj) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj))


def test_upstream_layout_reference_and_predict_results_preferred(tmp_path):
    outputs = tmp_path / "run" / "outputs"
    _write_json(outputs / "0-reference" / "predict_results.json", {"predict_exact_match_for_a": 10.0, "predict_exact_match_for_b": 20.0})
    _write_json(outputs / "1-a" / "predict_results.json", {"predict_exact_match_for_a": 90.0, "predict_exact_match_for_b": 40.0})
    _write_json(outputs / "1-a" / "all_results.json", {"predict_exact_match_for_a": 1.0})
    _write_json(outputs / "2-b" / "all_results.json", {"predict_exact_match_for_a": 70.0, "predict_exact_match_for_b": 80.0,
                                                       "predict_exact_match_for_TC": 75.0})
    run = load_run(tmp_path / "run")
    assert run.task_order == ["a", "b"]
    assert run.reference == [10.0, 20.0]
    assert run.matrix == [[90.0, 40.0], [70.0, 80.0]]
    assert run.forward_transfer == pytest.approx(40.0 - 20.0)
    assert "FWT 20.00" in format_report([run])


def test_dealcl_layout(tmp_path):
    run_dir = tmp_path / "my-run"
    summary = summarize(["a", "b"], [[90.0, None], [70.0, 80.0]], reference=[10.0, 20.0])
    _write_json(run_dir / "results.json", summary)
    (run_dir / "run.yaml").write_text(yaml.safe_dump({"config": {"method": "deal", "model": "t5-small"}}))
    run = load_run(run_dir)
    assert (run.name, run.source, run.method, run.model, run.joint) == ("my-run", "dealcl", "deal", "t5-small", False)
    assert run.average_accuracy == 75.0 and run.backward_transfer == -20.0
    assert run.forward_transfer is None  # R[0][1] not evaluated


def test_dealcl_joint_run(tmp_path):
    _write_json(tmp_path / "results.json", {"method": "mtl", **summarize(["a", "b"], [[70.0, 90.0]], joint=True)})
    run = load_run(tmp_path)
    assert run.joint and run.method == "mtl"
    assert run.average_accuracy == 80.0 and run.backward_transfer is None
    assert "BWT" not in format_report([run])


def test_neither_layout_is_a_user_error(tmp_path):
    (tmp_path / "notes.txt").write_text("hello")
    with pytest.raises(UserError, match="not a dealcl run or upstream output directory"):
        load_run(tmp_path)
    with pytest.raises(UserError, match="not a dealcl run or upstream output directory"):
        load_run(tmp_path / "does-not-exist")


def _dealcl_run(run_dir: Path, packages: dict | None, step_losses: list[list[float]] | None = None) -> Path:
    _write_json(run_dir / "results.json", {"method": "seqlora", **summarize(["a", "b"], [[90.0, 10.0], [70.0, 80.0]])})
    record = {"config": {"method": "seqlora", "model": "tiny-llama"}}
    if packages is not None:
        record["provenance"] = {"dealcl": "0.1.0", "packages": packages}
    (run_dir / "run.yaml").write_text(yaml.safe_dump(record))
    if step_losses is not None:
        stages = [{"stage": k, "task": task, "step_losses": losses} for k, (task, losses) in enumerate(zip("ab", step_losses), 1)]
        _write_json(run_dir / "efficiency.json", {"device": "cpu", "stages": stages})
    return run_dir


PACKAGES = {"python": "3.11.7", "torch": "2.13.0+cpu", "transformers": "5.24.0", "peft": "0.21.2", "accelerate": "1.16.0"}


def test_report_warns_once_when_runs_come_from_different_versions(tmp_path, capsys):
    from dealcl.cli import main

    a = _dealcl_run(tmp_path / "old", {**PACKAGES, "transformers": "5.23.0"})
    b = _dealcl_run(tmp_path / "new", PACKAGES)
    c = _dealcl_run(tmp_path / "upstream-like", None)  # recorded nothing: left out
    assert load_run(a).packages["transformers"] == "5.23.0"
    assert main(["report", str(a), str(b), str(c), "--output", str(tmp_path / "rep")]) == 0
    captured = capsys.readouterr()
    lines = [line for line in captured.err.splitlines() if line.startswith("warning:")]
    assert len(lines) == 1, captured.err
    assert "transformers 5.23.0 (old) vs 5.24.0 (new)" in lines[0]
    assert "torch" not in lines[0] and "peft" not in lines[0] and "upstream-like" not in lines[0]
    assert "warning:" not in captured.out  # stdout keeps the report only
    assert lines[0] in (tmp_path / "rep" / "report.md").read_text()


def test_report_of_runs_with_the_same_versions_does_not_warn(tmp_path, capsys):
    from dealcl.cli import main

    a = _dealcl_run(tmp_path / "one", PACKAGES)
    b = _dealcl_run(tmp_path / "two", {**PACKAGES, "accelerate": "1.15.0", "python": "3.12.1"})  # not compared
    assert main(["report", str(a), str(b)]) == 0
    assert "warning" not in capsys.readouterr().err


def test_version_mismatch_names_every_differing_package():
    from dealcl.runs.report import version_mismatch

    runs = [_summary(name, packages) for name, packages in (
        ("x", PACKAGES), ("y", {**PACKAGES, "torch": "2.14.0", "peft": "0.22.0"}), ("z", PACKAGES))]
    warning = version_mismatch(runs)
    assert warning.startswith("warning: ") and "\n" not in warning
    assert "torch 2.13.0+cpu (x, z) vs 2.14.0 (y)" in warning and "peft 0.21.2 (x, z) vs 0.22.0 (y)" in warning
    assert "transformers" not in warning
    assert version_mismatch(runs[:1]) is None and version_mismatch([runs[0], runs[2]]) is None


def _summary(name: str, packages: dict):
    from dealcl.runs.report import RunSummary

    return RunSummary(name=name, task_order=["a"], matrix=[[1.0]], reference=None, method=None, model=None,
                      source="dealcl", packages=packages)


def test_report_draws_the_loss_curve_of_the_whole_sequence(tmp_path, capsys):
    from dealcl.cli import main

    run_dir = _dealcl_run(tmp_path / "run", PACKAGES, step_losses=[[3.0, 2.0, 1.5], [2.5, 1.0]])
    assert main(["report", str(run_dir)]) == 0
    plot = run_dir / "run_loss.png"
    assert plot.is_file() and plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and plot.stat().st_size > 5000
    assert "![training loss per step](run_loss.png)" in (run_dir / "report.md").read_text()

    # Several runs: one curve per run with step losses, none for a run that trained nothing.
    zero = _dealcl_run(tmp_path / "zero", PACKAGES, step_losses=[[], []])
    assert main(["report", str(run_dir), str(zero), "--output", str(tmp_path / "rep")]) == 0
    assert (tmp_path / "rep" / "run_loss.png").is_file() and not (tmp_path / "rep" / "zero_loss.png").exists()
    assert "zero_loss.png" not in (tmp_path / "rep" / "report.md").read_text()


def test_loss_curve_plots_every_step_in_sequence_with_stage_boundaries(tmp_path, monkeypatch):
    from dealcl.runs import plots

    drawn = {}
    monkeypatch.setattr(plots, "_save", lambda figure, path: drawn.setdefault("figure", figure) and path)
    run = load_run(_dealcl_run(tmp_path / "run", PACKAGES, step_losses=[[3.0, 2.0, 1.5], [2.5, 1.0]]))
    assert run.step_losses == [("a", [3.0, 2.0, 1.5]), ("b", [2.5, 1.0])]
    plots.loss_curve(run, tmp_path / "loss.png")
    axes = drawn["figure"].axes[0]
    curves = [line for line in axes.get_lines() if line.get_linestyle() == "-"]
    boundaries = [line for line in axes.get_lines() if line.get_linestyle() == "--"]
    assert [list(c.get_xdata()) for c in curves] == [[1, 2, 3], [4, 5]]
    assert [list(c.get_ydata()) for c in curves] == [[3.0, 2.0, 1.5], [2.5, 1.0]]
    assert [line.get_xdata()[0] for line in boundaries] == [3.5]  # between stage 1's last step and stage 2's first
    assert [t.get_text() for t in axes.texts] == ["a", "b"]
    plots.plt.close(drawn["figure"])
