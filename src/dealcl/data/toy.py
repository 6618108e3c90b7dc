"""Toy benchmarks in the CL_Benchmark layout for tests and bench/faults.py.

`write_toy_benchmark`: each label is a word its sentence contains; prompts of realistic length
(the real instructions), too hard for a tiny random model to answer right in a test's budget.
`write_learnable_benchmark`: one-letter labels in four-letter sentences under a one-word
instruction, which a tiny model learns to 100 % exact match in a few seconds: the end-to-end
tests that must see accuracy (an untrained model scores 0) use it.
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


LEARNABLE_TASKS = {"pickA": ("TC", ["a", "b"]), "pickB": ("SC", ["c", "d"])}


def write_learnable_benchmark(root: Path, n_train: int = 400, n_test: int = 32, seed: int = 0) -> Path:
    """Each sentence is three filler letters and the label letter, shuffled ("q a z k" → a)."""
    rng = random.Random(seed)
    fillers = "qzkmwx"
    for name, (task_type, labels) in LEARNABLE_TASKS.items():
        folder = root / task_type / name
        folder.mkdir(parents=True, exist_ok=True)
        for split, n in (("train", n_train), ("test", n_test), ("dev", n_test)):
            records = []
            for _ in range(n):
                label = rng.choice(labels)
                letters = [rng.choice(fillers) for _ in range(3)] + [label]
                rng.shuffle(letters)
                records.append({"sentence": " ".join(letters), "label": label})
            (folder / f"{split}.json").write_text(json.dumps(records))
        (folder / "labels.json").write_text(json.dumps(labels))
    config = {task_type: [{"instruction_type": "zero-shot", "instruction": "Pick.\n"}]
              for task_type, _ in LEARNABLE_TASKS.values()}
    (root / "instruction_config.json").write_text(json.dumps(config))
    return root
