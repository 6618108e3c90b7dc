"""GPM subspace memory as InfLoRA and GainLoRA code it (new_methods_spec.md §1.3, §2.3).

Not a method (registers nothing): the memory math both `inflora.py` and `gainlora.py` use, as
small pure functions tested against the spec's hand values (§1.9), plus the covariance
collection and the safetensors files.

Conventions. A memory is an orthonormal basis M ∈ ℝ^{d×k} (stored, never the dense MMᵀ). With
`chunk` c > 1 the d inputs are split into c equal blocks and only the diagonal blocks of the
covariance are kept (upstream LLaMA: c = 4), so a memory is a list of c bases, one per block,
and projecting a row vector acts block by block: v ← v − (v_b M_b) M_bᵀ on every block b. This
is conservative (each block's old inputs are still annihilated) and what upstream does.

The thresholds are exactly as coded upstream, not GORP's inclusive rule (`_projected_adam.py`):
- the energy of a direction is λ² for the covariance's eigenvalue λ (`energy="squared"`, the
  code: an SVD of C itself, whose squared singular values are λ²), or λ (`energy="eigenvalue"`,
  equivalent to GPM on the representation matrix R, since σ_j(R)² = N·λ_j);
- after task 1 the direction that crosses ε is excluded, with a floor of one direction;
- after task t > 1 the crossing direction is included (the `while acc < ε` loop).
All decompositions run in float64 (upstream used CuPy SVDs); memories are stored in float32.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Callable

import torch
from safetensors.torch import load_file, save_file

from ..errors import UserError

ENERGIES = ("squared", "eigenvalue")
# Singular values below this share of the largest are zero (rounding of an exactly low-rank C):
# their vectors are arbitrary and must never enter a memory.
_ZERO_SHARE = 1e-12

Memory = list[torch.Tensor]  # one orthonormal basis [d_block, k_block] per chunk


def threshold_at(task_index: int, base: float, schedule_T: int) -> float:
    """ε_t = ε₀ + (1 − ε₀)(t − 1)/T (§1.3, upstream T = 15 hard-coded), capped at 1 for runs
    longer than T + 1 tasks (upstream never ran one)."""
    return min(1.0, base + (1.0 - base) * (task_index - 1) / schedule_T)


def _energy(values: torch.Tensor, energy: str) -> torch.Tensor:
    if energy == "squared":
        return values.pow(2)
    if energy == "eigenvalue":
        return values
    raise ValueError(f"energy must be one of {ENERGIES}, got {energy!r}")


def _spectrum(matrix: torch.Tensor, energy: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(left vectors, non-negative values) of a covariance-like matrix, values descending.

    "squared": the SVD of the matrix itself (upstream; for the residual C − MMᵀC this is not a
    symmetric matrix). "eigenvalue": the eigendecomposition of the symmetrised residual
    (I−P)C(I−P), whose eigenvalues are what GPM on the projected representations would see."""
    if energy == "squared":
        U, S, _ = torch.linalg.svd(matrix, full_matrices=False)
        return U, S
    values, vectors = torch.linalg.eigh((matrix + matrix.T) / 2)
    order = torch.argsort(values, descending=True)
    return vectors[:, order], values[order].clamp(min=0.0)


def initial_basis(covariance: torch.Tensor, eps: float, energy: str = "squared") -> torch.Tensor:
    """The memory after the first task (§1.3): k = max(1, #{j : Σ_{i≤j} ρ_i < ε}), M = U[:, :k].

    ρ_j = e_j / Σe with e the energies; the direction whose cumulative share crosses ε is left
    out (upstream comments the `+1` out). An all-zero covariance gives an empty memory."""
    C = covariance.detach().double()
    U, S = _spectrum(C, energy)
    e = _energy(S, energy)
    total = float(e.sum())
    if total <= 0.0:
        return torch.zeros(C.shape[0], 0, dtype=torch.float32)
    cumulative = torch.cumsum(e, 0) / total
    k = max(1, int((cumulative < eps).sum()))
    k = min(k, int((S > _ZERO_SHARE * S[0]).sum()))
    return U[:, :k].float().contiguous()


def extend_basis(basis: torch.Tensor, covariance: torch.Tensor, eps: float, energy: str = "squared") -> torch.Tensor:
    """The memory after a task t > 1 (§1.3).

    E = Σ e(S) for the spectrum S of C; Ĉ = C − MMᵀC ("eigenvalue": (I−P)C(I−P)); acc = (E −
    Σ e(Ŝ))/E, the share the old memory already explains; then while acc < ε the next residual
    direction is added (acc += e(Ŝ_j)/E). No re-orthonormalisation, as upstream: Û is
    orthogonal to M up to rounding. At most d columns; residual directions with a zero singular
    value are never added (their vectors are arbitrary)."""
    C = covariance.detach().double()
    M = basis.detach().double()
    d = C.shape[0]
    if M.shape[1] == 0:
        return initial_basis(covariance, eps, energy)
    _, S = _spectrum(C, energy)
    total = float(_energy(S, energy).sum())
    if total <= 0.0 or M.shape[1] >= d:
        return basis.float().contiguous()
    residual = C - M @ (M.T @ C)
    if energy == "eigenvalue":
        residual = residual - (residual @ M) @ M.T
    U_hat, S_hat = _spectrum(residual, energy)
    e_hat = _energy(S_hat, energy)
    accumulated = (total - float(e_hat.sum())) / total
    usable = int((S_hat > _ZERO_SHARE * max(float(S[0]), 1e-300)).sum())
    k = 0
    while accumulated < eps and k < min(usable, d - M.shape[1]):
        accumulated += float(e_hat[k]) / total
        k += 1
    if k == 0:
        return basis.float().contiguous()
    return torch.cat([M, U_hat[:, :k]], dim=1).float().contiguous()


