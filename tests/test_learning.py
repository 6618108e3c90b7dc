"""End to end, the runs must *learn*: on a task a tiny model can master in seconds, every main
method reaches high exact match right after each task, where the untrained model scores 0.

The other tiny-model tests score 0 exact match trained or not, so without this file a change
that broke learning (a wrong loss position, a frozen adapter, a bad stop rule) would pass as
long as the loss moved.
"""
from __future__ import annotations

import pytest

from conftest import tiny_run_config
from dealcl.data.toy import write_learnable_benchmark
from dealcl.runs.driver import run_continual


@pytest.fixture(scope="module")
def learnable(tmp_path_factory):
    return write_learnable_benchmark(tmp_path_factory.mktemp("learnable") / "CL_Benchmark")


@pytest.mark.parametrize("method", ["seqlora", "deal", "olora", "gorp"])
def test_each_task_is_learned_to_high_exact_match(learnable, tmp_path, method):
    # 10 epochs of 400 examples: 500 optimizer steps per task, about 10 s on 2 cores.
    config = tiny_run_config(learnable, method=method, tasks=["pickA", "pickB"], lr=1e-2, epochs=10,
                             batch_size=8, eval_batch_size=32)
    results = run_continual(config, tmp_path / "run", progress=False)
    matrix, reference = results["accuracy_matrix"], results["reference"]
    assert reference == [0.0, 0.0]  # the untrained model never answers right
    just_learned = [matrix[0][0], matrix[1][1]]
    assert min(just_learned) >= 60, just_learned
    assert results["average_accuracy"] >= 30, results["average_accuracy"]
