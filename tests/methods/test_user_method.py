"""A method defined outside the package runs end to end through `--method file.py:Class`."""
from __future__ import annotations

import json
from pathlib import Path

from dealcl.cli import main

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "l2_anchor.py"


def test_user_method_from_a_file_runs_end_to_end_and_resumes(toy_data, tmp_path, capsys):
    args = ["run", "--tasks", "toyA,toyB", "--model", "tiny-llama", "--data", str(toy_data), "--output",
            str(tmp_path / "run"), "--method", f"{EXAMPLE}:L2Anchor", "--precision", "fp32", "--batch-size", "4",
            "--lr", "5e-3", "--train-per-task", "8", "--quiet", "method.strength=0.5", "method.dropout=0.0"]
    assert main(args) == 0
    results = json.loads((tmp_path / "run" / "results.json").read_text())
    assert len(results["accuracy_matrix"]) == 2
    assert (tmp_path / "run" / "adapters" / "2-toyB" / "anchor.safetensors").is_file()
    log = (tmp_path / "run" / "logs" / "train_and_infer.log").read_text()
    assert "l2_anchor=" in log  # its extra loss term was applied in task 2
    assert main(args) == 0  # the same command on a finished run resumes and changes nothing
    assert json.loads((tmp_path / "run" / "results.json").read_text()) == results


def test_user_method_bad_option_is_one_error_line(toy_data, tmp_path, capsys):
    args = ["run", "--tasks", "toyA", "--model", "tiny-llama", "--data", str(toy_data), "--output",
            str(tmp_path / "run"), "--method", f"{EXAMPLE}:L2Anchor", "method.strenght=1"]
    assert main(args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "strenght" in err[0]
