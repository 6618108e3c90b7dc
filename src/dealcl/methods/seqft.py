"""SeqFT: full fine-tuning of the whole model on every task in turn (the classic forgetting
baseline; gorp_olora_spec.md §2.5: no upstream code, "all T5 weights trainable (embeddings
frozen or not: unknown)").

Decision on embeddings: they train by default (`train_embeddings=true`). SeqFT is "full
fine-tuning", and a stock full fine-tuning (HF Trainer on the whole model) trains them; with
tied embeddings (SmolLM2, T5 v1.0) the input embedding *is* the LM head, so freezing it would
also freeze the output layer. `method.train_embeddings=false` freezes the token embeddings (and,
when tied, the LM head with them) for a cheaper variant (no Adam state for the vocabulary matrix).
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from ..errors import UserError
from .base import ContinualMethod, MethodConfig, Stage, register

WEIGHTS_FILE = "seqft_weights.safetensors"


@dataclass
class SeqFtConfig(MethodConfig):
    # Train the token embeddings too (tied to the LM head in SmolLM2/T5: false freezes both).
    train_embeddings: bool = True


def _unique_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """model.state_dict() with every tied tensor once (safetensors refuses shared storage):
    the first name of each storage is kept, e.g. `model.embed_tokens.weight`, not `lm_head.weight`."""
    seen: set[tuple[int, int]] = set()
    tensors: dict[str, torch.Tensor] = {}
    for name, tensor in model.state_dict().items():
        key = (tensor.untyped_storage().data_ptr(), tensor.storage_offset())
        if key in seen:
            continue
        seen.add(key)
        tensors[name] = tensor.detach().contiguous().cpu()
    return tensors


@register
class SeqFt(ContinualMethod):
    name = "seqft"
    description = "full fine-tuning of every weight (embeddings included by default) on every task in turn"
    paper = "baseline (SeqFT in O-LoRA, Wang et al., EMNLP 2023 Findings)"
    config_class = SeqFtConfig
    export_as = "merged"
    fsdp_refusal = "it trains every base weight, and FSDP in dealcl shards frozen weights only"
    state_share = 1.0  # the whole model after every stage
    # Not swept. Adam moves every weight by about lr per step, so full fine-tuning of a ~100M
    # model uses the BERT-base range 2e-5..5e-5 (Devlin et al. 2019), ten times below the LoRA
    # rate (5e-4 for seqlora here). Upstream's 1e-3 then 1e-4 (§2.5) was for T5-large, far
    # above the usual AdamW full fine-tuning range of a decoder-only model. We take the top of
    # the range because a stage is one short epoch; a lower rate forgets less but learns less.
    default_lr = 5e-5

    def prepare_model(self, model: torch.nn.Module) -> torch.nn.Module:
        embeddings = {id(p) for p in model.get_input_embeddings().parameters()}
        for parameter in model.parameters():
            parameter.requires_grad_(self.config.train_embeddings or id(parameter) not in embeddings)
        return model

    def save_state(self, model: torch.nn.Module, directory: Path) -> None:
        # The whole model after this stage, bit for bit (tied tensors once). This is big:
        # ≈ 540 MB per stage for smollm2-135m in fp32 (≈ 270 MB in bf16), every stage kept.
        save_file(_unique_state(model), str(directory / WEIGHTS_FILE))

    def load_state(self, model: torch.nn.Module, directory: Path, stage: Stage) -> None:
        path = directory / WEIGHTS_FILE
        if not path.is_file():
            raise UserError(f"{directory}: no {WEIGHTS_FILE} (not a checkpoint of method seqft)")
        tensors = load_file(str(path))
        own = model.state_dict()
        unknown = [n for n in tensors if n not in own]
        if unknown:
            raise UserError(f"{directory}: checkpoint holds weights this model lacks, e.g. {unknown[0]}")
        # Every key the file lacks must be a tied alias of one it holds (e.g. lm_head.weight).
        stored = {(t.untyped_storage().data_ptr(), t.storage_offset()) for n, t in own.items() if n in tensors}
        missing = [n for n, t in own.items() if n not in tensors
                   and (t.untyped_storage().data_ptr(), t.storage_offset()) not in stored]
        if missing:
            raise UserError(f"{directory}: checkpoint lacks weight {missing[0]}")
        with torch.no_grad():
            for name, value in tensors.items():
                if own[name].shape != value.shape:
                    raise UserError(f"{directory}: {name} has shape {tuple(value.shape)}, "
                                    f"the model {tuple(own[name].shape)}")
                own[name].copy_(value.to(own[name].dtype))
