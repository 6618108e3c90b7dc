"""GORP's optimizer: GaLore-projected Adam plus a GPM-style gradient-subspace memory.

Not a method (registers nothing): the math used by `gorp.py`, kept as small pure functions so
each can be tested on its own (gorp_olora_spec.md §3.3, §3.4, §3.9).

Conventions. A "memory" is a matrix M with orthonormal columns (never the dense MMᵀ, §6 W8).
`side="left"` means M spans directions of the row index (M ∈ ℝ^{m×k} for G ∈ ℝ^{m×n}), the
projection is G − M(MᵀG); `side="right"` means M spans the column index (M ∈ ℝ^{n×k}), the
projection is G − (GM)Mᵀ.
"""
from __future__ import annotations

import math
from typing import Iterable

import torch

# Relative slack on the energy threshold, so that a spectrum whose first k directions hold
# exactly τ of the energy (up to rounding) picks k, not k+1.
_ENERGY_SLACK = 1e-9


def energy_threshold_rank(singular_values: torch.Tensor, tau: float, already: float = 0.0) -> int:
    """The smallest k with `already` + Σ_{i≤k} σ_i² / Σσ² ≥ τ (§6 W5: one inclusive rule).

    The direction whose energy crosses τ is kept, so k ≥ 1 for any non-zero spectrum when
    `already` < τ; an all-zero spectrum gives k = 0. (Upstream counted the directions whose
    cumulative share is still below τ, so k = 0 whenever σ₁² ≥ τ·Σσ², §3.4.)"""
    s = singular_values.detach().double().flatten()
    energy = s.pow(2)
    total = float(energy.sum())
    if total <= 0.0:
        return 0
    return _rank_for(energy, total, tau, already)


def _rank_for(energy: torch.Tensor, total: float, tau: float, already: float) -> int:
    """Inclusive threshold on `energy` normalised by `total`, starting from `already` (the share
    an existing memory explains, for the GPM residual update where `total` is ‖F‖², not Σσ̂²)."""
    if already >= tau - _ENERGY_SLACK:
        return 0
    cumulative = already + torch.cumsum(energy, 0) / total
    reached = (cumulative >= tau - _ENERGY_SLACK).nonzero()
    if len(reached) == 0:  # rounding: the residual cannot reach τ; keep every non-zero direction
        return int((energy > 0).sum())
    return int(reached[0]) + 1


def extend_memory(M_old: torch.Tensor | None, F: torch.Tensor, tau: float) -> torch.Tensor:
    """GPM residual update of a left-side memory by the matrix F ∈ ℝ^{d×c} (§3.4, fixed).

    E = ‖F‖²; F̂ = F − M_old(M_oldᵀF); the part of E the old memory already explains counts
    towards τ, and the left singular vectors of F̂ are added by the inclusive rule of
    `energy_threshold_rank`. The new directions are re-orthonormalised against M_old (the
    upstream code concatenates without it) and the result has at most d columns. With no old
    memory this is plain thresholding of F's SVD. Returns float32 (M_old's dtype if given)."""
    d = F.shape[0]
    out_dtype = M_old.dtype if M_old is not None else torch.float32
    if M_old is None:
        old = torch.zeros(d, 0, dtype=torch.float64, device=F.device)
    else:
        old = M_old.to(device=F.device, dtype=torch.float64)
    f = F.detach().double()
    total = float(f.pow(2).sum())
    if total <= 0.0 or old.shape[1] >= d:
        return old.to(out_dtype)
    residual = f - old @ (old.T @ f)
    explained = max(0.0, (total - float(residual.pow(2).sum())) / total)
    U, S, _ = torch.linalg.svd(residual, full_matrices=False)
    k = _rank_for(S.pow(2), total, tau, explained)
    k = min(k, d - old.shape[1])
    if k == 0:
        return old.to(out_dtype)
    new = U[:, :k]
    # Re-orthonormalise: remove any rounding component along the old basis, then QR.
    for _ in range(2):
        new = new - old @ (old.T @ new)
    new, r = torch.linalg.qr(new)
    keep = r.diagonal().abs() > 1e-8
    new = new[:, keep]
    return torch.cat([old, new], dim=1).to(out_dtype)


def project_out(G: torch.Tensor, M: torch.Tensor | None, side: str = "left") -> torch.Tensor:
    """Remove from G its component in span(M): left G − M(MᵀG), right G − (GM)Mᵀ (§3.9 iv)."""
    if M is None or M.shape[1] == 0:
        return G
    M = M.to(device=G.device, dtype=G.dtype)
    if side == "left":
        return G - M @ (M.T @ G)
    if side == "right":
        return G - (G @ M) @ M.T
    raise ValueError(f"side must be 'left' or 'right', got {side!r}")


