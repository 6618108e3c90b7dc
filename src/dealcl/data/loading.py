"""Reading tasks from disk: the CL_Benchmark layout and users' own task directories.

Every problem a user can cause (a missing or malformed file, an unknown label, an unsafe name)
becomes a one-line `UserError` that names the file and, where it helps, the record and value,
because these files are often hand-made and a traceback would point into dealcl instead.
Nothing is cached on disk: the largest split (7,600 records) parses in milliseconds.
"""
from __future__ import annotations

import csv
import difflib
import hashlib
import io
import json
import os
import random
import re
from pathlib import Path
from typing import Any

import yaml

from ..errors import UserError
from .types import Example, Task

# Task names become directory names of a run, so they may not contain `/` or start with `.`.
NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._+-]*$")
SPLIT_EXTENSIONS = ("json", "jsonl", "csv")
SAMPLES = ("first", "random")
TASK_YAML_KEYS = ("name", "type", "instruction")
# Upstream task types whose prompt has an instruction (COPA has none, deal_spec.md §2.3): a
# CL_Benchmark root without one for these would silently change the prompt, so it is an error.
INSTRUCTED_TYPES = ("NLI", "QQP", "SC", "TC", "BoolQA", "MultiRC", "WiC")
NO_DATA = "no benchmark data found: set --data, $DEALCL_DATA, or run `dealcl data download data/CL_Benchmark`"


def default_data_dir(cwd: Path | None = None) -> Path:
    """Where the benchmark lives when `--data` is not given: $DEALCL_DATA, then two usual places."""
    env = os.environ.get("DEALCL_DATA")
    if env:
        path = Path(env).expanduser()
        if not path.is_dir():
            raise UserError(f"$DEALCL_DATA={env} is not an existing directory")
        return path.resolve()
    base = Path(cwd) if cwd is not None else Path.cwd()
    for candidate in (base / ".." / "shared" / "CL_Benchmark", base / "data" / "CL_Benchmark"):
        if candidate.is_dir():
            return candidate.resolve()
    raise UserError(NO_DATA)


