"""The continual driver: for each stage, train, checkpoint, evaluate, record.

`run_continual` reads top to bottom: everything the user gave is checked and loaded
(`build_session`) before the run directory is touched; the untouched model is evaluated once
(stage 0, the zero-shot reference); a resumed run picks up after its last verified stage
(`resume`); then each stage trains, saves the method's state atomically, evaluates the tasks seen
so far and records its outputs. File names and formats are layout.py's.
"""
from __future__ import annotations

import dataclasses
import logging
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ..data.types import Task
from ..errors import RunInterrupted, UserError
from ..eval.evaluator import BASE_MODEL, OLD_ANSWER_RULE, Evaluator, StageEvaluation, answer_rule
from ..eval.metrics import ROUGE_TYPES, summarize
from ..methods import Stage
from ..models.loading import LoadedModel
from ..train.distributed import launched_processes
from .config import RunConfig, config_from_dict, stage_overrides
from .layout import (
    REFERENCE, RunStore, outputs_verify, read_stage_outputs, sibling_reference_answers, write_stage_outputs,
)
from .integrity import check_data_files, check_resumable, discard_stages
from .memory import peak_memory_mb, reset_peak_memory
from .paths import check_free_space, expected_run_bytes, writing
from .progress import RunProgress, Workload
from .provenance import run_yaml
from .session import Prepared, Session, build_session
from .store import atomic_write_json, verify_stage_dir, write_stage_dir
from .tracking import check_installed, open_tracker

log = logging.getLogger("dealcl")


def say(message: str) -> None:
    if launched_processes().is_main:
        print(message, file=sys.stderr, flush=True)


