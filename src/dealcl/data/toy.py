"""A toy benchmark in the CL_Benchmark layout, small enough to learn in seconds on tiny models.

Tests and bench/faults.py use it; each label is a word its sentence contains.
"""
from __future__ import annotations

import json
import random
from pathlib import Path

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
