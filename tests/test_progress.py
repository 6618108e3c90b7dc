"""The whole-run progress bar: its total is the run's estimated seconds, and a run with nothing
left to do (a finished run re-read) draws no bar at all."""
from __future__ import annotations

import io

from dealcl.runs.progress import RunProgress, Workload


def test_a_finished_run_draws_no_bar(monkeypatch):
    stream = io.StringIO()
    monkeypatch.setattr("sys.stderr", stream)
    progress = RunProgress(Workload(0, 0), enabled=True)
    progress.answered(5)
    progress.close()
    assert progress.bar.disable and stream.getvalue() == ""


def test_the_bar_counts_estimated_seconds_of_the_whole_run():
    progress = RunProgress(Workload(train_examples=10, answers=20), enabled=True, train_seconds=1.0, answer_seconds=0.5)
    assert not progress.bar.disable and progress.bar.total == 20.0
    progress.trained(4)
    progress.answered(100)  # more than estimated: the bar stops at its total
    assert progress.bar.n == 20.0
    progress.close()
