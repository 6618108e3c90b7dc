"""InfLoRA in its LLM/T5 form: a new LoRA branch per task whose down-projection A is designed
before training, orthogonal to the inputs of earlier tasks, and frozen; only B trains.

Liang & Li, "InfLoRA: Interference-Free Low-Rank Adaptation for Continual Learning", CVPR 2024;
the LLM form is the one shipped by the GainLoRA authors (new_methods_spec.md §1; written from
the spec, no upstream code read or copied). Paper symbols are swapped: the paper's designed "B"
is PEFT's `lora_A` here (§0).

Every target module carries one PEFT adapter per task, all active and summed with weight 1:
y = W₀x + s·Σ_{i≤t} B_i A_i x. If every row of A_t is orthogonal to the span of the old tasks'
inputs to that module (the GPM memory M, `_gpm.py`), then A_t x = 0 for any old input x, so the
new branch cannot change old outputs whatever B_t learns ("interference-free", §1.2). A_t is:
- `a_init=random_projected` (default; what the released LLM code does, I-2): task 1 keeps
  PEFT's Kaiming-uniform draw; task t > 1 projects its draw A⁰ off the memory, A⁰ − A⁰P, and
  rescales each row to norm 1/√3. The task's data is not used.
- `a_init=input_svd` (the paper and the vision code): A_t = (top-r left singular vectors of
  (I − P)C_t)ᵀ/√3, C_t the covariance of the task's own inputs to the module, collected in a
  no-grad pass before the first step (`before_training`), at every task including the first.

At task end a no-grad pass in eval mode over ≤ `memory_batches` batches of the task's training
data collects each module's input covariance and grows the memory with the threshold ε_t =
ε₀ + (1 − ε₀)(t−1)/`schedule_T` by the coded rules (§1.3). Memories are kept per distinct input:
modules that read the same tensor (q and v of one attention block) share one, found once by a
probe forward; T5 cross-attention v reads the encoder output and keeps its own memory of it
(`cross_v_memory=separate`, fixing I-3; `shared` projects it with the query-side memory, as
upstream). Padding is left out of the covariance (`covariance_padding=exclude`, fixing I-4).

No loss term, no gradient projection: A is frozen, so nothing can leak into the old subspace.
No checkpoint selection on the test set (I-1): dealcl evaluates the last model of each task.
"""
from __future__ import annotations

import json
import logging
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from ..errors import UserError
from ..models import unwrap
from ._gpm import (
    ENERGIES, InputCovariances, Memory, RunningCovariance, blocks_of, load_memories, memory_rank, project_rows,
    save_memories, threshold_at, update_memory, write_json,
)
from ._lora import TaskAdapters, is_seq2seq, lora_config, lora_layers
from ..domains import dimension, in_range, one_of, option, positive
from .base import ContinualMethod, LoraOptions, Stage, TrainItem, register

log = logging.getLogger("dealcl")

A_INITS = ("random_projected", "input_svd")
PADDING = ("exclude", "include")
CROSS_V = ("separate", "shared")
STATE_FORMAT = 1
ROW_NORM = 1.0 / math.sqrt(3.0)  # the designed rows' norm (upstream; ≈ a Kaiming-uniform row's)
# T5 modules that read the encoder's output: all of the encoder, and cross-attention k, v.
_READS_ENCODER = re.compile(r"(^|\.)encoder\.|EncDecAttention\.(k|v)$")
_CROSS_KV = re.compile(r"^(.*EncDecAttention)\.(k|v)$")


