"""Declared domains: the validator, the declarations of RunConfig and the methods, the doc table,
and the output paths checked before any work."""
from __future__ import annotations

import dataclasses
import math
import re
import subprocess
import sys
from pathlib import Path

import pytest

from dealcl.cli import main
from dealcl.domains import (
    Range, check, check_fields, coerce, domains_markdown, in_range, non_empty, one_of, option, positive, regexes,
)
from dealcl.errors import UserError
from dealcl.runs.config import RunConfig, build_config, method_config

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("domain, inside, outside", [
    (positive, [1, 0.5, 1e300], [0, -1, math.nan, math.inf, True, "1"]),
    (in_range(0, 1, high_open=True), [0, 0.0, 0.999], [1, 1.0, -0.1, math.nan]),
    (in_range(0, 1, low_open=True), [1, 0.5], [0, 1.01]),
    (one_of("a", "b"), ["a"], ["c", "", None]),
    (non_empty, ["x", ["a"]], ["", "  ", [], [""], 3]),
    (regexes, [[".*q"], ["a", "b|c"], []], [["("], ["x{2,1}"], "x"]),
])
def test_domains_contain_what_they_say(domain, inside, outside):
    assert all(domain.contains(v) for v in inside)
    assert not any(domain.contains(v) for v in outside)


def test_the_error_line_names_key_value_and_domain():
    with pytest.raises(UserError, match=r"^config key 'method.dropout' must be in \[0, 1\), got 1.5$"):
        check("method.dropout", 1.5, in_range(0, 1, high_open=True))
    assert check("x", None, positive) is None  # None: an optional setting left unset
    with pytest.raises(UserError, match="at most 64 bits"):
        coerce("seed", str(10**30), int)
    with pytest.raises(UserError, match="float range"):
        coerce("lr", 10**400, float)


def test_every_run_setting_but_the_switches_and_mappings_declares_a_domain():
    undeclared = [f.name for f in dataclasses.fields(RunConfig) if f.metadata.get("domain") is None
                  and f.type not in ("bool", bool) and f.name not in ("method_options", "task_overrides")]
    assert undeclared == []


@pytest.mark.parametrize("overrides, message", [
    (["method.rank=0"], "config key 'method.rank' must be in [1, 65536], got 0"),
    (["lr=nan"], "config key 'lr' must be positive, got nan"),
    (["seed=-1"], "config key 'seed' must be in [0, 4294967295], got -1"),
    (["micro_batch_tokens=0"], "config key 'micro_batch_tokens' must be positive, got 0"),
    (["task_overrides={toyB: {max_grad_norm: -inf}}"], "config key 'task_overrides.toyB.max_grad_norm' must not be negative"),
])
def test_overrides_are_checked_against_the_declarations(overrides, message):
    with pytest.raises(UserError) as info:
        config = build_config(None, {}, overrides)
        from dealcl.methods import resolve_method

        method_config(resolve_method(config.method).config_class, config.method_options, config.method)
    assert str(info.value).startswith(message)


def test_yaml_flags_and_overrides_are_checked_alike(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("batch_size: 0\n")
    for args in ((path, {}, []), (None, {"batch_size": "0"}, []), (None, {}, ["batch_size=0"])):
        with pytest.raises(UserError, match="config key 'batch_size' must be positive, got 0"):
            build_config(*args)


def test_a_method_option_without_a_domain_is_still_type_checked():
    """Backward compatible: a plain `x: int = 3` (an older or third-party method) keeps its type check."""
    @dataclasses.dataclass
    class Plain:
        width: int = 3
        share: float = option(0.5, in_range(0, 1))

    assert method_config(Plain, {"width": "7"}, "plain").width == 7
    with pytest.raises(UserError, match="'method.width' must be an integer"):
        method_config(Plain, {"width": "wide"}, "plain")
    with pytest.raises(UserError, match=r"'method.share' must be in \[0, 1\], got 2.0"):
        method_config(Plain, {"share": 2}, "plain")


def test_every_registered_method_option_declares_a_domain_or_is_a_switch():
    from dealcl.methods import REGISTRY

    for name, cls in REGISTRY.items():
        for spec in dataclasses.fields(cls.config_class):
            if spec.metadata.get("domain") is None:
                assert spec.type in ("bool", bool), f"{name}: method.{spec.name} has no declared domain"
        check_fields(cls.config_class(), prefix="method.")  # the defaults lie in their domains


def test_the_domains_table_in_reliability_md_is_current():
    doc = (REPO / "docs" / "RELIABILITY.md").read_text()
    found = re.search(r"<!-- domains:start -->\n(.*?)<!-- domains:end -->", doc, re.S)
    assert found, "docs/RELIABILITY.md lacks the domains table markers"
    assert found.group(1) == domains_markdown(), "regenerate it: python -m dealcl.domains (see docs/RELIABILITY.md)"


def test_the_validator_loads_without_torch():
    code = "import sys, dealcl.domains, dealcl.runs.config, dealcl.runs.paths; print('torch' in sys.modules)"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert done.stdout.strip() == "False"


# ---- paths the CLI writes: the four cases of issue 16 and their kin --------------------------------------
def _run(tmp_path: Path, output: str, *extra: str) -> list[str]:
    return ["run", "--tasks", "toyA,toyB", "--model", "tiny-llama", "--data", str(tmp_path / "data"),
            "--output", output, "--quiet", "--precision", "fp32", *extra]


def _error_line(capsys) -> str:
    lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), lines
    return lines[0]


