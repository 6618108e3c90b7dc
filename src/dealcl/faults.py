"""Named fault-injection points, so reliability tests can kill a run at an exact moment.

`DEALCL_FAULT=<point>:<n>` makes the process SIGKILL itself the n-th time it reaches `point`
(`train-step`, `checkpoint-write`, `eval-batch`, `results-write`); `<point>:<n>:int` sends it
SIGINT instead (Ctrl-C at an exact moment: the process must stop cleanly). Unset, a point costs one
dictionary lookup. `DEALCL_FAULT_LOG=<file>` appends each point reached to the file, so a
campaign can count how often each point occurs in a clean run. bench/faults.py and
tests/reliability/ use them; users never need to.
"""
from __future__ import annotations

import os
import signal

POINTS = ("train-step", "checkpoint-write", "eval-batch", "results-write")
_counts: dict[str, int] = {}


def trace_shard(rank: int, stage: int, indices: list[int]) -> None:
    """`DEALCL_SHARD_LOG=<file>`: each rank appends the training examples it computed, so the
    data-parallel tests can check that ranks see disjoint shards of every global batch."""
    path = os.environ.get("DEALCL_SHARD_LOG")
    if path:
        with open(f"{path}.{rank}", "a", encoding="utf-8") as handle:
            handle.write(f"{stage} {' '.join(map(str, indices))}\n")


def fault_point(point: str) -> None:
    trace = os.environ.get("DEALCL_FAULT_LOG")
    if trace:
        with open(trace, "a", encoding="utf-8") as handle:
            handle.write(point + "\n")
    spec = os.environ.get("DEALCL_FAULT")
    if not spec:
        return
    target, _, rest = spec.partition(":")
    if target != point:
        return
    count, _, action = rest.partition(":")
    _counts[point] = _counts.get(point, 0) + 1
    if _counts[point] == int(count or 1):
        os.kill(os.getpid(), signal.SIGINT if action == "int" else signal.SIGKILL)