@dataclass
class InfLoraConfig(LoraOptions):
    # rank/alpha None → 8/32 (upstream T5 Long: r 8, α 32); targets None → q,v everywhere.
    dropout: float = option(0.0, in_range(0, 1, high_open=True))  # upstream: LoRA dropout 0
    # How A_t is chosen: random_projected (the released LLM code) or input_svd (the paper).
    a_init: str = option("random_projected", one_of(*A_INITS))
    # ε₀ of the memory threshold schedule (upstream --threshold 0.995).
    threshold: float = option(0.995, in_range(0, 1, low_open=True))
    # T in ε_t = ε₀ + (1 − ε₀)(t−1)/T. Upstream hard-codes 15 (its 15-task sequences) for every
    # sequence; 15 is kept for parity. Set it to the sequence length for the intended schedule.
    schedule_T: int = option(15, positive)
    # Energy of a direction: squared (λ² of the covariance eigenvalue λ, as coded) or eigenvalue
    # (λ, equivalent to GPM on the representation matrix).
    energy: str = option("squared", one_of(*ENERGIES))
    # Split the input dimension into this many blocks and keep only the diagonal covariance
    # blocks (upstream: 1 for T5, 4 for LLaMA-2's 4096-dimensional inputs).
    chunk: int = option(1, dimension)
    # exclude: count only real tokens in the covariance (fix of I-4); include: pads too (upstream).
    covariance_padding: str = option("exclude", one_of(*PADDING))
    # separate: T5 cross-attention v keeps a memory of its own input, the encoder output (fix of
    # I-3); shared: it uses the query-side memory of its attention block (upstream).
    cross_v_memory: str = option("separate", one_of(*CROSS_V))
    # The task-end pass (and input_svd's pre-training pass) reads at most this many batches of
    # this many training examples (upstream: 1 002 batches of its training batch size).
    memory_batches: int = option(1002, positive)
    memory_batch_size: int = option(16, positive)


