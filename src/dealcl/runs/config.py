"""The run configuration: YAML file + CLI flags + `key=value` overrides, validated in one place.

Precedence: defaults < `--config FILE` < flags < `key=value` overrides. Method options live
under `method_options` in YAML and as `method.KEY=VALUE` on the command line.
"""
from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from ..errors import UserError


@dataclass
class RunConfig:
    method: str = "seqlora"
    model: str = "smollm2-135m"
    benchmark: str | None = None
    order: int | None = None
    tasks: list[str] | None = None
    data: str | None = None
    train_per_task: int | None = None
    test_per_task: int | None = None
    val_per_task: int = 0
    sample: str = "first"  # "first" (upstream) or "random" (seeded)
    epochs: int = 1
    task_epochs: dict[str, int] = field(default_factory=dict)  # e.g. {MNLI: 2} as in the long scripts
    lr: float | None = None  # None: the method's calibrated default
    batch_size: int = 8
    grad_accum: int = 1
    max_grad_norm: float = 1.0
    gradient_checkpointing: bool = False  # recompute activations in backward: less memory, slower
    group_by_length: bool = True  # batches of similar length (less padding); false: plain shuffle
    seed: int = 42
    max_source_length: int = 512
    precision: str = "auto"  # auto | bf16 | fp32 (autocast for compute)
    model_dtype: str = "fp32"  # fp32 | bf16: how the frozen base weights are stored (adapters stay fp32)
    fsdp: bool = False  # several processes: shard the frozen block weights over the ranks (FSDP2)
    prompt_style: str = "plain"  # plain | chat
    eval_batch_size: int = 16
    eval_mode: str = "generate"  # generate (exact match of greedy answers) | score (most likely label)
    eval_split: str = "test"  # test | validation (the --val-per-task examples held out of train: tuning)
    eval_all_stages: bool = False
    reference_stage: bool = True  # evaluate the untouched model first: the zero-shot b_j
    with_rouge: bool = False
    trust_remote_code: bool = False
    method_options: dict[str, Any] = field(default_factory=dict)

    # Keys that do not change what is computed: a run may be resumed with other values.
    NON_SEMANTIC: typing.ClassVar[frozenset[str]] = frozenset({"eval_batch_size", "fsdp"})

    def identity(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        return {k: v for k, v in data.items() if k not in self.NON_SEMANTIC}


CHOICES = {"model_dtype": ("fp32", "bf16"), "eval_mode": ("generate", "score"), "eval_split": ("test", "validation"), "sample": ("first", "random"), "precision": ("auto", "bf16", "fp32"), "prompt_style": ("plain", "chat")}
POSITIVE = {"epochs", "batch_size", "grad_accum", "eval_batch_size", "max_source_length", "train_per_task", "test_per_task", "lr"}
NON_NEGATIVE = {"val_per_task", "max_grad_norm", "seed"}


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", str(tp))


def coerce(key: str, value: Any, tp: Any) -> Any:
    """Check `value` against the annotated type `tp`; accept strings from the command line."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if value is None or (isinstance(value, str) and value.lower() in ("none", "null")):
            return None
        return coerce(key, value, args[0])
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "yes", "1", "false", "no", "0"):
            return value.lower() in ("true", "yes", "1")
        raise UserError(f"config key '{key}' must be true or false, got {value!r}")
    if tp is int:
        if isinstance(value, bool):
            raise UserError(f"config key '{key}' must be an integer, got {value!r}")
        if isinstance(value, int):
            return value
        if isinstance(value, str):
            try:
                return int(value)
            except ValueError:
                pass
        raise UserError(f"config key '{key}' must be an integer, got {value!r}")
    if tp is float:
        if isinstance(value, bool):
            raise UserError(f"config key '{key}' must be a number, got {value!r}")
        if isinstance(value, (int, float)):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                pass
        raise UserError(f"config key '{key}' must be a number, got {value!r}")
    if tp is str:
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            return str(value)
        raise UserError(f"config key '{key}' must be a string, got {value!r}")
    if origin is list:
        (item_type,) = typing.get_args(tp) or (str,)
        if isinstance(value, str):
            value = [v for v in (part.strip() for part in value.split(",")) if v]
        if not isinstance(value, list):
            raise UserError(f"config key '{key}' must be a list, got {value!r}")
        return [coerce(key, v, item_type) for v in value]
    if origin is dict:
        if isinstance(value, str):
            value = yaml.safe_load(value)
        if not isinstance(value, dict):
            raise UserError(f"config key '{key}' must be a mapping, got {value!r}")
        key_type, value_type = typing.get_args(tp) or (str, Any)
        if value_type is Any:
            return dict(value)
        return {str(k): coerce(f"{key}.{k}", v, value_type) for k, v in value.items()}
    return value


def _unknown_key(key: str, known: list[str], where: str) -> UserError:
    close = difflib.get_close_matches(key, known, n=1)
    hint = f" (did you mean '{close[0]}'?)" if close else ""
    return UserError(f"unknown {where} key '{key}'{hint}")


def apply_values(config: RunConfig, values: dict[str, Any], source: str = "config") -> RunConfig:
    hints = typing.get_type_hints(RunConfig)
    known = [f.name for f in dataclasses.fields(RunConfig)]
    for key, value in values.items():
        if key.startswith("method."):
            option = key.split(".", 1)[1]
            config.method_options = {**config.method_options, option: value}
            continue
        if key not in known:
            raise _unknown_key(key, known, source)
        setattr(config, key, coerce(key, value, hints[key]))
    return config


def validate(config: RunConfig) -> RunConfig:
    for key, choices in CHOICES.items():
        if getattr(config, key) not in choices:
            raise UserError(f"config key '{key}' must be one of {', '.join(choices)}, got {getattr(config, key)!r}")
    for key in POSITIVE:
        value = getattr(config, key)
        if value is not None and not value > 0:
            raise UserError(f"config key '{key}' must be positive, got {value!r}")
    for key in NON_NEGATIVE:
        value = getattr(config, key)
        if value is not None and value < 0:
            raise UserError(f"config key '{key}' must not be negative, got {value!r}")
    for task, epochs in config.task_epochs.items():
        if epochs <= 0:
            raise UserError(f"config key 'task_epochs.{task}' must be positive, got {epochs!r}")
    return config


def read_yaml_config(path: Path) -> dict[str, Any]:
    try:
        text = Path(path).read_text(encoding="utf-8")
    except FileNotFoundError:
        raise UserError(f"config file does not exist: {path}") from None
    except UnicodeDecodeError:
        raise UserError(f"config file is not UTF-8 text: {path}") from None
    except OSError as exc:
        raise UserError(f"cannot read config file {path}: {exc.strerror}") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" (line {mark.line + 1})" if mark is not None else ""
        raise UserError(f"config file {path} is not valid YAML{where}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise UserError(f"config file {path} must hold a mapping of keys to values, not a {type(data).__name__}")
    # run.yaml written by dealcl carries provenance next to the config: skip it on reload.
    data = dict(data.get("config", data)) if "config" in data and isinstance(data["config"], dict) else data
    return data


def parse_overrides(pairs: list[str]) -> dict[str, Any]:
    values: dict[str, Any] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise UserError(f"expected key=value, got '{pair}'")
        values[key.strip()] = value
    return values


def build_config(config_file: Path | None, flags: dict[str, Any], overrides: list[str]) -> RunConfig:
    config = RunConfig()
    if config_file is not None:
        apply_values(config, read_yaml_config(config_file), source=f"config file {config_file}")
    apply_values(config, {k: v for k, v in flags.items() if v is not None}, source="flag")
    apply_values(config, parse_overrides(overrides), source="override")
    return validate(config)


def config_from_dict(data: dict[str, Any]) -> RunConfig:
    return validate(apply_values(RunConfig(), data))


def method_config(config_class: type, options: dict[str, Any], method_name: str):
    """Build a method's config dataclass from `method_options`, with the same strict checks."""
    hints = typing.get_type_hints(config_class)
    known = [f.name for f in dataclasses.fields(config_class)]
    values = {}
    for key, value in options.items():
        if key not in known:
            raise _unknown_key(key, known, f"method '{method_name}' option")
        values[key] = coerce(f"method.{key}", value, hints[key])
    instance = config_class(**values)
    check = getattr(instance, "validate", None)
    if callable(check):
        check()
    return instance
