"""The continual driver: for each stage, set up the method, train, checkpoint, evaluate, record.

Read it top to bottom (`run_continual`): everything the user gave is checked before the run
directory is touched; then the untouched model is evaluated once (the zero-shot reference);
then each stage trains, saves the method's state atomically, evaluates tasks 1..k and writes its
outputs. A killed run resumes after its last stage whose files match their manifests.
"""
from __future__ import annotations

import contextlib
import dataclasses
import functools
import hashlib
import json
import logging
import os
import platform
import resource
import subprocess
import sys
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch

from .. import __version__
from ..data.benchmarks import resolve_sequence
from ..data.loading import default_data_dir, load_task_with_validation
from ..data.types import Task
from ..errors import UserError
from ..eval.generate import ANSWER_RULE, generate_answers
from ..eval.score import score_answers
from ..eval.metrics import normalize_answer, score_task, summarize
from ..methods import ContinualMethod, Stage, resolve_method
from ..models.loading import LoadedModel, load_model
from ..prompts import PromptEncoder
from ..train.services import TrainingServices
from ..train.loop import (
    CPU_MICRO_BATCH_TOKENS, TrainSettings, enable_gradient_checkpointing, resolve_precision, train_stage,
)
from .config import RunConfig, config_from_dict, method_config, recipe_record, stage_overrides
from .progress import RunProgress, Workload
from ..train.distributed import fsdp_requested, launched_processes
from .store import RunStore, atomic_write_json, atomic_write_text, dumps_json, sha256_file, verify_stage_dir, write_stage_dir

log = logging.getLogger("dealcl")
REFERENCE = "reference"
PREDICTIONS = "predictions.json"  # answers and labels per task, no sentences
UPSTREAM_PREDICTIONS = "predict_eval_predictions.jsonl"  # upstream layout, quotes the test sentences
REFERENCE_KEYS = "reference_keys.json"  # per task: what the untouched model's answers depend on


def say(message: str) -> None:
    if launched_processes().is_main:
        print(message, file=sys.stderr, flush=True)


@dataclass
class Prepared:
    """Everything checked and loaded before the run directory is created."""

    config: RunConfig
    data_dir: Path
    tasks: list[Task]
    method_class: type[ContinualMethod]
    method_options: Any
    lr: float
    loaded: LoadedModel
    device: torch.device
    precision: str


def prepare(config: RunConfig, loaded: LoadedModel | None = None) -> Prepared:
    """Validate the whole configuration and load data and model; touches no run directory."""
    sequence = resolve_sequence(config.benchmark, config.order, config.tasks)
    data_dir = Path(config.data).expanduser() if config.data else default_data_dir()
    if not data_dir.is_dir():
        raise UserError(f"data directory does not exist: {data_dir}")
    method_class = resolve_method(config.method)
    options = method_config(method_class.config_class, config.method_options, config.method)
    check_task_overrides(config, sequence, method_class)
    if config.eval_split == "validation" and not config.val_per_task:
        raise UserError("eval_split=validation needs held-out examples: set --val-per-task N (N > 0)")
    tasks = []
    for name in sequence:
        task, validation = load_task_with_validation(
            name, data_dir, train_per_task=config.train_per_task, test_per_task=config.test_per_task,
            val_per_task=config.val_per_task, sample=config.sample, seed=config.seed,
        )
        if config.eval_split == "validation":
            # Tuning: score the held-out training examples, never the test set (upstream's dev
            # split is the test split, so it cannot be used for choosing hyperparameters).
            known = set(task.labels)
            task = dataclasses.replace(task, test=validation,
                                       unknown_test_labels=sum(1 for e in validation if e.label not in known))
        tasks.append(task)
    names = [t.name for t in tasks]
    if len(set(names)) != len(names):
        raise UserError(f"the task sequence names a task twice: {names}")
    if loaded is None:
        dtype = torch.bfloat16 if config.model_dtype == "bf16" else torch.float32
        loaded = load_model(config.model, trust_remote_code=config.trust_remote_code, dtype=dtype)
    ranks = launched_processes()
    device = ranks.device
    if (config.fsdp or fsdp_requested()) and ranks.world > 1:
        if method_class.fsdp_refusal:
            raise UserError(f"method {config.method} cannot run with fsdp: {method_class.fsdp_refusal} "
                            "(docs/SCALING.md has the method x backend matrix)")
        ranks.shard_blocks(loaded.model)  # moves only this rank's shard of each block to the device
    loaded.model.to(device)
    precision = resolve_precision(config.precision, device)
    return Prepared(config, data_dir, tasks, method_class, options, config.lr or method_class.lr_for(config.model), loaded, device, precision)