@register
class InfLora(ContinualMethod):
    name = "inflora"
    description = "a new LoRA per task with A designed orthogonal to old tasks' inputs (GPM memory) and frozen; only B trains"
    paper = "Liang & Li, InfLoRA: Interference-Free Low-Rank Adaptation for Continual Learning, CVPR 2024 (LLM form of the GainLoRA code)"
    config_class = InfLoraConfig
    export_as = "adapter"  # the branches are summed with weight 1: one stock adapter of rank r·T
    # Only B trains (half of seqlora's parameters, A fixed at a Kaiming-like scale): between
    # seqlora's swept 1e-3 and inclora's 2e-3 on smollm2-135m; upstream T5 3e-4, LLaMA 5e-5.
    default_lr = 1e-3
    default_rank = 8
    default_alpha = 32.0
    init_offset = 700  # the adapters' init generators, apart from the other LoRA methods'
    file_stem = "inflora"

    def __init__(self, config: InfLoraConfig, services) -> None:
        super().__init__(config, services)
        self.adapters: TaskAdapters | None = None
        self.current: str | None = None
        self.groups: dict[str, str] = {}  # LoRA module name → memory key (the first module reading that input)
        self.memory: dict[str, Memory] = {}  # memory key → bases per chunk
        self.tasks_done = 0  # the schedule position: the memory holds tasks 1..tasks_done

    # ---- model structure ----------------------------------------------------------------------
    def prepare_model(self, model: torch.nn.Module) -> torch.nn.Module:
        config = lora_config(model, self.config, self.default_rank, self.default_alpha)
        self.adapters = TaskAdapters(config, self.services.seed, init_offset=self.init_offset,
                                     file_stem=f"{self.file_stem}_lora")
        wrapped = self.adapters.wrap(model)
        self.groups = self.input_groups(wrapped)
        for name, layer in self.lora_modules(wrapped):
            blocks_of(layer.lora_A["task1"].weight.shape[1], self.config.chunk)  # one clear error early
        self._activate(wrapped, 1, "task1")
        return wrapped

    @staticmethod
    def lora_modules(model: torch.nn.Module):
        """(name in the transformers model, PEFT LoRA layer): the names key the memories."""
        return lora_layers(unwrap(model))

    def _activate(self, model: torch.nn.Module, count: int, trainable: str | None,
                  also_trainable: tuple[torch.nn.Parameter, ...] = ()) -> None:
        """Adapters of tasks 1..count active and summed; only `trainable`'s B (and
        `also_trainable`) train: every A is frozen from its creation (§1.4)."""
        self.adapters.activate(model, self.adapters.names[:count], trainable, also_trainable)
        if trainable is not None:
            for _, layer in self.lora_modules(model):
                layer.lora_A[trainable].weight.requires_grad_(False)

    def _probe_batch(self, model: torch.nn.Module) -> dict:
        ids = torch.full((1, 2), self.services.encoder.eos_id, dtype=torch.long)
        batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
        if is_seq2seq(model):
            batch["decoder_input_ids"] = torch.zeros((1, 1), dtype=torch.long)
        device = next(model.parameters()).device
        return {k: v.to(device) for k, v in batch.items()}

    @torch.no_grad()
    def input_groups(self, model: torch.nn.Module) -> dict[str, str]:
        """Memory key of every LoRA module: modules whose input is the very same tensor in a
        probe forward (q, k, v of one attention block; every cross-attention k, v, which all read
        the encoder output) share the key of the first of them; with `cross_v_memory=shared` a
        cross-attention k/v takes its block's q key instead (upstream, I-3)."""
        modules = self.lora_modules(model)
        seen: list[tuple[str, torch.Tensor]] = []  # the inputs stay referenced: no storage is reused
        handles = [layer.register_forward_hook(lambda m, args, out, name=name: seen.append((name, args[0])))
                   for name, layer in modules]
        was_training = model.training
        model.eval()
        try:
            model(**self._probe_batch(model), use_cache=False)
        finally:
            for handle in handles:
                handle.remove()
            model.train(was_training)
        first_reader: dict[tuple, str] = {}
        groups = {}
        for name, x in seen:
            if name in groups:
                continue
            identity = (x.data_ptr(), tuple(x.shape), tuple(x.stride()))
            groups[name] = first_reader.setdefault(identity, name)
        missing = [name for name, _ in modules if name not in groups]
        if missing:
            raise UserError(f"LoRA module {missing[0]} is not reached by a forward pass: InfLoRA cannot collect its inputs")
        if self.config.cross_v_memory == "shared":
            for name in groups:
                match = _CROSS_KV.match(name)
                if match and f"{match.group(1)}.q" in groups:
                    groups[name] = groups[f"{match.group(1)}.q"]
        return groups

    # ---- data passes --------------------------------------------------------------------------
    def _token_masks(self, batch: dict) -> dict[str, torch.Tensor]:
        """The positions counted in each input stream: real tokens (or all, with padding
        included). Causal: prompt + answer; T5 encoder: the source; decoder: the target."""
        masks = {"source": batch["attention_mask"].bool()}
        if "labels" in batch:
            masks["target"] = batch["labels"] != -100
        return masks

    def _stream(self, name: str, model_is_seq2seq: bool) -> str:
        return "source" if not model_is_seq2seq or _READS_ENCODER.search(name) else "target"

    def _feature_forward(self, model: torch.nn.Module, batch: dict) -> None:
        """The model's forward on a training batch, prompt prefix never shared (each row's
        inputs must reach the covariance once per row)."""
        for observe in self.services.batch_observers:
            observe(batch)
        with self.services.autocast():
            if "labels" in batch:
                model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=batch["labels"],
                      use_cache=False)
            else:
                model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False,
                      logits_to_keep=1)

    def feature_pass(self, model: torch.nn.Module, items: list[TrainItem], chunk: int,
                     per_batch: Callable[[dict], None] | None = None) -> dict[str, list[torch.Tensor]]:
        """Input covariances (diagonal blocks per `chunk`) of every memory key's module over at
        most `memory_batches` batches of `items`, no grad, eval mode (§1.5 step 4).
        `per_batch(batch)` runs after each forward (GainLoRA reads its gate features there)."""
        seq2seq = is_seq2seq(model)
        layers = dict(self.lora_modules(model))
        # One hook per distinct input: on the module whose name is the memory key.
        representatives = {key: layers[key] for key in dict.fromkeys(self.groups.values())}
        streams = {key: self._stream(key, seq2seq) for key in representatives}
        current: dict[str, dict[str, torch.Tensor]] = {}

        def mask_for(key: str, x: torch.Tensor) -> torch.Tensor | None:
            if self.config.covariance_padding == "include":
                return None
            mask = current["masks"][streams[key]]
            if tuple(mask.shape) != tuple(x.shape[:2]):
                raise RuntimeError(f"{key}: input of shape {tuple(x.shape)} does not match its token mask {tuple(mask.shape)}")
            return mask

        was_training = model.training
        model.eval()
        try:
            with torch.no_grad(), InputCovariances(representatives, chunk, mask_for) as collector:
                for k, batch in enumerate(self.services.batches(items, self.config.memory_batch_size)):
                    if k >= self.config.memory_batches:
                        break
                    current["masks"] = self._token_masks(batch)
                    self._feature_forward(model, batch)
                    if per_batch is not None:
                        per_batch(batch)
        finally:
            model.train(was_training)
        return collector.covariances()

    # ---- per task ------------------------------------------------------------------------------
    def on_task_start(self, model: torch.nn.Module, stage: Stage) -> None:
        self.current = self.adapters.for_task(model, stage.index)
        self.add_task_structure(model, stage)
        if self.config.a_init == "random_projected" and stage.index > 1:
            self.design_a_projected(model, self.current)
        self._activate(model, stage.index, self.current, self.extra_trainable(model))

    def add_task_structure(self, model: torch.nn.Module, stage: Stage) -> None:
        """What a subclass adds per task besides the adapter (GainLoRA: the task's gate)."""

    def extra_trainable(self, model: torch.nn.Module) -> tuple[torch.nn.Parameter, ...]:
        """Parameters that train besides the current B (GainLoRA: the current gate)."""
        return ()

    @torch.no_grad()
    def design_a_projected(self, model: torch.nn.Module, adapter: str) -> None:
        """A ← A⁰ − A⁰P per module (its draw projected off the memory), rows rescaled to 1/√3."""
        for name, layer in self.lora_modules(model):
            weight = layer.lora_A[adapter].weight
            design = design_a_random_projected(weight.detach(), self.memory.get(self.groups[name]))
            weight.copy_(design.to(weight.dtype))

    def before_training(self, model: torch.nn.Module, stage: Stage, items: list[TrainItem]) -> None:
        if self.config.a_init == "input_svd":
            self.design_a_from_inputs(model, self.current or self.adapters.names[stage.index - 1], items)

    @torch.no_grad()
    def design_a_from_inputs(self, model: torch.nn.Module, adapter: str, items: list[TrainItem]) -> None:
        """A = (top-r left singular vectors of (I − P)C_t)ᵀ/√3 per module, C_t the full input
        covariance of this task (the paper, §1.2). Rows are projected once more and rescaled, so
        that a rank-deficient (I − P)C_t, whose trailing singular vectors are arbitrary, still
        gives rows orthogonal to the memory (zero rows where nothing is left)."""
        covariances = self.feature_pass(model, items, chunk=1)
        for name, layer in self.lora_modules(model):
            weight = layer.lora_A[adapter].weight
            memory = self.memory.get(self.groups[name])
            design = design_a_input_svd(covariances[self.groups[name]][0], memory, weight.shape[0])
            weight.copy_(design.to(weight.dtype))

    def on_task_end(self, model: torch.nn.Module, stage: Stage) -> None:
        self._activate(model, stage.index, None)
        covariances = self.feature_pass(model, self.training_items(stage), self.config.chunk,
                                        self.gate_feature_collector(model, stage))
        self.update_memories(covariances, stage.index)
        self.tasks_done = stage.index

    def gate_feature_collector(self, model: torch.nn.Module, stage: Stage) -> Callable[[dict], None] | None:
        return None

    def update_memories(self, covariances: dict[str, list[torch.Tensor]], task_index: int) -> None:
        eps = threshold_at(task_index, self.config.threshold, self.config.schedule_T)
        for key, blocks in covariances.items():
            self.memory[key] = update_memory(self.memory.get(key), blocks, eps, self.config.energy)
        ranks = [memory_rank(m) for m in self.memory.values()]
        if ranks:
            log.info("%s stage %d: ε %.6f, memory rank min %d mean %.1f max %d over %d inputs", self.name,
                     task_index, eps, min(ranks), sum(ranks) / len(ranks), max(ranks), len(ranks))

    # ---- checkpoints ---------------------------------------------------------------------------
    def state_meta(self) -> dict:
        return {
            "format": STATE_FORMAT,
            "init_seed": self.adapters.seed,
            "init_offset": self.init_offset,
            "adapters": self.adapters.names,
            "tasks_done": self.tasks_done,
            "groups": self.groups,
            "a_init": self.config.a_init,
            "chunk": self.config.chunk,
        }

    def save_state(self, model: torch.nn.Module, directory: Path) -> None:
        self.adapters.save(model, directory)
        meta = self.state_meta()
        meta["memory"] = save_memories(self.memory, directory / f"{self.file_stem}_memory.safetensors")
        write_json(directory / f"{self.file_stem}_state.json", meta)

    def read_meta(self, directory: Path) -> dict:
        path = directory / f"{self.file_stem}_state.json"
        if not path.is_file():
            raise UserError(f"{directory}: no {path.name} (not a {self.name} checkpoint)")
        meta = json.loads(path.read_text())
        if meta.get("format") != STATE_FORMAT:
            raise UserError(f"{directory}: unsupported {self.name} state format {meta.get('format')!r}")
        if meta["groups"] != self.groups or meta["chunk"] != self.config.chunk:
            raise UserError(f"{directory}: its memories were built for other target modules, chunk or "
                            f"cross_v_memory than this run's")
        return meta

    def load_state(self, model: torch.nn.Module, directory: Path, stage: Stage) -> None:
        meta = self.read_meta(directory)
        self.adapters.seed = int(meta["init_seed"])
        self.adapters.load(model, directory)
        self.memory = load_memories(directory / f"{self.file_stem}_memory.safetensors", meta["memory"])
        self.tasks_done = int(meta["tasks_done"])
        self.current = self.adapters.names[stage.index - 1]
        self._activate(model, stage.index, None)


