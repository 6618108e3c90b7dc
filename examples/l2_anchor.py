"""A user's own continual method in one file: LoRA with an L2 pull toward the previous task's adapter.

    dealcl run --benchmark tc --method examples/l2_anchor.py:L2Anchor method.strength=0.1

It uses only the public API: a config dataclass, a `ContinualMethod` subclass, and the hooks
it needs (prepare_model, on_task_end, extra_losses, save_state/load_state).
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from dealcl.domains import non_negative, option
from dealcl.methods import (
    ContinualMethod, LoraOptions, Stage, load_adapter_tensors, lora_config, save_adapter_tensors, wrap_with_lora,
)


@dataclass
class L2AnchorConfig(LoraOptions):
    # Weight of Σ‖θ − θ_previous‖² over the adapter's weights; its domain is declared with the
    # default, so `method.strength=-1` is refused with one error line before anything runs.
    strength: float = option(0.1, non_negative)


class L2Anchor(ContinualMethod):
    name = "l2-anchor"
    description = "LoRA pulled toward the previous task's adapter by an L2 penalty (example plugin)"
    paper = "example in examples/l2_anchor.py"
    config_class = L2AnchorConfig
    default_lr = 5e-4

    def prepare_model(self, model: torch.nn.Module) -> torch.nn.Module:
        self.anchor: dict[str, torch.Tensor] = {}
        return wrap_with_lora(model, lora_config(model, self.config, 8, 32))

    def extra_losses(self, model, batch, answer_logits):
        if not self.anchor:
            return {}
        penalty = sum(((p - self.anchor[n]) ** 2).sum() for n, p in model.named_parameters() if n in self.anchor)
        return {"l2_anchor": self.config.strength * penalty}

    def on_task_end(self, model: torch.nn.Module, stage: Stage) -> None:
        self.anchor = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}

    def save_state(self, model: torch.nn.Module, directory: Path) -> None:
        save_adapter_tensors(model, directory)
        save_file({k: v.contiguous() for k, v in self.anchor.items()}, str(directory / "anchor.safetensors"))

    def load_state(self, model: torch.nn.Module, directory: Path, stage: Stage) -> None:
        load_adapter_tensors(model, directory)
        self.anchor = load_file(str(directory / "anchor.safetensors"))