def run_continual(config: RunConfig, output: Path, *, progress: bool = True, loaded: LoadedModel | None = None,
                  costs: tuple[float, float] | None = None, retrain_stage: int | None = None) -> dict:
    """Run (or resume) a whole continual sequence; returns the results.json content.

    `costs`: seconds per training example and per answer on this machine (a probe's), for the
    whole-run progress bar; typical values otherwise. `retrain_stage` K: discard stage K and the
    later ones of an existing run and do them again (0: only the reference evaluation), the way
    out that a damaged run's error names (integrity.py)."""
    check_installed(config.report_to)  # a missing tracker package stops the run before anything loads
    session = build_session(config, loaded, prepare_model=False)
    reset_peak_memory(session.prep.device)
    ranks = session.services.processes
    progress = progress and ranks.is_main
    stages = session.stages()
    if ranks.is_main:  # before the run directory is touched
        warning = check_free_space(Path(output), _expected_bytes(session, RunStore(Path(output)), stages))
        if warning:
            say(warning)
    if len({s.name for s in stages}) != len(stages):
        raise UserError("a method produced two stages with the same name")
    existed = RunStore(Path(output)).is_run()
    if existed:
        # Read before anything is written: a damaged stage or changed data stops the command here.
        check_resumable(Path(output), stages, retrain_stage)
    elif retrain_stage is not None:
        raise UserError(f"--retrain-stage: {output} is not a dealcl run directory (no run.yaml)")
    # Only rank 0 writes the run directory; the others wait for it and then read it.
    store = ranks.on_main(lambda: open_run_dir(Path(output), session.prep))
    store = store or RunStore(Path(output))
    if existed:
        check_data_files(store.root, store.read_run_yaml(), session.tasks)
    if retrain_stage is not None:
        removed = ranks.on_main(lambda: discard_stages(store.root, stages, retrain_stage)) or []
        say(f"--retrain-stage {retrain_stage}: discarded {', '.join(str(p.relative_to(store.root)) for p in removed) or 'nothing'}; "
            "redoing " + ("the reference evaluation" if retrain_stage == 0 else f"stage {retrain_stage} and the later ones"))
    handler = _setup_log(store) if ranks.is_main else None
    if retrain_stage is not None:
        log.info("--retrain-stage %d: discarded %s", retrain_stage, [str(p) for p in removed])
    evaluator = session.evaluator(progress)
    record = RunRecord(session.prep, efficiency=list(store.read_json(store.efficiency_path, {}).get("stages", [])))
    overall = RunProgress(_workload(session, store, stages), progress, *(costs or ()))
    session.services.on_trained, evaluator.on_answered = overall.trained, overall.answered
    tracker = ranks.on_main(lambda: open_tracker(store, config, record.efficiency))  # None off the main process
    if tracker is not None:
        session.services.on_step = tracker.log_step
    log.info("run %s: method=%s model=%s tasks=%s precision=%s", store.root, config.method, config.model,
             [t.name for t in session.tasks], session.prep.precision)
    phase = "stage 0 (the zero-shot reference)"
    try:
        if config.reference_stage:
            record.reference = reference_stage(session, store, evaluator)
        phase = "loading the last finished stage"
        model = session.prepare_model()
        resumed = resume(session, store, stages, evaluator, record)
        summary = ranks.on_main(lambda: record.write(store, stages)) if record.rows else {}
        if tracker is not None:  # what earlier sessions evaluated and did not log (trackers added later)
            for index, results in enumerate([record.reference] + record.rows):
                if results is not None:
                    tracker.log_evaluation(index, results)
        for stage in stages[len(record.rows):]:
            # Each stage's own peak; where the count cannot be reset, efficiency.json says so.
            record.peak_scope = "stage" if reset_peak_memory(session.prep.device) else "process"
            started = time.perf_counter()
            stats: dict[str, Any] = {}
            if stage.index > resumed:
                if tracker is not None:
                    tracker.begin_stage(stage.index)
                phase = f"training of stage {stage.index} ({stage.name})"
                stats = session.train(stage, progress)
                if tracker is not None:
                    tracker.trained(stage.index, stats.get("train_steps", 0))
                ranks.on_main(lambda: write_stage_dir(store.adapter_dir(stage.index, stage.name),
                                                      lambda d: session.method.save_state(model, d)))
            phase = f"evaluation of stage {stage.index} ({stage.name})"
            tasks = evaluated_tasks(session, stages, stage)
            evaluation = evaluator.evaluate(model, tasks, lambda task: session.method.eval_fingerprint(task, stage),
                                            session.method.eval_model)
            ranks.on_main(lambda: write_stage_outputs(store.output_dir(stage.index, stage.name), session.tasks,
                                                      evaluation.results, evaluation.fingerprints))
            record.add_stage(stage, evaluation, stats, model, session.method.trains, time.perf_counter() - started)
            summary = ranks.on_main(lambda: record.write(store, stages, with_efficiency=True))
            if tracker is not None:
                tracker.log_evaluation(stage.index, evaluation.results)
            _report_stage(stage, len(stages), stats, tasks, evaluation)
        if tracker is not None and len(record.rows) == len(stages):
            tracker.log_final(summary)
        return summary
    except KeyboardInterrupt:
        # Ctrl-C: every writer has removed its temporary (they clean up on any exception), so
        # what is on disk is the finished stages; the CLI prints how to continue.
        log.info("interrupted during %s", phase)
        raise RunInterrupted(store.root, phase) from None
    finally:
        overall.close()
        if tracker is not None:
            tracker.close()
        if handler is not None:
            log.removeHandler(handler)
            handler.close()


def reference_stage(session: Session, store: RunStore, evaluator: Evaluator) -> dict[str, dict]:
    """Stage 0: the untouched model on every task, the zero-shot reference b_j for FWT. Answers
    come from a sibling run's identical stage 0 wherever its reference key matches."""
    directory = store.output_dir(0, REFERENCE)
    if outputs_verify(directory):
        log.info("stage 0 (zero-shot reference): read from %s", directory)
        return _read_stage(directory, evaluator)
    prep = session.prep
    keys = evaluator.reference_keys(prep.tasks, prep.loaded.source, prep.config.model_dtype, prep.precision)
    borrowed = sibling_reference_answers(store.root, keys)
    for name, answers in borrowed.items():
        evaluator.remember(name, BASE_MODEL, answers)
    say(f"stage 0 (zero-shot reference): evaluating {_count(len(prep.tasks) - len(borrowed), 'task')}"
        + (f", {len(borrowed)} answered by a sibling run's identical stage 0" if borrowed else ""))
    evaluation = evaluator.evaluate(prep.loaded.model, prep.tasks)
    session.services.processes.on_main(
        lambda: write_stage_outputs(directory, prep.tasks, evaluation.results, evaluation.fingerprints, keys))
    scores = " ".join(f"{name}={r['exact_match']:.1f}" for name, r in evaluation.results.items())
    log.info("stage 0 (zero-shot reference) done: %s evaluated in %.0f s (%d borrowed from a sibling run) | EM %s",
             _count(len(prep.tasks), "task"), evaluation.seconds, len(borrowed), scores)
    return evaluation.results