def _rescale_rows(rows: torch.Tensor) -> torch.Tensor:
    """Every row to norm 1/√3; a row with nothing left after the projection stays zero."""
    norms = rows.norm(dim=-1, keepdim=True)
    scale = torch.where(norms > 1e-12, ROW_NORM / norms.clamp(min=1e-300), torch.zeros_like(norms))
    return rows * scale


def design_a_input_svd(covariance: torch.Tensor, memory: Memory | None, rank: int) -> torch.Tensor:
    """The paper's A (§1.2): rows = top-`rank` left singular vectors of Ĉ = (I − P)C, /√3."""
    C = covariance.double()
    residual = project_rows(C, memory).T  # (I − P)C, as C − CP = ((I − P)C)ᵀ for a symmetric C
    U, _, _ = torch.linalg.svd(residual, full_matrices=False)
    rows = project_rows(U[:, :rank].T.contiguous(), memory)
    return _rescale_rows(rows).float()


def design_a_random_projected(a0: torch.Tensor, memory: Memory | None) -> torch.Tensor:
    """The released LLM code's A for t > 1 (§1.2): A⁰ − A⁰P, each row rescaled to 1/√3."""
    return _rescale_rows(project_rows(a0.double(), memory)).float()


__all__ = ["InfLora", "InfLoraConfig", "design_a_input_svd", "design_a_random_projected"]
