"""LwF: distil the previous stage's model into the new one on the new task's inputs
(Li & Hoiem, 2017), at the answer positions, with softened distributions."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from ..errors import UserError
from .base import LoraOptions, Stage, register
from .seqlora import SeqLora


@dataclass
class LwfConfig(LoraOptions):
    lwf_lambda: float = 1.0  # weight of the distillation term
    temperature: float = 2.0  # softening of both distributions (the KL is scaled by T²)

    def validate(self) -> None:
        if self.lwf_lambda < 0:
            raise UserError(f"method.lwf_lambda must not be negative, got {self.lwf_lambda}")
        if self.temperature <= 0:
            raise UserError(f"method.temperature must be positive, got {self.temperature}")


@register
class Lwf(SeqLora):
    name = "lwf"
    description = "one LoRA; KL toward the previous stage's model on the new task's answer positions (T = 2)"
    paper = "Li & Hoiem, Learning without Forgetting, ECCV 2016 / TPAMI 2017"
    config_class = LwfConfig

    def prepare_model(self, model: torch.nn.Module) -> torch.nn.Module:
        self.teacher: dict[int, torch.Tensor] = {}
        return super().prepare_model(model)

    @torch.no_grad()
    def on_task_start(self, model: torch.nn.Module, stage: Stage) -> None:
        """The frozen teacher is the model as this task starts; its answer-position logits are
        computed once per task (kept in bf16) and looked up by training-item index."""
        self.teacher = {}
        if stage.index == 1 or self.config.lwf_lambda == 0:
            return
        was_training = model.training
        model.eval()
        for batch in self.services.batches(self.training_items(stage), 8):
            with self.services.autocast():
                logits = self.services.answer_logits(model, batch)
            counts = torch.bincount(batch["target_rows"], minlength=len(batch["indices"])).tolist()
            for index, part in zip(batch["indices"], logits.split(counts)):
                self.teacher[index] = part.to(torch.bfloat16).cpu()
        model.train(was_training)

    def extra_losses(self, model: torch.nn.Module, batch: dict[str, Any], answer_logits: torch.Tensor) -> dict[str, torch.Tensor]:
        if not self.teacher:
            return {}
        T = self.config.temperature
        teacher = torch.cat([self.teacher[i] for i in batch["indices"]]).to(answer_logits.device).float()
        student = F.log_softmax(answer_logits.float() / T, dim=-1)
        target = F.log_softmax(teacher / T, dim=-1)
        kl = F.kl_div(student, target, log_target=True, reduction="sum") / answer_logits.shape[0]
        return {"lwf": self.config.lwf_lambda * T * T * kl}

    def on_task_end(self, model: torch.nn.Module, stage: Stage) -> None:
        self.teacher = {}