def check_task_overrides(config: RunConfig, sequence: list[str], method_class: type[ContinualMethod]) -> None:
    """Every per-task value names a task of the sequence and an option the method lets vary
    per task, and gives every task a valid method config (so a bad value stops the run before
    its first stage, not at the stage it applies to)."""
    for selector, entry in config.task_overrides.items():
        if not selector.startswith("stage") and selector not in sequence:
            raise UserError(f"task_overrides names a task not in the sequence: {selector}")
        for key in entry:
            option = key.split(".", 1)[1] if key.startswith("method.") else None
            if option is not None and option not in method_class.per_task_options:
                allowed = ", ".join(method_class.per_task_options) or "none"
                raise UserError(f"task_overrides.{selector}: method {config.method} option {option!r} cannot vary "
                                f"per task (per-task options: {allowed})")
    for index, task in enumerate(sequence, start=1):
        stage_method_config(config, method_class, index, [task])


def stage_method_config(config: RunConfig, method_class: type[ContinualMethod], index: int, tasks: list[str]):
    """The method options of stage `index`: the run's, with the stage's task_overrides on top."""
    values = stage_overrides(config, index, tasks)
    options = {**config.method_options, **{k.split(".", 1)[1]: v for k, v in values.items() if k.startswith("method.")}}
    return method_config(method_class.config_class, options, config.method)


def _git_commit() -> str | None:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=Path(__file__).parent, capture_output=True, text=True, timeout=5
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None if out.returncode == 0 else None


def _package_versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    versions = {"python": platform.python_version()}
    for name in ("torch", "transformers", "peft", "accelerate", "safetensors"):
        try:
            versions[name] = version(name)
        except PackageNotFoundError:
            pass
    return versions


def run_yaml(prep: Prepared) -> dict[str, Any]:
    config = prep.config
    return {
        "config": dataclasses.asdict(config),
        "effective": {
            "task_order": [t.name for t in prep.tasks],
            "lr": prep.lr,
            "method_options": dataclasses.asdict(prep.method_options),
            "precision": prep.precision,
            "device": str(prep.device),
            "data_dir": str(prep.data_dir.resolve()),
            "model_source": prep.loaded.source,
            "arch": prep.loaded.arch,
            # The global batch is batch_size x grad_accum whatever the number of processes:
            # each rank computes 1/world of every step (train/distributed.py).
            "world_size": launched_processes().world,
            "fsdp": launched_processes().sharded,
            "global_batch": config.batch_size * config.grad_accum,
            "answer_rule": answer_rule(config),
            "micro_batch_tokens": micro_batch_tokens(config, prep.device),
            "model_weights": prep.loaded.weights,
            "recipe": recipe_record(config),
            # What each task trains with, after task_overrides (stage k trains task k).
            "per_task": [{"task": t.name, **_per_task(config, prep, k, t.name)} for k, t in enumerate(prep.tasks, 1)],
        },
        "provenance": {
            "dealcl": __version__,
            "packages": _package_versions(),
            "git_commit": _git_commit(),
            "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "data_files": {
                t.name: {role: {"path": path, "sha256": sha256_file(Path(path))} for role, path in t.files.items()}
                for t in prep.tasks
            },
        },
    }


# What runs made before the upstream exact-match rule used (they have no `answer_rule`).
OLD_ANSWER_RULE = "greedy, longest label + 3 new tokens, stop at EOS"


def answer_rule(config: RunConfig) -> str:
    """How the answers exact match scores were produced (run.yaml `effective.answer_rule`)."""
    if config.eval_mode == "score":
        return "score: the most likely label"
    return ANSWER_RULE + (" (off: with_rouge generates whole answers)" if config.with_rouge else "")


def micro_batch_tokens(config: RunConfig, device: torch.device) -> int | None:
    if config.micro_batch_tokens is not None:
        return config.micro_batch_tokens
    return CPU_MICRO_BATCH_TOKENS if device.type == "cpu" else None