def _count(n: int, noun: str) -> str:
    return f"{n} {noun}" if n == 1 else f"{n} {noun}s"


def resume(session: Session, store: RunStore, stages: list[Stage], evaluator: Evaluator, record: "RunRecord") -> int:
    """Bring a resumed run to its last verified stage: that stage's checkpoint loaded into the
    model, the finished stages' scores in `record`. Returns the index of the last stage whose
    checkpoint is loaded (0 for a new run; every stage for a finished one).

    A stage counts when its checkpoint verifies and every earlier stage's outputs do. A finished
    run (every stage's outputs verify) needs no checkpoint at all: its adapters may have been
    deleted to save space (results/ keeps none) and nothing is retrained."""
    config = session.config
    finished = all(outputs_verify(store.output_dir(s.index, s.name)) for s in stages)
    recorded_rule = store.read_run_yaml().get("effective", {}).get("answer_rule", OLD_ANSWER_RULE)
    if not finished and recorded_rule != answer_rule(config.eval_mode, config.with_rouge):
        # Its finished stages were scored another way: continuing would mix two metrics.
        raise UserError(f"{store.root} was started with another answer rule ({recorded_rule}); its remaining "
                        f"stages cannot be scored the same way: start it again in a new --output")
    # The last stage whose checkpoint verifies and whose predecessors' outputs all do (a damaged
    # folder never gets here: run_continual refused it). A checkpoint absent in between (deleted
    # to save space) does not stop a later one from counting.
    resume_from = len(stages) if finished else 0
    for position, stage in enumerate(stages if not finished else []):
        if verify_stage_dir(store.adapter_dir(stage.index, stage.name)) is None:
            resume_from = position + 1
        if not outputs_verify(store.output_dir(stage.index, stage.name)):
            break
    for stage in stages[:resume_from]:
        out_dir = store.output_dir(stage.index, stage.name)
        if outputs_verify(out_dir):
            record.rows.append(_read_stage(out_dir, evaluator))
    if resume_from and not finished:
        last = stages[resume_from - 1]
        session.method.load_state(session.model, store.adapter_dir(last.index, last.name), last)
        say(f"resuming {store.root} after stage {last.index} ({last.name})")
        log.info("resumed after stage %d (%s)", last.index, last.name)
    for stage in stages[resume_from:]:
        for directory in (store.adapter_dir(stage.index, stage.name), store.output_dir(stage.index, stage.name)):
            problem = verify_stage_dir(directory)
            if directory.exists() and problem is not None:
                say(f"stage {stage.index} ({stage.name}): {directory.name} is incomplete ({problem}); redoing it")
                log.warning("redoing %s: %s", directory, problem)
    record.efficiency = [e for e in record.efficiency if e.get("stage", 0) <= len(record.rows)]
    return resume_from


def _read_stage(directory: Path, evaluator: Evaluator) -> dict[str, dict]:
    """A finished stage's scores; its answers are remembered for reuse under their fingerprints."""
    results, fingerprints = read_stage_outputs(directory)
    for name, result in results.items():
        evaluator.remember(name, fingerprints.get(name), result["predictions"])
    return results


def evaluated_tasks(session: Session, stages: list[Stage], stage: Stage) -> list[Task]:
    """The tasks seen up to `stage` (every task with eval_all_stages, and for joint methods)."""
    if session.config.eval_all_stages or session.method.joint:
        return session.tasks
    seen = {t.name for s in stages if s.index <= stage.index for t in s.train_tasks}
    return [t for t in session.tasks if t.name in seen]


