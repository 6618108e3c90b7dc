"""`dealcl export RUN_DIR --to DIR`: the final model, for use outside dealcl.

- "adapter" methods (seqlora, inclora, olora, and the single-adapter baselines): one stock PEFT
  adapter folder. Methods whose per-task adapters are all active (inclora, olora) compute
  Σ_t s·B_t A_t with equal rank r and scale s = α/r; that sum is exactly one adapter of rank
  r·T with A stacked by rows, B by columns and α·T, so `PeftModel.from_pretrained` reproduces it.
- "merged" methods (gorp, seqft): full model weights (safetensors) with the adapters merged in.
- "module" methods (deal, deal-code): the MLP between LoRA's A and B has a ReLU, so the model is
  neither one LoRA adapter nor mergeable (exactly) into linear weights. The folder holds the base
  model's weights (transformers' `from_pretrained`), the method's tensors and a loader file that
  needs only torch and safetensors (methods/_deal_loader.py, copied as deal_loader.py): the
  model plus one small module file, exact.
- Others (pertask's per-task adapters) cannot be taken out as one model: an error.
Every export also holds `dealcl_export.json`: the task list, each task's prompt template and
label set, and the answer rule, which is what a user needs to prompt the model.
The kind comes from the method class's `export_as` / `export_refusal`; a method that declares
neither (a user plugin) is classified from its model: only standard LoRA layers on the stock
architecture, all adapters active → "merged" (right whether or not the base weights were trained);
a plain model with the stock architecture → "merged"; anything else (extra modules) → refused.
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

from .. import __version__
from ..errors import UserError
from ..eval.generate import MAX_NEW_TOKENS
from ..methods.base import ContinualMethod
from ..prompts import format_prompt
from .paths import check_folder, writing
from .predict import FinalModel, load_final_model
from .store import atomic_write_json, follow_umask

PROMPTS_FILE = "dealcl_export.json"
SENTENCE = "{sentence}"  # where the input goes in a prompt template (replace it, do not str.format)


def _summed_adapter(model, names: list[str]) -> tuple[dict[str, torch.Tensor], dict]:
    configs = [model.peft_config[n] for n in names]
    first = configs[0]
    if any(c.r != first.r or c.lora_alpha != first.lora_alpha or set(c.target_modules) != set(first.target_modules)
           for c in configs):
        raise UserError("the active adapters differ in rank, alpha or targets: they cannot be summed into one adapter")
    if getattr(first, "use_dora", False) or first.rank_pattern or first.alpha_pattern:
        raise UserError("the adapters use DoRA or per-module ranks: they cannot be summed into one adapter")
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
    # Keep each task's scale: α/r with r → r·T needs α·T; rsLoRA's α/√r needs α·√T.
    factor = len(names) ** 0.5 if getattr(first, "use_rslora", False) else len(names)
    config.update(r=first.r * len(names), lora_alpha=first.lora_alpha * factor)
    config = {k: (sorted(v) if isinstance(v, set) else v) for k, v in config.items()}
    return merged, config


def _declares(cls: type, attribute: str) -> bool:
    return any(attribute in klass.__dict__ for klass in cls.__mro__ if klass is not ContinualMethod)


def _stock_names(model: torch.nn.Module) -> set[str] | None:
    """Parameter names of the plain transformers model of this architecture (built on meta)."""
    config = getattr(model, "config", None)
    if config is None:
        return None
    try:
        with torch.device("meta"):
            return {n for n, _ in type(model)(config).named_parameters()}
    except Exception:  # noqa: BLE001 (an architecture that cannot be rebuilt is not stock)
        return None


def export_kind(method, model: torch.nn.Module) -> tuple[str | None, str]:
    """("adapter" | "merged" | None, reason when None) for a method's final model."""
    cls = type(method)
    if _declares(cls, "export_as") or _declares(cls, "export_refusal"):
        return cls.export_as, cls.export_refusal
    from peft import PeftModel
    from peft.tuners.lora import LoraModel

    if isinstance(model, PeftModel):
        if not isinstance(model.base_model, LoraModel):
            return None, "its adapter is not a LoRA adapter"
        inner = model.base_model.model
        active = set(model.base_model.active_adapters)
        if set(model.peft_config) - active:
            return None, "some of its adapters are inactive (task-specific adapters): no single final model"
        names = {n.replace(".base_layer.", ".") for n, _ in inner.named_parameters() if ".lora_" not in n}
        if getattr(model, "modules_to_save", None):
            return None, "its adapter trains whole modules besides LoRA"
    else:
        inner = model
        names = {n for n, _ in model.named_parameters()}
    stock = _stock_names(inner)
    if stock is None or names != stock:
        return None, "its model holds modules besides standard LoRA layers and the stock weights"
    # Merged weights are right whether or not the method also changed the base weights; a plugin
    # that keeps them frozen can declare export_as = "adapter" for the smaller stock adapter.
    return "merged", ""