def _per_task(config: RunConfig, prep: Prepared, index: int, task: str) -> dict[str, Any]:
    values = stage_overrides(config, index, [task])
    row = {"lr": values.get("lr", prep.lr), "epochs": values.get("epochs", config.epochs)}
    varying = {k.split(".", 1)[1]: v for k, v in values.items() if k.startswith("method.")}
    if varying:
        options = stage_method_config(config, prep.method_class, index, [task])
        row["method_options"] = {k: getattr(options, k) for k in varying}
    return row


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
    output.mkdir(parents=True, exist_ok=True)
    store.write_run_yaml(run_yaml(prep))
    return store


def _setup_log(store: RunStore) -> logging.Handler:
    store.log_path.parent.mkdir(parents=True, exist_ok=True)
    handler = logging.FileHandler(store.log_path, encoding="utf-8")
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
    log.addHandler(handler)
    log.setLevel(logging.INFO)
    return handler


def reset_peak_memory(device: torch.device) -> None:
    """Start a run's peak-memory count afresh: `dealcl compare` runs many in one process, and
    each run's efficiency.json should show its own peak, not the largest so far."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        return
    # The reset starts from the current RSS, which still holds what earlier runs freed (glibc
    # keeps freed heap): collect it and hand it back first, where the C library allows.
    import ctypes
    import gc

    gc.collect()
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    with contextlib.suppress(OSError):  # Linux: "5" resets the peak RSS (VmHWM) to the current RSS
        Path("/proc/self/clear_refs").write_text("5")


def peak_memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    with contextlib.suppress(OSError, ValueError, StopIteration):
        status = Path("/proc/self/status").read_text().splitlines()
        return int(next(line for line in status if line.startswith("VmHWM:")).split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


class Evaluator:
    """Evaluates tasks, writes a stage's outputs, and reuses predictions when the method
    proves the model unchanged (equal fingerprints)."""

    def __init__(self, prep: Prepared, encoder: PromptEncoder, services: TrainingServices, progress: bool) -> None:
        self.prep = prep
        self.encoder = encoder
        self.services = services
        self.progress = progress
        self.on_answered = lambda answers: None  # the whole-run progress
        self.cache: dict[tuple[str, str], list[str]] = {}

    def predictions(self, model, method: ContinualMethod | None, task: Task, fingerprint: str | None) -> tuple[list[str], float]:
        key = (task.name, fingerprint) if fingerprint else None
        if key is not None and key in self.cache:
            return self.cache[key], 0.0
        # Each rank answers its shard of the test set; the shards are gathered in input order.
        ranks = self.services.processes
        mine = ranks.shard(list(range(len(task.test))))
        sentences = [task.test[i].sentence for i in mine]
        # Sharded weights: every rank runs the same forwards, so shards are padded to one size.
        sentences += [task.test[0].sentence] * (ranks.lockstep_count(len(sentences)) - len(sentences))
        context = method.eval_model(model, task) if method is not None else contextlib.nullcontext(model)
        if self.prep.config.eval_mode == "score":
            answer = score_answers
        else:  # ROUGE scores the whole answer: no early stop for it
            answer = functools.partial(generate_answers, stop_without_label=not self.prep.config.with_rouge)
        with context as eval_model:
            answers, seconds = answer(
                eval_model, self.encoder, task, sentences, arch=self.prep.loaded.arch,
                batch_size=self.prep.config.eval_batch_size, device=self.prep.device,
                autocast=self.services.autocast, progress=self.progress, synced=ranks.sharded,
            )
        answers = answers[: len(mine)]
        if ranks.world > 1:
            answers = [a for _, a in sorted(ranks.gather(list(zip(mine, answers))))]
        if key is not None:
            self.cache[key] = answers
        return answers, seconds

    def write_stage(self, directory: Path, results: dict[str, dict], fingerprints: dict[str, str | None],
                    reference_keys: dict[str, str] | None = None) -> None:
        def fill(tmp: Path) -> None:
            if reference_keys is not None:
                atomic_write_json(tmp / REFERENCE_KEYS, reference_keys)
            atomic_write_json(tmp / "predict_results.json", predict_results(self.prep.tasks, results))
            lines = []
            for task in self.prep.tasks:
                if task.name not in results:
                    continue
                for example, prediction in zip(task.test, results[task.name]["predictions"]):
                    lines.append(dumps_json({
                        "Task": task.task_type, "Dataset": task.name, "sentence": example.sentence,
                        "label": example.label, "prediction": prediction,
                    }).replace("\n", " ").strip())
            atomic_write_text(tmp / UPSTREAM_PREDICTIONS, "\n".join(lines) + "\n")
            # The same answers without the test sentences: small, free of benchmark text, so
            # results/ can commit it and resume and compare can work from it alone.
            atomic_write_json(tmp / PREDICTIONS, {
                task.name: {"predictions": results[task.name]["predictions"], "labels": [e.label for e in task.test]}
                for task in self.prep.tasks if task.name in results
            })
            atomic_write_json(tmp / "eval_fingerprints.json", fingerprints)

        write_stage_dir(directory, fill)

    def reference_keys(self) -> dict[str, str]:
        """Per task, a digest of everything the untouched model's answers depend on: model,
        precision, evaluation settings, world size (it changes the batches) and every test
        prompt and label. Equal keys mean equal answers (greedy decoding is deterministic)."""
        config, loaded = self.prep.config, self.prep.loaded
        common = json.dumps([loaded.source, loaded.arch, config.model_dtype, self.prep.precision, config.eval_mode,
                             config.eval_batch_size, self.services.processes.world, torch.__version__,
                             ANSWER_RULE, config.with_rouge])
        keys = {}
        for task in self.prep.tasks:
            digest = hashlib.sha256(common.encode())
            digest.update(json.dumps(task.labels).encode())
            for example in task.test:
                digest.update(json.dumps([self.encoder.prompt_ids(task, example.sentence), example.label]).encode())
            keys[task.name] = digest.hexdigest()
        return keys

    def borrow_reference(self, siblings: Path, keys: dict[str, str], own: Path) -> list[str]:
        """Take the untouched model's answers from the finished stage 0 of runs next to this
        one (the other methods and orders of a `dealcl compare`, and the runs of comparisons
        next to that one) wherever a task's key matches; returns the tasks found. Saves a whole
        evaluation per run: an untuned model often talks until the token limit."""
        found: list[str] = []
        try:
            folders = [siblings] + [f for f in sorted(siblings.parent.iterdir()) if f != siblings and
                                    (f / "comparison.json").is_file()]
            candidates = [d for folder in folders for d in sorted(folder.iterdir()) if d.is_dir()]
        except OSError:  # an unreadable neighbour: nothing to borrow, evaluate as usual
            return found
        for directory in candidates:
            reference = RunStore(directory).output_dir(0, REFERENCE) if (directory / "outputs").is_dir() else None
            if reference is None or reference == own or not (reference / REFERENCE_KEYS).is_file():
                continue
            if not outputs_verify(reference):
                continue
            theirs = json.loads((reference / REFERENCE_KEYS).read_text())
            answers = json.loads((reference / PREDICTIONS).read_text())
            for name, key in keys.items():
                if name not in found and theirs.get(name) == key and name in answers:
                    self.cache[(name, "base-model")] = answers[name]["predictions"]
                    found.append(name)
        return found

    def load_stage(self, directory: Path) -> dict[str, dict]:
        """Read back a finished stage's scores and predictions (for resume)."""
        scores = json.loads((directory / "predict_results.json").read_text())
        fingerprints = json.loads((directory / "eval_fingerprints.json").read_text())
        answers = json.loads((directory / PREDICTIONS).read_text())
        results = {}
        for name, answer in answers.items():
            preds = answer["predictions"]
            results[name] = {
                "exact_match": scores[f"predict_exact_match_for_{name}"],
                "invalid_rate": scores.get(f"predict_invalid_rate_for_{name}"),
                "predictions": preds,
            }
            if fingerprints.get(name):
                self.cache[(name, fingerprints[name])] = preds
        return results

    def evaluate(self, model, method, tasks: list[Task], stage: Stage | None) -> tuple[dict, dict, float, int]:
        results, fingerprints, seconds, generated = {}, {}, 0.0, 0
        for task in tasks:
            fingerprint = "base-model" if method is None else method.eval_fingerprint(task, stage)
            answers, took = self.predictions(model, method, task, fingerprint)
            self.on_answered(len(answers))
            seconds += took
            generated += len(answers) if took > 0 else 0
            labels = [e.label for e in task.test]
            score = score_task(answers, labels, task.labels, with_rouge=self.prep.config.with_rouge)
            results[task.name] = {**score, "predictions": answers}
            fingerprints[task.name] = fingerprint
        return results, fingerprints, seconds, generated


