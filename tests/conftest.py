"""Shared fixtures: a tiny benchmark in the CL_Benchmark layout, and tiny random models.

Nothing here downloads: the models are random configs built in code, the data is written here.
"""
from __future__ import annotations

import json
import random
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"
CL_BENCHMARK = SHARED / "CL_Benchmark"

# Each toy task: the label is a word the sentence contains, so a tiny model can learn it fast.
TOY_TASKS = {
    "toyA": ("TC", ["apple", "plum"]),
    "toyB": ("SC", ["Good", "Bad"]),
    "toyC": ("NLI", ["yes", "no", "maybe"]),
}
INSTRUCTIONS = {
    "TC": "What is the topic of the following paragraph? Choose one from the option.\n",
    "SC": "What is the sentiment of the following paragraph? Choose one from the option.\n",
    "NLI": "What is the logical relationship between the \"sentence 1\" and the \"sentence 2\"? Choose one from the option.\n",
}


def write_toy_benchmark(root: Path, n_train: int = 24, n_test: int = 8, seed: int = 0) -> Path:
    rng = random.Random(seed)
    fillers = ["the", "a", "red", "big", "cat", "sun", "one", "two"]
    for name, (task_type, labels) in TOY_TASKS.items():
        folder = root / task_type / name
        folder.mkdir(parents=True, exist_ok=True)
        for split, n in (("train", n_train), ("test", n_test), ("dev", n_test)):
            records = []
            for _ in range(n):
                label = rng.choice(labels)
                words = [rng.choice(fillers) for _ in range(3)] + [label.lower()]
                rng.shuffle(words)
                records.append({"sentence": " ".join(words), "label": label})
            (folder / f"{split}.json").write_text(json.dumps(records))
        (folder / "labels.json").write_text(json.dumps(labels))
    config = {k: [{"instruction_type": "zero-shot", "instruction": v}] for k, v in INSTRUCTIONS.items()}
    (root / "instruction_config.json").write_text(json.dumps(config))
    return root


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
