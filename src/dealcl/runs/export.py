"""`dealcl export RUN_DIR --to DIR`: the final model, for use outside dealcl.

- "adapter" methods (seqlora, inclora, olora, and the single-adapter baselines): one stock PEFT
  adapter folder. Methods whose per-task adapters are all active (inclora, olora) compute
  Σ_t s·B_t A_t with equal rank r and scale s = α/r; that sum is exactly one adapter of rank
  r·T with A stacked by rows, B by columns and α·T, so `PeftModel.from_pretrained` reproduces it.
- "merged" methods (gorp, seqft): full model weights (safetensors) with the adapters merged in.
- Others (deal's MLP, pertask's per-task adapters) cannot be taken out as one model: an error.
The tokenizer is written next to the weights either way; the folder is written atomically.
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

import torch
from peft.utils import get_peft_model_state_dict
from safetensors.torch import save_file

from ..errors import UserError
from .predict import load_final_model


def _summed_adapter(model, names: list[str]) -> tuple[dict[str, torch.Tensor], dict]:
    configs = [model.peft_config[n] for n in names]
    first = configs[0]
    if any(c.r != first.r or c.lora_alpha != first.lora_alpha or set(c.target_modules) != set(first.target_modules)
           for c in configs):
        raise UserError("the active adapters differ in rank, alpha or targets: they cannot be summed into one adapter")
    states = [get_peft_model_state_dict(model, adapter_name=n) for n in names]
    merged = {}
    for key in states[0]:
        parts = [s[key].detach().float().cpu() for s in states]
        if "lora_A" in key:
            merged[key] = torch.cat(parts, dim=0).contiguous()
        elif "lora_B" in key:
            merged[key] = torch.cat(parts, dim=1).contiguous()
        else:
            raise UserError(f"cannot sum adapter tensor {key}: only lora_A/lora_B are supported")
    config = first.to_dict()
    config.update(r=first.r * len(names), lora_alpha=first.lora_alpha * len(names))
    config = {k: (sorted(v) if isinstance(v, set) else v) for k, v in config.items()}
    return merged, config


def export_run(run_dir: Path, destination: Path) -> str:
    if destination.exists() and any(destination.iterdir()):
        raise UserError(f"{destination} exists and is not empty; choose another --to")
    final = load_final_model(Path(run_dir))
    method, model = final.method, final.model
    kind = type(method).export_as
    if kind is None:
        raise UserError(f"method '{method.name}' cannot be exported: {type(method).export_refusal}")
    destination.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{destination.name}.", suffix=".tmp", dir=destination.parent))
    try:
        if kind == "adapter":
            names = list(model.base_model.active_adapters)
            tensors, config = _summed_adapter(model, names)
            save_file(tensors, str(tmp / "adapter_model.safetensors"))
            (tmp / "adapter_config.json").write_text(json.dumps(config, indent=2, default=str))
        else:
            merged = model.merge_and_unload() if hasattr(model, "merge_and_unload") else model
            merged.save_pretrained(tmp, safe_serialization=True)
        final.prep.loaded.tokenizer.save_pretrained(tmp)
        if destination.exists():
            destination.rmdir()
        os.replace(tmp, destination)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return kind