def predict_results(tasks: list[Task], results: dict[str, dict]) -> dict[str, Any]:
    """The upstream `predict_results.json` keys, so existing tooling keeps working.

    `predict_exact_match` is upstream's sample-weighted (micro) mean; our AA is the macro mean."""
    out: dict[str, Any] = {}
    total = correct = 0.0
    by_type: dict[str, list[float]] = {}
    for task in tasks:
        if task.name not in results:
            continue
        r = results[task.name]
        n = len(r["predictions"])
        total += n
        correct += r["exact_match"] * n
        by_type.setdefault(task.task_type, [0.0, 0.0])
        by_type[task.task_type][0] += r["exact_match"] * n
        by_type[task.task_type][1] += n
    out["predict_exact_match"] = round(correct / total, 4) if total else None
    for task_type, (c, n) in by_type.items():
        out[f"predict_exact_match_for_{task_type}"] = round(c / n, 4)
    for task in tasks:
        if task.name not in results:
            continue
        r = results[task.name]
        out[f"predict_exact_match_for_{task.name}"] = round(r["exact_match"], 4)
        out[f"predict_invalid_rate_for_{task.name}"] = round(r["invalid_rate"], 4)
        out[f"predict_samples_for_{task.name}"] = len(r["predictions"])
        out[f"predict_unknown_labels_for_{task.name}"] = task.unknown_test_labels
        if "rougeL" in r:
            out[f"predict_rougeL_for_{task.name}"] = round(r["rougeL"], 4)
    out["predict_samples"] = int(total)
    return out