@dataclass
class RunRecord:
    """What a run has measured so far, and its results.json and efficiency.json."""

    prep: Prepared
    rows: list[dict[str, dict]] = field(default_factory=list)  # per finished stage: task → scores
    reference: dict[str, dict] | None = None
    efficiency: list[dict] = field(default_factory=list)
    # "stage": peak_memory_mb is the stage's own peak; "process": the count could not be reset
    # (no /proc/self/clear_refs), so it is the process's peak so far.
    peak_scope: str = "stage"

    def add_stage(self, stage: Stage, evaluation: StageEvaluation, stats: dict[str, Any], model: torch.nn.Module,
                  trains: bool, wall: float) -> None:
        self.rows.append(evaluation.results)
        trainable = sum(p.numel() for p in model.parameters() if p.requires_grad) if trains else 0
        train_seconds = stats.get("train_seconds", 0.0)
        self.efficiency.append({
            "stage": stage.index, "task": stage.name, "wall_seconds": round(wall, 3),
            "train_examples": stats.get("train_examples", 0), "train_seconds": round(train_seconds, 3),
            "train_samples_per_second": _round(stats.get("train_samples_per_second")),
            "eval_examples": evaluation.answered, "eval_seconds": round(evaluation.seconds, 3),
            "eval_examples_per_second": _round(evaluation.answered / evaluation.seconds if evaluation.seconds > 0 else None),
            "peak_memory_mb": round(peak_memory_mb(self.prep.device), 1), "peak_memory_scope": self.peak_scope,
            "world_size": launched_processes().world,
            "step_losses": stats.get("step_losses", []),
            # Each part of those losses per step: "task" and the method's extra_losses terms.
            "step_loss_terms": stats.get("step_loss_terms", {}),
            "trainable_parameters": stats.get("trainable_parameters", trainable),
        })

    def _matrix(self, key: str, order: list[str]) -> tuple[list[list], list | None]:
        """One score per (stage, task) and its zero-shot row, as the accuracy matrix lays them out."""
        rows = [[row.get(name, {}).get(key) for name in order] for row in self.rows]
        return rows, [self.reference.get(name, {}).get(key) for name in order] if self.reference else None

    def write(self, store: RunStore, stages: list[Stage], with_efficiency: bool = False) -> dict:
        if with_efficiency:
            atomic_write_json(store.efficiency_path, {
                "device": str(self.prep.device), "precision": self.prep.precision, "threads": torch.get_num_threads(),
                "stages": self.efficiency,
            })
        prep = self.prep
        order = [t.name for t in prep.tasks]
        matrix = [[row.get(name, {}).get("exact_match") for name in order] for row in self.rows]
        invalid = [[row.get(name, {}).get("invalid_rate") for name in order] for row in self.rows]
        reference = [self.reference.get(name, {}).get("exact_match") for name in order] if self.reference else None
        unknown = {t.name: t.unknown_test_labels for t in prep.tasks}
        rouge = {name: self._matrix(name, order) for name in ROUGE_TYPES} if prep.config.with_rouge else None
        summary = summarize(order, matrix, reference, invalid, unknown_labels=unknown, joint=prep.method_class.joint,
                            rouge=rouge)
        summary = {"method": prep.config.method, "model": prep.config.model, "stages": [s.name for s in stages], **summary}
        atomic_write_json(store.results_path, summary)
        return summary


def _report_stage(stage: Stage, total: int, stats: dict[str, Any], tasks: list[Task], evaluation: StageEvaluation) -> None:
    if not launched_processes().is_main:
        return
    scores = " ".join(f"{name}={r['exact_match']:.1f}" for name, r in evaluation.results.items())
    say(f"stage {stage.index}/{total} {stage.name}: trained {stats.get('train_examples', 0)} examples "
        f"in {stats.get('train_seconds', 0.0):.0f} s, evaluated {_count(len(tasks), 'task')} in {evaluation.seconds:.0f} s | EM {scores}")
    log.info("stage %d %s done: %s", stage.index, stage.name, scores)


