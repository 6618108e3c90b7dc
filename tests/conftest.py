"""Shared fixtures: a tiny benchmark in the CL_Benchmark layout, and tiny random models.

Nothing here downloads: the models are random configs built in code, the data is written here.
"""
from __future__ import annotations

from pathlib import Path

import pytest

from dealcl.data.toy import TOY_TASKS, write_toy_benchmark  # noqa: F401 (re-exported for tests)

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"
CL_BENCHMARK = SHARED / "CL_Benchmark"


@pytest.fixture
def toy_data(tmp_path: Path) -> Path:
    return write_toy_benchmark(tmp_path / "CL_Benchmark")


@pytest.fixture(scope="session")
def toy_data_session(tmp_path_factory) -> Path:
    return write_toy_benchmark(tmp_path_factory.mktemp("data") / "CL_Benchmark")


def tiny_run_config(data: Path, **overrides):
    """A run config small enough for 2 CPU cores: fp32 and no dropout so results are exact."""
    from dealcl.runs.config import RunConfig

    values = dict(
        method="seqlora", model="tiny-llama", tasks=["toyA", "toyB"], data=str(data), precision="fp32",
        batch_size=4, eval_batch_size=8, lr=5e-3, seed=0, max_source_length=256, method_options={"dropout": 0.0},
    )
    values.update(overrides)
    return RunConfig(**values)
