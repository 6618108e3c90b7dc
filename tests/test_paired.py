"""The paired bootstrap (eval/bootstrap.py) and the pairwise table (runs/pairwise.py), checked on
constructed cases whose answer is known: identical methods, a method right on exactly k more
examples, perfectly correlated errors, and seeds and orders whose differences carry no example noise."""
from __future__ import annotations

import json
import math
import time
from pathlib import Path

import numpy as np
import pytest
import yaml

from dealcl.runs.store import write_stage_dir
from dealcl.eval import metrics
from dealcl.eval.bootstrap import (
    RunHits, matrix_metrics, paired_difference, percentile_interval, resample_runs, run_intervals,
)
from dealcl.runs import pairwise
from dealcl.runs.report import format_report, load_run

T, N = 4, 100  # tasks, test examples per task


def _continual(hits_of_cell, n_tasks=T, keys=None) -> RunHits:
    """A continual run: cell (i, j) for every j <= i, its hits from hits_of_cell(i, j)."""
    keys = keys or [f"task{j}" for j in range(n_tasks)]
    return RunHits(n_rows=n_tasks, test_sets=keys,
                   hits={(i, j): hits_of_cell(i, j) for i in range(n_tasks) for j in range(i + 1)})


def _first(m: int, n: int = N) -> np.ndarray:
    """Correct on the first m of n examples."""
    return np.arange(n) < m


BASE = {(i, j): 40 + 5 * i - 3 * j for i in range(T) for j in range(T)}  # some non-trivial accuracies


def _difference(a: RunHits, b: RunHits, metric: str):
    ra, rb = resample_runs([a, b])
    return paired_difference([[(ra, rb)]], metric)


def test_identical_methods_differ_by_exactly_zero():
    run = _continual(lambda i, j: _first(BASE[(i, j)]))
    twin = _continual(lambda i, j: _first(BASE[(i, j)]))
    for metric in ("average_accuracy", "backward_transfer", "forgetting"):
        d = _difference(run, twin, metric)
        assert (d.difference, d.low, d.high) == (0.0, 0.0, 0.0)
        assert not d.excludes_zero


def _binomial_quantile(trials: int, p: float, q: float) -> int:
    """The smallest x with P(X <= x) >= q for X ~ Binomial(trials, p)."""
    total = 0.0
    for x in range(trials + 1):
        total += math.comb(trials, x) * p ** x * (1 - p) ** (trials - x)
        if total >= q:
            return x
    return trials


def test_k_more_correct_examples_gives_k_over_n_and_a_binomial_interval():
    """A is right wherever B is, and on k more of the n examples of every task after the last stage.

    Per resample the k extra examples are drawn X_j ~ Binomial(n, k/n) times in task j, so
    ΔAA = 100/(T n) * Binomial(T n, k/n) exactly; the percentile interval is that binomial's
    2.5% and 97.5% quantiles, up to the Monte-Carlo error of 10 000 resamples (a fraction of one
    step of 100/(T n) points). ΔBWT is the same over the T − 1 earlier tasks, and ΔFT its negative
    (the earlier stages are identical, so each task's best earlier score is too)."""
    k = 10
    b = _continual(lambda i, j: _first(BASE[(i, j)]))
    # The extra k examples are positions the base run gets wrong (the last k).
    a = _continual(lambda i, j: _first(BASE[(i, j)]) | (np.arange(N) >= N - k) if i == T - 1 else _first(BASE[(i, j)]))
    for metric, tasks, sign in (("average_accuracy", T, 1), ("backward_transfer", T - 1, 1), ("forgetting", T - 1, -1)):
        d = _difference(a, b, metric)
        assert d.difference == pytest.approx(sign * 100 * k / N)
        step = 100 / (tasks * N)
        low = step * _binomial_quantile(tasks * N, k / N, 0.025)
        high = step * _binomial_quantile(tasks * N, k / N, 0.975)
        expected = (low, high) if sign > 0 else (-high, -low)
        assert d.low == pytest.approx(expected[0], abs=step)
        assert d.high == pytest.approx(expected[1], abs=step)
        assert d.excludes_zero
    # The same k examples also right right after learning each task: the diagonal and the last
    # row move together on every resample, so BWT does not change at all.
    both = _continual(lambda i, j: _first(BASE[(i, j)]) | (np.arange(N) >= N - k))
    d = _difference(both, b, "backward_transfer")
    assert (d.difference, d.low, d.high) == (0.0, 0.0, 0.0)