def _config_difference(old: dict[str, Any], new: dict[str, Any]) -> str:
    keys = sorted(set(old) | set(new))
    for key in keys:
        if key in RunConfig.NON_SEMANTIC:
            continue
        if old.get(key) != new.get(key):
            return f"{key}: {old.get(key)!r} → {new.get(key)!r}"
    return ""


def open_run_dir(output: Path, prep: Prepared) -> RunStore:
    """Create the run directory, or accept an existing one holding the same config (resume)."""
    store = RunStore(output)
    store.remove_temporaries()  # what a killed process left half-written
    if store.is_run():
        # Through the config parser, so that a key added since the run was made counts as its
        # default rather than as a difference.
        recorded = store.read_run_yaml()
        old = dataclasses.asdict(config_from_dict(recorded["config"]))
        new = dataclasses.asdict(prep.config)
        # The rate actually used, not the flag: a method's default may have changed since
        # (a sweep), and `--lr` equal to the rate the run used is no difference.
        old["lr"], new["lr"] = recorded.get("effective", {}).get("lr", old["lr"]), prep.lr
        difference = _config_difference(old, new)
        if difference:
            raise UserError(
                f"output directory {output} holds a run with a different config ({difference}); "
                f"choose another --output, or continue it with `dealcl resume {output}`"
            )
        return store
    if output.exists() and (not output.is_dir() or any(output.iterdir())):
        raise UserError(f"output directory {output} exists and is not a dealcl run; choose another --output")
    with writing(output):
        output.mkdir(parents=True, exist_ok=True)
    store.write_run_yaml(run_yaml(prep))
    return store


def _expected_bytes(session: Session, store: RunStore, stages: list[Stage]) -> int:
    """What the unfinished part of the run will write (runs/paths.py: expected_run_bytes)."""
    model = session.prep.loaded.model
    model_bytes = sum(t.numel() * t.element_size() for t in (*model.parameters(), *model.buffers()))
    todo = [s for s in stages if not outputs_verify(store.output_dir(s.index, s.name))]
    evaluations = [t for s in todo for t in evaluated_tasks(session, stages, s)]
    if session.config.reference_stage and not outputs_verify(store.output_dir(0, REFERENCE)):
        evaluations += session.tasks
    answers = [(len(t.test), sum(len(e.sentence.encode()) for e in t.test)) for t in evaluations]
    return expected_run_bytes(model_bytes, len(todo) if session.method.trains else 0, session.prep.method_class.state_share,
                              answers)


def _setup_log(store: RunStore) -> logging.Handler:
    with writing(store.log_path):
        store.log_path.parent.mkdir(parents=True, exist_ok=True)
        handler = logging.FileHandler(store.log_path, encoding="utf-8")
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
    log.addHandler(handler)
    log.setLevel(logging.INFO)
    return handler


def _workload(session: Session, store: RunStore, stages: list[Stage]) -> Workload:
    """What is left to do: training examples and answers of every unfinished stage."""
    config, tasks = session.config, session.tasks
    todo = [s for s in stages if not outputs_verify(store.output_dir(s.index, s.name))]
    train = sum(len(t.train) * stage_overrides(config, s.index, [t.name]).get("epochs", config.epochs)
                for s in todo for t in s.train_tasks) if session.method.trains else 0
    answers = sum(len(t.test) for s in todo for t in evaluated_tasks(session, stages, s))
    if config.reference_stage and not outputs_verify(store.output_dir(0, REFERENCE)):
        answers += sum(len(t.test) for t in tasks)
    return Workload(train, answers)


def _round(value: float | None) -> float | None:
    return None if value is None else round(value, 3)


def resume_config(run_dir: Path) -> RunConfig:
    store = RunStore(run_dir)
    if not store.is_run():
        raise UserError(f"{run_dir} is not a dealcl run directory (no run.yaml)")
    recorded = store.read_run_yaml()
    config = config_from_dict(recorded["config"])
    # Continue with the rate the run was started with, even if the method's default changed.
    lr = recorded.get("effective", {}).get("lr")
    return dataclasses.replace(config, lr=config.lr or lr)