def sha256_file(path: str | os.PathLike[str]) -> str:
    """Hex sha256 of a file, read in chunks; runs record it for every data file they read."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def check_name(name: str, what: str, source: Path | None = None) -> str:
    """Reject names that are unsafe as a directory name (path traversal, hidden files, spaces)."""
    if not isinstance(name, str) or not NAME_RE.match(name):
        where = f" in {source}" if source is not None else ""
        raise UserError(
            f"invalid {what} {name!r}{where}: use letters, digits and . _ + - only, starting with a letter or digit"
        )
    return name


def _json_type(value: Any) -> str:
    names = {dict: "an object", list: "a list", str: "a string", bool: "a boolean", type(None): "null"}
    return names.get(type(value), "a number")


def _read_text(path: Path) -> str:
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise UserError(f"missing file {path}") from None
    except OSError as exc:
        raise UserError(f"cannot read {path}: {exc.strerror or exc}") from None
    try:
        return raw.decode("utf-8-sig")  # a BOM (Excel CSV) is harmless; anything else non-UTF-8 is not
    except UnicodeDecodeError as exc:
        line = raw.count(b"\n", 0, exc.start) + 1
        raise UserError(f"{path} is not valid UTF-8 (line {line}, byte {exc.start})") from None


def _parse_json(path: Path, text: str) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise UserError(f"malformed JSON in {path} at line {exc.lineno} column {exc.colno}: {exc.msg}") from None


def load_instructions(data_dir: Path) -> dict[str, str]:
    """Task type → its first "zero-shot" instruction, verbatim (with its trailing newline).

    Upstream uses `instruction_strategy single`, i.e. the first zero-shot entry. A root without
    `instruction_config.json` gives {} (custom roots); `load_task` refuses that for upstream types.
    """
    path = Path(data_dir) / "instruction_config.json"
    if not path.is_file():
        return {}
    data = _parse_json(path, _read_text(path))
    if not isinstance(data, dict):
        raise UserError(f"{path}: expected an object mapping task types to lists of instructions, got {_json_type(data)}")
    found: dict[str, str] = {}
    for task_type, entries in data.items():
        if not isinstance(entries, list):
            raise UserError(f"{path}: {task_type!r} must map to a list of instructions, got {_json_type(entries)}")
        for index, entry in enumerate(entries):
            if not (isinstance(entry, dict) and isinstance(entry.get("instruction"), str)
                    and isinstance(entry.get("instruction_type"), str)):
                raise UserError(f"{path}: entry {index} of {task_type!r} needs string keys instruction_type and instruction")
            if entry["instruction_type"] == "zero-shot" and task_type not in found:
                found[task_type] = entry["instruction"]
    return found


def _available_tasks(data_dir: Path) -> list[str]:
    return sorted(d.name for t in data_dir.iterdir() if t.is_dir() for d in t.iterdir() if d.is_dir())


def find_task_dir(name: str, data_dir: Path) -> tuple[str, Path]:
    """(task type, directory) of dataset `name` in the `<root>/<TaskType>/<name>/` layout."""
    check_name(name, "task name")
    data_dir = Path(data_dir)
    if not data_dir.is_dir():
        raise UserError(f"data directory {data_dir} does not exist")
    hits = sorted(t for t in data_dir.iterdir() if t.is_dir() and (t / name).is_dir())
    if len(hits) > 1:
        raise UserError(f"task {name!r} is ambiguous in {data_dir}: found under {', '.join(h.name for h in hits)}")
    if hits:
        return hits[0].name, hits[0] / name
    available = _available_tasks(data_dir)
    close = difflib.get_close_matches(name, available, n=1) or [a for a in available if a.lower() == name.lower()]
    hint = f" (did you mean {close[0]!r}?)" if close else ""
    raise UserError(f"unknown task {name!r} in {data_dir}{hint}; available: {', '.join(available) or 'none'}")


def _split_file(task_dir: Path, split: str) -> Path:
    found = [task_dir / f"{split}.{ext}" for ext in SPLIT_EXTENSIONS if (task_dir / f"{split}.{ext}").is_file()]
    if not found:
        raise UserError(f"missing file {task_dir / (split + '.json')} (or .jsonl / .csv)")
    if len(found) > 1:
        raise UserError(f"{task_dir} has several {split} files ({', '.join(p.name for p in found)}); keep one")
    return found[0]


def _read_rows(path: Path, required: tuple[str, ...]) -> list[Any]:
    """The raw records of a JSON list, JSONL or CSV file (CSV must have the `required` columns)."""
    text = _read_text(path)
    rows: list[Any]
    if path.suffix == ".jsonl":
        rows = []
        for lineno, line in enumerate(text.splitlines(), 1):
            if line.strip():
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError as exc:
                    raise UserError(f"malformed JSON in {path} at line {lineno} column {exc.colno}: {exc.msg}") from None
    elif path.suffix == ".csv":
        reader = csv.DictReader(io.StringIO(text, newline=""))
        fields = reader.fieldnames or []
        missing = [c for c in required if c not in fields]
        if missing:
            raise UserError(f"{path}: CSV header lacks column {', '.join(missing)} (found: {', '.join(fields) or 'none'})")
        try:
            rows = list(reader)
        except csv.Error as exc:
            raise UserError(f"malformed CSV in {path} at line {reader.line_num}: {exc}") from None
    else:
        rows = _parse_json(path, text)
        if not isinstance(rows, list):
            raise UserError(f"{path}: expected a JSON list of objects with {' and '.join(required)}, got {_json_type(rows)}")
    if not rows:
        raise UserError(f"{path} has no records")
    return rows


def _string_field(path: Path, index: int, row: Any, key: str, required: bool = True) -> str | None:
    if not isinstance(row, dict):
        raise UserError(f"{path}: record {index} is {_json_type(row)}, not an object with a sentence")
    if key not in row:
        if required:
            raise UserError(f"{path}: record {index} lacks key {key!r}")
        return None
    if not isinstance(row[key], str):
        raise UserError(f"{path}: record {index} key {key!r} must be a string, got {_json_type(row[key])}")
    return row[key]


def _read_records(path: Path) -> list[Example]:
    """Examples of one split file, checked record by record."""
    rows = _read_rows(path, ("sentence", "label"))
    return [Example(_string_field(path, i, row, "sentence"), _string_field(path, i, row, "label"))
            for i, row in enumerate(rows)]


def read_inputs(path: str | os.PathLike[str]) -> tuple[list[str], list[str] | None]:
    """Sentences to answer (`dealcl predict`), from a JSON list, JSONL or CSV file.

    Each record needs a `sentence`; `label` is optional but then needed on every record, and
    when present the predictions are scored against it.
    """
    path = Path(path)
    if not path.is_file():
        raise UserError(f"input file {path} does not exist")
    if path.suffix not in (".json", ".jsonl", ".csv"):
        raise UserError(f"input file {path} must end in .json, .jsonl or .csv")
    rows = _read_rows(path, ("sentence",))
    sentences = [_string_field(path, i, row, "sentence") for i, row in enumerate(rows)]
    labels = [_string_field(path, i, row, "label", required=False) for i, row in enumerate(rows)]
    have = [label is not None for label in labels]
    if any(have) and not all(have):
        raise UserError(f"{path}: record {have.index(False)} lacks 'label' while others have one; give all or none")
    return sentences, (labels if all(have) else None)


def _read_labels(path: Path) -> list[str]:
    labels = _parse_json(path, _read_text(path))
    if not (isinstance(labels, list) and labels and all(isinstance(x, str) and x for x in labels)):
        raise UserError(f"{path}: labels must be a non-empty JSON list of non-empty strings")
    if len(set(labels)) != len(labels):
        dup = next(x for x in labels if labels.count(x) > 1)
        raise UserError(f"{path}: label {dup!r} appears twice")
    return labels


def _read_task_yaml(path: Path) -> dict[str, str]:
    try:
        data = yaml.safe_load(_read_text(path))
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark is not None else ""
        raise UserError(f"malformed YAML in {path}{where}: {getattr(exc, 'problem', None) or exc}") from None
    data = {} if data is None else data
    if not isinstance(data, dict):
        raise UserError(f"{path}: expected a mapping with keys {', '.join(TASK_YAML_KEYS)}")
    unknown = sorted(str(k) for k in data if k not in TASK_YAML_KEYS)
    if unknown:
        raise UserError(f"{path}: unknown key {', '.join(unknown)}; allowed: {', '.join(TASK_YAML_KEYS)}")
    for key, value in data.items():
        if not isinstance(value, str):
            raise UserError(f"{path}: key {key!r} must be a string, got {value!r}")
    return data


def _order(n: int, sample: str, seed: int, name: str, split: str) -> list[int]:
    """Indices in the order caps take them: file order, or a seeded shuffle.

    The shuffle is seeded from (seed, task, split) only, so a task's pick does not depend on
    which other tasks the run has; and caps take a prefix, so a larger cap is a superset.
    """
    order = list(range(n))
    if sample == "random":
        digest = hashlib.sha256(f"{seed}\0{name}\0{split}".encode()).digest()
        random.Random(int.from_bytes(digest[:8], "big")).shuffle(order)
    return order


def _check_cap(value: int | None, key: str) -> None:
    if value is None:
        return
    if isinstance(value, bool) or not isinstance(value, int):
        raise UserError(f"{key} must be an integer, got {value!r}")
    if value < 0:
        raise UserError(f"{key} must not be negative, got {value}")
    if value == 0 and key != "val_per_task":
        raise UserError(f"{key}=0 leaves no examples; omit it to use the whole split")


def _locate(name_or_path: str, data_dir: Path) -> tuple[Path, str | None]:
    """(task directory, task type) — type None for a user's own directory (read task.yaml)."""
    looks_like_path = "/" in name_or_path or os.sep in name_or_path or name_or_path.startswith((".", "~"))
    if not looks_like_path:
        try:
            task_type, task_dir = find_task_dir(name_or_path, data_dir)
            return task_dir, task_type
        except UserError:
            if not Path(name_or_path).is_dir():
                raise
    path = Path(name_or_path).expanduser()
    if not path.is_dir():
        raise UserError(f"task directory {path} does not exist")
    return path.resolve(), None


