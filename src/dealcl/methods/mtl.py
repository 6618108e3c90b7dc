"""MTL: one LoRA trained jointly on all tasks of the sequence, evaluated once (the upper bound)."""
from __future__ import annotations

from dataclasses import dataclass

from ..data.types import Task
from .base import LoraOptions, Stage, register
from .seqlora import SeqLora


@dataclass
class MtlConfig(LoraOptions):
    pass


@register
class Mtl(SeqLora):
    name = "mtl"
    description = "one LoRA trained jointly on every task of the sequence (multi-task upper bound; AA only)"
    paper = "multi-task learning upper bound (as in Wang et al., EMNLP 2023)"
    config_class = MtlConfig
    joint = True

    def stages(self, tasks: list[Task]) -> list[Stage]:
        return [Stage(index=1, name="joint", train_tasks=list(tasks))]
