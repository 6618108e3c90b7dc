"""The Python API (`import dealcl`) gives what the CLI gives."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest

import dealcl
from dealcl.errors import UserError


def test_import_dealcl_stays_light():
    code = "import sys, dealcl; assert 'torch' not in sys.modules; print(sorted(dealcl.__all__))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert "run" in out and "compare" in out


def test_run_report_and_load_run_match_the_files(toy_data, tmp_path):
    settings = dict(tasks=["toyA", "toyB"], model="tiny-llama", data=str(toy_data), precision="fp32", batch_size=4,
                    eval_batch_size=8, lr=5e-3, seed=0, max_source_length=256, train_per_task=8,
                    method_options={"dropout": 0.0})
    results = dealcl.run(tmp_path / "run", **settings)
    assert results == json.loads((tmp_path / "run" / "results.json").read_text())
    summary = dealcl.load_run(tmp_path / "run")
    assert summary.task_order == ["toyA", "toyB"] and summary.matrix == results["accuracy_matrix"]
    assert "toyA" in dealcl.report(tmp_path / "run")
    assert dealcl.resume(tmp_path / "run") == results  # finished: nothing is redone
    assert {"deal", "seqlora", "gorp"} <= set(dealcl.registered_methods())


def test_bad_settings_raise_the_cli_error(tmp_path):
    with pytest.raises(UserError, match="unknown argument key 'no_such_key'"):
        dealcl.run(tmp_path / "run", no_such_key=1)
    assert not (tmp_path / "run").exists()