def export_record(final: FinalModel, kind: str, run_dir: Path) -> dict:
    """What a user needs to prompt the exported model as the run did (dealcl_export.json)."""
    prep, config = final.prep, final.prep.config
    return {
        "dealcl": __version__, "run": str(run_dir), "method": config.method, "kind": kind,
        "stage": {"index": final.stage.index, "name": final.stage.name},
        # What the run loaded (a hub id, folder or .gguf file), and the folder transformers read
        # it from (for a .gguf, dealcl's safetensors cache of it): the base an adapter goes on.
        "base_model": prep.loaded.source,
        "base_model_path": getattr(getattr(final.model, "config", None), "_name_or_path", None) or prep.loaded.source,
        "arch": prep.loaded.arch,
        "tasks": [t.name for t in prep.tasks],
        "prompt": {
            "style": config.prompt_style,
            "how": f"replace {SENTENCE} in the task's template by the input; with style 'chat' wrap the result as one "
                   "user turn of the tokenizer's chat template (add_generation_prompt=True). Over-long inputs: dealcl "
                   f"shortens only the sentence, to fit {config.max_source_length} tokens",
            "max_source_length": config.max_source_length,
        },
        "answer": {
            "mode": config.eval_mode,
            "rule": f"greedy decoding of up to {MAX_NEW_TOKENS} new tokens; the answer is correct when it equals a "
                    "label after lower-casing, removing ASCII punctuation and collapsing whitespace"
                    if config.eval_mode == "generate" else "the label with the highest likelihood",
            "max_new_tokens": MAX_NEW_TOKENS,
        },
        "per_task": {
            t.name: {"task_type": t.task_type, "labels": list(t.labels), "prompt_template": format_prompt(t, SENTENCE)}
            for t in prep.tasks
        },
    }


def export_run(run_dir: Path, destination: Path, stage: int | None = None) -> str:
    check_folder(destination, "--to", kind="export")
    final = load_final_model(Path(run_dir), stage)
    method, model = final.method, final.model
    kind, reason = export_kind(method, model)
    if kind is None:
        raise UserError(f"method '{method.name}' cannot be exported: {reason}")
    with writing(destination):
        return _write_export(final, kind, destination, Path(run_dir))


def _write_export(final, kind: str, destination: Path, run_dir: Path) -> str:
    """The folder, built under a temporary name and renamed into place."""
    model, method = final.model, final.method
    destination.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{destination.name}.", suffix=".tmp", dir=destination.parent))
    try:
        follow_umask(tmp, directory=True)
        record = export_record(final, kind, run_dir)
        if kind == "adapter":
            names = list(model.base_model.active_adapters)
            tensors, config = _summed_adapter(model, names)
            save_file(tensors, str(tmp / "adapter_model.safetensors"))
            (tmp / "adapter_config.json").write_text(json.dumps(config, indent=2, default=str))
        elif kind == "module":
            method.export_module(model, tmp)
            loader = Path(type(method).export_loader)
            shutil.copyfile(loader, tmp / loader.name.lstrip("_"))
            # The base weights without the adapter layers (the method keeps them frozen).
            base = model.unload() if hasattr(model, "unload") else model
            base.save_pretrained(tmp, safe_serialization=True)
        else:
            merged = model.merge_and_unload() if hasattr(model, "merge_and_unload") else model
            merged.save_pretrained(tmp, safe_serialization=True)
        final.prep.loaded.tokenizer.save_pretrained(tmp)
        atomic_write_json(tmp / PROMPTS_FILE, record)
        if destination.exists():
            destination.rmdir()
        os.replace(tmp, destination)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return kind
