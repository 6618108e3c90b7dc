"""`dealcl demo` sizes itself to the machine from a probe's costs, and keeps its caps on a rerun."""
from __future__ import annotations

from conftest import tiny_run_config
from dealcl.runs.demo import CAPS, choose_caps, existing_caps, workload
from dealcl.runs.driver import run_continual

TASKS = ["dbpedia", "yahoo", "agnews"]
SIZES = {"dbpedia": (14000, 7600), "yahoo": (10000, 340), "agnews": (4000, 7600)}


def test_workload_counts_every_stage_and_the_reference():
    work = workload(TASKS, 96, 40, SIZES)
    assert work.train_examples == 3 * 96
    assert work.answers == 3 * 40 + (40 + 80 + 120)  # stage 0, then 1, 2 and 3 tasks


def test_a_slower_machine_gets_smaller_caps_within_the_budget():
    fast = choose_caps(TASKS, SIZES, (0.5, 0.1), budget=240)
    slow = choose_caps(TASKS, SIZES, (1.5, 0.4), budget=240)
    very_slow = choose_caps(TASKS, SIZES, (20.0, 5.0), budget=240)
    assert fast[:2] == CAPS[0] and fast[2] <= 240
    assert slow[:2] in CAPS[1:] and slow[2] <= 240
    assert very_slow[:2] == CAPS[-1]  # never below the smallest caps, even over the budget
    assert [c[0] for c in CAPS] == sorted((c[0] for c in CAPS), reverse=True)


def test_an_existing_demo_run_keeps_its_caps(toy_data, tmp_path):
    assert existing_caps(tmp_path / "none") is None
    run_continual(tiny_run_config(toy_data, train_per_task=6, test_per_task=3), tmp_path / "run", progress=False)
    assert existing_caps(tmp_path / "run") == (6, 3)