def update_memory(memory: Memory | None, covariances: list[torch.Tensor], eps: float,
                  energy: str = "squared") -> Memory:
    """Block by block: `initial_basis` where a block has no memory yet, else `extend_basis`."""
    if memory is None:
        return [initial_basis(C, eps, energy) for C in covariances]
    return [extend_basis(M, C, eps, energy) for M, C in zip(memory, covariances)]


def memory_rank(memory: Memory | None) -> int:
    return 0 if memory is None else sum(int(M.shape[1]) for M in memory)


def project_rows(rows: torch.Tensor, memory: Memory | None) -> torch.Tensor:
    """rows − rows·P for the block-diagonal P of `memory` (rows: [..., d]): the part of every row
    vector orthogonal to the remembered input subspace. Computed in float64, returned in the
    rows' dtype."""
    if memory is None or all(M.shape[1] == 0 for M in memory):
        return rows
    x = rows.detach().double()
    blocks = x.split(memory[0].shape[0], dim=-1)
    out = []
    for block, M in zip(blocks, memory):
        if M.shape[1] == 0:
            out.append(block)
            continue
        M = M.to(device=block.device, dtype=torch.float64)
        out.append(block - (block @ M) @ M.T)
    return torch.cat(out, dim=-1).to(rows.dtype)


def blocks_of(d: int, chunk: int) -> int:
    """The block size for `chunk` blocks of a d-dimensional input (one clear error otherwise)."""
    if d % chunk:
        raise UserError(f"method.chunk={chunk} does not divide the input size {d} of an adapted module")
    return d // chunk


class RunningCovariance:
    """(1/N) Σ x xᵀ over the rows given so far, kept as `chunk` diagonal blocks in float64.

    Each batch's xᵀx is computed in float32 (the expensive part; exact enough for a mean of
    thousands of outer products) and summed in float64."""

    def __init__(self, d: int, chunk: int = 1, device: torch.device | str = "cpu") -> None:
        self.block = blocks_of(d, chunk)
        self.chunk = chunk
        self.sum = torch.zeros(chunk, self.block, self.block, dtype=torch.float64, device=device)
        self.count = 0

    def add(self, rows: torch.Tensor) -> None:
        """rows: [N, d], the vectors to count (masked tokens already removed)."""
        if rows.shape[0] == 0:
            return
        x = rows.detach().float().reshape(rows.shape[0], self.chunk, self.block).transpose(0, 1)
        self.sum += torch.bmm(x.transpose(1, 2), x).double()
        self.count += rows.shape[0]

    def blocks(self) -> list[torch.Tensor]:
        """The mean's diagonal blocks (zeros when nothing was counted), on the CPU."""
        mean = self.sum / max(self.count, 1)
        return [b.cpu() for b in mean.unbind(0)]


class InputCovariances:
    """Forward hooks collecting the running input covariance of named modules.

    `modules` maps a memory key to the module whose input defines it; `mask_for(key, x)` gives
    the [batch, tokens] boolean mask of the positions to count in that module's input x (None:
    every position), so padding can be left out (§1.8 I-4) or kept for parity. Use as a context
    manager around no-grad forwards; `covariances()` afterwards."""

    def __init__(self, modules: dict[str, torch.nn.Module], chunk: int,
                 mask_for: Callable[[str, torch.Tensor], torch.Tensor | None]) -> None:
        self.modules = modules
        self.chunk = chunk
        self.mask_for = mask_for
        self.running: dict[str, RunningCovariance] = {}
        self.handles: list = []

    def __enter__(self) -> "InputCovariances":
        for key, module in self.modules.items():
            self.handles.append(module.register_forward_hook(self._hook(key)))
        return self

    def __exit__(self, *exc) -> None:
        for handle in self.handles:
            handle.remove()
        self.handles = []

    def _hook(self, key: str):
        def collect(module, args, output):
            x = args[0]
            mask = self.mask_for(key, x)
            rows = x.reshape(-1, x.shape[-1]) if mask is None else x[mask.to(x.device).bool()]
            if key not in self.running:
                self.running[key] = RunningCovariance(x.shape[-1], self.chunk, x.device)
            self.running[key].add(rows)
        return collect

    def covariances(self) -> dict[str, list[torch.Tensor]]:
        return {key: running.blocks() for key, running in self.running.items()}


def save_memories(memories: dict[str, Memory], path: Path) -> dict[str, dict]:
    """Write every memory's non-empty blocks as `<key>/<block>` tensors; return what the json
    side records per key (block size and rank per block), so empty blocks need no tensor."""
    tensors = {}
    layout = {}
    for key, memory in memories.items():
        layout[key] = {"block": int(memory[0].shape[0]), "ranks": [int(M.shape[1]) for M in memory]}
        for b, M in enumerate(memory):
            if M.shape[1]:
                tensors[f"{key}/{b}"] = M.detach().float().contiguous().cpu()
    save_file(tensors, str(path))
    return layout


def load_memories(path: Path, layout: dict[str, dict]) -> dict[str, Memory]:
    """Inverse of `save_memories`, given the layout it returned."""
    tensors = load_file(str(path)) if path.is_file() else {}
    memories = {}
    for key, entry in layout.items():
        memories[key] = [tensors[f"{key}/{b}"] if k else torch.zeros(entry["block"], 0)
                         for b, k in enumerate(entry["ranks"])]
    return memories


def write_json(path: Path, data: dict) -> None:
    path.write_text(json.dumps(data, indent=2, sort_keys=True))
