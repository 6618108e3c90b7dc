"""Load a DEAL export onto its base model with torch and safetensors only (no dealcl, no PEFT).

`dealcl export` of a `deal` or `deal-code` run copies this file into the export folder as
`deal_loader.py`, next to the base model's weights, `deal_adapter.safetensors` and
`deal_adapter.json`. DEAL's adaptive-update MLP sits between LoRA's A and B and has a ReLU, so
the adapter is neither a stock PEFT LoRA adapter nor mergeable into the linear weights; this
file rebuilds it exactly. Every adapted linear layer W becomes (deal_spec.md §1.5, PEFT's LoRA
forward)

    y = W x + s · B · g(A x),   s = alpha / r,
    g(z) = z + fc2(relu(fc1 z))   (deal: residual MLP)
    g(z) = fc2(relu(fc1 z))       (deal-code)
    g(z) = z                      (no MLP: a run whose only stage was plain LoRA)

with A the filtered LoRA-A after the last task (θ folded in). Use:

    import sys; sys.path.insert(0, EXPORT)           # the export folder
    from transformers import AutoModelForCausalLM    # (AutoModelForSeq2SeqLM for T5)
    from deal_loader import load_deal
    model = load_deal(AutoModelForCausalLM.from_pretrained(EXPORT), EXPORT)
"""
from __future__ import annotations

import json
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file

TENSORS = "deal_adapter.safetensors"
META = "deal_adapter.json"


class DealLinear(torch.nn.Module):
    """A frozen linear layer plus DEAL's adapter, computed as PEFT computes LoRA: the input cast
    to the adapter's dtype, the update added in the adapter's dtype, the sum cast back."""

    def __init__(self, base: torch.nn.Module, tensors: dict[str, torch.Tensor], scale: float, residual: bool) -> None:
        super().__init__()
        self.base_layer = base
        self.scale = scale
        self.residual = residual
        self.lora_A = torch.nn.Parameter(tensors["lora_A"], requires_grad=False)
        self.lora_B = torch.nn.Parameter(tensors["lora_B"], requires_grad=False)
        self.has_mlp = "mlp.fc1.weight" in tensors
        if self.has_mlp:
            for key in ("fc1.weight", "fc1.bias", "fc2.weight", "fc2.bias"):
                self.register_buffer("mlp_" + key.replace(".", "_"), tensors["mlp." + key])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        result = self.base_layer(x)
        z = F.linear(x.to(self.lora_A.dtype), self.lora_A)
        if self.has_mlp:
            hidden = F.linear(F.relu(F.linear(z, self.mlp_fc1_weight, self.mlp_fc1_bias)), self.mlp_fc2_weight, self.mlp_fc2_bias)
            z = z + hidden if self.residual else hidden
        return (result + F.linear(z, self.lora_B) * self.scale).to(result.dtype)


def load_deal(model: torch.nn.Module, folder: str | Path) -> torch.nn.Module:
    """`model` (the base model) with DEAL's adapter installed in every module the export names."""
    folder = Path(folder)
    meta = json.loads((folder / META).read_text(encoding="utf-8"))
    tensors = load_file(str(folder / TENSORS))
    for name, entry in meta["modules"].items():
        own = {key[len(name) + 1:]: value for key, value in tensors.items() if key.startswith(name + ".")}
        parent_name, _, attribute = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        base = getattr(parent, attribute)
        device = next(base.parameters()).device
        own = {key: value.to(device) for key, value in own.items()}
        setattr(parent, attribute, DealLinear(base, own, float(entry["scale"]), bool(meta["residual_mlp"])))
    return model.eval()
