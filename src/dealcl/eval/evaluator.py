"""Evaluate a model on tasks: answers (generated or scored), exact match, and reuse of answers
whose model is provably unchanged (equal fingerprints). Takes everything it needs as
arguments; where a run's files live is runs/layout.py's business.
"""
from __future__ import annotations

import contextlib
import functools
import hashlib
import json
from dataclasses import dataclass
from typing import Callable, ContextManager

import torch

from ..data.types import Task
from ..prompts import PromptEncoder
from .generate import ANSWER_RULE, generate_answers
from .metrics import score_task
from .score import score_answers

# What runs made before the upstream exact-match rule used (they record no `answer_rule`).
OLD_ANSWER_RULE = "greedy, longest label + 3 new tokens, stop at EOS"
BASE_MODEL = "base-model"  # the fingerprint of the untouched model


def answer_rule(eval_mode: str, with_rouge: bool) -> str:
    """How the answers that exact match scores were produced (run.yaml `effective.answer_rule`)."""
    if eval_mode == "score":
        return "score: the most likely label"
    return ANSWER_RULE + (" (off: with_rouge generates whole answers)" if with_rouge else "")


@dataclass
class EvalSettings:
    mode: str = "generate"  # generate (greedy answers) | score (the most likely label)
    batch_size: int = 16
    with_rouge: bool = False


@dataclass
class StageEvaluation:
    results: dict[str, dict]  # task → exact_match, invalid_rate, (rougeL), predictions
    fingerprints: dict[str, str | None]
    seconds: float  # spent answering (reused answers cost none)
    answered: int  # answers computed, not reused


def _plain(model: torch.nn.Module, task: Task) -> ContextManager[torch.nn.Module]:
    return contextlib.nullcontext(model)


class Evaluator:
    """Answers tasks with a model; `processes` shards each test set over the ranks."""

    def __init__(self, encoder: PromptEncoder, arch: str, device: torch.device, settings: EvalSettings,
                 autocast: Callable[[], ContextManager], processes, progress: bool = True) -> None:
        self.encoder = encoder
        self.arch = arch
        self.device = device
        self.settings = settings
        self.autocast = autocast
        self.processes = processes
        self.progress = progress
        self.on_answered: Callable[[int], None] = lambda answers: None  # the whole-run progress
        self.cache: dict[tuple[str, str], list[str]] = {}

    def remember(self, task_name: str, fingerprint: str | None, answers: list[str]) -> None:
        """Answers known for (task, fingerprint), e.g. read back from a finished stage."""
        if fingerprint:
            self.cache[(task_name, fingerprint)] = answers

    def answers(self, model: torch.nn.Module, task: Task, fingerprint: str | None,
                eval_model: Callable = _plain) -> tuple[list[str], float]:
        key = (task.name, fingerprint) if fingerprint else None
        if key is not None and key in self.cache:
            return self.cache[key], 0.0
        # Each rank answers its shard of the test set; the shards are gathered in input order.
        ranks = self.processes
        mine = ranks.shard(list(range(len(task.test))))
        sentences = [task.test[i].sentence for i in mine]
        # Sharded weights: every rank runs the same forwards, so shards are padded to one size.
        sentences += [task.test[0].sentence] * (ranks.lockstep_count(len(sentences)) - len(sentences))
        if self.settings.mode == "score":
            answer = score_answers
        else:  # ROUGE scores the whole answer: no early stop for it
            answer = functools.partial(generate_answers, stop_without_label=not self.settings.with_rouge)
        with eval_model(model, task) as model_for_task:
            answers, seconds = answer(
                model_for_task, self.encoder, task, sentences, arch=self.arch, batch_size=self.settings.batch_size,
                device=self.device, autocast=self.autocast, progress=self.progress, synced=ranks.sharded,
            )
        answers = answers[: len(mine)]
        if ranks.world > 1:
            answers = [a for _, a in sorted(ranks.gather(list(zip(mine, answers))))]
        if key is not None:
            self.cache[key] = answers
        return answers, seconds

    def evaluate(self, model: torch.nn.Module, tasks: list[Task],
                 fingerprint: Callable[[Task], str | None] = lambda task: BASE_MODEL,
                 eval_model: Callable = _plain) -> StageEvaluation:
        """Every task answered with `eval_model(model, task)` (a method's own, or the model) and scored."""
        out = StageEvaluation({}, {}, 0.0, 0)
        for task in tasks:
            key = fingerprint(task)
            answers, took = self.answers(model, task, key, eval_model)
            self.on_answered(len(answers))
            out.seconds += took
            out.answered += len(answers) if took > 0 else 0
            labels = [e.label for e in task.test]
            score = score_task(answers, labels, task.labels, with_rouge=self.settings.with_rouge)
            out.results[task.name] = {**score, "predictions": answers}
            out.fingerprints[task.name] = key
        return out

    def reference_keys(self, tasks: list[Task], model_source: str, model_dtype: str, precision: str) -> dict[str, str]:
        """Per task, a digest of everything the untouched model's answers depend on: model,
        precision, evaluation settings, world size (it changes the batches) and every test
        prompt and label. Equal keys mean equal answers (greedy decoding is deterministic)."""
        common = json.dumps([model_source, self.arch, model_dtype, precision, self.settings.mode,
                             self.settings.batch_size, self.processes.world, torch.__version__,
                             ANSWER_RULE, self.settings.with_rouge])
        keys = {}
        for task in tasks:
            digest = hashlib.sha256(common.encode())
            digest.update(json.dumps(task.labels).encode())
            for example in task.test:
                digest.update(json.dumps([self.encoder.prompt_ids(task, example.sentence), example.label]).encode())
            keys[task.name] = digest.hexdigest()
        return keys
