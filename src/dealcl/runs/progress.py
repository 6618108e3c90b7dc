"""Progress over a whole run (every stage's training and evaluation), not only per task.

The work is counted in estimated seconds: a training example costs `train_seconds` and an
answer `answer_seconds` (measured by a probe, or typical smollm2 ratios until the first stage
has been timed), so the bar's fraction and its time left mean the whole run.
"""
from __future__ import annotations

from dataclasses import dataclass

from tqdm.auto import tqdm

# Typical costs on a 2-core CPU with smollm2-135m (bench/speed.py): only their ratio matters
# until a stage has been measured.
DEFAULT_TRAIN_SECONDS = 0.9
DEFAULT_ANSWER_SECONDS = 0.12


@dataclass
class Workload:
    train_examples: int  # every stage's training examples × epochs
    answers: int  # every stage's evaluated test examples, stage 0 included

    def seconds(self, train_seconds: float, answer_seconds: float) -> float:
        return self.train_examples * train_seconds + self.answers * answer_seconds


class RunProgress:
    def __init__(self, work: Workload, enabled: bool, train_seconds: float = DEFAULT_TRAIN_SECONDS,
                 answer_seconds: float = DEFAULT_ANSWER_SECONDS, label: str = "run") -> None:
        self.train_seconds, self.answer_seconds = train_seconds, answer_seconds
        total = work.seconds(train_seconds, answer_seconds)
        # A finished run re-read (`make demo` a second time) has nothing to show a bar for.
        self.bar = tqdm(total=round(max(total, 1e-9), 1), desc=label, unit="s", disable=not enabled or total <= 0,
                        position=0,
                        bar_format="{desc}: {percentage:3.0f}%|{bar}| {elapsed} elapsed, about {remaining} left")

    def trained(self, examples: int) -> None:
        self._advance(examples * self.train_seconds)

    def answered(self, answers: int) -> None:
        self._advance(answers * self.answer_seconds)

    def _advance(self, seconds: float) -> None:
        self.bar.update(min(round(seconds, 1), max(self.bar.total - self.bar.n, 0)))

    def close(self) -> None:
        self.bar.close()
