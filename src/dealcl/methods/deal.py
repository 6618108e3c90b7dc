"""DEAL (Han, Zhao et al., NeurIPS 2025): continual LoRA with a wavelet knowledge-retention filter
on LoRA-A and a small adaptive-update MLP on the rank-r activations.

Two methods share this module (deal_spec.md §1, §6, §7):

* `deal` — the released code's structure with its bugs fixed (deal_spec.md §6, §7):
    task 1 is plain PEFT LoRA on q,v; from task 2 every LoRA-A goes through the Haar retention
    filter (learnable gain θ on the 2×2-block means of A, §1.4) and a residual, zero-initialised
    MLP (r → h → r, token-wise on the activations, §1.5). B is frozen unless `update_b=true`. The ℓp
    regulariser (§1.7) is really applied. At task end θ is folded into A and reset to 1; the MLP
    is carried into the next task and keeps training, so the model evaluated after task t is
    exactly the model task t+1 starts from.
* `deal-code` — the released code's behaviour (§1.2–1.9): a fresh Kaiming MLP (non-residual) and
    θ = 1 at each task ≥ 2, the filtered A carried, B frozen after task 1, regulariser off by
    default, and the A-gradient accumulation bug (§1.8) behind `accumulate_a_grad_bug=true`.
    The model evaluated after task t (with MLP_t) is NOT the model task t+1 starts from.

Deviations from the upstream code are listed in docs/METHODS.md (and in the report of the
session that wrote this file); the main ones are commented where the code differs.
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from ..domains import at_least, dimension, non_negative, option
from ..errors import UserError
from .base import ContinualMethod, LoraOptions, Stage, register
from ._lora import lora_config, lora_layers, wrap_with_lora

ADAPTER = "default"
STATE_FILE = "deal_state.safetensors"
META_FILE = "deal_state.json"


# ---- the knowledge-retention filter (deal_spec.md §1.4) ---------------------------------------
def theta_shape(rank: int, d_in: int) -> tuple[int, int]:
    """Shape of the gain θ: one value per 2×2 block of A (= the Haar approximation band)."""
    return (math.ceil(rank / 2), math.ceil(d_in / 2))


def _block_sum(x: torch.Tensor) -> torch.Tensor:
    """Sum over every 2×2 block of a 2-D tensor; ragged last row/column blocks sum what exists."""
    r, d = x.shape
    padded = F.pad(x, (0, d % 2, 0, r % 2))  # zero-pad to even sizes: adds nothing to the sums
    R, D = padded.shape
    return padded.reshape(R // 2, 2, D // 2, 2).sum(dim=(1, 3))


def _block_counts(r: int, d: int, like: torch.Tensor) -> torch.Tensor:
    """How many real entries each 2×2 block holds: 4 inside, 2 on a ragged edge, 1 in a ragged corner."""
    rows = torch.full((math.ceil(r / 2),), 2.0, dtype=like.dtype, device=like.device)
    cols = torch.full((math.ceil(d / 2),), 2.0, dtype=like.dtype, device=like.device)
    if r % 2:
        rows[-1] = 1.0
    if d % 2:
        cols[-1] = 1.0
    return rows[:, None] * cols[None, :]


def haar_retention_filter(A: torch.Tensor, theta: torch.Tensor, block_counts: torch.Tensor | None = None) -> torch.Tensor:
    """A_f = IDWT(θ ⊙ cA(A), cD(A)) of a one-level orthonormal 2-D Haar transform, in closed form.

    The Haar approximation coefficient of a 2×2 block is twice the block mean and the inverse
    spreads cA/2 back over the block, so scaling cA by θ adds (θ − 1)·mean to every entry of the
    block (deal_spec.md §1.4):  A_f[2i:2i+2, 2j:2j+2] = A_blk + (θ_ij − 1) · mean(A_blk).
    Details pass untouched; θ = 1 returns A bit for bit (A + 0·mean).

    Odd r or d_in (upstream breaks there, §1.4 caveat / §6.14): the ragged last row/column of blocks
    is treated as 1×2 / 2×1 / 1×1 blocks and θ acts on the mean of the entries that exist.
    Vectorised: one reshape-sum, no Python loop over blocks.
    """
    r, d = A.shape
    if theta.shape != theta_shape(r, d):
        raise ValueError(f"theta has shape {tuple(theta.shape)}, expected {theta_shape(r, d)} for A {tuple(A.shape)}")
    counts = block_counts if block_counts is not None else _block_counts(r, d, A)
    mean = _block_sum(A) / counts.to(A.dtype)
    shift = (theta.to(A.dtype) - 1) * mean  # [⌈r/2⌉, ⌈d/2⌉]
    R, D = shift.shape
    spread = shift[:, None, :, None].expand(R, 2, D, 2).reshape(2 * R, 2 * D)[:r, :d]
    return A + spread


# ---- the adaptive-update MLP (deal_spec.md §1.5) -----------------------------------------------
class UpdateMLP(torch.nn.Module):
    """fc1: r → h, ReLU, fc2: h → r, token-wise on the last dimension (works for any input rank).

    `residual=True` (`deal`): output z + fc2(relu(fc1 z)) with fc2 zero-initialised, so a new MLP
    is exactly the identity. `residual=False` (`deal-code`): output fc2(relu(fc1 z)) with both
    layers Kaiming-uniform and zero biases, as the released code (`mlp_init='kaiming'`)."""

    def __init__(self, rank: int, hidden: int, residual: bool, like: torch.Tensor,
                 generator: torch.Generator | None = None) -> None:
        super().__init__()
        self.residual = residual
        kwargs = dict(dtype=like.dtype, device=like.device)
        self.fc1 = torch.nn.Linear(rank, hidden, **kwargs)
        self.fc2 = torch.nn.Linear(hidden, rank, **kwargs)
        with torch.no_grad():
            for layer in (self.fc1, self.fc2):
                weight = torch.empty(layer.weight.shape, dtype=torch.float32)
                torch.nn.init.kaiming_uniform_(weight, nonlinearity="relu", generator=generator)
                layer.weight.copy_(weight)
                layer.bias.zero_()
            if residual:
                self.fc2.weight.zero_()

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        out = self.fc2(F.relu(self.fc1(z)))
        return z + out if self.residual else out


class DealLoraA(torch.nn.Module):
    """Stands in for PEFT's `lora_A[adapter]` Linear from task 2 on.

    A stays ONE proper Parameter named `weight` (PEFT reads `lora_A.weight.dtype`); the filtered
    A_f is computed functionally on every forward, never re-registered (fixes deal_spec.md §1.8,
    §6.3). Then the MLP runs on the rank-r activations."""

    def __init__(self, weight: torch.Tensor, mlp: UpdateMLP | None) -> None:
        super().__init__()
        self.out_features, self.in_features = weight.shape
        self.weight = torch.nn.Parameter(weight.detach().clone())
        ones = torch.ones(theta_shape(*weight.shape), dtype=weight.dtype, device=weight.device)
        self.theta = torch.nn.Parameter(ones)
        self.mlp = mlp
        # A constant of the shape, built once rather than on every forward.
        self.register_buffer("block_counts", _block_counts(*weight.shape, weight), persistent=False)

    def filtered_weight(self) -> torch.Tensor:
        return haar_retention_filter(self.weight, self.theta, self.block_counts)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        z = F.linear(x, self.filtered_weight())
        return self.mlp(z) if self.mlp is not None else z

    @torch.no_grad()
    def fold_theta(self) -> None:
        """A ← A_f(A, θ), θ ← 1: the function is unchanged bit for bit (θ = 1 adds exactly 0)."""
        self.weight.copy_(self.filtered_weight())
        self.theta.fill_(1.0)

    def mlp_parameters(self) -> list[torch.nn.Parameter]:
        return list(self.mlp.parameters()) if self.mlp is not None else []


# ---- options -----------------------------------------------------------------------------------
@dataclass
class DealConfig(LoraOptions):
    # LoRA shape (rank/alpha None → r 16 for T5, 32 for LLaMA-family, α 32, deal_spec.md §1.3).
    # Width of the update MLP; the hidden size is max(mlp_hidden, r // 2) as upstream (§1.5).
    mlp_hidden: int = option(128, dimension)
    # Train B from task 2 on as well (the paper's "both", Alg. 1 / Fig. 2a); upstream freezes B (§1.8).
    update_b: bool = False
    # Apply the ℓp regulariser λ1·‖θ‖_p1 + λ2·‖MLP‖_p2 per module, summed (§1.7; dead code upstream).
    regularize: bool = True
    # λ1, weight of the θ norm (upstream trainer default 0.01).
    lambda1: float = option(0.01, non_negative)
    # λ2, weight of the MLP-parameter norm (upstream 0.001).
    lambda2: float = option(0.001, non_negative)
    # p1, order of the θ norm (upstream `theta_norm_p` 10: nearly a max-norm).
    theta_norm_p: float = option(10.0, at_least(1))  # a norm: p >= 1
    # p2, order of the MLP norm (upstream `mlp_norm_p` 2).
    mlp_norm_p: float = option(2.0, at_least(1))
    # False: un-powered norms ‖·‖_p as the code writes them; True: ‖·‖_p^p as the paper writes (Eq. 12).
    reg_powered: bool = False


@dataclass
class DealCodeConfig(DealConfig):
    # The released code's regulariser never takes effect (deal_spec.md §1.7): off by default.
    regularize: bool = False
    # Reproduce §1.8: A's gradient is never zeroed (A gets the running sum of every gradient since
    # the task began) and A is left out of gradient clipping. Only for faithful reproduction.
    accumulate_a_grad_bug: bool = False


# ---- the methods -------------------------------------------------------------------------------
@register
class Deal(ContinualMethod):
    name = "deal"
    description = "DEAL, bugs fixed: Haar-gain filter on LoRA-A + carried residual MLP, ℓp regulariser, B frozen"
    paper = ("Han, Zhao et al., Data Efficient Adaptation in Large Language Models via Continuous Low-Rank "
             "Fine-Tuning, NeurIPS 2025 (arXiv:2509.18942)")
    config_class = DealConfig
    per_task_options = ("lambda1", "lambda2")
    # The adaptive-update MLP sits between A and B and has a ReLU: the model is neither a stock
    # LoRA adapter nor mergeable into linear weights. `dealcl export` writes the base model, this
    # method's tensors (`export_module`) and a standalone loader (torch + safetensors only).
    export_as = "module"
    export_loader = Path(__file__).with_name("_deal_loader.py")
    # Task 1 is plain LoRA, as SeqLoRA (calibrated at 5e-4 on smollm2-135m). From task 2 the MLP
    # starts as the exact identity (residual, fc2 = 0) and Adam's step size is lr-bound per
    # parameter, so the same lr trains θ and the MLP without a jump at the task boundary.
    # Upstream's 1e-5 (fp32, few hundred steps) barely moves a LoRA from B = 0 (deal_spec.md §6.15).
    default_lr = 5e-4
    tuned_lrs = {"smollm2-135m": 1e-3}  # dealcl sweep, docs/RESULTS.md (validation AA 54.5 vs 51.5 at 5e-4)
    default_alpha = 32.0
    # deal_spec.md §1.3: r 16 for T5, 32 for LLaMA.
    default_rank = {"seq2seq": 16, "causal": 32}
    residual_mlp = True   # deal: identity-initialised residual MLP carried across tasks (§6.4 b)
    fresh_mlp_each_task = False

    def __init__(self, config, services) -> None:
        super().__init__(config, services)
        self.wrappers: dict[str, DealLoraA] = {}   # module name → wrapper (from task 2 on)
        self.layers: dict[str, Any] = {}           # module name → PEFT LoraLayer
        self.tasks_done = 0
        self.grad_sums: dict[str, torch.Tensor] = {}  # deal-code bug: running sums of A's gradient

    # ---- shape ----------------------------------------------------------------------------------
    @property
    def rank(self) -> int:
        return self.config.rank or self.default_rank.get(self.services.arch, 32)

    @property
    def hidden(self) -> int:
        return max(self.config.mlp_hidden, self.rank // 2)  # upstream: max(128, r // 2) (§1.5)

    def prepare_model(self, model: torch.nn.Module) -> torch.nn.Module:
        alpha = self.config.alpha or self.default_alpha
        model = wrap_with_lora(model, lora_config(model, self.config, self.rank, alpha), adapter_name=ADAPTER)
        self.layers = dict(lora_layers(model))
        return model

    # ---- wrappers -------------------------------------------------------------------------------
    def _new_mlp(self, like: torch.Tensor, seed: int) -> UpdateMLP:
        # Seeded per (stage, module) so a resumed run builds the same MLPs as an uninterrupted one.
        generator = torch.Generator().manual_seed(seed)
        return UpdateMLP(self.rank, self.hidden, self.residual_mlp, like, generator)

    def _install_wrappers(self, stage_index: int) -> None:
        for k, (name, layer) in enumerate(self.layers.items()):
            plain = layer.lora_A[ADAPTER]
            weight = plain.weight
            mlp = self._new_mlp(weight, 1_000_003 * stage_index + k)
            wrapper = DealLoraA(weight, mlp)
            layer.lora_A[ADAPTER] = wrapper  # ModuleDict assignment: PEFT calls it in place of the Linear
            self.wrappers[name] = wrapper

    def _set_trainable(self, stage_index: int) -> None:
        for name, layer in self.layers.items():
            if not self.wrappers:  # task 1: plain LoRA, A and B train (§1.2)
                layer.lora_A[ADAPTER].weight.requires_grad_(True)
                layer.lora_B[ADAPTER].weight.requires_grad_(True)
                continue
            for p in self.wrappers[name].parameters():
                p.requires_grad_(True)
            layer.lora_B[ADAPTER].weight.requires_grad_(bool(self.config.update_b))

    # ---- hooks ----------------------------------------------------------------------------------
    def on_task_start(self, model: torch.nn.Module, stage: Stage) -> None:
        if stage.index >= 2:
            if not self.wrappers:
                self._install_wrappers(stage.index)
            elif self.fresh_mlp_each_task:
                # deal-code (§1.9): θ and MLP_t are dropped, the filtered A carried (θ was folded
                # at task end), a new θ = 1 and a new Kaiming MLP are created.
                for k, (name, wrapper) in enumerate(self.wrappers.items()):
                    wrapper.mlp = self._new_mlp(wrapper.weight, 1_000_003 * stage.index + k)
        self.grad_sums = {}
        self._set_trainable(stage.index)

    def _reproduces_a_grad_bug(self) -> bool:
        return bool(self.wrappers) and bool(getattr(self.config, "accumulate_a_grad_bug", False))

    def unclipped_parameters(self, model: torch.nn.Module) -> list[torch.nn.Parameter]:
        # §1.8: upstream's A is outside model.parameters(), so its clipping never sees it.
        return [w.weight for w in self.wrappers.values()] if self._reproduces_a_grad_bug() else []

    def regularizer(self) -> torch.Tensor:
        """Σ_modules λ1·‖θ‖_p1 + λ2·‖vec(MLP params)‖_p2 (deal_spec.md §1.7), in fp32.

        As the code defines it, the θ term penalises θ itself, not θ − 1: at θ = 1 it is
        λ1·n^(1/p1) per module, not zero (n = θ's size); its gradient pulls θ towards 0, the
        strongest on the largest |θ| at p1 = 10 (nearly a max-norm).

        Computed for all modules of one shape at once (stacked, one norm per row): the same
        sum as a loop over the 60 wrappers of a smollm2, in a handful of operations instead of
        several hundred per step."""
        c = self.config
        groups: dict[tuple, list[DealLoraA]] = {}
        for wrapper in self.wrappers.values():
            key = (tuple(wrapper.theta.shape), tuple(tuple(p.shape) for p in wrapper.mlp_parameters()))
            groups.setdefault(key, []).append(wrapper)

        def per_row_norm(rows: torch.Tensor, p: float) -> torch.Tensor:
            if c.reg_powered:
                return rows.abs().pow(p).sum(dim=1)
            return torch.linalg.vector_norm(rows, ord=p, dim=1)

        total = torch.zeros((), device=self.services.device)
        for group in groups.values():
            thetas = torch.stack([w.theta for w in group]).float().flatten(1)
            term = c.lambda1 * per_row_norm(thetas, c.theta_norm_p)
            mlps = [w.mlp_parameters() for w in group]
            if mlps[0]:
                flat = torch.cat([torch.stack([ps[k] for ps in mlps]).float().flatten(1) for k in range(len(mlps[0]))], dim=1)
                term = term + c.lambda2 * per_row_norm(flat, c.mlp_norm_p)
            total = total + term.sum().to(total.device)
        return total

    def extra_losses(self, model: torch.nn.Module, batch: dict[str, Any],
                     answer_logits: torch.Tensor) -> dict[str, torch.Tensor]:
        # Independent of the batch: the loop weights it by the micro-batch's share of the step's
        # answer tokens, so it counts exactly once per optimizer step.
        if not (self.wrappers and self.config.regularize):
            return {}
        return {"reg": self.regularizer()}

    def after_backward(self, model: torch.nn.Module) -> None:
        if not self._reproduces_a_grad_bug():
            return
        # deal_spec.md §1.8: upstream's raw A falls out of model.parameters() after the first
        # forward, so zero_grad never clears it and every step adds to it. Reproduced with a
        # running sum per A: this step's gradient (summed over ranks by the loop) is added, and A
        # steps on the whole sum.
        for name, wrapper in self.wrappers.items():
            grad = wrapper.weight.grad
            if grad is None:
                continue
            running = self.grad_sums.get(name)
            running = grad.detach().clone() if running is None else running + grad
            self.grad_sums[name] = running
            wrapper.weight.grad = running.clone()

    def on_task_end(self, model: torch.nn.Module, stage: Stage) -> None:
        # A ← A_f(A, θ) from the final parameters, θ ← 1: the function is unchanged (deal_spec
        # §1.9 carries A_f; upstream's copy is one optimizer step stale, not reproduced).
        for wrapper in self.wrappers.values():
            wrapper.fold_theta()
            wrapper.weight.grad = None
        self.grad_sums = {}
        self.tasks_done = stage.index

    # ---- export -------------------------------------------------------------------------------------
    def export_module(self, model: torch.nn.Module, directory: Path) -> None:
        """The adapter as `_deal_loader.py` rebuilds it on the plain base model: per module, the
        filtered A (θ applied), B, the MLP's weights, and PEFT's scale α/r."""
        prefix = "base_model.model."  # PeftModel → LoraModel → the transformers model
        tensors: dict[str, torch.Tensor] = {}
        modules = {}
        with torch.no_grad():
            for name, layer in self.layers.items():
                plain = name[len(prefix):] if name.startswith(prefix) else name
                wrapper = self.wrappers.get(name)
                a = wrapper.filtered_weight() if wrapper is not None else layer.lora_A[ADAPTER].weight
                tensors[f"{plain}.lora_A"] = a
                tensors[f"{plain}.lora_B"] = layer.lora_B[ADAPTER].weight
                if wrapper is not None and wrapper.mlp is not None:
                    for key, value in wrapper.mlp.state_dict().items():
                        tensors[f"{plain}.mlp.{key}"] = value
                modules[plain] = {"scale": float(layer.scaling[ADAPTER])}
        save_file({k: v.detach().float().contiguous().cpu() for k, v in tensors.items()}, str(directory / "deal_adapter.safetensors"))
        meta = {"method": self.name, "rank": self.rank, "mlp_hidden": self.hidden, "residual_mlp": self.residual_mlp,
                "modules": modules}
        (directory / "deal_adapter.json").write_text(json.dumps(meta, indent=2))

    # ---- checkpoints ----------------------------------------------------------------------------
    def save_state(self, model: torch.nn.Module, directory: Path) -> None:
        tensors: dict[str, torch.Tensor] = {}
        for name, layer in self.layers.items():
            tensors[f"{name}.lora_A"] = layer.lora_A[ADAPTER].weight
            tensors[f"{name}.lora_B"] = layer.lora_B[ADAPTER].weight
            wrapper = self.wrappers.get(name)
            if wrapper is not None:
                tensors[f"{name}.theta"] = wrapper.theta
                if wrapper.mlp is not None:
                    for key, value in wrapper.mlp.state_dict().items():
                        tensors[f"{name}.mlp.{key}"] = value
        save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, str(directory / STATE_FILE))
        meta = {"method": self.name, "tasks_done": self.tasks_done, "wrapped": bool(self.wrappers),
                "rank": self.rank, "mlp_hidden": self.hidden, "residual_mlp": self.residual_mlp,
                "modules": len(self.layers)}
        (directory / META_FILE).write_text(json.dumps(meta, indent=2))

    def load_state(self, model: torch.nn.Module, directory: Path, stage: Stage) -> None:
        meta = json.loads((directory / META_FILE).read_text())
        if meta.get("rank") != self.rank or meta.get("modules") != len(self.layers):
            raise UserError(f"{directory}: DEAL state of rank {meta.get('rank')} over {meta.get('modules')} modules "
                            f"does not match this model (rank {self.rank}, {len(self.layers)} modules)")
        tensors = load_file(str(directory / STATE_FILE))
        if meta["wrapped"] and not self.wrappers:
            self._install_wrappers(stage.index)  # rebuilt; every tensor is overwritten below
        expected = set()
        with torch.no_grad():
            for name, layer in self.layers.items():
                targets = {f"{name}.lora_A": layer.lora_A[ADAPTER].weight,
                           f"{name}.lora_B": layer.lora_B[ADAPTER].weight}
                wrapper = self.wrappers.get(name)
                if wrapper is not None:
                    targets[f"{name}.theta"] = wrapper.theta
                    for key, value in wrapper.mlp.state_dict().items():
                        targets[f"{name}.mlp.{key}"] = value
                for key, target in targets.items():
                    if key not in tensors:
                        raise UserError(f"{directory}: DEAL state lacks tensor {key}")
                    target.copy_(tensors[key])
                expected |= set(targets)
        unexpected = set(tensors) - expected
        if unexpected:
            raise UserError(f"{directory}: DEAL state holds unexpected tensors, e.g. {sorted(unexpected)[0]}")
        self.tasks_done = meta["tasks_done"]
        self.grad_sums = {}


@register
class DealCode(Deal):
    name = "deal-code"
    description = "DEAL as released: fresh Kaiming MLP and θ per task, dropped at task end; B frozen; regulariser off"
    paper = Deal.paper
    config_class = DealCodeConfig
    # Same lr as `deal` (and SeqLoRA) so the two modes compare at one setting; upstream's 1e-5
    # learns nothing on a few hundred examples (deal_spec.md §6.15).
    default_lr = 5e-4
    residual_mlp = False        # output = MLP(A_f x), Kaiming weights, zero biases (§1.5)
    fresh_mlp_each_task = True  # §1.9: MLP_t and θ dropped, the filtered A carried
