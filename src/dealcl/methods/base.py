"""The contract between a continual method and the engine: this file and train/services.py.

A method is a config dataclass plus a subclass of `ContinualMethod` that overrides only the hooks
it needs (the Avalanche idea, see ../shared/docs/STYLE.md). The driver calls the hooks in this
order for every stage:

    prepare_model            once, before the first stage (wrap the base model with adapters)
    on_task_start            create this task's adapter, choose what trains
    training_items           what the stage trains on (Replay mixes a buffer in, MTL joins tasks)
    build_optimizer          AdamW by default; GORP brings its projected Adam
    before_training          the exact items the loop trains on (LwF's teacher pass)
      per step: extra_losses → backward → after_backward → clip (all but unclipped_parameters) → step
    on_task_end              fold, merge, build memories
    save_state / load_state  everything needed to rebuild the model after this stage
    eval_model               the model used to evaluate one task (PerTask picks its own adapter)
    eval_fingerprint         lets the driver reuse predictions when the model is provably unchanged

What a method may use is `self.services` (train/services.py: encoder, seed and generators,
autocast, the answer-only forward, processes) and the LoRA plumbing in `methods/_lora`. The
training loop never names a method; a method never needs to read the loop.
"""
from __future__ import annotations

import contextlib
import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Iterator

import torch

from ..data.types import Task
from ..domains import dimension, in_range, non_empty, option, positive
from ..train.hooks import Stage, TrainItem
from ..train.services import TrainingServices


@dataclass
class MethodConfig:
    """Options every method accepts. Subclasses add their own fields, each with its default and
    its domain: `strength: float = option(0.1, non_negative)` (dealcl/domains.py). The domains
    are checked for YAML, flags and `method.KEY=VALUE` alike before `validate()` runs."""

    def validate(self) -> None:
        """Checks that involve several options (ranges of one option are its declared domain);
        a subclass that adds some calls `super().validate()`."""


@dataclass
class LoraOptions(MethodConfig):
    """LoRA shape for the methods built on PEFT LoRA adapters.

    `rank`/`alpha` of None pick the method's default for the model's architecture. Target
    modules of None pick q and v: every T5 attention q,v (self and cross) or LLaMA q_proj,v_proj.
    """

    rank: int | None = option(None, dimension)
    alpha: float | None = option(None, positive)
    dropout: float = option(0.1, in_range(0, 1, high_open=True))
    target_modules: list[str] | None = option(None, non_empty)  # null: q and v


