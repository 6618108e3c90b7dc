"""ROUGE-1 and ROUGE-L in results.json (with_rouge runs) are the values the stored answers imply,
survive a rebuild from the stage outputs (resume), and reach `dealcl report`; runs without them
still load and report."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from conftest import tiny_run_config
from dealcl.eval.metrics import rouge
from dealcl.runs.driver import run_continual
from dealcl.runs.report import format_report, load_run

# Two labels sharing a word: a wrong answer still has ROUGE-1 0.5, so ROUGE differs from EM.
LABELS = {"twoA": ["very good", "very bad"], "twoB": ["not sure", "quite sure"]}


def _two_word_benchmark(root: Path) -> Path:
    for k, (name, labels) in enumerate(LABELS.items()):
        folder = root / "SC" / name
        folder.mkdir(parents=True)
        for split, n in (("train", 8), ("test", 6), ("dev", 6)):
            records = [{"sentence": f"item {i} of {split} is {labels[(i + k) % 2]}", "label": labels[(i + k) % 2]}
                       for i in range(n)]
            (folder / f"{split}.json").write_text(json.dumps(records))
        (folder / "labels.json").write_text(json.dumps(labels))
    instruction = [{"instruction_type": "zero-shot", "instruction": "What is the answer?\n"}]
    (root / "instruction_config.json").write_text(json.dumps({"SC": instruction}))
    return root


def _implied(run_dir: Path, stage: str, task: str, kind: str) -> float:
    answers = json.loads((run_dir / "outputs" / stage / "predictions.json").read_text())[task]
    scores = [rouge(p, y)[kind] for p, y in zip(answers["predictions"], answers["labels"])]
    return round(100 * sum(scores) / len(scores), 4)


def test_results_json_carries_the_rouge_the_answers_imply(tmp_path):
    data = _two_word_benchmark(tmp_path / "CL_Benchmark")
    run_dir = tmp_path / "run"
    # Score mode answers with a label: quick, and every answer is one of the two-word labels.
    config = tiny_run_config(data, tasks=["twoA", "twoB"], with_rouge=True, eval_mode="score", report_to=["tensorboard"])
    results = run_continual(config, run_dir, progress=False)
    stages = {0: "0-reference", 1: "1-twoA", 2: "2-twoB"}
    for kind in ("rouge1", "rougeL"):
        assert results[f"reference_{kind}"] == [_implied(run_dir, stages[0], t, kind) for t in LABELS]
        expected = [[_implied(run_dir, stages[1], "twoA", kind), None],
                    [_implied(run_dir, stages[2], t, kind) for t in LABELS]]
        assert results[f"{kind}_matrix"] == expected
        assert results[f"average_{kind}"] == pytest.approx(sum(expected[1]) / 2, abs=1e-4)
    assert results["rouge1_matrix"] != results["accuracy_matrix"]  # not exact match under another name
    assert min(v for row in results["rouge1_matrix"] for v in row if v is not None) >= 50.0
    # The trackers log the same values per stage (the untouched model at step 0).
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(run_dir / "tracking" / "tensorboard"))
    events.Reload()
    logged = [e.value for e in events.Scalars("eval/rouge1/twoA")]
    assert logged == pytest.approx([results["reference_rouge1"][0]] + [row[0] for row in results["rouge1_matrix"]])

    # Rebuilt from the stage outputs alone (what resume reads), results.json is byte-identical.
    written = (run_dir / "results.json").read_bytes()
    (run_dir / "results.json").unlink()
    run_continual(config, run_dir, progress=False)
    assert (run_dir / "results.json").read_bytes() == written

    summary = load_run(run_dir)
    assert summary.rouge1 == results["rouge1_matrix"] and summary.average_rouge1 == results["average_rouge1"]
    text = format_report([summary, summary], warn=False)
    assert "ROUGE-1" in text and f"R-1 {results['average_rouge1']:.2f}" in text
    header = next(line for line in text.splitlines() if line.startswith("run "))
    assert header.split()[-1] == "R-1"


def test_runs_without_rouge_load_and_report_as_before(toy_data, tmp_path):
    results = run_continual(tiny_run_config(toy_data, train_per_task=4, test_per_task=2), tmp_path / "run",
                            progress=False)
    assert not any("rouge" in key for key in results)
    summary = load_run(tmp_path / "run")
    assert summary.rouge1 is None and summary.average_rouge1 is None
    text = format_report([summary, summary], warn=False)
    assert "ROUGE" not in text and "R-1" not in text