def galore_projector(grad: torch.Tensor, rank: int) -> tuple[str, torch.Tensor | None]:
    """(side, projector) from a thin SVD of the current gradient in fp32 (§3.3 step 1, §6 W9).

    m ≥ n: P = top-r rows of Vᵀ (r×n, right); otherwise Q = top-r columns of U (m×r, left).
    At full rank (r ≥ min(m, n)) the projection would be lossless, and we use the identity
    (side "full") so that projected Adam is exactly Adam (a deliberate deviation, see gorp.py)."""
    m, n = grad.shape
    if rank >= min(m, n):
        return "full", None
    U, _, Vh = torch.linalg.svd(grad.float(), full_matrices=False)
    if m >= n:
        return "right", Vh[:rank].to(grad.dtype).contiguous()
    return "left", U[:, :rank].to(grad.dtype).contiguous()


def to_low_rank(grad: torch.Tensor, side: str, P: torch.Tensor | None) -> torch.Tensor:
    if side == "right":
        return grad @ P.T  # (m×n)(n×r) → m×r
    if side == "left":
        return P.T @ grad  # (r×m)(m×n) → r×n
    return grad


def from_low_rank(low: torch.Tensor, side: str, P: torch.Tensor | None) -> torch.Tensor:
    if side == "right":
        return low @ P
    if side == "left":
        return P @ low
    return low


def full_space_moment(exp_avg: torch.Tensor, side: str, P: torch.Tensor | None) -> torch.Tensor:
    """A matrix whose column space and singular values equal those of the full-space first
    moment exp_avg·P (or Q·exp_avg). For the right projector P has orthonormal rows, so
    exp_avg (m×r) itself has the same left singular vectors and values as exp_avg·P: we skip
    the m×n product (11008×4096 on LLaMA-7B)."""
    if side == "right":
        return exp_avg
    return from_low_rank(exp_avg, side, P)


class ProjectedAdam(torch.optim.Optimizer):
    """HF-style Adam (§3.3: ε inside √v + ε, bias corrections folded into the step size) with
    three kinds of parameter groups, named by the group's `kind`:

    - "galore" (group G): the full gradient first loses its memory component in the output
      space (G ← G − M(MᵀG), M ∈ ℝ^{m×k}), then is projected to rank r by a projector refreshed
      by SVD every `gap` steps (including the first), Adam runs on the low-rank gradient with
      moments that are NOT reset when the projector changes (GaLore), and the normalised update
      is projected back and scaled by `scale`.
    - "lora_a" (group L): plain Adam on G(I − QQᵀ), Q ∈ ℝ^{d_in×k} the input-space memory.
    - "plain" (group R): plain Adam.

    `memory` maps a parameter to (M, side); parameters without an entry are not projected.
    """

    def __init__(self, groups: Iterable[dict], lr: float = 1e-3, betas=(0.9, 0.999), eps: float = 1e-6,
                 weight_decay: float = 0.0, memory: dict | None = None) -> None:
        defaults = dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, kind="plain", rank=8, gap=10, scale=1.0)
        super().__init__(list(groups), defaults)
        self.memory: dict[torch.Tensor, tuple[torch.Tensor, str]] = dict(memory or {})

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            beta1, beta2 = group["betas"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                grad = p.grad
                if grad.is_sparse:
                    raise RuntimeError("ProjectedAdam does not support sparse gradients")
                state = self.state[p]
                if "step" not in state:
                    state["step"] = 0
                kind = group["kind"]
                entry = self.memory.get(p)
                if entry is not None:
                    # Memory projection BEFORE Adam (§3.3 step 3; for G in the full output space).
                    grad = project_out(grad, entry[0], entry[1])
                if kind == "galore":
                    if state["step"] % group["gap"] == 0:
                        state["side"], state["projector"] = galore_projector(grad, group["rank"])
                    grad = to_low_rank(grad, state["side"], state["projector"])
                if "exp_avg" not in state:
                    state["exp_avg"] = torch.zeros_like(grad)
                    state["exp_avg_sq"] = torch.zeros_like(grad)
                exp_avg, exp_avg_sq = state["exp_avg"], state["exp_avg_sq"]
                exp_avg.mul_(beta1).add_(grad, alpha=1.0 - beta1)
                exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1.0 - beta2)
                state["step"] += 1
                t = state["step"]
                step_size = group["lr"] * math.sqrt(1.0 - beta2**t) / (1.0 - beta1**t)
                update = exp_avg / exp_avg_sq.sqrt().add_(group["eps"])
                if kind == "galore":
                    update = from_low_rank(update, state["side"], state["projector"]) * group["scale"]
                p.add_(update.to(p.dtype), alpha=-step_size)
                if group["weight_decay"] > 0.0:
                    p.add_(p, alpha=-group["lr"] * group["weight_decay"])
        return loss
