"""examples/api_study.py runs as written, through the public API, on a tiny model."""
from __future__ import annotations

import importlib.util
import json
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_api_study_runs_and_prints_what_the_runs_hold(tmp_path, capsys):
    spec = importlib.util.spec_from_file_location("api_study", REPO / "examples" / "api_study.py")
    study = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(study)
    out = tmp_path / "study"
    comparison = study.main(["--model", "tiny-llama", "--output", str(out), "--train-per-task", "4",
                             "--test-per-task", "2"], precision="fp32", seed=0)
    printed = capsys.readouterr().out
    assert set(comparison["methods"]) == {"seqlora", "olora"}
    assert json.loads((out / "compare" / "comparison.json").read_text()) == json.loads(json.dumps(comparison))
    for row in comparison["runs"]:
        results = json.loads((out / "compare" / row["run"] / "results.json").read_text())
        assert results["task_order"] == ["toyA", "toyB"]
        line = f"{row['method']:>10}: AA {results['average_accuracy']:6.2f}  BWT {results['backward_transfer']:6.2f}"
        assert line in printed
    assert "== summary ==" in printed  # dealcl.report's side-by-side table
