"""The run directory on disk: atomic files, per-stage folders with sha256 manifests.

Every file is written to a temporary name, flushed, fsynced and renamed, so a kill leaves either
the old file or the new one. A stage folder (`adapters/<k>-<task>/`, `outputs/<k>-<task>/`) is
built under a temporary name with a `manifest.json` listing each file's sha256, then renamed into
place: a folder whose manifest is missing or does not match is not a finished stage.

    run.yaml                        effective config + provenance
    logs/train_and_infer.log
    adapters/<k>-<task>/            the method's state after stage k (safetensors + json)
    outputs/0-reference/            the untouched model on every task (zero-shot b_j)
    outputs/<k>-<task>/             predict_results.json, predict_eval_predictions.jsonl, predictions.json
    results.json                    metrics only: identical for identical runs
    efficiency.json                 wall time, throughput, memory per stage
"""
from __future__ import annotations

import errno
import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Callable

import yaml

from ..errors import UserError
from ..faults import fault_point

MANIFEST = "manifest.json"


def _fsync_dir(directory: Path) -> None:
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _disk_error(path: Path, exc: OSError) -> UserError:
    if exc.errno == errno.ENOSPC:
        return UserError(f"no space left on device while writing {path}; finished stages are kept: free space, then `dealcl resume`")
    return UserError(f"cannot write {path}: {exc.strerror or exc}")


def atomic_write_bytes(path: Path, data: bytes) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data[: len(data) // 2])
            fault_point("results-write")  # a kill here leaves a half-written temporary file
            handle.write(data[len(data) // 2 :])
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
        _fsync_dir(path.parent)
    except OSError as exc:
        Path(tmp).unlink(missing_ok=True)
        raise _disk_error(path, exc) from None
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def dumps_json(obj: Any) -> str:
    return json.dumps(obj, indent=2, sort_keys=False, ensure_ascii=False) + "\n"


def atomic_write_json(path: Path, obj: Any) -> None:
    atomic_write_text(path, dumps_json(obj))


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def write_stage_dir(final: Path, fill: Callable[[Path], None]) -> None:
    """Build a stage folder atomically: `fill(tmp)` writes the files, we add the manifest."""
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.", suffix=".tmp", dir=final.parent))
    try:
        fill(tmp)
        fault_point("checkpoint-write")  # a kill here leaves a stage folder without manifest
        files = sorted(p for p in tmp.rglob("*") if p.is_file())
        manifest = {str(p.relative_to(tmp)): sha256_file(p) for p in files}
        for p in files:
            with open(p, "rb+") as handle:
                os.fsync(handle.fileno())
        (tmp / MANIFEST).write_text(dumps_json({"files": manifest}))
        with open(tmp / MANIFEST, "rb+") as handle:
            os.fsync(handle.fileno())
        _fsync_dir(tmp)
        if final.exists():
            # Move the stale folder aside first: renaming onto a non-empty folder is not allowed.
            stale = final.with_name(f".{final.name}.stale")
            shutil.rmtree(stale, ignore_errors=True)
            os.replace(final, stale)
            os.replace(tmp, final)
            shutil.rmtree(stale, ignore_errors=True)
        else:
            os.replace(tmp, final)
        _fsync_dir(final.parent)
    except OSError as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        raise _disk_error(final, exc) from None
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def verify_stage_dir(directory: Path, optional: tuple[str, ...] = ()) -> str | None:
    """None if the folder is a finished stage whose files all match its manifest, else why not.

    Files named in `optional` may be absent (a finished run whose bulky copies were pruned),
    but where present they must still match.
    """
    directory = Path(directory)
    manifest_path = directory / MANIFEST
    if not directory.is_dir():
        return "missing"
    try:
        manifest = json.loads(manifest_path.read_text())["files"]
    except (OSError, ValueError, KeyError, TypeError):
        return "no readable manifest"
    for name, expected in manifest.items():
        path = directory / name
        if not path.is_file():
            if name in optional:
                continue
            return f"{name} is missing"
        if sha256_file(path) != expected:
            return f"{name} does not match its manifest"
    return None


class RunStore:
    """Paths and writers for one run directory."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)

    @property
    def config_path(self) -> Path:
        return self.root / "run.yaml"

    @property
    def log_path(self) -> Path:
        return self.root / "logs" / "train_and_infer.log"

    @property
    def results_path(self) -> Path:
        return self.root / "results.json"

    @property
    def efficiency_path(self) -> Path:
        return self.root / "efficiency.json"

    def stage_name(self, index: int, name: str) -> str:
        return f"{index}-{name}"

    def adapter_dir(self, index: int, name: str) -> Path:
        return self._inside(self.root / "adapters" / self.stage_name(index, name))

    def output_dir(self, index: int, name: str) -> Path:
        return self._inside(self.root / "outputs" / self.stage_name(index, name))

    def _inside(self, path: Path) -> Path:
        # Task names are validated when read; this is the last line of defence against a name
        # that would write outside the run directory.
        resolved = path.resolve()
        if not resolved.is_relative_to(self.root.resolve()):
            raise UserError(f"refusing to write outside the run directory: {path}")
        return path

    def remove_temporaries(self) -> list[Path]:
        """Delete the temporary files and folders a killed writer leaves (`.<name>.*.tmp`)."""
        removed = []
        for folder in (self.root, self.root / "adapters", self.root / "outputs"):
            if not folder.is_dir():
                continue
            for path in folder.iterdir():
                if path.name.startswith(".") and (path.name.endswith(".tmp") or path.name.endswith(".stale")):
                    if path.is_dir():
                        shutil.rmtree(path, ignore_errors=True)
                    else:
                        path.unlink(missing_ok=True)
                    removed.append(path)
        return removed

    def is_run(self) -> bool:
        return self.config_path.is_file()

    def read_run_yaml(self) -> dict[str, Any]:
        try:
            data = yaml.safe_load(self.config_path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, yaml.YAMLError):
            raise UserError(f"{self.config_path} is unreadable or not valid YAML") from None
        if not isinstance(data, dict) or not isinstance(data.get("config"), dict):
            raise UserError(f"{self.config_path} is not a dealcl run.yaml (no 'config' mapping)")
        return data

    def write_run_yaml(self, data: dict[str, Any]) -> None:
        atomic_write_text(self.config_path, yaml.safe_dump(data, sort_keys=False, allow_unicode=True))

    def read_json(self, path: Path, default: Any = None) -> Any:
        try:
            return json.loads(Path(path).read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return default