@dataclass
class RunState:
    matrix_rows: list[dict[str, dict]] = field(default_factory=list)  # per finished stage: task → scores
    reference: dict[str, dict] | None = None
    efficiency: list[dict] = field(default_factory=list)


def write_results(store: RunStore, prep: Prepared, stages: list[Stage], state: RunState, joint: bool) -> dict:
    order = [t.name for t in prep.tasks]
    matrix = [[row.get(name, {}).get("exact_match") for name in order] for row in state.matrix_rows]
    invalid = [[row.get(name, {}).get("invalid_rate") for name in order] for row in state.matrix_rows]
    reference = [state.reference.get(name, {}).get("exact_match") for name in order] if state.reference else None
    unknown = {t.name: t.unknown_test_labels for t in prep.tasks}
    summary = summarize(order, matrix, reference, invalid, unknown_labels=unknown, joint=joint)
    summary = {"method": prep.config.method, "model": prep.config.model, "stages": [s.name for s in stages], **summary}
    atomic_write_json(store.results_path, summary)
    return summary


def run_continual(config: RunConfig, output: Path, *, progress: bool = True, loaded: LoadedModel | None = None,
                  costs: tuple[float, float] | None = None) -> dict:
    """Run (or resume) a whole continual sequence; returns the results.json content.

    `costs`: seconds per training example and per answer on this machine (a probe's), for the
    whole-run progress bar; typical values otherwise."""
    prep = prepare(config, loaded)
    reset_peak_memory(prep.device)
    ranks = launched_processes()
    # Only rank 0 writes the run directory; the others wait for it and then read it.
    store = ranks.on_main(lambda: open_run_dir(Path(output), prep))
    if not ranks.is_main:
        return _run(prep, RunStore(Path(output)), progress=False)
    handler = _setup_log(store)
    try:
        return _run(prep, store, progress, costs)
    finally:
        log.removeHandler(handler)
        handler.close()


def outputs_verify(directory: Path) -> bool:
    """A stage's evaluation outputs are complete. The upstream-layout predictions file quotes
    the benchmark sentences, so results/ does not keep it: it may be missing, never wrong."""
    return verify_stage_dir(directory, optional=(UPSTREAM_PREDICTIONS,)) is None


def _workload(prep: Prepared, store: RunStore, stages: list[Stage], method: ContinualMethod) -> Workload:
    """What is left to do: training examples and answers of every unfinished stage."""
    config, tasks = prep.config, prep.tasks
    todo = [s for s in stages if not outputs_verify(store.output_dir(s.index, s.name))]
    train = sum(len(t.train) * stage_overrides(config, s.index, [t.name]).get("epochs", config.epochs)
                for s in todo for t in s.train_tasks) if method.trains else 0
    answers = sum(len(t.test) for s in todo
                  for t in (tasks if (config.eval_all_stages or method.joint) else _seen_tasks(tasks, stages, s)))
    if config.reference_stage and not outputs_verify(store.output_dir(0, REFERENCE)):
        answers += sum(len(t.test) for t in tasks)
    return Workload(train, answers)


