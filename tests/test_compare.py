"""`dealcl compare` on tiny models: runs are resumed, not redone; aggregates match the runs."""
from __future__ import annotations

import json
import statistics

import pytest

import dealcl.eval.evaluator as evaluator
import dealcl.runs.session as session
from dealcl.cli import main


def _args(data, out, methods="seqlora,zero-shot"):
    return ["compare", "--tasks", "toyA,toyB", "--methods", methods, "--model", "tiny-llama", "--data", str(data),
            "--output", str(out), "--precision", "fp32", "--batch-size", "4", "--lr", "5e-3", "--train-per-task", "8",
            "--test-per-task", "6", "--quiet"]


def test_compare_aggregates_equal_the_runs_and_a_rerun_trains_nothing(toy_data, tmp_path, monkeypatch, capsys):
    out = tmp_path / "cmp"
    assert main(_args(toy_data, out)) == 0
    comparison = json.loads((out / "comparison.json").read_text())
    for method, run in (("seqlora", "custom-seqlora"), ("zero-shot", "custom-zero-shot")):
        results = json.loads((out / run / "results.json").read_text())
        row = comparison["methods"][method]
        assert row["aa"][run] == pytest.approx(results["average_accuracy"])
        assert row["bwt"][run] == pytest.approx(results["backward_transfer"])
        assert row["aa_mean"] == pytest.approx(statistics.mean([results["average_accuracy"]]), abs=0.01)
        efficiency = json.loads((out / run / "efficiency.json").read_text())["stages"]
        assert row["trainable_parameters"] == max(s["trainable_parameters"] for s in efficiency)
    for name in ("comparison.md", "aa_bwt.png", "custom-seqlora_matrix.png", "custom-seqlora_curves.png"):
        assert (out / name).is_file()
    assert "| seqlora |" in (out / "comparison.md").read_text()
    # The paired table (tests/test_paired.py checks its numbers): in comparison.json and .md, and printed.
    (pair,) = comparison["pairwise"]["pairs"]
    assert {pair["a"], pair["b"]} == {"seqlora", "zero-shot"} and pair["run_pairs"] and pair["average_accuracy"]
    assert f"| {pair['a']} − {pair['b']} | 1 |" in (out / "comparison.md").read_text()
    assert "## Paired differences" in capsys.readouterr().out
    row = comparison["methods"]["seqlora"]
    results = json.loads((out / "custom-seqlora" / "results.json").read_text())
    assert row["ft"]["custom-seqlora"] == pytest.approx(results["mean_forgetting"])

    def no_training(*args, **kwargs):
        raise AssertionError("a finished run was trained again")

    monkeypatch.setattr(session, "train_stage", no_training)
    before = (out / "custom-seqlora" / "results.json").read_bytes()
    intervals = [(r["aa_interval"], r["bwt_interval"]) for r in comparison["runs"]]
    # What results/ keeps of a finished run: no adapters, no sentence-quoting prediction files.
    import shutil

    shutil.rmtree(out / "custom-seqlora" / "adapters")
    for path in (out / "custom-seqlora" / "outputs").glob("*/predict_eval_predictions.jsonl"):
        path.unlink()
    answers = {p: p.read_bytes() for p in (out / "custom-seqlora" / "outputs").glob("*/predictions.json")}
    assert len(answers) == 3

    def no_generation(*args, **kwargs):
        # The tiny model scores 0 trained or not: only "nothing was evaluated again" shows
        # that a pruned run is re-read rather than re-evaluated on an untrained model.
        raise AssertionError("a finished run was evaluated again")

    monkeypatch.setattr(evaluator, "generate_answers", no_generation)
    assert main(_args(toy_data, out)) == 0
    assert (out / "custom-seqlora" / "results.json").read_bytes() == before
    assert all(path.read_bytes() == content for path, content in answers.items())
    again = json.loads((out / "comparison.json").read_text())["runs"]
    assert [(r["aa_interval"], r["bwt_interval"]) for r in again] == intervals
    assert json.loads((out / "comparison.json").read_text())["pairwise"] == comparison["pairwise"]


def test_one_order_plots_bootstrap_intervals_as_error_bars(toy_data, tmp_path, monkeypatch):
    """One run per method has no spread over orders: the bars show its sampling error."""
    import dealcl.runs.plots as plots

    drawn = {}
    monkeypatch.setattr(plots, "metric_bars", lambda names, aa, bwt, path, title, aa_err, bwt_err:
                        drawn.update(names=names, aa=aa, aa_err=aa_err, title=title))
    assert main(_args(toy_data, tmp_path / "cmp", methods="seqlora")) == 0
    row = json.loads((tmp_path / "cmp" / "comparison.json").read_text())["runs"][0]
    low, high = row["aa_interval"]
    assert drawn["aa_err"] == [[pytest.approx(drawn["aa"][0] - low)], [pytest.approx(high - drawn["aa"][0])]]
    assert "bootstrap" in drawn["title"]


def test_bootstrap_interval_contains_the_point_estimate(toy_data, tmp_path):
    from dealcl.runs.compare import summarize_run

    assert main(_args(toy_data, tmp_path / "cmp", methods="seqlora")) == 0
    row = summarize_run(tmp_path / "cmp" / "custom-seqlora")
    low, high = row["aa_interval"]
    assert low <= row["average_accuracy"] <= high


def test_compare_refuses_method_options(toy_data, tmp_path, capsys):
    assert main(_args(toy_data, tmp_path / "cmp") + ["method.rank=4"]) == 2
    assert "method.KEY=VALUE" in capsys.readouterr().err


def test_a_sibling_runs_identical_stage_zero_is_reused(toy_data, tmp_path, monkeypatch, capsys):
    """The second method of a comparison takes the untouched model's answers from the first
    run's stage 0 (same model, prompts and evaluation settings) instead of generating them;
    a run whose evaluation batches differ does not."""
    calls = []
    real = evaluator.generate_answers

    def counting(model, encoder, task, sentences, **kwargs):
        calls.append(task.name)
        return real(model, encoder, task, sentences, **kwargs)

    monkeypatch.setattr(evaluator, "generate_answers", counting)
    out = tmp_path / "cmp"
    assert main(_args(toy_data, out, methods="seqlora")) == 0
    first = len(calls)
    assert main(_args(toy_data, out, methods="seqlora,inclora")) == 0
    # inclora: no stage-0 generation, only its two stages (toyA; toyA and toyB)
    assert len(calls) - first == 3
    references = [json.loads((out / run / "outputs" / "0-reference" / "predictions.json").read_text())
                  for run in ("custom-seqlora", "custom-inclora")]
    assert references[0] == references[1]
    assert "answered by a sibling run" in capsys.readouterr().err

    calls.clear()
    assert main(_args(toy_data, tmp_path / "next", methods="olora")) == 0
    assert calls == ["toyA", "toyA", "toyB"]  # a comparison next to the first one counts too

    calls.clear()
    assert main(_args(toy_data, out, methods="olora") + ["eval_batch_size=3"]) == 0
    assert calls[:2] == ["toyA", "toyB"]  # its own stage 0
