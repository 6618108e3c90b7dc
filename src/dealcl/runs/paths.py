"""Every path the CLI writes, checked before any work starts, and write errors as one line.

A run directory (`run --output`, `resume`), a comparison, sweep or demo folder, a report folder,
an export destination and a `predict --output` file are each checked by `check_folder` /
`check_file` as soon as the command knows them, before torch is imported or a model is loaded:

- it is not an existing file where a folder is meant (or a folder where a file is meant);
- it can be created: its nearest existing ancestor is a folder in which we can create one (a
  real probe, created and removed at once: permission bits say nothing for root, and a
  read-only or special file system such as /proc only answers a real attempt);
- it is not inside another run directory (a folder holding run.yaml), whose own files it would
  mix with; a report written into the run it reports on is the one exception.

`check_free_space` compares the free space with the run's expected size (`expected_run_bytes`:
the method's state after each stage plus the evaluation outputs) once the model is loaded and
before the run directory is touched: less than the estimate is refused, less than twice the
estimate is a warning. `writing(path)` turns any OSError while writing into one `error:` line
naming the path. Nothing here imports torch.
"""
from __future__ import annotations

import contextlib
import errno
import shutil
import tempfile
from pathlib import Path
from typing import Iterator

from ..errors import UserError
from .layout import RUN_YAML

# Besides the stage files: logs, run.yaml, results, efficiency.json, plots.
FIXED_RUN_BYTES = 16 * 2**20
# Per test example and evaluation: the upstream-layout line quotes the sentence; answers, labels
# and JSON keys come on top.
ANSWER_OVERHEAD_BYTES = 512


def _nearest_existing(path: Path) -> Path:
    for candidate in (path, *path.parents):
        try:
            if candidate.exists() or candidate.is_symlink():
                return candidate
        except OSError:
            continue
    return Path(path.anchor or ".")


def _enclosing_run(path: Path) -> Path | None:
    """The run directory `path` lies inside (strictly), if any."""
    try:
        resolved = path.resolve()
    except (OSError, RuntimeError):
        return None
    for parent in resolved.parents:
        try:
            if (parent / RUN_YAML).is_file():
                return parent
        except OSError:
            continue
    return None


def _probe(folder: Path, what: str, path: Path) -> None:
    """Create and remove a folder in `folder`: the only test every file system answers truly."""
    try:
        Path(tempfile.mkdtemp(prefix=".dealcl-probe-", dir=folder)).rmdir()
    except OSError as exc:
        reason = exc.strerror or str(exc)
        if exc.errno in (errno.ENOENT, errno.EROFS, errno.EPERM, errno.EACCES):
            reason += " (a read-only or special file system, or no permission)"
        raise UserError(f"{what} {path} cannot be written: cannot create anything in {folder}: {reason}") from None


def _text_check(path: Path, what: str) -> None:
    if not str(path) or "\0" in str(path):
        raise UserError(f"{what} must be a path, got {str(path)!r}")


def check_folder(path: Path, what: str, *, kind: str = "folder") -> Path:
    """Refuse a folder the command could not write, before any work.

    `kind`: "run" (a run directory: new, empty, or a dealcl run, which is continued), "export"
    (new or empty), "folder" (a comparison, sweep or demo folder: may hold earlier results, must
    not itself be a run), "report" (a folder, or the run directory the report is about)."""
    path = Path(path)
    _text_check(path, what)
    try:
        exists, is_dir = path.exists(), path.is_dir()
    except OSError as exc:
        raise UserError(f"{what} {path} cannot be used: {exc.strerror or exc}") from None
    if exists and not is_dir:
        raise UserError(f"{what} {path} is a file, not a folder; choose another {what}")
    inside = _enclosing_run(path)
    if inside is not None:
        raise UserError(f"{what} {path} is inside the run directory {inside}; choose a folder outside it")
    if is_dir:
        is_run = (path / RUN_YAML).is_file()
        if kind == "run" and not is_run and any(path.iterdir()):
            raise UserError(f"output directory {path} exists and is not a dealcl run; choose another --output")
        if kind == "export" and any(path.iterdir()):
            raise UserError(f"{path} exists and is not empty; choose another {what}")
        if kind == "folder" and is_run:
            raise UserError(f"{what} {path} is a run directory; choose a folder of its own")
        _probe(path, what, path)
        return path
    ancestor = _nearest_existing(path)
    if not ancestor.is_dir():
        raise UserError(f"{what} {path} cannot be created: {ancestor} is a file, not a folder")
    _probe(ancestor, what, path)
    return path


def check_file(path: Path, what: str) -> Path:
    """Refuse a file the command could not write (`predict --output`), before any work."""
    path = Path(path)
    _text_check(path, what)
    if path.is_dir():
        raise UserError(f"{what} {path} is a folder, not a file; choose another {what}")
    inside = _enclosing_run(path)
    if inside is not None:
        raise UserError(f"{what} {path} is inside the run directory {inside}; choose a file outside it")
    ancestor = _nearest_existing(path.parent if str(path.parent) else Path("."))
    if not ancestor.is_dir():
        raise UserError(f"{what} {path} cannot be created: {ancestor} is a file, not a folder")
    _probe(ancestor, what, path)
    return path


def expected_run_bytes(model_bytes: int, stages: int, state_share: float, answers: list[tuple[int, int]]) -> int:
    """What the rest of a run will write: the method's state after each of `stages` stages
    (`state_share` of the model's bytes: `ContinualMethod.state_share`) and one file set per
    evaluation, `answers` being (test examples, their sentences' bytes) per evaluation of a task."""
    state = int(model_bytes * state_share)
    outputs = sum(2 * text + count * ANSWER_OVERHEAD_BYTES for count, text in answers)
    return FIXED_RUN_BYTES + stages * state + outputs


def _size(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1024 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TB"


def check_free_space(path: Path, expected: int) -> str | None:
    """Refuse a run the file system under `path` has no room for; a warning when it is tight."""
    where = _nearest_existing(Path(path))
    try:
        free = shutil.disk_usage(where).free
    except OSError:
        return None  # a file system that cannot say: nothing to compare with
    if free < expected:
        raise UserError(f"not enough free space for {path}: about {_size(expected)} needed, {_size(free)} free on "
                        f"{where}; free space or choose another --output")
    if free < 2 * expected:
        return (f"warning: {path} needs about {_size(expected)} and {_size(free)} are free on {where}; "
                f"the run may stop with a full disk (it can be resumed)")
    return None


@contextlib.contextmanager
def writing(path: Path) -> Iterator[None]:
    """Any OSError in the block is one `error:` line naming `path` (the file the error names, if it does)."""
    try:
        yield
    except OSError as exc:
        raise UserError(write_error(path, exc)) from None


def write_error(path: Path, exc: OSError) -> str:
    named = exc.filename if exc.filename is not None else path
    if exc.errno == errno.ENOSPC:
        return f"no space left on device while writing {named}"
    return f"cannot write {named}: {exc.strerror or exc}"


def make_folder(path: Path) -> Path:
    """`mkdir -p`, with a failure as one line naming the folder."""
    with writing(path):
        Path(path).mkdir(parents=True, exist_ok=True)
    return Path(path)


