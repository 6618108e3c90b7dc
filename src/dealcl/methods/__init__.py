"""Continual methods, one module each, registered by name (`dealcl methods` lists them).

Importing this package is cheap: the method modules (and torch with them) are imported on first
use of the registry or of a class (`REGISTRY`, `ContinualMethod`, `resolve_method`, ...). What the
command line needs before that (the names, descriptions and papers of the built-in methods, to
list them and to check `--method` instantly) is the static table `BUILTIN_METHODS`;
tests/methods/test_catalog.py checks it against the real registry, so the two cannot drift.
"""
from __future__ import annotations

import importlib
import importlib.util
import pkgutil
import sys
from dataclasses import dataclass
from importlib.metadata import entry_points
from pathlib import Path
from typing import Any

from ..errors import UserError

ENTRY_POINT_GROUP = "dealcl.methods"


@dataclass(frozen=True)
class MethodInfo:
    """What `dealcl methods` shows of a method, and whether it trains (compare's --lrs-from)."""

    name: str
    description: str
    paper: str
    trains: bool = True


_DEAL_PAPER = ("Han, Zhao et al., Data Efficient Adaptation in Large Language Models via Continuous Low-Rank "
               "Fine-Tuning, NeurIPS 2025 (arXiv:2509.18942)")
_OLORA = "Wang et al., EMNLP 2023 Findings"

# One row per module of this package that registers a method (the class attributes `name`,
# `description`, `paper`, `trains`), in name order. A new method file adds its row here.
BUILTIN_METHODS: tuple[MethodInfo, ...] = (
    MethodInfo("deal", "DEAL, bugs fixed: Haar-gain filter on LoRA-A + carried residual MLP, ℓp regulariser, "
                       "B frozen", _DEAL_PAPER),
    MethodInfo("deal-code", "DEAL as released: fresh Kaiming MLP and θ per task, dropped at task end; B frozen; "
                            "regulariser off", _DEAL_PAPER),
    MethodInfo("ewc", "one LoRA with an EWC penalty (empirical diagonal Fisher per finished task, accumulated)",
               "Kirkpatrick et al., Overcoming catastrophic forgetting in neural networks, PNAS 2017"),
    MethodInfo("gainlora", "InfLoRA branches weighted by per-task gates on the prompt; gate updates kept off old tasks' features",
               "Liang & Li, Gated Integration of Low-Rank Adaptation for Continual Learning of Large Language Models, "
               "NeurIPS 2025"),
    MethodInfo("gorp", "per-task LoRA + GaLore full-rank weights, gradient memory from Adam's first moment",
               "Wang, Lyu, Sun, Jing, Continual Gradient Low-Rank Projection Fine-Tuning for LLMs, ACL 2025"),
    MethodInfo("inclora", "a new LoRA per task, earlier ones frozen and summed, no regulariser",
               f"IncLoRA baseline of {_OLORA} (O-LoRA with λ1 = λ2 = 0)"),
    MethodInfo("inflora", "a new LoRA per task with A designed orthogonal to old tasks' inputs (GPM memory) and frozen; "
                          "only B trains",
               "Liang & Li, InfLoRA: Interference-Free Low-Rank Adaptation for Continual Learning, CVPR 2024 "
               "(LLM form of the GainLoRA code)"),
    MethodInfo("lwf", "one LoRA; KL toward the previous stage's model on the new task's answer positions (T = 2)",
               "Li & Hoiem, Learning without Forgetting, ECCV 2016 / TPAMI 2017"),
    MethodInfo("mtl", "one LoRA trained jointly on every task of the sequence (multi-task upper bound; AA only)",
               f"multi-task learning upper bound (as in O-LoRA, {_OLORA})"),
    MethodInfo("nlora", "a new LoRA per task, earlier ones frozen and summed, ℓ1 penalty on the new adapter (‖BA‖₁)",
               "Yang et al., Is Parameter Collision Hindering Continual Learning in LLMs?, COLING 2025"),
    MethodInfo("olora", "a new LoRA per task, kept orthogonal to the frozen earlier ones (overlap penalty on A)",
               f"Wang et al., Orthogonal Subspace Learning for Language Model Continual Learning, EMNLP 2023 Findings"),
    MethodInfo("osf", "orthogonal subspace fine-tuning (PEFT's osf): top singular directions frozen, the rest trained, "
                      "merged per task",
               "Nayak et al., Sculpting Subspaces: Constrained Full Fine-Tuning in LLMs for Continual Learning, 2025"),
    MethodInfo("pertask", "an independent LoRA per task, each task evaluated with its own adapter (upper bound)",
               f"baseline (PerTaskFT in O-LoRA, {_OLORA}), LoRA variant"),
    MethodInfo("replay", "one LoRA; later tasks also train on a seeded sample (2 %, at least 8) of every earlier task",
               "experience replay baseline (e.g. Rolnick et al., NeurIPS 2019; as listed in O-LoRA, EMNLP 2023)"),
    MethodInfo("seqft", "full fine-tuning of every weight (embeddings included by default) on every task in turn",
               f"baseline (SeqFT in O-LoRA, {_OLORA})"),
    MethodInfo("seqlora", "one LoRA adapter carried and trained on every task in turn",
               "baseline (Hu et al., 2021 LoRA; as in O-LoRA, Wang et al., EMNLP 2023)"),
    MethodInfo("zero-shot", "trains nothing: the base model's own accuracy on each task (reference for FWT)",
               "reference point (no training)", trains=False),
)
BUILTIN_NAMES = frozenset(m.name for m in BUILTIN_METHODS)

