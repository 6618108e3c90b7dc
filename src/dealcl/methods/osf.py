"""OSF: orthogonal subspace fine-tuning through PEFT's own `osf` tuner, task after task
(new_methods_spec.md §4).

Nayak et al., "Sculpting Subspaces: Constrained Full Fine-Tuning in LLMs for Continual
Learning", arXiv 2504.07097. Stock PEFT (`peft.tuners.osf`, peft ≥ 0.18; this checkout pins
0.21.2); nothing of the tuner is reimplemented. Per task t:

1. `on_task_start`: `get_peft_model(model, OSFConfig(target_modules=…, rank_pattern=…))` on the
   plain model. PEFT replaces every target `nn.Linear` in place by an OSF layer holding a thin
   SVD of the current weight W = U S Vᵀ: the top k_t triplets are frozen, the rest (U_low,
   S_low, V_low, PEFT's `osf_svd_params`) train, and PEFT's gradient hooks keep U_low's and
   V_low's gradients orthogonal to the frozen directions. Because PEFT injects in place, the
   model the driver holds (this method's `prepare_model` returns the plain model) trains,
   evaluates and counts parameters through the OSF layers; the PeftModel wrapper is only kept
   here to merge. PEFT marks only `osf_svd_params` trainable.
2. Training: plain CE, AdamW over those parameters (the loop's default), or with
   `strict_orthogonal` an AdamW that re-projects U_low and V_low off the frozen directions after
   every step: Adam's elementwise normalisation of the projected gradient otherwise makes the
   preservation approximate (spec O-4). Not in PEFT; off by default.
3. `on_task_end`: `merge_and_unload()`, which writes W + ΔW into every base weight and puts the
   plain `nn.Linear`s back. Not `unload()` (spec O-1): it drops the OSF layers without writing
   anything, because PEFT's forward is base(x) + ΔW x and the base weight is never trained, so
   every task would start from the pretrained weights again. The next task's SVD is taken of
   the merged weights: nothing but the weights is carried.

Schedule (§4.4): k_t = max(1, ⌊q·(t−1)/T⌋) frozen directions at task t of T for a module with
q = min(d_out, d_in), i.e. a frozen fraction max(1/q, (t−1)/T); PEFT cannot freeze 0 (k = 0
raises), so task 1 freezes the top direction. `effective_ranks` gives one value per task instead:
a value in (0, 1) is a fraction of each module's q (k = ⌊q·v⌋, as PEFT truncates), a whole
number ≥ 1 an absolute k. Every k is resolved here and given to PEFT per module (`rank_pattern`
with the exact module name), so PEFT's traps cannot bite (§4.3, O-5): a float 1.0 meaning "all of
q" in PEFT is not expressible (values ≥ 1 are ranks), and a k that freezes every direction of a
module (k ≥ q: nothing would train) or rounds to 0 is refused with the module named.

Targets (O-2: PEFT has no T5 entry and falls back to every linear layer, lm_head included):
LLaMA-family q,k,v,o,gate,up,down (PEFT's own map, which also covers Mistral/Qwen/Gemma); T5
q,k,v,o and the feed-forward wi / wi_0 / wi_1 and wo. Never the output layer.

Precision (O-3): PEFT stores the SVD factors in the weight's dtype. With bf16 base weights
(`model_dtype=bf16`) the trained factors and the ΔW they make would be bf16 and ΔW ≠ 0 at the
start. Each target weight is therefore lifted to fp32 while PEFT decomposes it (exact: bf16 → fp32
loses nothing) and put back afterwards, so the factors and ΔW are fp32 and the base weight keeps
the model's dtype; the merge then rounds W + ΔW to that dtype once per task. With the default
fp32 weights nothing is cast.

Checkpoints: the merged weights of the target modules (`osf_weights.safetensors`, bit-exact) and
`osf_state.json` (stage, targets, the ranks used); a resume rebuilds the next task's SVD from them.
"""
from __future__ import annotations

import json
import logging
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from ..data.types import Task
from ..errors import UserError
from ._lora import model_type
from ..domains import Domain, non_empty, option
from .base import ContinualMethod, MethodConfig, Stage, register


