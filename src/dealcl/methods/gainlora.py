"""GainLoRA(InfLoRA): InfLoRA branches, each weighted by its own task gate computed from the prompt.

Liang & Li, "Gated Integration of Low-Rank Adaptation for Continual Learning of Large Language
Models", NeurIPS 2025 (new_methods_spec.md §2; written from the spec, no upstream code read or
copied). The variant is GainLoRA on InfLoRA branches (`inflora.py`: A designed and frozen, B
trained, GPM memories of every adapted module's inputs).

Each module computes y = W₀x + s·Σ_{i≤t} a_i(x)·B_i A_i x, where task i's gate maps the prompt to
a_i ∈ [0, 1) (§2.2):
    p₀ = mean of the prompt tokens' input embeddings (prompt only, never the answer),
    p₁ = φ(W₁ p₀) (φ = SiLU for T5, the identity for LLaMA-family models, as upstream),
    p₂ = SiLU(W₂ p₁),   a_i = |2σ(4·cos(p₂, k_i)) − 1|.
The coefficients are computed once per forward from the prompt (T5: the encoder input, reused at
every decoding step; decoder-only: the prompt positions of the batch, or the prompt that
`generate` starts from) and multiply each `lora_B[task<i>]` output through a forward hook, so the
LoRA layers stay stock PEFT. The gates live in a `GateBank` module attached to the transformers
model (outside PEFT's layers), fp32, one `TaskGate` (W₁, W₂, k) per task.

Keeping a_t ≈ 0 on old tasks (§2.3): gate t starts as a copy of gate t−1 (W₁, W₂) with its key in
the complement of M², the memory of old p₂; every optimizer step's change of W₁, W₂, k is
projected onto the complements of M⁰ (old p₀), M¹ (old p₁), M² (old p₂), so by induction an old
input reaches the new key through exactly the old features, orthogonal to k_t. The memories grow
at task end by the same GPM rules as the LoRA memories (`_gpm.py`), with ε from `gate_threshold`.

Upstream bugs, fixed by default (docs/METHODS.md lists the reasons):
G-1 no test-set checkpoint selection; G-2 the pooled embedding is the true masked mean
(`pool=padded_mean`: upstream's division by the padded length); G-3 no row re-normalisation after
the projected step (`row_renorm=true`: upstream T5); G-4 the projection edits the fp32 values the
optimizer steps on (dealcl keeps adapters and gates in fp32; under bf16 model weights the loop's
fp32 master copy is what `step()` sees); G-5 both key inits (`key_init`) and both A designs
(`a_init`) with the latest author revision's as defaults; G-6 the running means use the right
counts, cross-attention v and padding as in InfLoRA (I-3, I-4); G-7 tests use |cos|.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from ..errors import UserError
from ..models import SHARES_PROMPT_PREFIX, unwrap
from ._gpm import (
    Memory, RunningCovariance, load_memories, memory_rank, project_rows, save_memories, threshold_at, update_memory,
    write_json,
)
from ._lora import is_seq2seq
from ..domains import dimension, in_range, one_of, option
from .base import Stage, TrainItem, register
from .inflora import InfLora, InfLoraConfig, log

POOLS = ("masked_mean", "padded_mean")
KEY_INITS = ("complement_random", "complement_top_eig")
ACTIVATIONS = ("silu", "none")
GATE_SHARPNESS = 4.0  # a = |2σ(4·cos) − 1| (§2.2)
GATE_FILE = "gainlora_gates.safetensors"
GATE_MEMORY_FILE = "gainlora_gate_memory.safetensors"
# Gate memories: M⁰ over p₀ (protects W₁), M¹ over p₁ (W₂), M² over p₂ (the key).
GATE_MEMORIES = ("input", "hidden", "output")


@dataclass
class GainLoraConfig(InfLoraConfig):
    # ε₀ of the gate memories' schedule (upstream --transthreshold 0.995).
    gate_threshold: float = option(0.995, in_range(0, 1, low_open=True))
    # Width h of the gate's hidden layer; None: 100 for T5, 50 for decoder-only models (upstream).
    gate_hidden: int | None = option(None, dimension)
    # Activation after W₁: silu or none; None: silu for T5, none for decoder-only (upstream).
    gate_first_activation: str | None = option(None, one_of(*ACTIVATIONS))
    # masked_mean: p₀ averages the real prompt tokens (fix of G-2); padded_mean: the masked sum
    # divided by the padded prompt width (upstream).
    pool: str = option("masked_mean", one_of(*POOLS))
    # Rescale each gate row to its unprojected post-step norm (upstream T5; breaks the
    # invariance the projection gives, G-3). Off by default.
    row_renorm: bool = False
    # The key of gate t: complement_random (a random direction orthogonal to M², the latest
    # author revision) or complement_top_eig (the top eigenvector of this task's p₂ covariance
    # projected off M², computed before training: the first release).
    key_init: str = option("complement_random", one_of(*KEY_INITS))


def gate_value(cosine: torch.Tensor) -> torch.Tensor:
    """f(c) = |2σ(4c) − 1| (§2.2): 0 at c = 0, symmetric in the sign of c."""
    return (2.0 * torch.sigmoid(GATE_SHARPNESS * cosine) - 1.0).abs()


def pool_prompt(embeddings: torch.Tensor, mask: torch.Tensor, pool: str = "masked_mean") -> torch.Tensor:
    """p₀ from [batch, tokens, d] embeddings and the [batch, tokens] prompt mask: the masked sum
    over the real count (masked_mean) or over the padded width (padded_mean, upstream G-2)."""
    m = mask.to(embeddings.dtype).unsqueeze(-1)
    total = (embeddings * m).sum(dim=1)
    if pool == "padded_mean":
        return total / embeddings.shape[1]
    return total / m.sum(dim=1).clamp(min=1.0)


def projected_update(old: torch.Tensor, new: torch.Tensor, memory: Memory | None, row_renorm: bool = False) -> torch.Tensor:
    """old + Δ(I − P) for the step's change Δ = new − old, P the memory's (block-diagonal)
    projector acting on the rows (§2.3). `row_renorm` then rescales every row to the norm it had
    after the unprojected step (upstream T5, G-3)."""
    projected = old + project_rows(new - old, memory)
    if not row_renorm:
        return projected
    target = new.norm(dim=-1, keepdim=True)
    current = projected.norm(dim=-1, keepdim=True)
    return projected * torch.where(current > 0, target / current.clamp(min=1e-30), torch.ones_like(current))


class TaskGate(torch.nn.Module):
    """One task's gate: W₁ ∈ ℝ^{h×d}, W₂ ∈ ℝ^{d×h}, key k ∈ ℝ^d, no biases (§2.2)."""

    def __init__(self, d: int, hidden: int, first_activation: str) -> None:
        super().__init__()
        self.w1 = torch.nn.Parameter(torch.zeros(hidden, d))
        self.w2 = torch.nn.Parameter(torch.zeros(d, hidden))
        self.key = torch.nn.Parameter(torch.zeros(d))
        self.first_activation = first_activation

    def features(self, p0: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        p1 = F.linear(p0, self.w1)
        if self.first_activation == "silu":
            p1 = F.silu(p1)
        return p1, F.silu(F.linear(p1, self.w2))

    def forward(self, p0: torch.Tensor) -> torch.Tensor:
        _, p2 = self.features(p0)
        cosine = F.cosine_similarity(p2, self.key.unsqueeze(0).expand_as(p2), dim=-1, eps=1e-8)
        return gate_value(cosine)


class GateBank(torch.nn.Module):
    """The tasks' gates, and the coefficients of the forward in progress ([batch, active])."""

    def __init__(self, d: int, hidden: int, first_activation: str, device: torch.device) -> None:
        super().__init__()
        self.d, self.hidden, self.first_activation, self.device = d, hidden, first_activation, device
        self.gates = torch.nn.ModuleList()
        self.active = 1
        self.coefficients: torch.Tensor | None = None

    def add_gate(self) -> TaskGate:
        gate = TaskGate(self.d, self.hidden, self.first_activation).to(self.device)
        self.gates.append(gate)
        return gate

    def compute(self, p0: torch.Tensor) -> None:
        with torch.autocast(device_type=p0.device.type, enabled=False):  # gates in fp32 always
            self.coefficients = torch.stack([gate(p0.float()) for gate in self.gates[: self.active]], dim=1)

    def coefficient(self, index: int, rows: int) -> torch.Tensor:
        """Task `index`'s (1-based) coefficient per row of an output with `rows` rows: the
        prompt's rows, repeated where the forward repeats them (beams, scored labels)."""
        if self.coefficients is None:
            raise RuntimeError("a gated LoRA branch ran before its gate coefficients were computed")
        values = self.coefficients[:, index - 1]
        if rows != values.shape[0]:
            if rows % values.shape[0]:
                raise RuntimeError(f"gate coefficients for {values.shape[0]} prompts, output of {rows} rows")
            values = values.repeat_interleave(rows // values.shape[0])
        return values


def gate_hook(bank: GateBank, index: int):
    """A forward hook for task `index`'s `lora_B`: its output times a_index, row by row."""
    def hook(module, args, output):
        a = bank.coefficient(index, output.shape[0]).to(output.dtype)
        return output * a.view(-1, *([1] * (output.dim() - 1)))
    return hook


class GateProjectedAdamW(torch.optim.AdamW):
    """AdamW whose step on each gate parameter is projected off that parameter's memory
    (§2.5 step 3): the values are snapshot, the inner step runs, the change is projected. The
    loop calls `step()` on fp32 values (adapters and gates are fp32; 16-bit weights step on the
    loop's fp32 master copies), so the projection is never overwritten (G-4)."""

    def __init__(self, params, lr: float, projected: list[tuple[torch.nn.Parameter, Memory | None]],
                 row_renorm: bool) -> None:
        super().__init__(params, lr=lr, weight_decay=0.0)
        self.projected = projected
        self.row_renorm = row_renorm

    @torch.no_grad()
    def step(self, closure=None):
        before = [p.detach().clone() for p, _ in self.projected]
        loss = super().step(closure)
        for (p, memory), old in zip(self.projected, before):
            p.copy_(projected_update(old, p.detach(), memory, self.row_renorm))
        return loss


@register
class GainLora(InfLora):
    name = "gainlora"
    description = "InfLoRA branches weighted by per-task gates on the prompt; gate updates kept off old tasks' features"
    paper = ("Liang & Li, Gated Integration of Low-Rank Adaptation for Continual Learning of Large Language Models, "
             "NeurIPS 2025")
    config_class = GainLoraConfig
    export_as = None
    export_refusal = "its branches are weighted by gates computed from each prompt: no single adapter or weight computes that"
    fsdp_refusal = "its gates read the input embeddings outside the model's sharded forward"
    # InfLoRA's rate: the branches are the same and upstream trains the gates at the LoRA's rate.
    default_lr = 1e-3
    init_offset = 720
    gate_offset = 740  # gate t draws W₁, W₂, k from services.generator(gate_offset + t)
    file_stem = "gainlora"

    def __init__(self, config: GainLoraConfig, services) -> None:
        super().__init__(config, services)
        self.bank: GateBank | None = None
        self.gate_memory: dict[str, Memory] = {}
        self.hooked: set[str] = set()  # adapters whose lora_B outputs are gated
        self._prompt_positions: tuple[torch.Tensor, torch.Tensor] | None = None  # (input_ids, prompt mask)
        self._lm: torch.nn.Module | None = None
        self._gate_memory_layout: dict = {}
        services.batch_observers.append(self._observe_batch)

    # ---- structure -----------------------------------------------------------------------------
    def prepare_model(self, model: torch.nn.Module) -> torch.nn.Module:
        wrapped = super().prepare_model(model)
        lm = unwrap(wrapped)
        self._lm = lm
        d = lm.get_input_embeddings().weight.shape[1]
        seq2seq = is_seq2seq(wrapped)
        hidden = self.config.gate_hidden or (100 if seq2seq else 50)
        activation = self.config.gate_first_activation or ("silu" if seq2seq else "none")
        self.bank = GateBank(d, hidden, activation, lm.get_input_embeddings().weight.device)
        lm.add_module("gainlora_gates", self.bank)
        # A row's states depend on its whole prompt (through the gates): never share a prefix.
        setattr(lm, SHARES_PROMPT_PREFIX, False)
        self._init_gate(self.bank.add_gate(), 1)
        self._gate_hooks(wrapped)
        if seq2seq:
            lm.get_encoder().register_forward_pre_hook(self._before_encoder, with_kwargs=True)
        else:
            lm.get_decoder().register_forward_pre_hook(self._before_decoder, with_kwargs=True)
        self._activate(wrapped, 1, "task1", self.extra_trainable(wrapped))
        return wrapped

    def adapter_modules(self, model: torch.nn.Module) -> set[torch.nn.Module]:
        return super().adapter_modules(model) | set(self.bank.modules())

    def _gate_hooks(self, model: torch.nn.Module) -> None:
        """Multiply every `lora_B[task<i>]` output by a_i (stock PEFT layers, one hook each)."""
        for index, adapter in enumerate(self.adapters.names, start=1):
            if adapter in self.hooked:
                continue
            for _, layer in self.lora_modules(model):
                layer.lora_B[adapter].register_forward_hook(gate_hook(self.bank, index))
            self.hooked.add(adapter)

    # ---- the gate input ------------------------------------------------------------------------
    def _pooled(self, input_ids: torch.Tensor, prompt_mask: torch.Tensor) -> torch.Tensor:
        embeddings = self._lm.get_input_embeddings()(input_ids).detach().float()
        if self.config.pool == "padded_mean":
            # Upstream divides by the padded prompt width: cut the columns no row's prompt uses.
            width = int(prompt_mask.any(dim=0).nonzero().max()) + 1 if prompt_mask.any() else 1
            first = int(prompt_mask.any(dim=0).nonzero().min()) if prompt_mask.any() else 0
            embeddings, prompt_mask = embeddings[:, first:width], prompt_mask[:, first:width]
        return pool_prompt(embeddings, prompt_mask, self.config.pool)

    @staticmethod
    def training_prompt_mask(batch: dict) -> torch.Tensor:
        """[batch, tokens] mask of the prompt positions of a training batch. Decoder-only: a row's
        first target position is its last prompt token (it predicts the first answer token);
        encoder-decoder: the source is the prompt."""
        if "labels" in batch:
            return batch["attention_mask"].bool()
        ids, rows, positions = batch["input_ids"], batch["target_rows"], batch["target_positions"]
        ends = torch.full((ids.shape[0],), ids.shape[1], dtype=torch.long, device=ids.device)
        ends = ends.scatter_reduce(0, rows.to(ids.device), positions.to(ids.device), reduce="amin") + 1
        columns = torch.arange(ids.shape[1], device=ids.device)
        return (columns.unsqueeze(0) < ends.unsqueeze(1)) & batch["attention_mask"].bool()

    def _observe_batch(self, batch: dict) -> None:
        if self.bank is not None and "labels" not in batch:
            self._prompt_positions = (batch["input_ids"], self.training_prompt_mask(batch))

    def _before_encoder(self, module, args, kwargs):
        ids = kwargs.get("input_ids", args[0] if args else None)
        mask = kwargs.get("attention_mask")
        self.bank.compute(self._pooled(ids, torch.ones_like(ids, dtype=torch.bool) if mask is None else mask.bool()))

    def _before_decoder(self, module, args, kwargs):
        # transformers renamed `past_key_values` to `cache` during 5.x: either may hold it.
        cache = kwargs.get("cache")
        if cache is None:
            cache = kwargs.get("past_key_values")
        if cache is not None and hasattr(cache, "get_seq_length") and cache.get_seq_length() > 0:
            return  # a decoding step: the gates of the prompt that filled the cache still hold
        ids = kwargs.get("input_ids", args[0] if args else None)
        known = self._prompt_positions
        if known is not None and known[0] is ids:
            prompt = known[1]  # a training batch: prompt + answer, only the prompt counts
        else:  # the first forward of generation or scoring: the input is the prompt
            mask = kwargs.get("attention_mask")
            prompt = torch.ones_like(ids, dtype=torch.bool) if mask is None or mask.dim() != 2 else mask.bool()
        self.bank.compute(self._pooled(ids, prompt))

    # ---- per task ------------------------------------------------------------------------------
    def _init_gate(self, gate: TaskGate, index: int) -> None:
        """Gate 1: PEFT/nn.Linear-style init (Kaiming-uniform W₁, W₂; key U(−1, 1)). Gate t > 1:
        W₁, W₂ copied from gate t−1, key a random direction orthogonal to M² with the norm of its
        U(−1, 1) draw (complement_random; complement_top_eig replaces its direction before
        training)."""
        generator = self.services.generator(self.gate_offset + index)
        with torch.no_grad():
            key = torch.empty(gate.key.shape).uniform_(-1.0, 1.0, generator=generator)
            if index == 1:
                for weight in (gate.w1, gate.w2):
                    fresh = torch.empty(weight.shape)
                    torch.nn.init.kaiming_uniform_(fresh, a=math.sqrt(5), generator=generator)
                    weight.copy_(fresh)
                gate.key.copy_(key)
                return
            previous = self.bank.gates[index - 2]
            gate.w1.copy_(previous.w1)
            gate.w2.copy_(previous.w2)
            direction = project_rows(torch.randn(gate.key.shape, generator=generator, dtype=torch.float64),
                                     self.gate_memory.get("output"))
            gate.key.copy_((direction / direction.norm().clamp(min=1e-300) * key.norm()).float())

    def add_task_structure(self, model: torch.nn.Module, stage: Stage) -> None:
        while len(self.bank.gates) < stage.index:
            gate = self.bank.add_gate()
            self._init_gate(gate, len(self.bank.gates))
        self.bank.active = stage.index
        self._gate_hooks(model)

    def extra_trainable(self, model: torch.nn.Module) -> tuple[torch.nn.Parameter, ...]:
        return tuple(self.bank.gates[self.bank.active - 1].parameters())

    def build_optimizer(self, model: torch.nn.Module, lr: float) -> torch.optim.Optimizer:
        gate = self.bank.gates[self.bank.active - 1]
        memory = self.gate_memory
        projected = [(gate.w1, memory.get("input")), (gate.w2, memory.get("hidden")), (gate.key, memory.get("output"))]
        projected = [(p, m) for p, m in projected if p.requires_grad and memory_rank(m) > 0]
        return GateProjectedAdamW(self.trainable_parameters(model), lr, projected, self.config.row_renorm)

    def before_training(self, model: torch.nn.Module, stage: Stage, items: list[TrainItem]) -> None:
        super().before_training(model, stage, items)
        if self.config.key_init == "complement_top_eig":
            self._key_from_task_features(model, items)

    def _prompt_pools(self, items: list[TrainItem]):
        for k, batch in enumerate(self.services.batches(items, self.config.memory_batch_size)):
            if k >= self.config.memory_batches:
                break
            yield self._pooled(batch["input_ids"], self.training_prompt_mask(batch))

    @torch.no_grad()
    def _key_from_task_features(self, model: torch.nn.Module, items: list[TrainItem]) -> None:
        """k_t = top left singular vector of (I − P²)C², C² the covariance of this task's p₂
        under the new gate (the first release, §2.3), with the key's current norm."""
        gate = self.bank.gates[self.bank.active - 1]
        running = RunningCovariance(self.bank.d, 1, gate.key.device)
        for p0 in self._prompt_pools(items):
            running.add(gate.features(p0)[1])
        covariance = running.blocks()[0]
        residual = project_rows(covariance, self.gate_memory.get("output")).T  # (I − P²)C²
        U, S, _ = torch.linalg.svd(residual, full_matrices=False)
        if float(S[0]) <= 0.0:
            return  # no feature left outside the memory: keep the random complement key
        direction = project_rows(U[:, 0], self.gate_memory.get("output"))
        gate.key.copy_((direction / direction.norm() * float(gate.key.norm())).float())

    def gate_feature_collector(self, model: torch.nn.Module, stage: Stage) -> Callable[[dict], None] | None:
        gate = self.bank.gates[stage.index - 1]
        device = gate.key.device
        self._gate_running = {"input": RunningCovariance(self.bank.d, self.config.chunk, device),
                              "hidden": RunningCovariance(self.bank.hidden, 1, device),
                              "output": RunningCovariance(self.bank.d, self.config.chunk, device)}

        def collect(batch: dict) -> None:
            p0 = self._pooled(batch["input_ids"], self.training_prompt_mask(batch))
            p1, p2 = gate.features(p0)
            for name, rows in zip(GATE_MEMORIES, (p0, p1, p2)):
                self._gate_running[name].add(rows)
        return collect

    def on_task_end(self, model: torch.nn.Module, stage: Stage) -> None:
        super().on_task_end(model, stage)
        eps = threshold_at(stage.index, self.config.gate_threshold, self.config.schedule_T)
        for name in GATE_MEMORIES:
            blocks = self._gate_running[name].blocks()
            self.gate_memory[name] = update_memory(self.gate_memory.get(name), blocks, eps, self.config.energy)
        log.info("gainlora stage %d: gate memory ranks %s", stage.index,
                 {name: memory_rank(m) for name, m in self.gate_memory.items()})

    # ---- checkpoints ---------------------------------------------------------------------------
    def state_meta(self) -> dict:
        meta = super().state_meta()
        meta.update(gates=len(self.bank.gates), gate_hidden=self.bank.hidden,
                    gate_first_activation=self.bank.first_activation, gate_memory=self._gate_memory_layout,
                    pool=self.config.pool, key_init=self.config.key_init)
        return meta

    def save_state(self, model: torch.nn.Module, directory: Path) -> None:
        tensors = {f"task{i}/{name}": p.detach().contiguous().cpu()
                   for i, gate in enumerate(self.bank.gates, start=1) for name, p in gate.named_parameters()}
        save_file(tensors, str(directory / GATE_FILE))
        layout = save_memories(self.gate_memory, directory / GATE_MEMORY_FILE)
        self._gate_memory_layout = layout  # recorded in the json that InfLoRA's save_state writes
        super().save_state(model, directory)

    def load_state(self, model: torch.nn.Module, directory: Path, stage: Stage) -> None:
        meta = self.read_meta(directory)
        if meta["gate_hidden"] != self.bank.hidden or meta["gate_first_activation"] != self.bank.first_activation:
            raise UserError(f"{directory}: its gates have another hidden size or activation than this run's")
        super().load_state(model, directory, stage)
        while len(self.bank.gates) < meta["gates"]:
            self.bank.add_gate()
        tensors = load_file(str(directory / GATE_FILE))
        with torch.no_grad():
            for i, gate in enumerate(self.bank.gates, start=1):
                for name, p in gate.named_parameters():
                    p.copy_(tensors[f"task{i}/{name}"])
        self.gate_memory = load_memories(directory / GATE_MEMORY_FILE, meta["gate_memory"])
        self.bank.active = stage.index
        self._gate_hooks(model)
        self._activate(model, stage.index, None)


__all__ = ["GainLora", "GainLoraConfig", "GateBank", "GateProjectedAdamW", "TaskGate", "gate_hook", "gate_value", "pool_prompt", "projected_update"]