def test_pairing_narrows_the_interval_when_errors_are_correlated():
    """A and B both miss half of every task, the same half; B misses 5 more. Paired, the interval
    only sees the 5 examples that differ; resampled independently it sees both methods' full
    sampling error (about ±7 points per task) and includes 0."""
    a = _continual(lambda i, j: _first(50))
    b = _continual(lambda i, j: _first(45))
    ra, rb = resample_runs([a, b])
    paired = paired_difference([[(ra, rb)]], "average_accuracy")
    # Unpaired: B's examples drawn independently of A's (another bootstrap seed).
    rb_independent = resample_runs([b], seed=1)[0]
    unpaired = percentile_interval(ra.samples["average_accuracy"] - rb_independent.samples["average_accuracy"])
    assert paired.difference == pytest.approx(5.0)
    assert paired.excludes_zero and paired.low > 0
    assert unpaired[0] < 0 < unpaired[1]
    assert (paired.high - paired.low) < 0.5 * (unpaired[1] - unpaired[0])


def _constant(correct: bool, n_tasks: int = 2, key: str = "t") -> RunHits:
    """Every example right (or wrong) at every stage: resampling examples changes nothing."""
    return _continual(lambda i, j: np.full(N, correct), n_tasks=n_tasks, keys=[f"{key}{j}" for j in range(n_tasks)])


def test_seeds_are_resampled_and_orders_averaged():
    """Order 1, seeds 1 and 2: A − B = 0 and 100 points of AA; order 2, one seed: 50 (B right on
    all of task y, none of task x). Every example is right, or wrong, at every stage, so drawing
    examples changes nothing and only the seeds vary: two seeds drawn with replacement give a
    seed mean of 0, 50 or 100 with probability 1/4, 1/2, 1/4. Orders are not resampled, so A − B
    = (seed mean + 50) / 2 per resample: 25, 50 or 75."""
    order1, order2 = ("x", "y"), ("y", "x")
    half = _continual(lambda i, j: np.full(N, j == 0), n_tasks=2, keys=["u0", "u1"])
    runs = [
        pairwise.PairedRun("A", "a-o1-s1", order1, 1, _constant(True)),
        pairwise.PairedRun("B", "b-o1-s1", order1, 1, _constant(True)),
        pairwise.PairedRun("A", "a-o1-s2", order1, 2, _constant(True)),
        pairwise.PairedRun("B", "b-o1-s2", order1, 2, _constant(False)),
        pairwise.PairedRun("A", "a-o2", order2, 1, _constant(True, key="u")),
        pairwise.PairedRun("B", "b-o2", order2, 1, half),
    ]
    table = pairwise.pairwise(runs)
    (pair,) = table["pairs"]
    assert (pair["a"], pair["b"], pair["orders"], pair["runs"]) == ("A", "B", 2, 3)
    aa = pair["average_accuracy"]
    assert aa["difference"] == pytest.approx((50 + 50) / 2)
    assert aa["interval"] == [pytest.approx(25.0), pytest.approx(75.0)]
    assert aa["excludes_zero"]


def test_seed_resampling_gives_the_three_point_distribution():
    a1, a2, b1, b2 = resample_runs([_constant(True), _constant(True), _constant(True), _constant(False)])
    d = paired_difference([[(a1, b1), (a2, b2)]], "average_accuracy")
    assert d.difference == pytest.approx(50.0)
    assert (d.low, d.high) == (0.0, 100.0)  # 25% of resamples draw seed 1 twice, 25% seed 2 twice


def test_pairs_with_other_test_examples_or_no_common_setting_are_skipped():
    same = ("x", "y")
    runs = [
        pairwise.PairedRun("A", "a", same, 42, _constant(True, key="t")),
        pairwise.PairedRun("B", "b", same, 42, _constant(True, key="other")),  # another test set
        pairwise.PairedRun("C", "c", ("y", "x"), 42, _constant(True, key="t")),  # another order only
        pairwise.PairedRun("D", "d", same, 42, None, note="no per-example answers for stage 1"),
    ]
    table = pairwise.pairwise(runs)
    assert table["pairs"] == []
    reasons = {(s["a"], s["b"]): s["reason"] for s in table["skipped"]}
    assert reasons[("A", "B")] == "different test examples: a vs b"
    assert reasons[("A", "C")] == "no task order and seed in common"
    assert table["notes"] == ["d: no per-example answers for stage 1"]
    text = "\n".join(pairwise.markdown_lines(table))
    assert "not compared: A − B (different test examples" in text and "No pair of methods" in text


