"""The LoRA plumbing every LoRA-based method shares, on stock PEFT (no vendored PEFT).

Not a method (the registry skips modules whose name starts with "_"): a config from the user's
`LoraOptions`, wrapping a model, one adapter per task with seeded init (`TaskAdapters`), the
LoRA layers, and adapter tensors saved and loaded as stock PEFT files."""
from __future__ import annotations

import json
from pathlib import Path

import torch
from peft import LoraConfig, PeftModel, get_peft_model
from peft.utils import get_peft_model_state_dict, set_peft_model_state_dict
from safetensors.torch import load_file, save_file

from ...errors import UserError
from ..base import LoraOptions

# q and v of every attention block: T5 self- and cross-attention (`q`, `v`), LLaMA `q_proj`/`v_proj`
# (deal_spec.md §1.3, gorp_olora_spec.md §2.1).
QV_TARGETS = {"t5": ["q", "v"], "mt5": ["q", "v"], "llama": ["q_proj", "v_proj"]}


def model_type(model: torch.nn.Module) -> str:
    base = model.get_base_model() if isinstance(model, PeftModel) else model
    return getattr(base.config, "model_type", "")


def is_seq2seq(model: torch.nn.Module) -> bool:
    base = model.get_base_model() if isinstance(model, PeftModel) else model
    return bool(getattr(base.config, "is_encoder_decoder", False))


def default_targets(model: torch.nn.Module) -> list[str]:
    kind = model_type(model)
    if kind in QV_TARGETS:
        return QV_TARGETS[kind]
    names = {name.rsplit(".", 1)[-1] for name, _ in model.named_modules()}
    for candidates in (["q_proj", "v_proj"], ["q", "v"], ["query", "value"]):
        if set(candidates) <= names:
            return candidates
    raise UserError(f"cannot pick LoRA target modules for model type '{kind}': set method.target_modules")


REGEX_CHARACTERS = frozenset("*()|[]\\+?^$")


def lora_config(model: torch.nn.Module, options: LoraOptions, rank: int, alpha: float,
                targets: dict[str, str] | None = None) -> LoraConfig:
    """PEFT LoRA config from the user's options; `rank`/`alpha` are the method's defaults for
    options left unset, `targets` its default target (a full-match regex) per model type, else
    q and v. A `target_modules` of one element that looks like a regex is one (PEFT matches a
    string target in full); otherwise it is PEFT's list of name suffixes."""
    chosen = options.target_modules
    if chosen is None:
        target: str | list[str] = (targets or {}).get(model_type(model)) or default_targets(model)
    elif len(chosen) == 1 and REGEX_CHARACTERS & set(chosen[0]):
        target = chosen[0]
    else:
        target = list(chosen)
    return LoraConfig(
        r=options.rank or rank,
        lora_alpha=options.alpha or alpha,
        lora_dropout=options.dropout,
        target_modules=target,
        bias="none",
        task_type="SEQ_2_SEQ_LM" if is_seq2seq(model) else "CAUSAL_LM",
    )


def wrap_with_lora(model: torch.nn.Module, config: LoraConfig, adapter_name: str = "default") -> PeftModel:
    """Freeze the base model and add one trainable LoRA adapter (PEFT's standard init:
    Kaiming-uniform A, zero B, so the wrapped model starts as the base model)."""
    for parameter in model.parameters():
        parameter.requires_grad_(False)
    return get_peft_model(model, config, adapter_name=adapter_name)


def lora_layers(model: torch.nn.Module):
    """(name, PEFT LoRA layer) for every adapted module."""
    from peft.tuners.lora import LoraLayer

    return [(name, module) for name, module in model.named_modules() if isinstance(module, LoraLayer)]


def save_adapter_tensors(model: PeftModel, directory: Path, adapter_name: str = "default") -> None:
    """A stock PEFT adapter folder (adapter_config.json + adapter_model.safetensors)."""
    tensors = get_peft_model_state_dict(model, adapter_name=adapter_name)
    save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, str(directory / "adapter_model.safetensors"))
    config = model.peft_config[adapter_name].to_dict()
    config = {k: (sorted(v) if isinstance(v, set) else v) for k, v in config.items()}
    (directory / "adapter_config.json").write_text(json.dumps(config, indent=2, default=str))


