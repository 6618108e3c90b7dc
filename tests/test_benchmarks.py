"""Benchmark sequences, written out by hand from gorp_olora_spec.md §4 and deal_spec.md §4."""
from __future__ import annotations

import pytest

from dealcl.data.benchmarks import BENCHMARKS, list_benchmarks, resolve_sequence
from dealcl.errors import UserError

EXPECTED = {
    ("tc", None): ["dbpedia", "yahoo", "agnews"],
    ("standard", 1): ["dbpedia", "amazon", "yahoo", "agnews"],
    ("standard", 2): ["dbpedia", "amazon", "agnews", "yahoo"],
    ("standard", 3): ["yahoo", "amazon", "agnews", "dbpedia"],
    ("long", 4): "MNLI CB WiC COPA QQP BoolQA RTE IMDB yelp amazon SST-2 dbpedia agnews MultiRC yahoo".split(),
    ("long", 5): "MultiRC BoolQA WiC MNLI CB COPA QQP RTE IMDB SST-2 dbpedia agnews yelp amazon yahoo".split(),
    ("long", 6): "yelp amazon MNLI CB COPA QQP RTE IMDB SST-2 dbpedia agnews yahoo MultiRC BoolQA WiC".split(),
}


@pytest.mark.parametrize("key", list(EXPECTED))
def test_every_order_exactly(key):
    benchmark, order = key
    assert resolve_sequence(benchmark, order, None) == EXPECTED[key]


def test_list_benchmarks_has_exactly_the_expected_rows():
    rows = list_benchmarks()
    assert {(b, o): t for b, o, t in rows} == EXPECTED
    assert len(rows) == len(EXPECTED)
    rows[0][2].append("mutated")  # callers get copies
    assert BENCHMARKS["tc"][None] == ["dbpedia", "yahoo", "agnews"]


def test_long_orders_are_permutations_of_the_15_tasks():
    long_tasks = set(EXPECTED[("long", 4)])
    assert len(long_tasks) == 15
    for order in (5, 6):
        assert sorted(EXPECTED[("long", order)]) == sorted(long_tasks)


def test_tc_accepts_order_1_as_alias():
    assert resolve_sequence("tc", 1, None) == ["dbpedia", "yahoo", "agnews"]


def test_tc_rejects_other_orders():
    with pytest.raises(UserError, match="tc"):
        resolve_sequence("tc", 2, None)


@pytest.mark.parametrize("benchmark, valid", [("standard", "1, 2, 3"), ("long", "4, 5, 6")])
def test_missing_order_is_an_error_listing_valid_orders(benchmark, valid):
    with pytest.raises(UserError, match=f"valid orders: {valid}"):
        resolve_sequence(benchmark, None, None)


def test_unknown_order_names_it_and_lists_valid():
    with pytest.raises(UserError) as info:
        resolve_sequence("standard", 4, None)
    assert "order 4" in str(info.value) and "1, 2, 3" in str(info.value)


def test_unknown_benchmark_names_it_and_lists_valid():
    with pytest.raises(UserError) as info:
        resolve_sequence("medium", 1, None)
    message = str(info.value)
    assert "'medium'" in message and "tc, standard, long" in message


def test_custom_tasks_win_and_keep_their_order():
    assert resolve_sequence(None, None, ["yelp", "CB", "./my_task"]) == ["yelp", "CB", "./my_task"]


@pytest.mark.parametrize("benchmark, order", [("standard", None), (None, 1), ("tc", 1)])
def test_custom_tasks_cannot_be_mixed_with_benchmark(benchmark, order):
    with pytest.raises(UserError, match="not both"):
        resolve_sequence(benchmark, order, ["yelp"])


def test_duplicate_tasks_are_rejected():
    with pytest.raises(UserError, match="'CB' twice"):
        resolve_sequence(None, None, ["CB", "MNLI", "CB"])


def test_empty_task_list_or_name_is_rejected():
    with pytest.raises(UserError):
        resolve_sequence(None, None, [])
    with pytest.raises(UserError, match="empty task name"):
        resolve_sequence(None, None, ["CB", ""])


def test_nothing_given_is_an_error():
    with pytest.raises(UserError, match="--benchmark"):
        resolve_sequence(None, None, None)
    with pytest.raises(UserError, match="--order 4 needs --benchmark"):
        resolve_sequence(None, 4, None)
