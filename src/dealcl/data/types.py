"""The two data types every other module speaks: one labelled example, and one task."""
from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class Example:
    sentence: str
    label: str


@dataclass
class Task:
    """One dataset of a continual sequence, already read from disk.

    `name` is the dataset name (`dbpedia`), `task_type` its category (`TC`), `instruction` the
    verbatim zero-shot instruction for that category ("" for COPA and custom tasks without one).
    `labels` keeps the order of labels.json: it defines the `Option:` text of the prompt.
    `files` maps a role (`train`, `test`, `labels`) to the path it was read from, so the run can
    record each file's sha256. `unknown_test_labels` counts test examples whose label is not in
    `labels` (kept and scored as wrong, as upstream does: MNLI's test set has 131 `-` labels).
    """

    name: str
    task_type: str
    instruction: str
    labels: list[str]
    train: list[Example]
    test: list[Example]
    files: dict[str, str] = field(default_factory=dict)
    unknown_test_labels: int = 0