class FrozenRanks(Domain):
    """One frozen rank per task: a fraction in (0, 1) of each module's q, or a whole number ≥ 1
    of directions (PEFT's `effective_rank`; 0 and 1.0-as-everything are refused, spec O-5)."""

    @property
    def requirement(self) -> str:  # type: ignore[override]
        return "list, per task, a fraction in (0, 1) or a whole number >= 1 of frozen directions"

    def contains(self, value: Any) -> bool:
        return isinstance(value, list) and bool(value) and all(
            isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) and v > 0
            and (v < 1 or v == int(v)) for v in value)

log = logging.getLogger("dealcl")

# Explicit targets per architecture (module-name suffixes). T5 v1.0 has `wi`, v1.1/flan `wi_0`/`wi_1`.
OSF_TARGETS = {
    "llama": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
    "t5": ["q", "k", "v", "o", "wi", "wi_0", "wi_1", "wo"],
    "mt5": ["q", "k", "v", "o", "wi", "wi_0", "wi_1", "wo"],
}
WEIGHTS_FILE = "osf_weights.safetensors"
STATE_FILE = "osf_state.json"
ADAPTER = "default"


@dataclass
class OsfConfig(MethodConfig):
    # Module-name suffixes of the linear layers OSF fine-tunes; None: the architecture's (above).
    target_modules: list[str] | None = option(None, non_empty)
    # Frozen (preserved) rank per task, one value per task: in (0, 1) a fraction of each module's
    # q = min(d_out, d_in), ≥ 1 a whole number of directions. None: max(1, ⌊q·(t−1)/T⌋).
    effective_ranks: list[float] | None = option(None, FrozenRanks())
    # Re-project U_low, V_low off the frozen directions after every optimizer step (exact
    # preservation under Adam; not in PEFT).
    strict_orthogonal: bool = False


def frozen_rank(value: float, q: int) -> int:
    """k for one module from a schedule value: a fraction in (0, 1) of q truncated as PEFT does
    (int(q·f)), or a whole number of directions."""
    return int(q * value) if value < 1 else int(value)


