"""Exact match, invalid rate and the continual-learning metrics, checked against hand computations."""
import json

import pytest

from dealcl.eval.metrics import (
    average_accuracy,
    backward_transfer,
    exact_match,
    forgetting,
    forward_transfer,
    mean_forgetting,
    normalize_answer,
    rouge,
    rouge_l,
    score_task,
    summarize,
)

# Rows = after stage 1..3, columns = tasks a, b, c. Task a peaks after stage 2 (88), not on the
# diagonal (80), so forgetting and BWT differ.
R = [
    [80.0, 30.0, 10.0],
    [88.0, 90.0, 20.0],
    [60.0, 85.0, 50.0],
]
ZERO_SHOT = [5.0, 10.0, 5.0]


def test_normalize_and_exact_match():
    assert normalize_answer("  Science   or Technology. ") == "science or technology"
    assert exact_match("Science or Technology.", "science or technology")
    assert exact_match("World!", "world")
    assert not exact_match("Good movie, I", "Good")
    assert not exact_match("", "Good")


def test_rouge_l():
    assert rouge_l("the cat sat", "the cat sat") == 1.0
    assert rouge_l("dog", "cat") == 0.0
    # LCS("a b c d", "a c") = 2: P = 2/4, R = 2/2, F = 2PR/(P+R) = 2/3
    assert rouge_l("a b c d", "a c") == pytest.approx(2 / 3)


def test_rouge_stems_like_upstream():
    # Porter stems: "the cats are running" -> the cat are run (4 tokens; "are" is too short to
    # stem), "a cat runs" -> a cat run (3). Common unigrams: cat, run = 2, in the same order, so
    # LCS = 2 too. P = 2/3, R = 2/4, F = 2PR/(P+R) = 4/7 for both. Unstemmed, nothing matches.
    scores = rouge("a cat runs", "the cats are running")
    assert scores["rouge1"] == pytest.approx(4 / 7)
    assert scores["rougeL"] == pytest.approx(4 / 7)
    # The same three stems in reverse order: every unigram matches (ROUGE-1 = 1), the longest
    # common subsequence is one token (ROUGE-L: P = R = 1/3).
    reordered = rouge("dogs chase cats", "cats chase dogs")
    assert reordered["rouge1"] == pytest.approx(1.0)
    assert reordered["rougeL"] == pytest.approx(1 / 3)
    # rouge-score's tokenizer: lower case, anything outside a-z0-9 separates tokens.
    assert rouge("Science & Technology!", "science technology") == {"rouge1": 1.0, "rougeL": 1.0}
    assert rouge("", "cat") == {"rouge1": 0.0, "rougeL": 0.0}


def test_score_task_exact_match_and_invalid_rate():
    labels = ["positive", "negative", "positive", "negative"]
    predictions = ["Positive.", "positive", "maybe", "Negative"]
    score = score_task(predictions, labels, ["positive", "negative"])
    assert score["n"] == 4
    assert score["exact_match"] == pytest.approx(50.0)  # 1st and 4th
    assert score["invalid_rate"] == pytest.approx(25.0)  # only "maybe" is outside the label set
    assert "rougeL" not in score and "rouge1" not in score
    with_rouge = score_task(predictions, labels, ["positive", "negative"], with_rouge=True)
    assert with_rouge["rougeL"] == pytest.approx(50.0)
    assert with_rouge["rouge1"] == pytest.approx(50.0)


def test_score_task_rouge_is_the_mean_over_examples_in_percent():
    labels = ["the cats are running", "cats chase dogs"]
    score = score_task(["a cat runs", "dogs chase cats"], labels, labels, with_rouge=True)
    assert score["rouge1"] == pytest.approx(100 * (4 / 7 + 1) / 2)
    assert score["rougeL"] == pytest.approx(100 * (4 / 7 + 1 / 3) / 2)


def test_score_task_rejects_empty_or_mismatched():
    with pytest.raises(ValueError):
        score_task([], [], ["a"])
    with pytest.raises(ValueError):
        score_task(["a"], ["a", "b"], ["a", "b"])


def test_hand_computed_matrix():
    assert average_accuracy(R) == pytest.approx((60 + 85 + 50) / 3)  # 65.0
    assert backward_transfer(R) == pytest.approx(((60 - 80) + (85 - 90)) / 2)  # -12.5
    assert forward_transfer(R, ZERO_SHOT) == pytest.approx(((30 - 10) + (20 - 5)) / 2)  # 17.5
    assert forgetting(R) == [pytest.approx(88 - 60), pytest.approx(90 - 85), None]  # 28, 5, None
    assert mean_forgetting(R) == pytest.approx(16.5)


