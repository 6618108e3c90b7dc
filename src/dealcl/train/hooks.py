"""What the training loop calls on a continual method, typed on the engine side.

The loop (loop.py) and the services (services.py) know methods only through this Protocol, so
nothing under train/ imports methods/. `methods/base.py:ContinualMethod` implements every hook
with plain-LoRA defaults; a method overrides the ones it needs. The driver calls the hooks that
surround a stage (`on_task_start`, `training_items`, `on_task_end`, save/load, eval_model);
`train_stage` calls the ones inside it, in this order:

    build_optimizer(model, lr)                 once per stage
    before_training(model, stage, items)       once, with the exact item list the loop trains on:
                                               a batch's `indices` are positions in `items`
    per micro-batch: extra_losses(model, batch, answer_logits)
    per step:        after_backward(model)     gradients of this step are complete (summed over ranks)
                     clip over the optimizer's parameters except `unclipped_parameters(model)`
                     optimizer.step(), zero_grad
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol

import torch

from ..data.types import Example, Task


@dataclass
class Stage:
    """One step of a continual run: train on `train_tasks`, then evaluate.

    `index` counts from 1; `name` names the output folders (`<index>-<name>`)."""

    index: int
    name: str
    train_tasks: list[Task]


TrainItem = tuple[Task, Example]


class TrainingHooks(Protocol):
    def build_optimizer(self, model: torch.nn.Module, lr: float) -> torch.optim.Optimizer: ...

    def before_training(self, model: torch.nn.Module, stage: Stage, items: list[TrainItem]) -> None: ...

    def extra_losses(self, model: torch.nn.Module, batch: dict[str, Any],
                     answer_logits: torch.Tensor) -> dict[str, torch.Tensor]: ...

    def after_backward(self, model: torch.nn.Module) -> None: ...

    def unclipped_parameters(self, model: torch.nn.Module) -> list[torch.nn.Parameter]: ...

    def adapter_modules(self, model: torch.nn.Module) -> set[torch.nn.Module]: ...