def test_an_output_that_cannot_be_created_is_one_line(toy_data_session, tmp_path, capsys):
    (tmp_path / "data").symlink_to(toy_data_session)
    (tmp_path / "file").write_text("mine")
    assert main(_run(tmp_path, str(tmp_path / "file" / "run"))) == 2
    assert "cannot be created: " in _error_line(capsys)
    # /proc refuses every mkdir (ENOENT), as a read-only mount refuses it (EROFS), even for root.
    assert main(_run(tmp_path, "/proc/dealcl-test/run")) == 2
    assert "/proc/dealcl-test/run cannot be written: cannot create anything in /proc" in _error_line(capsys)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data", "file"]  # no probe left behind


def test_method_rank_zero_is_refused_before_anything_runs(toy_data_session, tmp_path, capsys):
    (tmp_path / "data").symlink_to(toy_data_session)
    assert main(_run(tmp_path, str(tmp_path / "out"), "method.rank=0")) == 2
    assert _error_line(capsys) == "error: config key 'method.rank' must be in [1, 65536], got 0"
    assert not (tmp_path / "out").exists()


def test_export_to_a_file_and_outputs_inside_a_run_are_one_line(toy_data_session, tmp_path, capsys):
    (tmp_path / "data").symlink_to(toy_data_session)
    run = tmp_path / "run"
    assert main(_run(tmp_path, str(run), "--train-per-task", "4", "--test-per-task", "2")) == 0
    capsys.readouterr()
    (tmp_path / "file").write_text("mine")
    assert main(["export", str(run), "--to", str(tmp_path / "file")]) == 2
    assert _error_line(capsys) == f"error: --to {tmp_path / 'file'} is a file, not a folder; choose another --to"
    for argv in (_run(tmp_path, str(run / "nested")), ["export", str(run), "--to", str(run / "exported")],
                 ["report", str(run), "--output", str(run / "adapters")],
                 ["compare", "--tasks", "toyA", "--methods", "seqlora", "--output", str(run / "cmp")]):
        assert main(argv) == 2
        assert f"is inside the run directory {run}" in _error_line(capsys)
    assert main(["sweep", "--tasks", "toyA", "--val-per-task", "2", "--output", str(run)]) == 2
    assert "is a run directory" in _error_line(capsys)
    assert main(["report", str(run)]) == 0  # a report into the run it reports on is the one exception


def test_too_little_free_space_is_refused_before_the_run_directory(toy_data_session, tmp_path, capsys, monkeypatch):
    import shutil
    from collections import namedtuple

    (tmp_path / "data").symlink_to(toy_data_session)
    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda path: usage(10**9, 10**9 - 10**6, 10**6))
    assert main(_run(tmp_path, str(tmp_path / "out"), "--train-per-task", "4", "--test-per-task", "2")) == 2
    line = _error_line(capsys)
    assert line.startswith(f"error: not enough free space for {tmp_path / 'out'}: about ") and "free space or" in line
    assert not (tmp_path / "out").exists()


def test_expected_run_size_counts_stage_states_and_answers():
    from dealcl.runs.paths import FIXED_RUN_BYTES, expected_run_bytes

    assert expected_run_bytes(1000, 3, 1.0, [(10, 500)]) == FIXED_RUN_BYTES + 3000 + 2 * 500 + 10 * 512
    assert expected_run_bytes(1000, 3, 0.05, []) == FIXED_RUN_BYTES + 3 * 50


def test_an_os_error_while_writing_names_the_path(tmp_path):
    from dealcl.runs.paths import make_folder

    (tmp_path / "file").write_text("x")
    with pytest.raises(UserError, match=f"cannot write {re.escape(str(tmp_path / 'file'))}"):
        make_folder(tmp_path / "file" / "sub")
