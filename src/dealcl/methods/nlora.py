"""N-LoRA: IncLoRA plus an ℓ1 "non-collision" penalty on the new task's adapter (new_methods_spec.md §3).

Yang et al., "Is Parameter Collision Hindering Continual Learning in LLMs?", COLING 2025. The
released code (PKU-YuanGroup/N-LoRA@7301afe) is the O-LoRA repository with one change: in
`training_step` O-LoRA's orthogonality and L2 terms are *replaced* by an ℓ1 term (§3.1). So the
architecture is IncLoRA's (methods/olora.py: a fresh rank-8 PEFT adapter per task on q,v, the
earlier ones frozen and summed) and the loss per micro-batch is CE + λ1·R over the current
adapter's (A, B) pairs only; the old adapters are frozen and never enter R. No orthogonality term.

Two forms of R (§3.2, bug N-1), summed over the adapted modules, never normalised by their count:
- `paper` (default, the method as described): R = Σ_ℓ ‖B_ℓ A_ℓ‖₁, the entry-wise ℓ1 norm of the
  d_out×d_in update ΔW (times the LoRA scaling s = α/r with `include_scaling`). Any shape.
- `code` (the released code): R = Σ_ℓ ‖A_ℓ B_ℓ‖₁ on the r×r "loop" matrix, which only exists when
  d_in = d_out (T5 q,v; LLaMA-7B q,v). A target with d_in ≠ d_out (GQA v_proj of LLaMA-3,
  Qwen, SmolLM2) is refused when the method prepares the model, naming the module (N-2).

λ1 default 3e-4 (paper form). The shipped λ's (0.4 on T5 standard) are calibrated for the code
form; by the spec's scale estimate R_paper/R_code ≈ (d/r)^1.5, about 1.4·10³ for T5-large q,v
(d 1024, r 8), so 0.4 becomes ≈ 2.8·10⁻⁴, rounded to 3e-4. With `form=code` set λ1 yourself
(the recipes do: upstream's values with the code form). λ1 may vary per task (`task_overrides`,
upstream's order-4 script).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from peft.tuners.tuners_utils import check_target_module_exists

from ..errors import UserError
from ._lora import lora_config, lora_layers
from ..domains import non_negative, one_of, option
from .base import LoraOptions, Stage, register
from .olora import IncLora

NLORA_FORMS = ("paper", "code")


def l1_penalty(a: torch.Tensor, b: torch.Tensor, form: str = "paper", scaling: float = 1.0) -> torch.Tensor:
    """The ℓ1 term of one module (spec §3.2), in fp32 whatever the adapter's dtype.

    a: (r, d_in), PEFT's lora_A weight; b: (d_out, r), lora_B. "paper": scaling·Σ|(B A)_ij| over
    the d_out×d_in update; "code": Σ|(A B)_ij| over the r×r product, defined only when d_in = d_out
    (the released code had no scaling, so `scaling` does not apply to it)."""
    if form == "paper":
        return (b.float() @ a.float()).abs().sum() * scaling
    if form == "code":
        if a.shape[1] != b.shape[0]:
            raise UserError(f"method.form=code needs d_in = d_out (A·B of A {tuple(a.shape)} and B {tuple(b.shape)} "
                            "is undefined): use method.form=paper")
        return (a.float() @ b.float()).abs().sum()
    raise ValueError(f"unknown N-LoRA form {form!r}")


@dataclass
class NLoraConfig(LoraOptions):
    # Weight λ1 of the ℓ1 term (per task through task_overrides). 3e-4 suits the paper form on a
    # T5-large-sized q,v (module docstring); upstream's code-form values are 0.4-1.8 (T5).
    lambda1: float = option(3e-4, non_negative)
    form: str = option("paper", one_of(*NLORA_FORMS))  # paper: ‖B·A‖₁ on ΔW (default); code: the released r×r ‖A·B‖₁ (square targets only)
    include_scaling: bool = False  # paper form: penalise s·B·A (s = α/r), not B·A (the paper is silent)

    def validate(self) -> None:
        super().validate()
        if self.include_scaling and self.form == "code":
            raise UserError("method.include_scaling applies to the paper form only (the released code form has no scaling)")


@register
class NLora(IncLora):
    name = "nlora"
    description = "a new LoRA per task, earlier ones frozen and summed, ℓ1 penalty on the new adapter (‖BA‖₁)"
    paper = "Yang et al., Is Parameter Collision Hindering Continual Learning in LLMs?, COLING 2025"
    config_class = NLoraConfig
    per_task_options = ("lambda1",)  # upstream's order-4 script sets λ1 per task
    # IncLoRA's calibrated value for the same adapters (its own swept rate is not inherited).
    default_lr = 5e-4
    tuned_lrs = {}  # not swept yet

    def check_model(self, model: torch.nn.Module) -> None:
        if self.config.form != "code":
            return
        # N-2: refuse before the run directory or the reference stage exists, not inside the
        # first step. The targets are matched with PEFT's own rule, as the adapters will be.
        config = lora_config(model, self.config, self.default_rank, self.default_alpha)
        for name, layer in model.named_modules():
            if isinstance(layer, torch.nn.Linear) and check_target_module_exists(config, name):
                if layer.in_features != layer.out_features:
                    raise UserError(f"method.form=code needs square target modules (d_in = d_out), but {name} maps "
                                    f"{layer.in_features} → {layer.out_features}: use method.form=paper")

    def on_task_start(self, model: torch.nn.Module, stage: Stage) -> None:
        super().on_task_start(model, stage)  # pairs: (old A's, new A, new B) per module
        self.scalings = [float(layer.scaling[self.current]) for _, layer in lora_layers(model)]

    def extra_losses(self, model: torch.nn.Module, batch: dict[str, Any], answer_logits: torch.Tensor) -> dict[str, torch.Tensor]:
        if self.config.lambda1 == 0:  # exactly IncLoRA (no term, not a zero term)
            return {}
        return {"l1": self.config.lambda1 * self.l1_norm()}

    def l1_norm(self) -> torch.Tensor:
        """R = Σ over modules of the current adapter's ℓ1 term (the old adapters are not in it)."""
        form = self.config.form
        terms = [l1_penalty(a_new, b_new, form, scaling if self.config.include_scaling else 1.0)
                 for (_, a_new, b_new), scaling in zip(self.pairs, self.scalings)]
        return torch.stack(terms).sum()


__all__ = ["NLora", "NLoraConfig", "l1_penalty"]
