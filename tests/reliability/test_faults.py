"""Kills, a full disk and a non-finite loss: finished stages survive and a resume ends identically."""
from __future__ import annotations

import errno
import importlib.util
import os
import sys
from collections import Counter
from pathlib import Path

import pytest
import torch

from conftest import tiny_run_config
from dealcl.cli import main
from dealcl.runs.driver import run_continual
from dealcl.runs.store import verify_stage_dir
from dealcl.train.loop import TrainingServices

REPO = Path(__file__).resolve().parents[2]


def _bench_faults():
    spec = importlib.util.spec_from_file_location("bench_faults", REPO / "bench" / "faults.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up
    spec.loader.exec_module(module)
    return module


def test_a_short_campaign_lands_every_planned_kill_and_resumes_identically(tmp_path):
    """One kill per phase: training, a borrowed stage 0's copy (its writes and its folder), and
    an unborrowed stage 0's own evaluation. Each must fire where it was planned (a trial that
    borrowed a stage 0 it was counted without, or the reverse, misses or misplaces its kill)."""
    faults = _bench_faults()
    result = faults.campaign(tmp_path, kills=4, seed=1, echo=lambda _: None)
    assert result.failures == []
    assert len(result.planned) == 4 and result.landed == result.planned
    assert dict(result.kills) == {"train-step": 1, "checkpoint-write": 1, "eval-batch": 1, "results-write": 1}
    stage0 = {(k.phase, k.kind) for k in result.landed if k.stage0}
    assert stage0 == {("eval-batch", faults.ALONE), ("results-write", faults.BORROWING),
                      ("checkpoint-write", faults.BORROWING)}
    assert result.survived == 4 and result.identical and result.corrupt == []


def test_kills_are_planned_only_at_points_a_trial_of_that_kind_reaches():
    faults = _bench_faults()
    # A run's points: run.yaml, stage 0 (3 evaluation batches when alone, none when borrowed;
    # then its 5 files and its folder), then one trained stage.
    stage1 = ["train-step"] * 4 + ["checkpoint-write", "eval-batch"] + ["results-write"] * 4 + ["checkpoint-write"]
    alone = ["results-write"] + ["eval-batch"] * 3 + ["results-write"] * 5 + ["checkpoint-write"] + stage1
    borrowing = ["results-write"] * 6 + ["checkpoint-write"] + stage1
    assert faults.stage0_occurrences(alone, 5) == {"eval-batch": [1, 2, 3], "results-write": [2, 3, 4, 5, 6],
                                                   "checkpoint-write": [1]}
    assert faults.stage0_occurrences(borrowing, 5) == {"results-write": [2, 3, 4, 5, 6], "checkpoint-write": [1]}
    counts = faults.Counts(total={faults.ALONE: Counter(alone), faults.BORROWING: Counter(borrowing)},
                           stage0={faults.ALONE: faults.stage0_occurrences(alone, 5),
                                   faults.BORROWING: faults.stage0_occurrences(borrowing, 5)})
    for seed in range(20):
        plan = faults.plan_kills(counts, 12, seed)
        assert Counter(k.phase for k in plan) == {p: 3 for p in faults.POINTS}
        for kill in plan:
            assert 1 <= kill.at <= counts.total[kill.kind][kill.phase], kill
            assert kill.stage0 == (kill.at in counts.stage0[kill.kind].get(kill.phase, [])), kill
        assert {k.kind for k in plan if k.phase == "eval-batch"} == {faults.ALONE}  # a borrowed stage 0 never evaluates
        assert any(k.stage0 and k.phase == "eval-batch" for k in plan)
        assert {k.phase for k in plan if k.kind == faults.BORROWING} == {"results-write", "checkpoint-write"}


def _cli_args(data: Path, out: Path) -> list[str]:
    return ["run", "--tasks", "toyA,toyB", "--model", "tiny-llama", "--data", str(data), "--output", str(out),
            "--precision", "fp32", "--batch-size", "4", "--lr", "5e-3", "--train-per-task", "8",
            "--test-per-task", "4", "--quiet", "method.dropout=0.0"]


def _caller_site() -> tuple[str, int, str]:
    import traceback

    frame = next(f for f in reversed(traceback.extract_stack()[:-2]) if "dealcl" in f.filename)
    return frame.filename, frame.lineno, frame.name


def test_disk_full_at_every_write_site_stops_cleanly_and_resumes(toy_data, tmp_path, monkeypatch, capsys):
    """Every write in a run directory ends in an fsync; ENOSPC is injected at each distinct
    fsync call site in turn, at its last occurrence in a clean run (so finished stages exist)."""
    real_fsync = os.fsync
    counts: dict[tuple[str, int, str], int] = {}

    def recording(fd):
        site = _caller_site()
        counts[site] = counts.get(site, 0) + 1
        return real_fsync(fd)

    clean = tmp_path / "clean"
    monkeypatch.setattr(os, "fsync", recording)
    assert main(_cli_args(toy_data, clean)) == 0
    # Directory-entry fsyncs are best effort by design (not every filesystem supports them).
    sites = {site: n for site, n in counts.items() if site[2] != "_fsync_dir"}
    assert len(sites) >= 3  # data files, stage files, manifests
    for number, (site, last) in enumerate(sites.items()):
        out = tmp_path / f"full-{number}"
        seen = {"n": 0}

        def full_disk(fd, site=site, last=last):
            if _caller_site() == site:
                seen["n"] += 1
                if seen["n"] == last:
                    raise OSError(errno.ENOSPC, "No space left on device")
            return real_fsync(fd)

        monkeypatch.setattr(os, "fsync", full_disk)
        capsys.readouterr()
        assert main(_cli_args(toy_data, out)) == 2, site
        errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
        assert len(errors) == 1 and errors[0].startswith("error: no space left on device"), (site, errors)
        for group in ("adapters", "outputs"):
            for stage in (out / group).glob("[0-9]*"):
                assert verify_stage_dir(stage) is None, f"{stage} corrupt after ENOSPC at {site}"
        assert not [p for p in out.rglob("*") if p.name.endswith(".tmp")], "temporary files left behind"
        # Space freed: the same command resumes and ends exactly like the clean run.
        monkeypatch.setattr(os, "fsync", real_fsync)
        assert main(_cli_args(toy_data, out)) == 0
        assert (out / "results.json").read_bytes() == (clean / "results.json").read_bytes()


def test_non_finite_loss_stops_with_one_line_and_keeps_finished_stages(toy_data, tmp_path, monkeypatch, capsys):
    real = TrainingServices.task_loss_sum
    calls = {"n": 0}

    def poisoned(self, model, batch):
        loss, logits = real(self, model, batch)
        calls["n"] += 1
        return (loss * float("nan") if calls["n"] > 3 else loss), logits  # toyA has 2 steps

    monkeypatch.setattr(TrainingServices, "task_loss_sum", poisoned)
    out = tmp_path / "run"
    assert main(_cli_args(toy_data, out)) == 2
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert len(err) == 1 and "non-finite loss" in err[0] and "'toyB'" in err[0] and "step" in err[0]
    assert "lr=" in err[0]  # the suggestion
    assert verify_stage_dir(out / "adapters" / "1-toyA") is None
    assert verify_stage_dir(out / "outputs" / "1-toyA") is None
    assert not (out / "adapters" / "2-toyB").exists()


def test_a_task_name_cannot_write_outside_the_run_directory(tmp_path):
    from dealcl.errors import UserError
    from dealcl.runs.layout import RunStore

    store = RunStore(tmp_path / "run")
    with pytest.raises(UserError, match="outside the run directory"):
        store.adapter_dir(1, "../../../../escape")
    with pytest.raises(UserError, match="outside the run directory"):
        store.output_dir(1, "x/../../../../../tmp/x")


def test_weights_are_never_unpickled():
    """Safe loading: no torch.load without weights_only, no pickle, no unsafe YAML in the package."""
    source = "\n".join(p.read_text() for p in (REPO / "src" / "dealcl").rglob("*.py"))
    assert "pickle" not in source
    assert "yaml.load(" not in source and "yaml.unsafe_load" not in source
    for line in source.splitlines():
        if "torch.load(" in line:
            assert "weights_only=True" in line, line
