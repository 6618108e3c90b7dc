"""What run.yaml records besides the config: the effective settings and where everything came
from (package versions, git commit, data files and their hashes)."""
from __future__ import annotations

import dataclasses
import platform
import subprocess
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from .. import __version__
from ..eval.evaluator import answer_rule
from ..train.distributed import launched_processes
from .config import RunConfig, recipe_record, stage_overrides
from .session import Prepared, micro_batch_tokens, stage_method_config
from .store import sha256_file


def _git_commit() -> str | None:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=Path(__file__).parent, capture_output=True, text=True, timeout=5
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None if out.returncode == 0 else None


def _package_versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    versions = {"python": platform.python_version()}
    for name in ("torch", "transformers", "peft", "accelerate", "safetensors"):
        try:
            versions[name] = version(name)
        except PackageNotFoundError:
            pass
    return versions


def run_yaml(prep: Prepared) -> dict[str, Any]:
    config = prep.config
    return {
        "config": dataclasses.asdict(config),
        "effective": {
            "task_order": [t.name for t in prep.tasks],
            "lr": prep.lr,
            "method_options": dataclasses.asdict(prep.method_options),
            "precision": prep.precision,
            "device": str(prep.device),
            "data_dir": str(prep.data_dir.resolve()),
            "model_source": prep.loaded.source,
            "arch": prep.loaded.arch,
            # The global batch is batch_size x grad_accum whatever the number of processes:
            # each rank computes 1/world of every step (train/distributed.py).
            "world_size": launched_processes().world,
            "fsdp": launched_processes().sharded,
            "global_batch": config.batch_size * config.grad_accum,
            "answer_rule": answer_rule(config.eval_mode, config.with_rouge),
            "micro_batch_tokens": micro_batch_tokens(config, prep.device),
            "model_weights": prep.loaded.weights,
            "recipe": recipe_record(config),
            # What each task trains with, after task_overrides (stage k trains task k).
            "per_task": [{"task": t.name, **_per_task(config, prep, k, t.name)} for k, t in enumerate(prep.tasks, 1)],
        },
        "provenance": {
            "dealcl": __version__,
            "packages": _package_versions(),
            "git_commit": _git_commit(),
            "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "data_files": {
                t.name: {role: {"path": path, "sha256": sha256_file(Path(path))} for role, path in t.files.items()}
                for t in prep.tasks
            },
        },
    }


def _per_task(config: RunConfig, prep: Prepared, index: int, task: str) -> dict[str, Any]:
    values = stage_overrides(config, index, [task])
    row = {"lr": values.get("lr", prep.lr), "epochs": values.get("epochs", config.epochs)}
    varying = {k.split(".", 1)[1]: v for k, v in values.items() if k.startswith("method.")}
    if varying:
        options = stage_method_config(config, prep.method_class, index, [task])
        row["method_options"] = {k: getattr(options, k) for k in varying}
    return row


