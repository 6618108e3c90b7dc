"""PerTask: an independent LoRA per task, each task evaluated with its own adapter.

The upper bound with the task identity given: nothing is shared, so nothing is forgotten, and
task j's predictions after any later stage equal those right after stage j (the driver reuses
them through `eval_fingerprint`). A task not trained yet is evaluated on the base model.
"""
from __future__ import annotations

import contextlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import torch

from ..data.types import Task
from .base import ContinualMethod, LoraOptions, Stage, register
from ._lora import TaskAdapters, lora_config


@dataclass
class PerTaskConfig(LoraOptions):
    pass


@register
class PerTask(ContinualMethod):
    name = "pertask"
    description = "an independent LoRA per task, each task evaluated with its own adapter (upper bound)"
    paper = "baseline (PerTaskFT in O-LoRA, Wang et al., EMNLP 2023 Findings), LoRA variant"
    config_class = PerTaskConfig
    export_refusal = "each task is answered by its own adapter: there is no single final model (see adapters/)"
    default_lr = 5e-4  # seqlora's calibrated value for the same adapter on smollm2-135m
    default_rank = 8
    default_alpha = 32.0

    def prepare_model(self, model: torch.nn.Module) -> torch.nn.Module:
        config = lora_config(model, self.config, self.default_rank, self.default_alpha)
        self.adapters = TaskAdapters(config, self.services.seed)
        self.task_adapter: dict[str, str] = {}  # task name → its adapter
        return self.adapters.wrap(model)

    def on_task_start(self, model: torch.nn.Module, stage: Stage) -> None:
        current = self.adapters.for_task(model, stage.index)
        self.adapters.activate(model, [current], current)

    def on_task_end(self, model: torch.nn.Module, stage: Stage) -> None:
        for task in stage.train_tasks:
            self.task_adapter[task.name] = self.adapters.names[stage.index - 1]
        self.adapters.activate(model, [self.adapters.names[stage.index - 1]], None)

    @contextlib.contextmanager
    def eval_model(self, model: torch.nn.Module, task: Task) -> Iterator[torch.nn.Module]:
        adapter = self.task_adapter.get(task.name)
        if adapter is None:
            with model.disable_adapter():
                yield model
            return
        previous = list(model.base_model.active_adapters)
        self.adapters.activate(model, [adapter], None)
        try:
            yield model
        finally:
            self.adapters.activate(model, previous, None)

    def eval_fingerprint(self, task: Task, stage: Stage | None) -> str | None:
        adapter = self.task_adapter.get(task.name)
        return f"adapter:{adapter}" if adapter else "base-model"

    def save_state(self, model: torch.nn.Module, directory: Path) -> None:
        self.adapters.save(model, directory)
        # task → adapter, and the adapters' init seed (a resumed run draws the next adapter exactly
        # as the uninterrupted one would).
        state = {"task_adapter": self.task_adapter, "init_seed": self.adapters.seed}
        (directory / "pertask.json").write_text(json.dumps(state, indent=2))

    def load_state(self, model: torch.nn.Module, directory: Path, stage: Stage) -> None:
        state = json.loads((directory / "pertask.json").read_text())
        if "task_adapter" not in state:  # checkpoints written before the seed was saved
            state = {"task_adapter": state}
        self.adapters.seed = int(state.get("init_seed", self.adapters.seed))
        self.adapters.load(model, directory)
        self.task_adapter = dict(state["task_adapter"])
        self.adapters.activate(model, [self.adapters.names[stage.index - 1]], None)
