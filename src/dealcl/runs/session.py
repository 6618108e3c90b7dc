"""A session: everything a run, `predict`, `export`, a bench or a test needs before its first
stage, built one way (`build_session`): the checked config, the tasks, the model, the prompt
encoder, the training services and the method, with the model wrapped by the method.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..data.benchmarks import resolve_sequence
from ..data.loading import default_data_dir, load_task_with_validation
from ..data.types import Task
from ..errors import UserError
from ..eval.evaluator import EvalSettings, Evaluator
from ..methods import ContinualMethod, Stage, resolve_method
from ..models.loading import LoadedModel, load_model
from ..prompts import PromptEncoder
from ..train.distributed import Processes, fsdp_requested, launched_processes
from ..train.loop import CPU_MICRO_BATCH_TOKENS, TrainSettings, enable_gradient_checkpointing, resolve_precision, train_stage
from ..train.services import TrainingServices
from .config import RunConfig, method_config, stage_overrides


@dataclass
class Prepared:
    """Everything checked and loaded before the run directory is created."""

    config: RunConfig
    data_dir: Path
    tasks: list[Task]
    method_class: type[ContinualMethod]
    method_options: Any
    lr: float
    loaded: LoadedModel
    device: torch.device
    precision: str


def prepare(config: RunConfig, loaded: LoadedModel | None = None) -> Prepared:
    """Validate the whole configuration and load data and model; touches no run directory."""
    sequence = resolve_sequence(config.benchmark, config.order, config.tasks)
    data_dir = Path(config.data).expanduser() if config.data else default_data_dir()
    if not data_dir.is_dir():
        raise UserError(f"data directory does not exist: {data_dir}")
    method_class = resolve_method(config.method)
    options = method_config(method_class.config_class, config.method_options, config.method)
    check_task_overrides(config, sequence, method_class)
    if config.eval_split == "validation" and not config.val_per_task:
        raise UserError("eval_split=validation needs held-out examples: set --val-per-task N (N > 0)")
    tasks = []
    for name in sequence:
        task, validation = load_task_with_validation(
            name, data_dir, train_per_task=config.train_per_task, test_per_task=config.test_per_task,
            val_per_task=config.val_per_task, sample=config.sample, seed=config.seed,
        )
        if config.eval_split == "validation":
            # Tuning: score the held-out training examples, never the test set (upstream's dev
            # split is the test split, so it cannot be used for choosing hyperparameters).
            known = set(task.labels)
            task = dataclasses.replace(task, test=validation,
                                       unknown_test_labels=sum(1 for e in validation if e.label not in known))
        tasks.append(task)
    names = [t.name for t in tasks]
    if len(set(names)) != len(names):
        raise UserError(f"the task sequence names a task twice: {names}")
    if loaded is None:
        dtype = torch.bfloat16 if config.model_dtype == "bf16" else torch.float32
        loaded = load_model(config.model, trust_remote_code=config.trust_remote_code, dtype=dtype)
    ranks = launched_processes()
    device = ranks.device
    if (config.fsdp or fsdp_requested()) and ranks.world > 1:
        if method_class.fsdp_refusal:
            raise UserError(f"method {config.method} cannot run with fsdp: {method_class.fsdp_refusal} "
                            "(docs/SCALING.md has the method x backend matrix)")
        ranks.shard_blocks(loaded.model)  # moves only this rank's shard of each block to the device
    loaded.model.to(device)
    precision = resolve_precision(config.precision, device)
    return Prepared(config, data_dir, tasks, method_class, options, config.lr or method_class.lr_for(config.model), loaded, device, precision)


def check_task_overrides(config: RunConfig, sequence: list[str], method_class: type[ContinualMethod]) -> None:
    """Every per-task value names a task of the sequence and an option the method lets vary
    per task, and gives every task a valid method config (so a bad value stops the run before
    its first stage, not at the stage it applies to)."""
    for selector, entry in config.task_overrides.items():
        if not selector.startswith("stage") and selector not in sequence:
            raise UserError(f"task_overrides names a task not in the sequence: {selector}")
        for key in entry:
            option = key.split(".", 1)[1] if key.startswith("method.") else None
            if option is not None and option not in method_class.per_task_options:
                allowed = ", ".join(method_class.per_task_options) or "none"
                raise UserError(f"task_overrides.{selector}: method {config.method} option {option!r} cannot vary "
                                f"per task (per-task options: {allowed})")
    for index, task in enumerate(sequence, start=1):
        stage_method_config(config, method_class, index, [task])


def stage_method_config(config: RunConfig, method_class: type[ContinualMethod], index: int, tasks: list[str]):
    """The method options of stage `index`: the run's, with the stage's task_overrides on top."""
    values = stage_overrides(config, index, tasks)
    options = {**config.method_options, **{k.split(".", 1)[1]: v for k, v in values.items() if k.startswith("method.")}}
    return method_config(method_class.config_class, options, config.method)


def micro_batch_tokens(config: RunConfig, device: torch.device) -> int | None:
    if config.micro_batch_tokens is not None:
        return config.micro_batch_tokens
    return CPU_MICRO_BATCH_TOKENS if device.type == "cpu" else None



def stage_settings(config: RunConfig, index: int, tasks: list[str], lr: float, device: torch.device) -> TrainSettings:
    """The training settings of stage `index`: the run's, with the stage's task_overrides on top."""
    own = stage_overrides(config, index, tasks)
    return TrainSettings(
        lr=own.get("lr", lr), epochs=own.get("epochs", config.epochs),
        batch_size=own.get("batch_size", config.batch_size), grad_accum=own.get("grad_accum", config.grad_accum),
        max_grad_norm=own.get("max_grad_norm", config.max_grad_norm), seed=config.seed,
        group_by_length=config.group_by_length, micro_batch_tokens=micro_batch_tokens(config, device),
    )


@dataclass
class Session:
    """A method ready to run on a loaded model; `model` is None until `prepare_model()`."""

    prep: Prepared
    encoder: PromptEncoder
    services: TrainingServices
    method: ContinualMethod
    model: torch.nn.Module | None = None

    @property
    def config(self) -> RunConfig:
        return self.prep.config

    @property
    def tasks(self) -> list[Task]:
        return self.prep.tasks

    def prepare_model(self) -> torch.nn.Module:
        """Wrap the base model with the method's adapters (once)."""
        if self.model is None:
            self.model = self.method.prepare_model(self.prep.loaded.model)
            if self.config.gradient_checkpointing:
                enable_gradient_checkpointing(self.model)
        return self.model

    def stages(self) -> list[Stage]:
        return self.method.stages(self.prep.tasks)

    def settings(self, stage: Stage) -> TrainSettings:
        return stage_settings(self.config, stage.index, [t.name for t in stage.train_tasks], self.prep.lr, self.prep.device)

    def evaluator(self, progress: bool = False) -> Evaluator:
        c = self.config
        return Evaluator(self.encoder, self.prep.loaded.arch, self.prep.device,
                         EvalSettings(c.eval_mode, c.eval_batch_size, c.with_rouge), self.services.autocast,
                         self.services.processes, progress)

    def train(self, stage: Stage, progress: bool = False, settings: TrainSettings | None = None) -> dict[str, Any]:
        """One stage of training as the driver runs it: the stage's method options, on_task_start,
        training_items, the loop, on_task_end. Returns the loop's statistics (empty when the
        method trains nothing)."""
        names = [t.name for t in stage.train_tasks]
        model = self.prepare_model()
        self.method.config = stage_method_config(self.config, self.prep.method_class, stage.index, names)
        self.method.on_task_start(model, stage)
        stats: dict[str, Any] = {}
        if self.method.trains:
            items = self.method.training_items(stage)
            stats = train_stage(model, self.method, stage, items, settings or self.settings(stage), self.services, progress)
        self.method.on_task_end(model, stage)
        return stats


def build_session(config: RunConfig, loaded: LoadedModel | None = None, *, prepare_model: bool = True,
                  processes: Processes | None = None) -> Session:
    """Check `config`, load data and model, and build the encoder, services and method.

    `prepare_model=False` leaves the base model unwrapped (the driver evaluates it first, as
    stage 0). Touches no run directory."""
    prep = prepare(config, loaded)
    torch.manual_seed(config.seed)
    ranks = processes or launched_processes()
    encoder = PromptEncoder(prep.loaded.tokenizer, prep.loaded.arch, config.max_source_length, config.prompt_style)
    services = TrainingServices(encoder, prep.loaded.arch, prep.precision, prep.device, ranks,
                                share_prefix=config.share_prompt_prefix and not config.gradient_checkpointing,
                                seed=config.seed)
    session = Session(prep, encoder, services, prep.method_class(prep.method_options, services))
    session.method.check_model(prep.loaded.model)
    if prepare_model:
        session.prepare_model()
    return session
