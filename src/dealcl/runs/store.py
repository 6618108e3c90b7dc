"""Writing safely: atomic files and per-stage folders with sha256 manifests (what is where in a
run directory is layout.py's).

Every file is written to a temporary name, flushed, fsynced and renamed, so a kill leaves either
the old file or the new one. A stage folder (`adapters/<k>-<task>/`, `outputs/<k>-<task>/`) is
built under a temporary name with a `manifest.json` listing each file's sha256, then renamed into
place: a folder whose manifest is missing or does not match is not a finished stage.
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


def _umask() -> int:
    """The process's umask, without changing it (Linux reports it in /proc; elsewhere it is
    read by setting it and putting it back)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def follow_umask(path: Path | int, directory: bool = False) -> None:
    """Give a file (path or open descriptor) or folder made by `tempfile` the mode a plain
    `open`/`mkdir` would have: mkstemp makes files 0600 and mkdtemp folders 0700, which would
    leave every result owner-only after the rename."""
    mode = (0o777 if directory else 0o666) & ~_umask()
    if isinstance(path, int):
        os.fchmod(path, mode)
    else:
        os.chmod(path, mode)


def _disk_error(path: Path, exc: OSError) -> UserError:
    if exc.errno == errno.ENOSPC:
        return UserError(f"no space left on device while writing {path}; finished stages are kept: free space, then `dealcl resume`")
    return UserError(f"cannot write {path}: {exc.strerror or exc}")


def atomic_write_bytes(path: Path, data: bytes) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        follow_umask(fd)
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
        follow_umask(tmp, directory=True)
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


def stage_dir_damage(directory: Path, optional: tuple[str, ...] = ()) -> tuple[str, str] | None:
    """None if the folder is a finished stage whose files all match its manifest, else
    (the file at fault, relative to the folder, or "" for the folder itself; what is wrong).

    Files named in `optional` may be absent (a finished run whose bulky copies were pruned),
    but where present they must still match.
    """
    directory = Path(directory)
    if not directory.is_dir():
        return "", "is missing"
    try:
        manifest = json.loads((directory / MANIFEST).read_text())["files"]
    except (OSError, ValueError, KeyError, TypeError):
        return MANIFEST, "is missing or unreadable"
    for name, expected in manifest.items():
        path = directory / name
        if not path.is_file():
            if name in optional:
                continue
            return name, "is missing"
        if sha256_file(path) != expected:
            return name, "does not match its manifest"
    return None


def verify_stage_dir(directory: Path, optional: tuple[str, ...] = ()) -> str | None:
    """None if the folder is a finished stage whose files all match its manifest, else why not."""
    damage = stage_dir_damage(directory, optional)
    if damage is None:
        return None
    name, why = damage
    return f"{name} {why}" if name else why