class ContinualMethod:
    """Base class: a method that trains nothing and changes nothing (the zero-shot reference)."""

    name: ClassVar[str] = ""
    description: ClassVar[str] = ""
    paper: ClassVar[str] = ""
    config_class: ClassVar[type[MethodConfig]] = MethodConfig
    # Training defaults this method was calibrated with on the embedded model (docs/METHODS.md).
    default_lr: ClassVar[float] = 5e-4
    # Learning rates chosen by `dealcl sweep` per model (short name), read through `lr_for`.
    # They are this class's own: a subclass (MTL of SeqLoRA) is swept on its own.
    tuned_lrs: ClassVar[dict[str, float]] = {}
    # False for methods whose model never changes: the driver then skips training altogether.
    trains: ClassVar[bool] = True
    # True when the run is one joint stage (MTL): results report AA only.
    joint: ClassVar[bool] = False
    # How `dealcl export` takes the final model out: "adapter" (the active PEFT LoRA adapters,
    # summed into one stock adapter), "merged" (adapters merged into full safetensors weights),
    # "module" (the base model, the method's own tensors from `export_module(model, folder)` and
    # the standalone loader file `export_loader`: DEAL), or None with `export_refusal` saying why
    # it cannot be done.
    export_as: ClassVar[str | None] = None
    export_refusal: ClassVar[str] = "its final model is not a plain (or mergeable) LoRA model"
    # Options a run may set per task (`task_overrides`, e.g. O-LoRA's λ per task in its 15-task
    # script): only ones the method reads afresh at every use (loss weights), never a shape.
    # The driver hands each stage its own `self.config`.
    per_task_options: ClassVar[tuple[str, ...]] = ()
    # Why the method cannot run with the base weights sharded (fsdp=true), or None when it can:
    # FSDP shards only frozen base weights, so a method that trains or reads them cannot.
    fsdp_refusal: ClassVar[str | None] = None
    # The disk space its state after one stage takes, as a share of the base model's bytes: the
    # run-size estimate that `dealcl run` checks the free space against (runs/paths.py). LoRA
    # methods: rank 8 on q,v of SmolLM2-135M is 0.34 %; 5 % leaves room for larger adapters.
    state_share: ClassVar[float] = 0.05

    @classmethod
    def lr_for(cls, model: str) -> float:
        """The default learning rate for `model`: its swept value, else the calibrated one."""
        return cls.__dict__.get("tuned_lrs", {}).get(model, cls.default_lr)

    def __init__(self, config: MethodConfig, services: TrainingServices) -> None:
        self.config = config
        self.services = services

    # ---- structure of the run ---------------------------------------------------------------
    def stages(self, tasks: list[Task]) -> list[Stage]:
        return [Stage(index=k + 1, name=task.name, train_tasks=[task]) for k, task in enumerate(tasks)]

    def check_model(self, model: torch.nn.Module) -> None:
        """Refuse a model this method cannot adapt (UserError), given the plain model before
        anything is evaluated or written: `build_session` calls it before the run directory
        exists, `prepare_model` only after the zero-shot reference stage."""

    def prepare_model(self, model: torch.nn.Module) -> torch.nn.Module:
        return model

    # ---- per task ----------------------------------------------------------------------------
    def on_task_start(self, model: torch.nn.Module, stage: Stage) -> None:
        pass

    def training_items(self, stage: Stage) -> list[TrainItem]:
        return [(task, example) for task in stage.train_tasks for example in task.train]

    def trainable_parameters(self, model: torch.nn.Module) -> list[torch.nn.Parameter]:
        return [p for p in model.parameters() if p.requires_grad]

    def build_optimizer(self, model: torch.nn.Module, lr: float) -> torch.optim.Optimizer:
        # Upstream: HF Trainer defaults (AdamW, betas 0.9/0.999, eps 1e-8, no weight decay).
        return torch.optim.AdamW(self.trainable_parameters(model), lr=lr, weight_decay=0.0)

    def before_training(self, model: torch.nn.Module, stage: Stage, items: list[TrainItem]) -> None:
        """Called by the loop after `build_optimizer`, with the very list it trains on: the
        `indices` of every batch it builds are positions in `items`."""

    def unclipped_parameters(self, model: torch.nn.Module) -> list[torch.nn.Parameter]:
        """Optimizer parameters the loop leaves out of gradient-norm clipping (none by default)."""
        return []

    def adapter_modules(self, model: torch.nn.Module) -> set[torch.nn.Module]:
        """The modules of the method's adapters: the loop keeps their weights in fp32 under bf16
        and gives their dropouts the fast CPU mask. Default: every submodule of a PEFT tuner
        layer (LoRA's A, B, dropout and whatever a method puts there) except the base layer."""
        from peft.tuners.tuners_utils import BaseTunerLayer

        found: set[torch.nn.Module] = set()
        for module in model.modules():
            if isinstance(module, BaseTunerLayer):
                base = set(module.get_base_layer().modules())
                found |= {m for m in module.modules() if m is not module and m not in base}
        return found

    def extra_losses(self, model: torch.nn.Module, batch: dict[str, Any], answer_logits: torch.Tensor) -> dict[str, torch.Tensor]:
        """Named loss terms added to the task loss of one micro-batch (already normalised)."""
        return {}

    def after_backward(self, model: torch.nn.Module) -> None:
        pass

    def on_task_end(self, model: torch.nn.Module, stage: Stage) -> None:
        pass

    # ---- evaluation --------------------------------------------------------------------------
    @contextlib.contextmanager
    def eval_model(self, model: torch.nn.Module, task: Task) -> Iterator[torch.nn.Module]:
        yield model

    def eval_fingerprint(self, task: Task, stage: Stage | None) -> str | None:
        """A key that names the exact model `task` is evaluated with, or None if it may differ
        from any earlier evaluation. Equal keys let the driver reuse earlier predictions."""
        return None if self.trains else "base-model"

    # ---- checkpoints -------------------------------------------------------------------------
    def save_state(self, model: torch.nn.Module, directory: Path) -> None:
        pass

    def load_state(self, model: torch.nn.Module, directory: Path, stage: Stage) -> None:
        """Bring a freshly prepared model to the state it had right after `stage` ended."""

    # ---- helpers -----------------------------------------------------------------------------
    @classmethod
    def options(cls) -> list[dataclasses.Field]:
        return list(dataclasses.fields(cls.config_class))


REGISTRY: dict[str, type[ContinualMethod]] = {}


def register(cls: type[ContinualMethod]) -> type[ContinualMethod]:
    """Class decorator: make a method available by its `name` (`--method NAME`)."""
    if not cls.name:
        raise ValueError(f"{cls.__qualname__} has no name")
    REGISTRY[cls.name] = cls
    return cls


def count_parameters(params) -> int:
    return sum(p.numel() for p in params)


__all__ = [
    "ContinualMethod", "MethodConfig", "LoraOptions", "Stage", "TrainItem", "TrainingServices", "REGISTRY", "register",
    "count_parameters", "field", "option",
]
