"""Use a finished run: rebuild its final model and answer new inputs (`dealcl predict`)."""
from __future__ import annotations

import json
import sys
from dataclasses import dataclass
from pathlib import Path

import torch

from ..data.loading import read_inputs
from ..errors import UserError
from ..eval.generate import generate_answers
from ..eval.metrics import score_task
from ..eval.score import score_answers
from ..methods import ContinualMethod, Stage
from ..prompts import PromptEncoder
from ..train.services import TrainingServices
from .driver import resume_config
from .layout import RunStore
from .session import Prepared, Session, build_session
from .store import atomic_write_text, verify_stage_dir


@dataclass
class FinalModel:
    session: Session
    stage: Stage  # the last finished stage, whose state the model holds

    @property
    def prep(self) -> Prepared:
        return self.session.prep

    @property
    def method(self) -> ContinualMethod:
        return self.session.method

    @property
    def model(self) -> torch.nn.Module:
        return self.session.model

    @property
    def encoder(self) -> PromptEncoder:
        return self.session.encoder

    @property
    def services(self) -> TrainingServices:
        return self.session.services


def load_final_model(run_dir: Path) -> FinalModel:
    """The run's model after its last finished stage, exactly as the driver left it."""
    run_dir = Path(run_dir)
    session = build_session(resume_config(run_dir))
    store = RunStore(run_dir)
    method, model = session.method, session.model
    stages = session.stages()
    finished = [s for s in stages if verify_stage_dir(store.adapter_dir(s.index, s.name)) is None]
    if not finished:
        raise UserError(f"{run_dir} has no finished stage yet: run `dealcl resume {run_dir}` first")
    last = finished[-1]
    if last is not stages[-1]:
        print(f"note: {run_dir} is not finished; using the model after stage {last.index} ({last.name})", file=sys.stderr)
    method.load_state(model, store.adapter_dir(last.index, last.name), last)
    model.eval()
    return FinalModel(session, last)


def predict_file(run_dir: Path, input_path: Path, *, task_name: str | None = None, output: Path | None = None) -> None:
    sentences, labels = read_inputs(input_path)
    final = load_final_model(run_dir)
    tasks = {t.name: t for t in final.prep.tasks}
    name = task_name or final.prep.tasks[-1].name
    if name not in tasks:
        raise UserError(f"task '{name}' is not part of run {run_dir} (its tasks: {', '.join(tasks)})")
    task = tasks[name]
    answer = score_answers if final.prep.config.eval_mode == "score" else generate_answers
    with final.method.eval_model(final.model, task) as eval_model:
        answers, _ = answer(
            eval_model, final.encoder, task, sentences, arch=final.prep.loaded.arch,
            batch_size=final.prep.config.eval_batch_size, device=final.prep.device,
            autocast=final.services.autocast, progress=sys.stderr.isatty(),
        )
    rows = []
    for i, (sentence, answer) in enumerate(zip(sentences, answers)):
        row = {"task": name, "sentence": sentence, "prediction": answer}
        if labels is not None:
            row["label"] = labels[i]
        rows.append(json.dumps(row, ensure_ascii=False))
    text = "\n".join(rows) + "\n"
    if labels is not None:
        score = score_task(answers, labels, task.labels)
        print(f"exact match {score['exact_match']:.2f} on {len(labels)} inputs "
              f"(invalid outputs {score['invalid_rate']:.1f}%)", file=sys.stderr)
    if output is None:
        sys.stdout.write(text)
    else:
        atomic_write_text(output, text)