def load_task_with_validation(
    name_or_path: str,
    data_dir: Path,
    *,
    train_per_task: int | None = None,
    test_per_task: int | None = None,
    val_per_task: int = 0,
    sample: str = "first",
    seed: int = 0,
) -> tuple[Task, list[Example]]:
    """Like `load_task`, plus `val_per_task` validation examples held out of the train file.

    The validation examples come right after the training pick (the next N of the same file
    order or seeded shuffle), so they never overlap the training set.
    """
    if sample not in SAMPLES:
        raise UserError(f"sample must be one of {', '.join(SAMPLES)}, got {sample!r}")
    _check_cap(train_per_task, "train_per_task")
    _check_cap(test_per_task, "test_per_task")
    _check_cap(val_per_task, "val_per_task")
    val_per_task = val_per_task or 0
    data_dir = Path(data_dir)
    task_dir, task_type = _locate(name_or_path, data_dir)
    files: dict[str, str] = {}
    if task_type is not None:  # CL_Benchmark layout: instruction from the root's config
        name = task_dir.name
        instructions = load_instructions(data_dir)
        instruction = instructions.get(task_type, "")
        config = data_dir / "instruction_config.json"
        if task_type in INSTRUCTED_TYPES and task_type not in instructions:
            raise UserError(f"no zero-shot instruction for task type {task_type!r} in {config} "
                            "(copy configs/instruction_config.json from the upstream repository)")
        if config.is_file():
            files["instructions"] = str(config.resolve())
    else:  # the user's own directory: optional task.yaml
        yaml_path = task_dir / "task.yaml"
        meta = _read_task_yaml(yaml_path) if yaml_path.is_file() else {}
        if meta:
            files["task_yaml"] = str(yaml_path.resolve())
        name = meta.get("name", task_dir.name)
        check_name(name, "task name", yaml_path if "name" in meta else task_dir)
        task_type = check_name(meta.get("type", "custom"), "task type", yaml_path)
        instruction = meta.get("instruction", "")
        if instruction and not instruction.endswith("\n"):
            instruction += "\n"  # upstream instructions end with a newline before "Option:"

    labels_path = task_dir / "labels.json"
    labels = _read_labels(labels_path)
    train_path, test_path = _split_file(task_dir, "train"), _split_file(task_dir, "test")
    train_all, test_all = _read_records(train_path), _read_records(test_path)
    known = set(labels)
    for index, example in enumerate(train_all):
        if example.label not in known:
            raise UserError(f"{train_path}: record {index} has label {example.label!r}, which is not in {labels_path}")

    n = len(train_all)
    if val_per_task >= n:
        raise UserError(f"{train_path} has {n} records: val_per_task={val_per_task} leaves none for training")
    n_train = n - val_per_task if train_per_task is None else min(train_per_task, n - val_per_task)
    order = _order(n, sample, seed, name, "train")
    train = [train_all[i] for i in sorted(order[:n_train])]
    validation = [train_all[i] for i in sorted(order[n_train:n_train + val_per_task])]
    n_test = len(test_all) if test_per_task is None else min(test_per_task, len(test_all))
    test = [test_all[i] for i in sorted(_order(len(test_all), sample, seed, name, "test")[:n_test])]

    files.update(train=str(train_path.resolve()), test=str(test_path.resolve()), labels=str(labels_path.resolve()))
    task = Task(
        name=name,
        task_type=task_type,
        instruction=instruction,
        labels=labels,
        train=train,
        test=test,
        files=files,
        unknown_test_labels=sum(1 for e in test if e.label not in known),
    )
    return task, validation


def load_task(
    name_or_path: str,
    data_dir: Path,
    *,
    train_per_task: int | None = None,
    test_per_task: int | None = None,
    val_per_task: int = 0,
    sample: str = "first",
    seed: int = 0,
) -> Task:
    """One task, by CL_Benchmark dataset name or by path to a task directory.

    Caps take the first N records (upstream's behaviour) or a seeded random N; the validation
    examples are still held out of training here, only not returned.
    """
    task, _ = load_task_with_validation(
        name_or_path, data_dir, train_per_task=train_per_task, test_per_task=test_per_task,
        val_per_task=val_per_task, sample=sample, seed=seed,
    )
    return task
