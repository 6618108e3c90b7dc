"""Stock PEFT LoRA helpers shared by the LoRA-based methods (no vendored PEFT)."""
from __future__ import annotations

import json
from pathlib import Path

import torch
from peft import LoraConfig, PeftModel, get_peft_model
from peft.utils import get_peft_model_state_dict, set_peft_model_state_dict
from safetensors.torch import load_file, save_file

from ..errors import UserError
from .base import LoraOptions

# q and v of every attention block: T5 self- and cross-attention (`q`, `v`), LLaMA `q_proj`/`v_proj`
# (deal_spec.md §1.3, gorp_olora_spec.md §2.1).
QV_TARGETS = {"t5": ["q", "v"], "mt5": ["q", "v"], "llama": ["q_proj", "v_proj"]}


def model_type(model: torch.nn.Module) -> str:
    base = model.get_base_model() if isinstance(model, PeftModel) else model
    return getattr(base.config, "model_type", "")


def is_seq2seq(model: torch.nn.Module) -> bool:
    base = model.get_base_model() if isinstance(model, PeftModel) else model
    return bool(getattr(base.config, "is_encoder_decoder", False))


def default_targets(model: torch.nn.Module) -> list[str]:
    kind = model_type(model)
    if kind in QV_TARGETS:
        return QV_TARGETS[kind]
    names = {name.rsplit(".", 1)[-1] for name, _ in model.named_modules()}
    for candidates in (["q_proj", "v_proj"], ["q", "v"], ["query", "value"]):
        if set(candidates) <= names:
            return candidates
    raise UserError(f"cannot pick LoRA target modules for model type '{kind}': set method.target_modules")


def lora_config(model: torch.nn.Module, options: LoraOptions, rank: int, alpha: float) -> LoraConfig:
    return LoraConfig(
        r=rank,
        lora_alpha=alpha,
        lora_dropout=options.dropout,
        target_modules=list(options.target_modules or default_targets(model)),
        bias="none",
        task_type="SEQ_2_SEQ_LM" if is_seq2seq(model) else "CAUSAL_LM",
    )


def wrap_with_lora(model: torch.nn.Module, config: LoraConfig, adapter_name: str = "default") -> PeftModel:
    """Freeze the base model and add one trainable LoRA adapter (PEFT's standard init:
    Kaiming-uniform A, zero B, so the wrapped model starts as the base model)."""
    for parameter in model.parameters():
        parameter.requires_grad_(False)
    return get_peft_model(model, config, adapter_name=adapter_name)


def lora_layers(model: torch.nn.Module):
    """(name, PEFT LoRA layer) for every adapted module."""
    from peft.tuners.lora import LoraLayer

    return [(name, module) for name, module in model.named_modules() if isinstance(module, LoraLayer)]


def save_adapter_tensors(model: PeftModel, directory: Path, adapter_name: str = "default") -> None:
    """A stock PEFT adapter folder (adapter_config.json + adapter_model.safetensors)."""
    tensors = get_peft_model_state_dict(model, adapter_name=adapter_name)
    save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, str(directory / "adapter_model.safetensors"))
    config = model.peft_config[adapter_name].to_dict()
    config = {k: (sorted(v) if isinstance(v, set) else v) for k, v in config.items()}
    (directory / "adapter_config.json").write_text(json.dumps(config, indent=2, default=str))


def load_adapter_tensors(model: PeftModel, directory: Path, adapter_name: str = "default") -> None:
    tensors = load_file(str(directory / "adapter_model.safetensors"))
    result = set_peft_model_state_dict(model, tensors, adapter_name=adapter_name)
    unexpected = getattr(result, "unexpected_keys", [])
    if unexpected:
        raise UserError(f"{directory}: adapter holds unexpected tensors, e.g. {unexpected[0]}")
