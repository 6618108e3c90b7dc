"""SeqLoRA: one LoRA adapter, trained on every task in turn (the forgetting baseline)."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from .base import ContinualMethod, LoraOptions, Stage, register
from ._lora import load_adapter_tensors, lora_config, save_adapter_tensors, wrap_with_lora


@dataclass
class SeqLoraConfig(LoraOptions):
    pass


@register
class SeqLora(ContinualMethod):
    name = "seqlora"
    description = "one LoRA adapter carried and trained on every task in turn"
    paper = "baseline (Hu et al., 2021 LoRA; as in O-LoRA, Wang et al., EMNLP 2023)"
    config_class = SeqLoraConfig
    export_as = "adapter"
    default_lr = 5e-4
    tuned_lrs = {"smollm2-135m": 1e-3}  # dealcl sweep, docs/RESULTS.md (validation AA 52 vs 49 at 5e-4)
    # Calibrated on smollm2-135m: r 8 took agnews from 0 % to 77 % EM in 256 examples.
    default_rank = 8
    default_alpha = 32.0

    def prepare_model(self, model: torch.nn.Module) -> torch.nn.Module:
        return wrap_with_lora(model, lora_config(model, self.config, self.default_rank, self.default_alpha))

    def save_state(self, model: torch.nn.Module, directory: Path) -> None:
        save_adapter_tensors(model, directory)

    def load_state(self, model: torch.nn.Module, directory: Path, stage: Stage) -> None:
        load_adapter_tensors(model, directory)
