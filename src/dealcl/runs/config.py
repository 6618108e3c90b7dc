"""The run configuration: recipe + YAML file + CLI flags + `key=value` overrides, validated in one place.

Precedence: defaults < recipe (`--recipe`, src/dealcl/recipes/) < `--config FILE` < flags <
`key=value` overrides. Method options live under `method_options` in YAML and as
`method.KEY=VALUE` on the command line. `task_overrides` gives some stages other values, by task
name or position: `{MNLI: {epochs: 2}, "stages 2-": {lr: 1e-4}, CB: {method.lambda1: 0.5}}`.
"""
from __future__ import annotations

import dataclasses
import difflib
import re
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from ..domains import (
    Domain, check, check_fields, coerce, existing_dir, name_list, non_empty, non_negative, one_of, option, positive, seed_value,
)
from ..data.benchmarks import BENCHMARKS
from ..errors import UserError

def flag(default: Any, help: str, domain: Domain | None = None) -> Any:
    """A field that `dealcl run` (and compare, sweep) also takes as `--name-with-dashes`; its
    domain (domains.py) is checked for every layer alike: YAML, flag and key=value."""
    return option(default, domain, flag=True, help=help)


@dataclass
class RunConfig:
    method: str = flag("seqlora", 'registered name (`dealcl methods`) or path/to/file.py:ClassName', non_empty)
    model: str = flag("smollm2-135m", 'short name (`dealcl models`), Hugging Face id, local folder or .gguf file', non_empty)
    benchmark: str | None = flag(None, 'a named task sequence (`dealcl benchmarks`; default: none, give --tasks)',
                                 one_of(*BENCHMARKS))
    order: int | None = flag(None, 'task order of the benchmark (standard: 1-3, long: 4-6; tc has one)', positive)
    tasks: list[str] | None = flag(None, 'a custom sequence: comma-separated dataset names or task folders', non_empty)
    data: str | None = flag(None, "CL_Benchmark root (default $DEALCL_DATA, ../shared/CL_Benchmark, "
                                  "./data/CL_Benchmark)", existing_dir)
    train_per_task: int | None = flag(None, 'cap on training examples per task (default: all)', positive)
    test_per_task: int | None = flag(None, 'cap on test examples per task (default: all)', positive)
    val_per_task: int = flag(0, 'validation examples held out of train', non_negative)
    sample: str = flag("first", 'first (upstream) or random (seeded) examples under a cap', one_of("first", "random"))
    epochs: int = flag(1, "passes over each task's training examples", positive)
    lr: float | None = flag(None, "learning rate (default: the method's calibrated value)", positive)
    batch_size: int = flag(8, "examples per batch; an optimizer step takes batch size x grad accum "
                              "examples, whatever the number of processes", positive)
    grad_accum: int = flag(1, "gradient accumulation: batches per optimizer step", positive)
    max_grad_norm: float = option(1.0, non_negative)  # 0: no clipping
    gradient_checkpointing: bool = False  # recompute activations in backward: less memory, slower
    # At most this many padded tokens (rows × longest) per micro-batch, one example at least;
    # the optimizer step (batch_size × grad_accum examples) and its loss stay the same.
    # None: 1024 on a CPU (bounded memory on long prompts), no cap on a GPU.
    micro_batch_tokens: int | None = option(None, positive)
    # Decoder-only training computes the prompt prefix a micro-batch's rows share once (the
    # same loss and gradient; LoRA dropout draws one mask on the shared positions). Off with
    # gradient checkpointing (no cache while recomputing) and with fsdp.
    share_prompt_prefix: bool = True
    group_by_length: bool = True  # batches of similar length (less padding); false: plain shuffle
    seed: int = flag(42, 'seed of the data order, sampling, dropout and adapter init', seed_value)
    max_source_length: int = option(512, positive)
    precision: str = flag("auto", "compute precision (autocast): bf16, fp32, or auto = bf16 where the CPU or GPU has it",
                           one_of("auto", "bf16", "fp32"))
    # How the frozen base weights are stored (adapters stay fp32).
    model_dtype: str = option("fp32", one_of("fp32", "bf16"))
    fsdp: bool = False  # several processes: shard the frozen block weights over the ranks (FSDP2)
    prompt_style: str = flag("plain", "plain (upstream prompt) or chat (model's chat template)", one_of("plain", "chat"))
    eval_batch_size: int = option(16, positive)
    eval_mode: str = flag("generate", "generate (greedy answers, exact match) or score (rank the labels "
                                      "by likelihood)", one_of("generate", "score"))
    # validation: score the --val-per-task examples held out of train (tuning), never the test set.
    eval_split: str = option("test", one_of("test", "validation"))
    eval_all_stages: bool = flag(False, 'evaluate every task after every stage (gives forward transfer)')
    reference_stage: bool = True  # evaluate the untouched model first: the zero-shot b_j
    with_rouge: bool = flag(False, "also score ROUGE-1 and ROUGE-L (rouge-score, stemmed, as upstream) into results.json; "
                                   "generates whole answers (no early stop)")
    # Experiment trackers (accelerate's): none, or a list of tensorboard, wandb, mlflow. They
    # log under <run>/tracking/ (runs/tracking.py); what is computed does not depend on them.
    report_to: list[str] | None = flag(None, "experiment trackers: none (default), or tensorboard, wandb, mlflow "
                                             "(comma-separated); they log into <run>/tracking/",
                                        name_list)  # which names: _check_trackers
    trust_remote_code: bool = flag(False, "allow a model's own Python code to run (off by default)")
    # The recipe whose values this config starts from (recorded, applied once).
    recipe: str | None = flag(None, "start from a recipe of upstream settings: a name from `dealcl recipes`, or "
                                    "upstream (the one for this method, benchmark and model family; default: none)", non_empty)
    method_options: dict[str, Any] = field(default_factory=dict)
    # Values for some stages only: selector (task name, "stage N", "stages N-M", "stages N-") →
    # {key: value}, keys from STAGE_KEYS or method.KEY (options the method lets vary per task).
    task_overrides: dict[str, dict[str, Any]] = field(default_factory=dict)

    # Keys that do not change what is computed: a run may be resumed with other values.
    NON_SEMANTIC: typing.ClassVar[frozenset[str]] = frozenset({"eval_batch_size", "fsdp", "report_to"})

    @classmethod
    def flag_fields(cls) -> list[dataclasses.Field]:
        """The fields the command line takes as flags, in declaration order."""
        return [f for f in dataclasses.fields(cls) if f.metadata.get("flag")]

    def identity(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        return {k: v for k, v in data.items() if k not in self.NON_SEMANTIC}


def _unknown_key(key: str, known: list[str], where: str) -> UserError:
    close = difflib.get_close_matches(key, known, n=1)
    hint = f" (did you mean '{close[0]}'?)" if close else ""
    return UserError(f"unknown {where} key '{key}'{hint}")


# What a stage may set for itself (task_overrides), besides method.KEY options.
STAGE_KEYS = ("epochs", "lr", "batch_size", "grad_accum", "max_grad_norm")
_SELECTOR = re.compile(r"stages? (\d+)(?:-(\d*))?")


def _stage_range(selector: str) -> tuple[int, float] | None:
    """(first, last) stage of a positional selector ("stage 2", "stages 2-4", "stages 2-"), else None."""
    match = _SELECTOR.fullmatch(selector.strip())
    if match is None:
        return None
    first = int(match.group(1))
    last = match.group(2)
    if last is None:
        return first, first
    return first, float("inf") if last == "" else int(last)


def merge_task_overrides(old: dict[str, dict], new: dict[str, dict]) -> dict[str, dict]:
    merged = {k: dict(v) for k, v in old.items()}
    for selector, values in new.items():
        merged[selector] = {**merged.get(selector, {}), **values}
    return merged


def apply_values(config: RunConfig, values: dict[str, Any], source: str = "config") -> RunConfig:
    hints = typing.get_type_hints(RunConfig)
    known = [f.name for f in dataclasses.fields(RunConfig)]
    for key, value in values.items():
        if key.startswith("method."):
            option = key.split(".", 1)[1]
            config.method_options = {**config.method_options, option: value}
            continue
        if key == "task_epochs":  # the older spelling of per-task epochs (run.yaml of earlier runs)
            epochs = coerce(key, value, dict[str, Any])
            value, key = {task: {"epochs": n} for task, n in epochs.items()}, "task_overrides"
        if key == "task_overrides":
            overrides = coerce(key, value, dict[str, Any])
            for selector, entry in overrides.items():
                if not isinstance(entry, dict):
                    raise UserError(f"config key 'task_overrides.{selector}' must be a mapping of keys to values, "
                                    f"got {entry!r}")
            config.task_overrides = merge_task_overrides(config.task_overrides,
                                                         {str(k): dict(v) for k, v in overrides.items()})
            continue
        if key not in known:
            raise _unknown_key(key, known, source)
        setattr(config, key, coerce(key, value, hints[key]))
    return config


_FIELDS = {spec.name: spec for spec in dataclasses.fields(RunConfig)}


def _check_task_overrides(config: RunConfig) -> None:
    hints = typing.get_type_hints(RunConfig)
    for selector, entry in config.task_overrides.items():
        stages = _stage_range(selector)
        if selector.startswith("stage") and (stages is None or stages[0] < 1 or stages[1] < stages[0]):
            raise UserError(f"task_overrides: {selector!r} is not a stage selector (stage N, stages N-M or stages N-)")
        for key, value in entry.items():
            where = f"task_overrides.{selector}.{key}"
            if key.startswith("method."):
                continue  # checked against the method's options when the method is known
            if key not in STAGE_KEYS:
                raise _unknown_key(key, list(STAGE_KEYS), f"task_overrides.{selector}")
            # A stage's value is always a value: the Optional of the run-wide key does not apply.
            (kind,) = [a for a in typing.get_args(hints[key]) if a is not type(None)] or [hints[key]]
            entry[key] = check(where, coerce(where, value, kind), _FIELDS[key].metadata.get("domain"))


def stage_overrides(config: RunConfig, index: int, tasks: list[str]) -> dict[str, Any]:
    """The values `task_overrides` sets for stage `index` (1-based) training `tasks`.

    Positional selectors apply first, then task names (more specific). A stage training several
    tasks (MTL) takes the largest epochs of its tasks; any other key must agree among them."""
    values: dict[str, Any] = {}
    for selector, entry in config.task_overrides.items():
        stages = _stage_range(selector)
        if stages is not None and stages[0] <= index <= stages[1]:
            values.update(entry)
    named = [config.task_overrides[t] for t in tasks if t in config.task_overrides]
    for key in {k for entry in named for k in entry}:
        found = [entry[key] for entry in named if key in entry]
        if key == "epochs":
            values[key] = max(found)
        elif len(set(map(repr, found))) > 1:
            raise UserError(f"task_overrides give stage {index} ({', '.join(tasks)}) different values of {key}: {found}")
        else:
            values[key] = found[0]
    return values


def validate(config: RunConfig) -> RunConfig:
    """Every key's declared domain (domains.py), then the per-stage values."""
    check_fields(config)
    _check_task_overrides(config)
    config.report_to = _check_trackers(config.report_to)
    return config


TRACKERS = ("tensorboard", "wandb", "mlflow")


def _check_trackers(names: list[str] | None) -> list[str] | None:
    """report_to as a list of known tracker names without repeats, or None for none."""
    wanted = [] if names is None else [n.strip().lower() for n in names]
    wanted = [n for n in dict.fromkeys(wanted) if n not in ("none", "")]
    for name in wanted:
        if name not in TRACKERS:
            raise _unknown_tracker(name)
    return wanted or None


def _unknown_tracker(name: str) -> UserError:
    close = difflib.get_close_matches(name, TRACKERS, n=1)
    hint = f" (did you mean '{close[0]}'?)" if close else ""
    return UserError(f"config key 'report_to' takes none or {', '.join(TRACKERS)}, got {name!r}{hint}")


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


def user_config(config_file: Path | None, flags: dict[str, Any], overrides: list[str]) -> tuple[RunConfig, set[str]]:
    """The user's layers (config file < flags < overrides) on the defaults, before any recipe,
    and the keys they set (method options as method.KEY)."""
    layers = []
    if config_file is not None:
        layers.append(read_yaml_config(config_file))
        source = f"config file {config_file}"
    config = RunConfig()
    if layers:
        apply_values(config, layers[0], source)
    for values, source in (({k: v for k, v in flags.items() if v is not None}, "flag"),
                           (parse_overrides(overrides), "override")):
        apply_values(config, values, source)
        layers.append(values)
    keys: set[str] = set()
    for values in layers:
        for key, value in values.items():
            keys |= {f"method.{k}" for k in value} if key == "method_options" and isinstance(value, dict) else {key}
    return config, keys


def build_config(config_file: Path | None, flags: dict[str, Any], overrides: list[str]) -> RunConfig:
    config, keys = user_config(config_file, flags, overrides)
    if config.recipe is not None:
        config = with_recipe(config, keys)
    return validate(config)


def with_recipe(user: RunConfig, keys: set[str]) -> RunConfig:
    """The config the recipe `user.recipe` gives, with the user's `keys` taken from `user`.

    A key the user sets for the whole run also replaces the recipe's per-stage values of that
    key (`--lr 5e-4` means 5e-4 on every task, not only where the recipe had no per-task lr)."""
    from ..data.benchmarks import resolve_sequence
    from ..models.registry import model_family
    from ..recipes import resolve_recipe

    recipe = resolve_recipe(user.recipe, user.method, user.benchmark, user.order, model_family(user.model))
    sequence = resolve_sequence(user.benchmark, user.order, user.tasks)
    config = apply_values(RunConfig(), recipe.settings, source=f"recipe {recipe.name}")
    per_stage = {selector: {k: v for k, v in entry.items() if k not in keys}
                 for selector, entry in recipe.overrides_for(sequence).items()}
    config.task_overrides = {selector: entry for selector, entry in per_stage.items() if entry}
    for key in keys:
        if key.startswith("method."):
            option = key.split(".", 1)[1]
            config.method_options = {**config.method_options, option: user.method_options[option]}
        elif key in ("task_overrides", "task_epochs"):
            config.task_overrides = merge_task_overrides(config.task_overrides, user.task_overrides)
        elif key != "method_options":
            setattr(config, key, getattr(user, key))
    config.recipe = recipe.name
    return config


def recipe_record(config: RunConfig) -> dict[str, Any] | None:
    """What run.yaml records of the recipe: where it comes from, every value it set, and which
    of them the user replaced."""
    if config.recipe is None:
        return None
    from ..data.benchmarks import resolve_sequence
    from ..recipes import get_recipe

    recipe = get_recipe(config.recipe)
    flat = {k: v for k, v in dataclasses.asdict(config).items() if k not in ("method_options", "task_overrides")}
    flat.update({f"method.{k}": v for k, v in config.method_options.items()})
    replaced = [k for k, v in recipe.settings.items() if k in flat and _differs(flat[k], v, k)]
    sequence = resolve_sequence(config.benchmark, config.order, config.tasks)
    overrides = recipe.overrides_for(sequence)
    replaced += [f"task_overrides.{s}.{k}" for s, entry in overrides.items() for k, v in entry.items()
                 if _differs(config.task_overrides.get(s, {}).get(k), v, k)]
    return {"name": recipe.name, "source": recipe.source, "basis": recipe.basis,
            "settings": dict(recipe.settings), "task_overrides": overrides, "replaced_by_user": replaced}


def _differs(actual: Any, recipe_value: Any, key: str) -> bool:
    if actual is None:
        return True
    try:
        return float(actual) != float(recipe_value)
    except (TypeError, ValueError):
        return str(actual) != str(recipe_value)


def config_from_dict(data: dict[str, Any]) -> RunConfig:
    return validate(apply_values(RunConfig(), data))


def method_config(config_class: type, options: dict[str, Any], method_name: str):
    """Build a method's config dataclass from `method_options`, with the same strict checks: each
    option's type and declared domain (defaults included), then the config's own cross-field
    `validate()` where it has one."""
    hints = typing.get_type_hints(config_class)
    known = [f.name for f in dataclasses.fields(config_class)]
    values = {}
    for key, value in options.items():
        if key not in known:
            raise _unknown_key(key, known, f"method '{method_name}' option")
        values[key] = coerce(f"method.{key}", value, hints[key])
    instance = check_fields(config_class(**values), prefix="method.")
    cross_field_check = getattr(instance, "validate", None)
    if callable(cross_field_check):
        cross_field_check()
    return instance
