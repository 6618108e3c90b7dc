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
from .integrity import check_data_files, model_stage
from .store import atomic_write_text


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


def load_final_model(run_dir: Path, stage: int | None = None) -> FinalModel:
    """The run's model after its last stage, exactly as the driver left it; after stage `stage`
    only when asked (`--stage K`). Its saved state must verify against its manifest, and the
    label files (they make the prompt) must be the ones the run was made with (integrity.py)."""
    run_dir = Path(run_dir)
    store = RunStore(run_dir)
    session = build_session(resume_config(run_dir))
    method, model = session.method, session.model
    stages = session.stages()
    index = model_stage(run_dir, stages, stage)
    check_data_files(run_dir, store.read_run_yaml(), session.tasks, roles=("labels",))
    chosen = next(s for s in stages if s.index == index)
    method.load_state(model, store.adapter_dir(chosen.index, chosen.name), chosen)
    model.eval()
    return FinalModel(session, chosen)


def predict_file(run_dir: Path, input_path: Path, *, task_name: str | None = None, output: Path | None = None,
                 stage: int | None = None) -> None:
    sentences, labels = read_inputs(input_path)
    final = load_final_model(run_dir, stage)
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
