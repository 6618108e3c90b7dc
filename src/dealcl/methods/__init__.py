"""Continual methods, one module each, registered by name (`dealcl methods` lists them)."""
from __future__ import annotations

import importlib
import importlib.util
import pkgutil
import sys
from importlib.metadata import entry_points
from pathlib import Path

from ..errors import UserError
from ._lora import (
    TaskAdapters, load_adapter_tensors, lora_config, lora_layers, save_adapter_tensors, wrap_with_lora,
)
from .base import REGISTRY, ContinualMethod, LoraOptions, MethodConfig, Stage, TrainItem, register

# Importing a module registers its method: every public module of this package is one method,
# so adding a method is adding a file. Helpers start with "_" (`_lora`, `_projected_adam`).
for _info in pkgutil.iter_modules(__path__):
    if not _info.name.startswith("_"):
        importlib.import_module(f"{__name__}.{_info.name}")

ENTRY_POINT_GROUP = "dealcl.methods"


def _from_file(spec: str) -> type[ContinualMethod]:
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


def _from_entry_points(name: str) -> type[ContinualMethod] | None:
    for entry in entry_points(group=ENTRY_POINT_GROUP):
        if entry.name == name:
            cls = entry.load()
            if isinstance(cls, type) and issubclass(cls, ContinualMethod):
                REGISTRY.setdefault(name, cls)
                return cls
            raise UserError(f"entry point '{name}' ({entry.value}) is not a ContinualMethod subclass")
    return None


def resolve_method(spec: str) -> type[ContinualMethod]:
    """A registered name, an installed entry point, or `path/to/file.py:ClassName`."""
    if spec in REGISTRY:
        return REGISTRY[spec]
    if ":" in spec and spec.rpartition(":")[0].endswith(".py"):
        return _from_file(spec)
    found = _from_entry_points(spec)
    if found is not None:
        return found
    raise UserError(f"unknown method '{spec}' (known: {', '.join(sorted(REGISTRY))}; or path/to/file.py:ClassName)")


def list_methods() -> list[type[ContinualMethod]]:
    for entry in entry_points(group=ENTRY_POINT_GROUP):
        if entry.name not in REGISTRY:
            try:
                _from_entry_points(entry.name)
            except Exception:  # a broken third-party plugin must not break the listing
                continue
    return [REGISTRY[name] for name in sorted(REGISTRY)]


__all__ = [
    "ContinualMethod", "MethodConfig", "LoraOptions", "Stage", "TrainItem", "register", "resolve_method",
    "list_methods", "REGISTRY",
    # the LoRA plumbing a method file may use (methods/_lora)
    "TaskAdapters", "load_adapter_tensors", "lora_config", "lora_layers", "save_adapter_tensors", "wrap_with_lora",
]