def scheduled_rank(q: int, task: int, tasks: int) -> int:
    """The default schedule (spec §4.4): freeze ⌊q·(t−1)/T⌋ directions, at least 1."""
    return max(1, q * (task - 1) // tasks)


def project_off_preserved(layer: torch.nn.Module, adapter: str = ADAPTER) -> None:
    """Put U_low and V_low of one PEFT OSF layer back in the complements of the frozen U_high,
    V_high: U ← (I − U_h U_hᵀ)U, V ← V(I − V_hᵀV_h) (the projection PEFT's hooks apply to the
    gradients, here to the parameters). PEFT stores U_high / V_high only where the factor is not
    square; otherwise the complement is spanned exactly by the initial U_low / V_low."""
    params = layer.osf_svd_params[adapter]
    with torch.no_grad():
        u, v = params["U_low"], params["V_low"]
        if adapter in layer._osf_U_high:
            u_high = layer._osf_U_high[adapter].to(u.dtype)
            u.sub_(u_high @ (u_high.T @ u))
        else:
            u_init = layer._osf_U_low_init[adapter].to(u.dtype)
            u.copy_(u_init @ (u_init.T @ u))
        if adapter in layer._osf_V_high:
            v_high = layer._osf_V_high[adapter].to(v.dtype)
            v.sub_((v @ v_high.T) @ v_high)
        else:
            v_init = layer._osf_V_low_init[adapter].to(v.dtype)
            v.copy_((v @ v_init.T) @ v_init)


class OrthogonalAdamW(torch.optim.AdamW):
    """AdamW whose every step ends by re-projecting each OSF layer's U_low, V_low (strict_orthogonal)."""

    def __init__(self, params, layers: list[torch.nn.Module], **kwargs) -> None:
        super().__init__(params, **kwargs)
        self.osf_layers = layers

    def step(self, closure=None):
        loss = super().step(closure)
        for layer in self.osf_layers:
            project_off_preserved(layer)
        return loss


def osf_layers(model: torch.nn.Module) -> list[tuple[str, torch.nn.Module]]:
    """(name, PEFT OSF layer) for every module OSF wraps right now."""
    from peft.tuners.osf import OSFLayer

    return [(name, module) for name, module in model.named_modules() if isinstance(module, OSFLayer)]


@register
class Osf(ContinualMethod):
    name = "osf"
    description = "orthogonal subspace fine-tuning (PEFT's osf): top singular directions frozen, the rest trained, merged per task"
    paper = "Nayak et al., Sculpting Subspaces: Constrained Full Fine-Tuning in LLMs for Continual Learning, 2025"
    config_class = OsfConfig
    export_as = "merged"  # the model is plain after every task: its weights are the merged ones
    fsdp_refusal = "it trains (an SVD reparametrisation of) the base weights, and FSDP in dealcl shards frozen weights only"
    # PEFT's example (Llama-3.1-8B, spec §4.5): full-size fine-tuning of the targets, so a full
    # fine-tuning rate. Not swept.
    default_lr = 5e-6

    def __init__(self, config: OsfConfig, services) -> None:
        super().__init__(config, services)
        self.targets: list[str] = []  # full names of the target linear modules in the plain model
        self.total_tasks: int | None = None
        self.ranks: dict[str, int] = {}  # the frozen rank k of each target in the current (last) task
        self.stage_index = 0
        self._peft = None  # PEFT's wrapper during a task (merged and dropped at its end)

    # ---- structure ---------------------------------------------------------------------------
    def stages(self, tasks: list[Task]) -> list[Stage]:
        stages = super().stages(tasks)
        self.total_tasks = len(stages)
        ranks = self.config.effective_ranks
        if ranks is not None and len(ranks) != len(stages):
            raise UserError(f"method.effective_ranks gives {len(ranks)} values for {len(stages)} tasks: give one per task")
        return stages

    def target_suffixes(self, model: torch.nn.Module) -> list[str]:
        if self.config.target_modules is not None:
            return list(self.config.target_modules)
        kind = model_type(model)
        if kind in OSF_TARGETS:
            return OSF_TARGETS[kind]
        from peft.utils.constants import TRANSFORMERS_MODELS_TO_OSF_TARGET_MODULES_MAPPING

        if kind in TRANSFORMERS_MODELS_TO_OSF_TARGET_MODULES_MAPPING:
            return list(TRANSFORMERS_MODELS_TO_OSF_TARGET_MODULES_MAPPING[kind])
        raise UserError(f"osf has no default target modules for model type '{kind}': set method.target_modules")

    def find_targets(self, model: torch.nn.Module) -> list[str]:
        suffixes = set(self.target_suffixes(model))
        output = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
        names = []
        for name, module in model.named_modules():
            if name.rsplit(".", 1)[-1] not in suffixes or not isinstance(module, torch.nn.Linear):
                continue
            if module is output:
                raise UserError(f"osf does not fine-tune the output layer ({name}): remove it from method.target_modules")
            names.append(name)
        if not names:
            raise UserError(f"method.target_modules {sorted(suffixes)} match no linear module of this model")
        return names

    def prepare_model(self, model: torch.nn.Module) -> torch.nn.Module:
        # The plain model: OSF layers come and go per task (injected in place, merged at its end).
        for parameter in model.parameters():
            parameter.requires_grad_(False)
        self.targets = self.find_targets(model)
        return model

    # ---- per task ----------------------------------------------------------------------------
    def frozen_ranks(self, model: torch.nn.Module, task: int) -> dict[str, int]:
        """k of every target at task `task` (1-based), checked: 1 ≤ k < q."""
        if self.total_tasks is None:
            raise RuntimeError("osf: stages() must be called before the first task (it fixes T for the schedule)")
        modules = dict(model.named_modules())
        value = None if self.config.effective_ranks is None else self.config.effective_ranks[task - 1]
        ranks = {}
        for name in self.targets:
            q = min(modules[name].weight.shape)
            k = scheduled_rank(q, task, self.total_tasks) if value is None else frozen_rank(value, q)
            if k < 1:
                raise UserError(f"method.effective_ranks[{task}] = {value:g} freezes no direction of {name} (q = {q}); "
                                "PEFT needs at least one: use a larger fraction or a whole number")
            if k >= q:
                where = f"method.effective_ranks[{task}] = {value:g}" if value is not None else f"the schedule at task {task}"
                raise UserError(f"{where} freezes all {q} directions of {name} (k = {k}): nothing would train; "
                                "choose a smaller value")
            ranks[name] = k
        return ranks

    def on_task_start(self, model: torch.nn.Module, stage: Stage) -> None:
        from peft import OSFConfig, get_peft_model

        if self._peft is not None:
            raise RuntimeError("osf: a task started while the previous one is still wrapped (on_task_end not called)")
        self.ranks = self.frozen_ranks(model, stage.index)
        self.stage_index = stage.index
        modules = dict(model.named_modules())
        lowered = {}
        for name in self.targets:  # O-3: factors in fp32 whatever the stored dtype
            weight = modules[name].weight
            if weight.dtype != torch.float32:
                lowered[name] = weight.dtype
                weight.data = weight.data.float()
        config = OSFConfig(target_modules=list(self.targets), effective_rank=min(self.ranks.values()),
                           rank_pattern={f"^{re.escape(name)}$": k for name, k in self.ranks.items()})
        self._peft = get_peft_model(model, config, adapter_name=ADAPTER)
        layers = dict(osf_layers(model))
        for layer in layers.values():
            # PEFT's OSF layer never sets the flag its own `disable_input_dtype_casting` reads
            # (LoRA's does; peft 0.21.2), and the loop uses that helper under bf16: set PEFT's
            # default (cast on) so the helper can switch it off and back.
            if not hasattr(layer, "cast_input_dtype_enabled"):
                layer.cast_input_dtype_enabled = True
        for name, dtype in lowered.items():
            base = layers[name].get_base_layer()
            base.weight.data = base.weight.data.to(dtype)
        trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
        log.info("osf stage %d: %d modules, frozen rank min %d max %d, %d trainable", stage.index, len(layers),
                 min(self.ranks.values()), max(self.ranks.values()), trainable)

    def build_optimizer(self, model: torch.nn.Module, lr: float) -> torch.optim.Optimizer:
        params = self.trainable_parameters(model)
        if self.config.strict_orthogonal:
            return OrthogonalAdamW(params, [layer for _, layer in osf_layers(model)], lr=lr, weight_decay=0.0)
        return torch.optim.AdamW(params, lr=lr, weight_decay=0.0)

    def on_task_end(self, model: torch.nn.Module, stage: Stage) -> None:
        if self._peft is None:
            return
        # O-1: merge_and_unload writes W + ΔW into the base weights; unload() would discard the task.
        merged = self._peft.merge_and_unload()
        if merged is not model:
            raise RuntimeError("PEFT's merge_and_unload returned another model than the one it wrapped in place")
        self._peft = None
        if "peft_config" in model.__dict__:  # BaseTuner's marker on the wrapped model; the next wrap starts clean
            del model.peft_config
        for parameter in model.parameters():
            parameter.requires_grad_(False)

    # ---- checkpoints -------------------------------------------------------------------------
    def save_state(self, model: torch.nn.Module, directory: Path) -> None:
        modules = dict(model.named_modules())
        save_file({f"{n}.weight": modules[n].weight.detach().contiguous().cpu() for n in self.targets},
                  str(directory / WEIGHTS_FILE))
        state = {"stage": self.stage_index, "targets": self.targets, "frozen_ranks": self.ranks,
                 "effective_ranks": self.config.effective_ranks, "tasks": self.total_tasks}
        (directory / STATE_FILE).write_text(json.dumps(state, indent=2))

    def load_state(self, model: torch.nn.Module, directory: Path, stage: Stage) -> None:
        path, meta = directory / WEIGHTS_FILE, directory / STATE_FILE
        if not path.is_file() or not meta.is_file():
            raise UserError(f"{directory}: no {WEIGHTS_FILE} / {STATE_FILE} (not a checkpoint of method osf)")
        state: dict[str, Any] = json.loads(meta.read_text())
        if state["targets"] != self.targets:
            raise UserError(f"{directory}: its target modules differ from this run's method.target_modules")
        tensors = load_file(str(path))
        modules = dict(model.named_modules())
        with torch.no_grad():
            for name in self.targets:
                weight, saved = modules[name].weight, tensors[f"{name}.weight"]
                if weight.shape != saved.shape:
                    raise UserError(f"{directory}: {name} has shape {tuple(saved.shape)}, the model {tuple(weight.shape)}")
                weight.copy_(saved.to(weight.dtype))
        self.stage_index = stage.index
        self.ranks = {k: int(v) for k, v in state["frozen_ranks"].items()}


__all__ = ["Osf", "OsfConfig", "OrthogonalAdamW", "frozen_rank", "osf_layers", "project_off_preserved", "scheduled_rank"]
