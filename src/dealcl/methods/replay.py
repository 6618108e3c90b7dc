"""Replay: SeqLoRA whose later tasks train on their own data plus a small seeded sample of every
earlier task (experience replay; gorp_olora_spec.md §2.5: no upstream code, built by definition).

The buffer is a pure function of (seed option, task name, the task's training list, the options):
task j's sample is drawn with random.Random(f"{seed}-{name}") from its training list, so it is
the same on every rank, after a resume, and whatever the order of the sequence. Nothing about
the buffer needs to be checkpointed; `save_state` still writes it (replay_buffer.json) as a record.
"""
from __future__ import annotations

import json
import math
import random
from dataclasses import dataclass
from pathlib import Path

import torch

from ..data.types import Example, Task
from ..domains import non_negative, option, probability, seed_value
from .base import LoraOptions, Stage, TrainItem, register
from .seqlora import SeqLora


@dataclass
class ReplayConfig(LoraOptions):
    # Share of each finished task's training set kept for replay (2 %: the usual small-buffer setting).
    replay_fraction: float = option(0.02, probability)
    # At least this many examples per finished task (capped at the task's size), so that small
    # tasks (CB: 250 training examples → 5 at 2 %) still replay one batch's worth.
    replay_min: int = option(8, non_negative)
    # Seeds the per-task sample, apart from the run's seed (`services.seed`) so that runs of several
    # seeds replay the same examples unless asked: 0 by default (the sample depends on the task only).
    seed: int = option(0, seed_value)


def buffer_size(n_train: int, fraction: float, minimum: int) -> int:
    """max(minimum, ⌈fraction·n⌉), never more than the task has."""
    return min(n_train, max(minimum, math.ceil(fraction * n_train - 1e-9)))


def replay_sample(task: Task, fraction: float, minimum: int, seed: int) -> list[Example]:
    """The task's buffer: a seeded sample of its training list, kept in the list's order."""
    k = buffer_size(len(task.train), fraction, minimum)
    rng = random.Random(f"{seed}-{task.name}")
    return [task.train[i] for i in sorted(rng.sample(range(len(task.train)), k))]


@register
class Replay(SeqLora):
    name = "replay"
    description = "one LoRA; later tasks also train on a seeded sample (2 %, at least 8) of every earlier task"
    paper = "experience replay baseline (e.g. Rolnick et al., NeurIPS 2019; as listed in O-LoRA, EMNLP 2023)"
    config_class = ReplayConfig
    # Same adapter and same data scale as seqlora (the buffer adds ≤ 2 % per past task), so the
    # seqlora calibration (5e-4 on smollm2-135m) carries over.
    default_lr = 5e-4

    def stages(self, tasks: list[Task]) -> list[Stage]:
        self._stages = super().stages(tasks)
        return self._stages

    def samples(self, before: int, exclude: set[str] = frozenset()) -> list[TrainItem]:
        """The samples of the tasks of every stage with index < `before`, in sequence order."""
        c = self.config
        return [(task, ex) for earlier in self._stages if earlier.index < before
                for task in earlier.train_tasks if task.name not in exclude
                for ex in replay_sample(task, c.replay_fraction, c.replay_min, c.seed)]

    def buffer(self, stage: Stage) -> list[TrainItem]:
        """What `stage` replays: every earlier task's sample (none for the first stage)."""
        return self.samples(stage.index, {t.name for t in stage.train_tasks})

    def training_items(self, stage: Stage) -> list[TrainItem]:
        # The loop shuffles, so appending mixes the buffer into the new task's batches.
        return super().training_items(stage) + self.buffer(stage)

    def on_task_end(self, model: torch.nn.Module, stage: Stage) -> None:
        super().on_task_end(model, stage)
        self._finished = stage.index

    def save_state(self, model: torch.nn.Module, directory: Path) -> None:
        super().save_state(model, directory)
        # A record of the buffer after this stage (load_state rebuilds it from the data).
        rows = [{"task": t.name, "sentence": e.sentence, "label": e.label}
                for t, e in self.samples(getattr(self, "_finished", 0) + 1)]
        (directory / "replay_buffer.json").write_text(json.dumps(rows, ensure_ascii=False, indent=0))

    def load_state(self, model: torch.nn.Module, directory: Path, stage: Stage) -> None:
        super().load_state(model, directory, stage)
        self._finished = stage.index
