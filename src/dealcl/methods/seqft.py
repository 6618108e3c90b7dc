"""SeqFT: full fine-tuning on every task in turn (the classic forgetting baseline)."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from ..errors import UserError
from .base import ContinualMethod, MethodConfig, Stage, register


@dataclass
class SeqFtConfig(MethodConfig):
    train_embeddings: bool = False  # token embeddings (tied to the LM head in many models) stay frozen


@register
class SeqFt(ContinualMethod):
    name = "seqft"
    description = "full fine-tuning of all weights (token embeddings frozen) on every task in turn"
    paper = "baseline (SeqFT in O-LoRA, Wang et al., EMNLP 2023)"
    config_class = SeqFtConfig
    export_as = "merged"
    # Not swept: 5e-5 is the usual full fine-tuning rate for a 100M-parameter model with Adam;
    # upstream T5-large used 1e-3 then 1e-4.
    default_lr = 5e-5

    def prepare_model(self, model: torch.nn.Module) -> torch.nn.Module:
        embeddings = {id(p) for p in model.get_input_embeddings().parameters()}
        for parameter in model.parameters():
            parameter.requires_grad_(self.config.train_embeddings or id(parameter) not in embeddings)
        return model

    def save_state(self, model: torch.nn.Module, directory: Path) -> None:
        # Every trained weight (tied tensors once): the model after this stage, bit for bit.
        seen, tensors = set(), {}
        for name, parameter in model.named_parameters():
            if parameter.requires_grad and id(parameter) not in seen:
                seen.add(id(parameter))
                tensors[name] = parameter.detach().contiguous().cpu()
        save_file(tensors, str(directory / "seqft_weights.safetensors"))

    def load_state(self, model: torch.nn.Module, directory: Path, stage: Stage) -> None:
        tensors = load_file(str(directory / "seqft_weights.safetensors"))
        params = dict(model.named_parameters())
        missing = [n for n in tensors if n not in params]
        if missing:
            raise UserError(f"{directory}: checkpoint holds weights this model lacks, e.g. {missing[0]}")
        with torch.no_grad():
            for name, value in tensors.items():
                params[name].copy_(value)
