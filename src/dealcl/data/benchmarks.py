"""The named task sequences of the CL_Benchmark literature, and how a run picks one.

The orders are copied from the upstream configs (not from the papers' tables) because the
configs are what the published numbers were produced with. Picking a sequence never defaults
silently: `standard` and `long` each have three orders that give different results, so a run
must say which one it means.
"""
from __future__ import annotations

from ..errors import UserError

BENCHMARKS: dict[str, dict[int | None, list[str]]] = {
    # deal_spec.md §4: scripts/TC.sh of DEAL, one sequence without an order number.
    "tc": {None: ["dbpedia", "yahoo", "agnews"]},
    "standard": {
        # gorp_olora_spec.md §4 / upstream configs/order1_configs
        1: ["dbpedia", "amazon", "yahoo", "agnews"],
        # gorp_olora_spec.md §4 / upstream configs/order2_configs
        2: ["dbpedia", "amazon", "agnews", "yahoo"],
        # gorp_olora_spec.md §4 / upstream configs/order3_configs
        3: ["yahoo", "amazon", "agnews", "dbpedia"],
    },
    "long": {
        # gorp_olora_spec.md §4 / upstream configs/order4_configs
        4: ["MNLI", "CB", "WiC", "COPA", "QQP", "BoolQA", "RTE", "IMDB",
            "yelp", "amazon", "SST-2", "dbpedia", "agnews", "MultiRC", "yahoo"],
        # gorp_olora_spec.md §4 / upstream configs/order5_configs
        5: ["MultiRC", "BoolQA", "WiC", "MNLI", "CB", "COPA", "QQP", "RTE",
            "IMDB", "SST-2", "dbpedia", "agnews", "yelp", "amazon", "yahoo"],
        # gorp_olora_spec.md §4 / upstream configs/order6_configs (= O-LoRA long_configs)
        6: ["yelp", "amazon", "MNLI", "CB", "COPA", "QQP", "RTE", "IMDB",
            "SST-2", "dbpedia", "agnews", "yahoo", "MultiRC", "BoolQA", "WiC"],
    },
}


def list_benchmarks() -> list[tuple[str, int | None, list[str]]]:
    """(benchmark, order, tasks) rows in a stable order, for `dealcl benchmarks`."""
    return [(name, order, list(tasks)) for name, orders in BENCHMARKS.items() for order, tasks in orders.items()]


def _check_unique(tasks: list[str], what: str) -> list[str]:
    seen: set[str] = set()
    for task in tasks:
        if not task:
            raise UserError(f"{what} has an empty task name: {','.join(tasks)!r}")
        if task in seen:
            raise UserError(f"{what} names task {task!r} twice; each task may appear once in a sequence")
        seen.add(task)
    return tasks


def resolve_sequence(benchmark: str | None, order: int | None, tasks: list[str] | None) -> list[str]:
    """The task list a run trains on, in order.

    A custom `tasks` list wins but may not be mixed with `benchmark`/`order` (which of the two
    the user meant would be a guess). Orders are never defaulted, except that `tc` has a single
    sequence and accepts order 1 as an alias for it.
    """
    if tasks is not None:
        if benchmark is not None or order is not None:
            raise UserError("give either --tasks or --benchmark/--order, not both")
        if not tasks:
            raise UserError("--tasks is empty: give a comma-separated list of task names")
        return _check_unique(list(tasks), "--tasks")
    if benchmark is None:
        hint = f" (--order {order} needs --benchmark)" if order is not None else ""
        raise UserError(f"no task sequence given{hint}: pass --benchmark ({', '.join(BENCHMARKS)}) or --tasks a,b,c")
    orders = BENCHMARKS.get(benchmark)
    if orders is None:
        raise UserError(f"unknown benchmark {benchmark!r}; valid benchmarks: {', '.join(BENCHMARKS)}")
    if None in orders:  # one sequence without an order number (tc)
        if order not in (None, 1):
            raise UserError(f"benchmark {benchmark!r} has a single sequence and no order {order}; omit --order")
        return _check_unique(list(orders[None]), f"benchmark {benchmark!r}")
    valid = ", ".join(str(o) for o in orders)
    if order is None:
        raise UserError(f"benchmark {benchmark!r} needs --order; valid orders: {valid}")
    if order not in orders:
        raise UserError(f"benchmark {benchmark!r} has no order {order}; valid orders: {valid}")
    return _check_unique(list(orders[order]), f"benchmark {benchmark!r} order {order}")