def load_adapter_tensors(model: PeftModel, directory: Path, adapter_name: str = "default") -> None:
    tensors = load_file(str(directory / "adapter_model.safetensors"))
    result = set_peft_model_state_dict(model, tensors, adapter_name=adapter_name)
    unexpected = getattr(result, "unexpected_keys", [])
    if unexpected:
        raise UserError(f"{directory}: adapter holds unexpected tensors, e.g. {unexpected[0]}")


class TaskAdapters:
    """One PEFT LoRA adapter per task ("task1", "task2", …) on the same target modules.

    `activate(names, trainable)` makes `names` the active adapters (PEFT sums their outputs)
    and lets only `trainable`'s LoRA weights train. A new adapter gets PEFT's init (Kaiming-
    uniform A, zero B, so adding it leaves the function unchanged) from a generator seeded by
    the run's seed, `init_offset` and the task index, so a resumed run builds the same adapter
    as an uninterrupted one.
    """

    def __init__(self, config: LoraConfig, seed: int, init_offset: int = 500, file_stem: str = "task_adapters") -> None:
        self.config = config
        self.seed = seed
        self.init_offset = init_offset
        self.file_stem = file_stem  # checkpoint files <stem>.safetensors and <stem>.json
        self.names: list[str] = []

    def wrap(self, model: torch.nn.Module) -> PeftModel:
        wrapped = wrap_with_lora(model, self.config, adapter_name="task1")
        self.names = ["task1"]
        self._init(wrapped, "task1", 1)
        self.activate(wrapped, ["task1"], "task1")
        return wrapped

    def for_task(self, model: PeftModel, index: int) -> str:
        """The adapter of task `index` (1-based), adding the missing ones first."""
        while len(self.names) < index:
            self.add(model)
        return self.names[index - 1]

    def add(self, model: PeftModel) -> str:
        name = f"task{len(self.names) + 1}"
        with torch.random.fork_rng(devices=[]):
            model.add_adapter(name, self.config)
        self.names.append(name)
        self._init(model, name, len(self.names))
        return name

    def _init(self, model: PeftModel, name: str, index: int) -> None:
        import math

        generator = torch.Generator().manual_seed(self.seed * 1000 + self.init_offset + index)
        with torch.no_grad():
            for _, layer in lora_layers(model):
                weight = layer.lora_A[name].weight
                fresh = torch.empty(weight.shape, dtype=torch.float32)
                torch.nn.init.kaiming_uniform_(fresh, a=math.sqrt(5), generator=generator)
                weight.copy_(fresh.to(weight.dtype))
                layer.lora_B[name].weight.zero_()

    def activate(self, model: PeftModel, names: list[str], trainable: str | None,
                 also_trainable: tuple[torch.nn.Parameter, ...] = ()) -> None:
        """`names` active (summed), only `trainable`'s LoRA weights (and `also_trainable`) train."""
        model.base_model.set_adapter(list(names))
        extra = {id(p) for p in also_trainable}
        for name, parameter in model.named_parameters():
            parameter.requires_grad_(trainable is not None and ".lora_" in name and f".{trainable}." in name
                                     or id(parameter) in extra)

    def save(self, model: PeftModel, directory: Path) -> None:
        tensors = {}
        for name in self.names:
            for key, value in get_peft_model_state_dict(model, adapter_name=name).items():
                tensors[f"{name}/{key}"] = value.detach().contiguous().cpu()
        save_file(tensors, str(directory / f"{self.file_stem}.safetensors"))
        (directory / f"{self.file_stem}.json").write_text(json.dumps({"adapters": self.names}, indent=2))

    def load(self, model: PeftModel, directory: Path) -> None:
        meta_path = directory / f"{self.file_stem}.json"
        if not meta_path.is_file():
            raise UserError(f"{directory}: no {meta_path.name} (not a checkpoint of this method)")
        names = json.loads(meta_path.read_text())["adapters"]
        while len(self.names) < len(names):
            self.add(model)
        tensors = load_file(str(directory / f"{self.file_stem}.safetensors"))
        for name in names:
            own = {k.split("/", 1)[1]: v for k, v in tensors.items() if k.startswith(name + "/")}
            result = set_peft_model_state_dict(model, own, adapter_name=name)
            unexpected = getattr(result, "unexpected_keys", [])
            if unexpected:
                raise UserError(f"{directory}: adapter {name} holds unexpected tensors, e.g. {unexpected[0]}")