def test_missing_entries_are_skipped_not_zero():
    with_gap = [row[:] for row in R]
    with_gap[1][1] = None  # task b never scored right after learning it
    with_gap[2][2] = None
    assert average_accuracy(with_gap) == pytest.approx((60 + 85) / 2)
    assert backward_transfer(with_gap) == pytest.approx(60 - 80)  # only task a qualifies
    assert average_accuracy([[None, None]]) is None
    assert backward_transfer([[70.0]]) is None  # T == 1
    assert forward_transfer(R, None) is None
    assert forward_transfer(R, [None, None, None]) is None


def test_summarize_rounds_and_is_deterministic():
    third = [[100 / 3, None], [200 / 3, 1 / 7]]
    summary = summarize(["a", "b"], third, reference=[None, 10 / 3], invalid=[[0.0, None], [1 / 3, 0.0]],
                        unknown_labels={"a": 0, "b": 2})
    assert summary["accuracy_matrix"] == [[33.3333, None], [66.6667, 0.1429]]
    assert summary["average_accuracy"] == pytest.approx(33.4048)
    assert summary["backward_transfer"] == 33.3333
    assert summary["forward_transfer"] is None  # R[0][1] unknown
    assert summary["forgetting"] == {"a": -33.3333, "b": None}  # a improved; b is the last task
    assert summary["invalid_rate_matrix"] == [[0.0, None], [0.3333, 0.0]]
    assert summary["missing"] == []
    assert summary["unknown_test_labels"] == {"a": 0, "b": 2}
    again = summarize(["a", "b"], third, reference=[None, 10 / 3], invalid=[[0.0, None], [1 / 3, 0.0]],
                      unknown_labels={"a": 0, "b": 2})
    assert json.dumps(summary) == json.dumps(again)


def test_summarize_lists_missing_diagonal_and_last_row():
    with_gap = [row[:] for row in R]
    with_gap[1][1] = None
    with_gap[2][0] = None
    summary = summarize(["a", "b", "c"], with_gap)
    assert summary["missing"] == [[2, "b"], [3, "a"]]
    assert summary["reference"] is None and summary["forward_transfer"] is None


def test_summarize_joint_run():
    summary = summarize(["a", "b", "c"], [[70.0, 80.0, 90.0]], joint=True)
    assert summary["joint"] is True
    assert summary["average_accuracy"] == 80.0
    assert summary["backward_transfer"] is None and summary["forward_transfer"] is None
    assert summary["forgetting"] == {"a": None, "b": None, "c": None}
    assert summary["mean_forgetting"] is None


def test_bootstrap_of_a_joint_run_uses_its_one_stage():
    """mtl trains every task in stage 1: its AA interval comes from that stage, and it has no BWT or FT."""
    import numpy as np

    from dealcl.eval.bootstrap import RunHits, run_intervals

    run = RunHits(n_rows=1, test_sets=["a", "b"], joint=True,
                  hits={(0, 0): np.array([True, False] * 50), (0, 1): np.ones(100, dtype=bool)})
    intervals = run_intervals(run)
    low, high = intervals["average_accuracy"]
    assert low < 75.0 < high and high <= 100.0
    assert intervals["backward_transfer"] is None and intervals["forgetting"] is None


def test_ft_by_hand_differs_from_minus_bwt_when_a_task_peaks_later():
    """FT (new_methods_spec.md §5) on R: task a peaks at stage 2 (88) and ends at 60, task b peaks
    on its own stage (90) and ends at 85: FT = ((88 − 60) + (90 − 85)) / 2 = 16.5, while
    −BWT = ((80 − 60) + (90 − 85)) / 2 = 12.5. They are equal once every task peaks on its own stage."""
    assert mean_forgetting(R) == pytest.approx(16.5)
    assert -backward_transfer(R) == pytest.approx(12.5)
    own_peak = [row[:] for row in R]
    own_peak[1][0] = 70.0
    assert mean_forgetting(own_peak) == pytest.approx(-backward_transfer(own_peak)) == pytest.approx(12.5)
    assert summarize(["a", "b", "c"], R)["mean_forgetting"] == 16.5
