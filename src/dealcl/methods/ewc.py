"""EWC on the LoRA weights: a quadratic pull toward each earlier task's solution, weighted by
its empirical diagonal Fisher (Kirkpatrick et al., 2017)."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from ..errors import UserError
from .base import LoraOptions, Stage, register
from .seqlora import SeqLora


@dataclass
class EwcConfig(LoraOptions):
    # λ: the penalty is λ/2 Σ_k Σ_i F_k,i (θ_i − θ*_k,i)². Not swept: 100 makes the penalty the
    # same order as the task loss on smollm2-135m after one task (LoRA Fishers are ~1e-3).
    ewc_lambda: float = 100.0
    fisher_examples: int = 200  # training examples (per task) the Fisher is averaged over

    def validate(self) -> None:
        if self.ewc_lambda < 0:
            raise UserError(f"method.ewc_lambda must not be negative, got {self.ewc_lambda}")
        if self.fisher_examples < 1:
            raise UserError(f"method.fisher_examples must be at least 1, got {self.fisher_examples}")


@register
class Ewc(SeqLora):
    name = "ewc"
    description = "one LoRA with an EWC penalty: diagonal Fisher per finished task, anchors accumulate"
    paper = "Kirkpatrick et al., Overcoming catastrophic forgetting in neural networks, PNAS 2017"
    config_class = EwcConfig

    def prepare_model(self, model: torch.nn.Module) -> torch.nn.Module:
        self.anchors: list[dict[str, torch.Tensor]] = []
        self.fishers: list[dict[str, torch.Tensor]] = []
        return super().prepare_model(model)

    def _trainable(self, model: torch.nn.Module) -> dict[str, torch.nn.Parameter]:
        return {n: p for n, p in model.named_parameters() if p.requires_grad}

    def penalty(self, model: torch.nn.Module) -> torch.Tensor:
        params = self._trainable(model)
        total = torch.zeros((), device=next(iter(params.values())).device)
        for anchor, fisher in zip(self.anchors, self.fishers):
            for name, p in params.items():
                total = total + (fisher[name] * (p.float() - anchor[name]) ** 2).sum()
        return 0.5 * self.config.ewc_lambda * total

    def extra_losses(self, model: torch.nn.Module, batch: dict[str, Any], answer_logits: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"ewc": self.penalty(model)} if self.anchors and self.config.ewc_lambda > 0 else {}

    def fisher(self, model: torch.nn.Module, stage: Stage) -> dict[str, torch.Tensor]:
        """Empirical diagonal Fisher: squared per-example gradients of the answer-token loss,
        averaged over up to `fisher_examples` of the task's training examples (eval mode)."""
        params = self._trainable(model)
        sums = {n: torch.zeros_like(p, dtype=torch.float32) for n, p in params.items()}
        items = self.training_items(stage)[: self.config.fisher_examples]
        was_training = model.training
        model.eval()
        for batch in self.services.batches(items, 1):
            model.zero_grad(set_to_none=True)
            loss_sum, _ = self.services.task_loss_sum(model, batch)
            (loss_sum / batch["target_ids"].numel()).backward()
            for n, p in params.items():
                if p.grad is not None:
                    sums[n] += p.grad.detach().float() ** 2
        model.zero_grad(set_to_none=True)
        model.train(was_training)
        return {n: s / len(items) for n, s in sums.items()}

    def on_task_end(self, model: torch.nn.Module, stage: Stage) -> None:
        self.fishers.append(self.fisher(model, stage))
        self.anchors.append({n: p.detach().float().clone() for n, p in self._trainable(model).items()})

    def save_state(self, model: torch.nn.Module, directory: Path) -> None:
        super().save_state(model, directory)
        tensors = {}
        for k, (anchor, fisher) in enumerate(zip(self.anchors, self.fishers)):
            tensors.update({f"anchor/{k}/{n}": v.contiguous() for n, v in anchor.items()})
            tensors.update({f"fisher/{k}/{n}": v.contiguous() for n, v in fisher.items()})
        save_file(tensors, str(directory / "ewc_state.safetensors"))

    def load_state(self, model: torch.nn.Module, directory: Path, stage: Stage) -> None:
        super().load_state(model, directory, stage)
        tensors = load_file(str(directory / "ewc_state.safetensors"))
        count = 1 + max((int(key.split("/")[1]) for key in tensors), default=-1)
        self.anchors = [{} for _ in range(count)]
        self.fishers = [{} for _ in range(count)]
        for key, value in tensors.items():
            kind, k, name = key.split("/", 2)
            (self.anchors if kind == "anchor" else self.fishers)[int(k)][name] = value