def _run(prep: Prepared, store: RunStore, progress: bool, costs: tuple[float, float] | None = None) -> dict:
    config = prep.config
    torch.manual_seed(config.seed)
    encoder = PromptEncoder(prep.loaded.tokenizer, prep.loaded.arch, config.max_source_length, config.prompt_style)
    ranks = launched_processes()
    services = TrainingServices(encoder, prep.loaded.arch, prep.precision, prep.device, ranks,
                                share_prefix=config.share_prompt_prefix and not config.gradient_checkpointing,
                                seed=config.seed)
    evaluator = Evaluator(prep, encoder, services, progress)
    state = RunState(efficiency=list(store.read_json(store.efficiency_path, {}).get("stages", [])))
    log.info("run %s: method=%s model=%s tasks=%s precision=%s", store.root, config.method, config.model,
             [t.name for t in prep.tasks], prep.precision)
    method = prep.method_class(prep.method_options, services)
    stages = method.stages(prep.tasks)
    if len({s.name for s in stages}) != len(stages):
        raise UserError("a method produced two stages with the same name")
    overall = RunProgress(_workload(prep, store, stages, method), progress and ranks.is_main, *(costs or ()))
    services.on_trained, evaluator.on_answered = overall.trained, overall.answered
    try:
        return _run_stages(prep, store, progress, services, evaluator, state, method, stages)
    finally:
        overall.close()