def test_vectorised_metrics_match_the_hand_checked_ones_with_gaps():
    R = [[80.0, 30.0, 10.0], [88.0, 90.0, 20.0], [60.0, 85.0, 50.0]]  # tests/test_metrics.py
    with_gap = [row[:] for row in R]
    with_gap[1][1] = None
    for matrix in (R, with_gap):
        acc = np.array([[[np.nan if v is None else v for v in row] for row in matrix]])
        got = matrix_metrics(acc)
        assert got["average_accuracy"][0] == pytest.approx(metrics.average_accuracy(matrix))
        assert got["backward_transfer"][0] == pytest.approx(metrics.backward_transfer(matrix))
        assert got["forgetting"][0] == pytest.approx(metrics.mean_forgetting(matrix))
    # A score before the task is learned (R[0][1] = 95 here) is not forgetting: FT stays 16.5.
    early = [row[:] for row in R]
    early[0][1] = 95.0
    acc = np.array([early])
    assert matrix_metrics(acc)["forgetting"][0] == pytest.approx(16.5) == metrics.mean_forgetting(early)
    joint = matrix_metrics(np.array([[[70.0, 90.0]]]), joint=True)
    assert joint["average_accuracy"][0] == 80.0 and joint["backward_transfer"] is None and joint["forgetting"] is None


def test_a_run_interval_contains_its_point_and_is_reproducible():
    run = _continual(lambda i, j: np.arange(N) % (2 + i + j) == 0)
    first, again = run_intervals(run), run_intervals(run)
    assert first == again
    point = resample_runs([run])[0].point
    for metric, (low, high) in first.items():
        assert low <= point[metric] <= high


def test_thirteen_methods_take_well_under_a_few_seconds():
    """The brief's size: 13 methods x 4 tasks x 100 examples, 10 000 resamples, 78 pairs (< 1 s
    when the machine is idle; the bound leaves room for a loaded 2-core machine)."""
    rng = np.random.default_rng(0)
    runs = [pairwise.PairedRun(f"m{k}", f"run{k}", ("a", "b", "c", "d"), 42,
                               _continual(lambda i, j: rng.random(N) < 0.5)) for k in range(13)]
    started = time.perf_counter()
    table = pairwise.pairwise(runs)
    assert len(table["pairs"]) == 78
    assert time.perf_counter() - started < 5.0


# --- from run directories ------------------------------------------------------------------------

def _write_run(run_dir: Path, method: str, correct_by_cell: dict[tuple[int, int], list[bool]], tasks=("a", "b"),
               seed: int = 42, old_results: bool = False) -> Path:
    """A finished dealcl run as the driver leaves it (results.json, run.yaml, predictions.json per
    stage), answers "yes" where correct and "no" where not, every label "yes"."""
    matrix = [[None] * len(tasks) for _ in tasks]
    for (i, j), correct in correct_by_cell.items():
        matrix[i][j] = 100.0 * sum(correct) / len(correct)
    results = {"method": method, **metrics.summarize(list(tasks), matrix)}
    if old_results:  # a results.json from before FT was reported
        results.pop("mean_forgetting"), results.pop("forgetting")
    run_dir.mkdir(parents=True)
    (run_dir / "results.json").write_text(json.dumps(results))
    (run_dir / "run.yaml").write_text(yaml.safe_dump({"config": {"method": method, "seed": seed, "sample": "first",
                                                                 "test_per_task": 4, "eval_split": "test"}}))
    for i, task in enumerate(tasks):
        answers = {tasks[j]: {"predictions": ["yes" if c else "no" for c in correct_by_cell[(i, j)]],
                              "labels": ["yes"] * len(correct_by_cell[(i, j)])}
                   for j in range(len(tasks)) if (i, j) in correct_by_cell}
        # With its manifest, as the driver writes every stage folder (report verifies it).
        write_stage_dir(run_dir / "outputs" / f"{i + 1}-{task}",
                        lambda folder, answers=answers: (folder / "predictions.json").write_text(json.dumps(answers)))
    return run_dir


