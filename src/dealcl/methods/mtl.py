"""MTL: one LoRA trained jointly on every task of the sequence (the multi-task upper bound;
gorp_olora_spec.md §2.5: no upstream code, built by definition).

One stage named "mtl" whose training items are the union of all tasks' training examples (the
loop shuffles them together); `joint = True` makes the driver evaluate every task once and
report AA only (BWT/FWT are not defined for a single stage).
"""
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
    paper = "multi-task learning upper bound (as in O-LoRA, Wang et al., EMNLP 2023 Findings)"
    config_class = MtlConfig
    joint = True
    # Same adapter and per-example rate as seqlora (5e-4, calibrated on smollm2-135m); the joint
    # stage has T times the steps of one task, which needs no smaller rate at a constant schedule.
    default_lr = 5e-4
    tuned_lrs = {"smollm2-135m": 1e-3}  # dealcl sweep, docs/RESULTS.md (validation AA 59.5 vs 56.0 at 5e-4)

    def stages(self, tasks: list[Task]) -> list[Stage]:
        return [Stage(index=1, name="mtl", train_tasks=list(tasks))]