def _run_stages(prep, store, progress, services, evaluator, state, method, stages) -> dict:
    config, ranks = prep.config, services.processes

    # Stage 0: the untouched model on every task, the zero-shot reference b_j for FWT.
    if config.reference_stage:
        reference_dir = store.output_dir(0, REFERENCE)
        if outputs_verify(reference_dir):
            state.reference = evaluator.load_stage(reference_dir)
        else:
            keys = evaluator.reference_keys()
            borrowed = evaluator.borrow_reference(store.root.parent, keys, reference_dir)
            say(f"stage 0 (zero-shot reference): evaluating {len(prep.tasks) - len(borrowed)} tasks"
                + (f", {len(borrowed)} answered by a sibling run's identical stage 0" if borrowed else ""))
            results, fingerprints, _, _ = evaluator.evaluate(prep.loaded.model, None, prep.tasks, None)
            ranks.on_main(lambda: evaluator.write_stage(reference_dir, results, fingerprints, keys))
            state.reference = results

    model = method.prepare_model(prep.loaded.model)
    if config.gradient_checkpointing:
        enable_gradient_checkpointing(model)

    # Resume: the last stage whose checkpoint verifies, and whose earlier outputs all verify.
    # A finished run (every stage's outputs verify) needs no checkpoint at all: its adapters
    # may have been deleted to save space (results/ keeps none) and nothing is retrained.
    finished = all(outputs_verify(store.output_dir(s.index, s.name)) for s in stages)
    recorded_rule = store.read_run_yaml().get("effective", {}).get("answer_rule", OLD_ANSWER_RULE)
    if not finished and recorded_rule != answer_rule(config):
        # Its finished stages were scored another way: continuing would mix two metrics.
        raise UserError(f"{store.root} was started with another answer rule ({recorded_rule}); its remaining "
                        f"stages cannot be scored the same way: start it again in a new --output")
    resume_from = len(stages) if finished else 0
    for stage in stages if not finished else []:
        if verify_stage_dir(store.adapter_dir(stage.index, stage.name)) is not None:
            break
        resume_from = stage.index
        if not outputs_verify(store.output_dir(stage.index, stage.name)):
            break
    for stage in stages[:resume_from]:
        out_dir = store.output_dir(stage.index, stage.name)
        if outputs_verify(out_dir):
            state.matrix_rows.append(evaluator.load_stage(out_dir))
    if resume_from and not finished:
        last = stages[resume_from - 1]
        method.load_state(model, store.adapter_dir(last.index, last.name), last)
        say(f"resuming {store.root} after stage {last.index} ({last.name})")
        log.info("resumed after stage %d (%s)", last.index, last.name)
    for stage in stages[resume_from:]:
        for directory in (store.adapter_dir(stage.index, stage.name), store.output_dir(stage.index, stage.name)):
            problem = verify_stage_dir(directory)
            if directory.exists() and problem is not None:
                say(f"stage {stage.index} ({stage.name}): {directory.name} is incomplete ({problem}); redoing it")
                log.warning("redoing %s: %s", directory, problem)
    state.efficiency = [e for e in state.efficiency if e.get("stage", 0) <= len(state.matrix_rows)]

    summary = ranks.on_main(lambda: write_results(store, prep, stages, state, method.joint)) if state.matrix_rows else {}
    for stage in stages:
        if stage.index <= len(state.matrix_rows):
            continue
        if state.efficiency:  # each stage's own peak (the first one's includes loading and stage 0)
            reset_peak_memory(prep.device)
        started = time.perf_counter()
        adapter_dir = store.adapter_dir(stage.index, stage.name)
        train_stats: dict[str, Any] = {"train_examples": 0, "train_seconds": 0.0, "train_samples_per_second": None}
        if stage.index > resume_from:
            names = [t.name for t in stage.train_tasks]
            own = stage_overrides(config, stage.index, names)
            method.config = stage_method_config(config, prep.method_class, stage.index, names)
            method.on_task_start(model, stage)
            if method.trains:
                items = method.training_items(stage)
                settings = TrainSettings(
                    lr=own.get("lr", prep.lr), epochs=own.get("epochs", config.epochs),
                    batch_size=own.get("batch_size", config.batch_size), grad_accum=own.get("grad_accum", config.grad_accum),
                    max_grad_norm=own.get("max_grad_norm", config.max_grad_norm), seed=config.seed,
                    group_by_length=config.group_by_length, micro_batch_tokens=micro_batch_tokens(config, prep.device),
                )
                train_stats = train_stage(model, method, stage, items, settings, services, progress)
            method.on_task_end(model, stage)
            ranks.on_main(lambda: write_stage_dir(adapter_dir, lambda d: method.save_state(model, d)))
        trainable = sum(p.numel() for p in model.parameters() if p.requires_grad) if method.trains else 0
        eval_tasks = prep.tasks if (config.eval_all_stages or method.joint) else _seen_tasks(prep.tasks, stages, stage)
        results, fingerprints, eval_seconds, generated = evaluator.evaluate(model, method, eval_tasks, stage)
        ranks.on_main(lambda: evaluator.write_stage(store.output_dir(stage.index, stage.name), results, fingerprints))
        state.matrix_rows.append(results)
        wall = time.perf_counter() - started
        state.efficiency.append({
            "stage": stage.index, "task": stage.name, "wall_seconds": round(wall, 3),
            "train_examples": train_stats["train_examples"], "train_seconds": round(train_stats["train_seconds"], 3),
            "train_samples_per_second": _round(train_stats["train_samples_per_second"]),
            "eval_examples": generated, "eval_seconds": round(eval_seconds, 3),
            "eval_examples_per_second": _round(generated / eval_seconds if eval_seconds > 0 else None),
            "peak_memory_mb": round(peak_memory_mb(prep.device), 1),
            "world_size": ranks.world,
            "step_losses": train_stats.get("step_losses", []),
            "trainable_parameters": train_stats.get("trainable_parameters", trainable),
        })
        summary = ranks.on_main(lambda: _write_stage_summaries(store, prep, stages, state, method.joint))
        if not ranks.is_main:
            continue
        scores = " ".join(f"{name}={r['exact_match']:.1f}" for name, r in results.items())
        say(
            f"stage {stage.index}/{len(stages)} {stage.name}: trained {train_stats['train_examples']} examples "
            f"in {train_stats['train_seconds']:.0f} s, evaluated {len(eval_tasks)} tasks in {eval_seconds:.0f} s | EM {scores}"
        )
        log.info("stage %d %s done: %s", stage.index, stage.name, scores)
    return summary


def _write_stage_summaries(store: RunStore, prep: Prepared, stages: list[Stage], state: RunState, joint: bool) -> dict:
    atomic_write_json(store.efficiency_path, {
        "device": str(prep.device), "precision": prep.precision, "threads": torch.get_num_threads(),
        "stages": state.efficiency,
    })
    return write_results(store, prep, stages, state, joint)


def _seen_tasks(tasks: list[Task], stages: list[Stage], stage: Stage) -> list[Task]:
    seen = {t.name for s in stages if s.index <= stage.index for t in s.train_tasks}
    return [t for t in tasks if t.name in seen]


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
