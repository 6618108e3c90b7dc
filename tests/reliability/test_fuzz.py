"""The CLI fuzzed with bad input (bench/fuzz.py's strategies, a short derandomized profile): every
case exits 2 with one `error:` line, no traceback, and no file created or changed."""
from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
# Enough for every family (config keys, data files, output paths, run folders) to be drawn tens
# of times in about a minute on one thread; `python bench/fuzz.py` runs thousands.
EXAMPLES = 120


def _bench_fuzz():
    spec = importlib.util.spec_from_file_location("bench_fuzz", REPO / "bench" / "fuzz.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up
    spec.loader.exec_module(module)
    return module


def test_bad_input_of_every_kind_is_one_error_line_and_exit_2():
    fuzz = _bench_fuzz()
    tried, failures = fuzz.campaign(EXAMPLES, seed=None, derandomize=True)
    assert failures == []
    assert sum(tried.values()) >= EXAMPLES * 0.9
    assert set(tried) == {"config", "data", "paths", "runs"}, tried


def test_the_strategies_build_values_outside_each_domain():
    """The fuzzer's bad values are bad by construction: each drawn value is refused by the
    domain it was built against (a check of the fuzzer, independent of the CLI)."""
    from hypothesis import HealthCheck, given, settings
    from hypothesis import strategies as st

    from dealcl.domains import Range, dimension, in_range, positive

    fuzz = _bench_fuzz()
    domains = [positive, dimension, in_range(0, 1, high_open=True), in_range(0, 1, low_open=True)]

    @settings(max_examples=200, deadline=None, derandomize=True, suppress_health_check=list(HealthCheck))
    @given(st.sampled_from(domains).flatmap(lambda d: st.tuples(st.just(d), fuzz._range_violations(d, integer=False))))
    def outside(pair):
        domain, value = pair
        assert isinstance(domain, Range) and not domain.contains(value), (domain, value)

    outside()