# Names this package exports from its submodules, imported when first asked for.
_LAZY = {
    "ContinualMethod": "base", "MethodConfig": "base", "LoraOptions": "base", "Stage": "base", "TrainItem": "base",
    "register": "base",
    "TaskAdapters": "_lora", "load_adapter_tensors": "_lora", "lora_config": "_lora", "lora_layers": "_lora",
    "save_adapter_tensors": "_lora", "wrap_with_lora": "_lora",
}
_all_imported = False


def _registry() -> dict[str, Any]:
    """The registry with every built-in method in it. Importing a module registers its method:
    every public module of this package is one method, so adding a method is adding a file.
    Helpers start with "_" (`_lora`, `_projected_adam`)."""
    global _all_imported
    if not _all_imported:
        for info in pkgutil.iter_modules(__path__):
            if not info.name.startswith("_"):
                importlib.import_module(f"{__name__}.{info.name}")
        _all_imported = True
    from .base import REGISTRY

    return REGISTRY


def __getattr__(name: str) -> Any:
    if name == "REGISTRY":
        value = _registry()
    elif name in _LAZY:
        _registry()  # `from dealcl.methods import Stage` behaves as before: every method registered
        value = getattr(importlib.import_module(f"{__name__}.{_LAZY[name]}"), name)
    else:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    globals()[name] = value
    return value


def is_method_file(spec: str) -> bool:
    return ":" in spec and spec.rpartition(":")[0].endswith(".py")


def check_method_name(spec: str) -> None:
    """Refuse a `--method` that names nothing, without importing any method (or torch): a
    built-in name, an installed entry point, or an existing `path/to/file.py:ClassName`. The
    class itself is checked when it is imported (`resolve_method`)."""
    if spec in BUILTIN_NAMES:
        return
    if is_method_file(spec):
        path = Path(spec.rpartition(":")[0]).expanduser()
        if not path.is_file():
            raise UserError(f"method file does not exist: {path}")
        return
    if any(entry.name == spec for entry in entry_points(group=ENTRY_POINT_GROUP)):
        return
    raise UserError(f"unknown method '{spec}' (known: {', '.join(sorted(BUILTIN_NAMES))}; `dealcl methods` "
                    "describes them; or path/to/file.py:ClassName)")


def _from_file(spec: str):
    from .base import ContinualMethod

    path_text, _, class_name = spec.rpartition(":")
    path = Path(path_text).expanduser()
    if not path.is_file():
        raise UserError(f"method file does not exist: {path}")
    module_name = f"dealcl_user_method_{abs(hash(str(path.resolve())))}"
    module_spec = importlib.util.spec_from_file_location(module_name, path)
    if module_spec is None or module_spec.loader is None:
        raise UserError(f"cannot import method file {path}")
    module = importlib.util.module_from_spec(module_spec)
    sys.modules[module_name] = module
    try:
        module_spec.loader.exec_module(module)
    except Exception as exc:  # the user's own code: report it as their error, in one line
        raise UserError(f"importing {path} failed: {type(exc).__name__}: {exc}") from None
    cls = getattr(module, class_name, None)
    if not (isinstance(cls, type) and issubclass(cls, ContinualMethod)):
        raise UserError(f"{path} has no ContinualMethod subclass named '{class_name}'")
    return cls


def _from_entry_points(name: str):
    from .base import ContinualMethod

    registry = _registry()
    for entry in entry_points(group=ENTRY_POINT_GROUP):
        if entry.name == name:
            cls = entry.load()
            if isinstance(cls, type) and issubclass(cls, ContinualMethod):
                registry.setdefault(name, cls)
                return cls
            raise UserError(f"entry point '{name}' ({entry.value}) is not a ContinualMethod subclass")
    return None


def resolve_method(spec: str):
    """A registered name, an installed entry point, or `path/to/file.py:ClassName`."""
    registry = _registry()
    if spec in registry:
        return registry[spec]
    if is_method_file(spec):
        return _from_file(spec)
    found = _from_entry_points(spec)
    if found is not None:
        return found
    raise UserError(f"unknown method '{spec}' (known: {', '.join(sorted(registry))}; or path/to/file.py:ClassName)")


def list_methods() -> list:
    """Every registered method class (the built-in ones and installed plugins), by name."""
    registry = _registry()
    for entry in entry_points(group=ENTRY_POINT_GROUP):
        if entry.name not in registry:
            try:
                _from_entry_points(entry.name)
            except Exception:  # a broken third-party plugin must not break the listing
                continue
    return [registry[name] for name in sorted(registry)]


def method_catalog() -> list[MethodInfo]:
    """What `dealcl methods` prints: the static table, plus installed plugins. Plugins are
    imported (and torch with them) only when one is installed."""
    found = {m.name: m for m in BUILTIN_METHODS}
    plugins = [entry for entry in entry_points(group=ENTRY_POINT_GROUP) if entry.name not in found]
    if plugins:
        for cls in list_methods():
            found.setdefault(cls.name, MethodInfo(cls.name, cls.description, cls.paper, cls.trains))
    return [found[name] for name in sorted(found)]


__all__ = [
    "ContinualMethod", "MethodConfig", "LoraOptions", "Stage", "TrainItem", "register", "resolve_method",
    "list_methods", "method_catalog", "check_method_name", "BUILTIN_METHODS", "MethodInfo", "REGISTRY",
    # the LoRA plumbing a method file may use (methods/_lora)
    "TaskAdapters", "load_adapter_tensors", "lora_config", "lora_layers", "save_adapter_tensors", "wrap_with_lora",
]