def _reseal(stage: Path) -> None:
    """Rewrite a stage folder's manifest after a test changed its files on purpose: a run made
    that way, not one damaged afterwards (which `load_run` refuses, tests/test_integrity.py)."""
    from dealcl.runs.store import MANIFEST, sha256_file

    files = {p.name: sha256_file(p) for p in sorted(stage.iterdir()) if p.name != MANIFEST}
    (stage / MANIFEST).write_text(json.dumps({"files": files}))


GOOD = {(0, 0): [True, True, True, False], (1, 0): [True, True, False, False], (1, 1): [True, True, True, True]}
WORSE = {(0, 0): [True, True, True, False], (1, 0): [False, False, False, False], (1, 1): [True, True, True, False]}


def test_report_of_two_runs_prints_the_paired_table_and_ft(tmp_path):
    runs = [load_run(_write_run(tmp_path / "r1", "deal", GOOD)), load_run(_write_run(tmp_path / "r2", "seqlora", WORSE))]
    text = format_report(runs, warn=False)
    assert "== paired differences (A − B) ==" in text
    line = next(line for line in text.splitlines() if line.startswith("deal − seqlora"))
    # AA: (50 + 100)/2 − (0 + 75)/2 = 37.5; BWT: (50 − 75) − (0 − 75) = +50; FT: 25 − 75 = −50.
    assert "+37.5 [" in line and "+50.0 [" in line and "-50.0 [" in line
    assert "FT  25.00  (forgetting, over 1 task)" in text
    assert max(len(line) for line in text.splitlines()) <= 100


def test_runs_of_one_method_and_setting_are_compared_run_by_run(tmp_path):
    a = _write_run(tmp_path / "lr1" / "order1-deal", "deal", GOOD)
    b = _write_run(tmp_path / "lr2" / "order1-deal-x", "deal", WORSE)
    text = format_report([load_run(a), load_run(b)], warn=False)
    assert "order1-deal − order1-deal-x" in text


def test_ft_of_a_results_json_without_it_is_computed_on_read(tmp_path):
    run = load_run(_write_run(tmp_path / "old", "seqlora", WORSE, old_results=True))
    assert "mean_forgetting" not in json.loads((tmp_path / "old" / "results.json").read_text())
    assert run.forgetting == pytest.approx(75.0 - 0.0)  # task a: 75 after learning it, 0 at the end


def test_answers_that_do_not_reproduce_the_matrix_are_refused(tmp_path):
    run_dir = _write_run(tmp_path / "r", "deal", GOOD)
    results = json.loads((run_dir / "results.json").read_text())
    results["accuracy_matrix"][1][1] = 50.0  # not what the answers give (100)
    (run_dir / "results.json").write_text(json.dumps(results))
    hits, note = pairwise.read_hits(load_run(run_dir))
    assert hits is None and note == "its answers for b at stage 2 do not reproduce its accuracy matrix"


def test_a_run_with_other_test_labels_is_not_paired(tmp_path):
    a = load_run(_write_run(tmp_path / "a", "deal", GOOD))
    b_dir = _write_run(tmp_path / "b", "seqlora", WORSE)
    for path in (b_dir / "outputs").glob("*/predictions.json"):  # the same scores on other examples
        answers = json.loads(path.read_text())
        for task in answers.values():
            task["predictions"] = ["no" if p == "yes" else "yes" for p in task["predictions"]]
            task["labels"] = ["no"] * len(task["labels"])
        path.write_text(json.dumps(answers))
        _reseal(path.parent)
    table = pairwise.pairwise([pairwise.paired_run(a), pairwise.paired_run(load_run(b_dir))])
    assert table["pairs"] == [] and table["skipped"][0]["reason"].startswith("different test examples")


def test_unreadable_answers_leave_the_run_out_with_a_note(tmp_path):
    run_dir = _write_run(tmp_path / "r", "deal", GOOD)
    (run_dir / "outputs" / "2-b" / "predictions.json").write_text("{not json")
    _reseal(run_dir / "outputs" / "2-b")
    hits, note = pairwise.read_hits(load_run(run_dir))
    assert hits is None and note.startswith("unreadable answers in") and note.endswith("2-b")
