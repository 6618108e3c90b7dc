"""Replay: SeqLoRA that mixes a small seeded sample of every earlier task into later tasks' data."""
from __future__ import annotations

import json
import math
import random
from dataclasses import dataclass
from pathlib import Path

import torch

from ..data.types import Example, Task
from ..errors import UserError
from .base import LoraOptions, Stage, TrainItem, register
from .seqlora import SeqLora


@dataclass
class ReplayConfig(LoraOptions):
    fraction: float = 0.02  # share of each finished task's training set kept in the buffer
    min_examples: int = 8  # at least this many per task (small tasks)

    def validate(self) -> None:
        if not 0 < self.fraction <= 1:
            raise UserError(f"method.fraction must be in (0, 1], got {self.fraction}")
        if self.min_examples < 0:
            raise UserError(f"method.min_examples must not be negative, got {self.min_examples}")


def buffer_size(n_train: int, fraction: float, minimum: int) -> int:
    return min(n_train, max(minimum, math.ceil(fraction * n_train)))


@register
class Replay(SeqLora):
    name = "replay"
    description = "one LoRA; later tasks' batches mix in a seeded sample (2%, at least 8) of every earlier task"
    paper = "experience replay baseline (e.g. as in Wang et al., EMNLP 2023 / TRACE)"
    config_class = ReplayConfig

    def stages(self, tasks: list[Task]) -> list[Stage]:
        self.tasks = {t.name: t for t in tasks}
        self.buffer: dict[str, list[Example]] = {}
        return super().stages(tasks)

    def training_items(self, stage: Stage) -> list[TrainItem]:
        replayed = [(self.tasks[name], example) for name, examples in self.buffer.items() for example in examples]
        return super().training_items(stage) + replayed

    def on_task_end(self, model: torch.nn.Module, stage: Stage) -> None:
        for task in stage.train_tasks:
            # Seeded by the task alone: the buffer does not depend on order or on resume.
            rng = random.Random(f"replay\0{task.name}")
            k = buffer_size(len(task.train), self.config.fraction, self.config.min_examples)
            self.buffer[task.name] = [task.train[i] for i in sorted(rng.sample(range(len(task.train)), k))]

    def save_state(self, model: torch.nn.Module, directory: Path) -> None:
        super().save_state(model, directory)
        buffer = {name: [[e.sentence, e.label] for e in examples] for name, examples in self.buffer.items()}
        (directory / "replay_buffer.json").write_text(json.dumps(buffer, ensure_ascii=False))

    def load_state(self, model: torch.nn.Module, directory: Path, stage: Stage) -> None:
        super().load_state(model, directory, stage)
        buffer = json.loads((directory / "replay_buffer.json").read_text())
        self.buffer = {name: [Example(s, l) for s, l in rows] for name, rows in buffer.items()}
