"""SeqFT, Replay, EWC, LwF and MTL against hand-checkable values."""
from __future__ import annotations

import pytest
import torch

from conftest import tiny_run_config
from dealcl.methods.replay import buffer_size
from dealcl.runs.driver import prepare, run_continual
from dealcl.train.batching import PromptEncoder
from dealcl.train.loop import TrainingServices, TrainSettings, train_stage


def _setup(toy_data, name, **options):
    prep = prepare(tiny_run_config(toy_data, method=name, method_options=options))
    services = TrainingServices(PromptEncoder(prep.loaded.tokenizer, "causal"), "causal", "fp32", torch.device("cpu"))
    method = prep.method_class(prep.method_options, services)
    model = method.prepare_model(prep.loaded.model)
    return prep, method, model, method.stages(prep.tasks), services


def _train(method, model, stage, services):
    method.on_task_start(model, stage)
    train_stage(model, method, stage, method.training_items(stage), TrainSettings(lr=5e-3, batch_size=4, seed=0),
                services, progress=False)
    method.on_task_end(model, stage)


def test_replay_buffer_sizes_and_mixing(toy_data):
    assert buffer_size(14000, 0.02, 8) == 280 and buffer_size(250, 0.02, 8) == 8 and buffer_size(5, 0.02, 8) == 5
    prep, method, model, stages, services = _setup(toy_data, "replay", dropout=0.0)
    _train(method, model, stages[0], services)
    assert len(method.buffer["toyA"]) == 8  # 24 training examples: 2% rounds up to 1, at least 8
    items = method.training_items(stages[1])
    assert len(items) == 24 + 8 and sum(task.name == "toyA" for task, _ in items) == 8
    assert all(example in prep.tasks[0].train for task, example in items if task.name == "toyA")


def test_ewc_penalty_is_zero_at_the_anchor_and_positive_elsewhere(toy_data):
    prep, method, model, stages, services = _setup(toy_data, "ewc", dropout=0.0)
    _train(method, model, stages[0], services)
    fisher = method.fishers[0]
    assert all((f >= 0).all() for f in fisher.values()) and sum(f.sum() for f in fisher.values()) > 0
    assert method.penalty(model).item() == 0.0
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(0.01)
    expected = 0.5 * method.config.ewc_lambda * sum(f.sum().item() * 0.01**2 for f in fisher.values())
    assert method.penalty(model).item() == pytest.approx(expected, rel=1e-3)


def test_lwf_distillation_is_zero_when_student_equals_teacher(toy_data):
    prep, method, model, stages, services = _setup(toy_data, "lwf", dropout=0.0)
    _train(method, model, stages[0], services)
    method.on_task_start(model, stages[1])
    assert len(method.teacher) == len(prep.tasks[1].train)
    batch = next(services.batches(method.training_items(stages[1]), 4))
    model.eval()
    with torch.no_grad():
        logits = services.answer_logits(model, batch)
        assert method.extra_losses(model, batch, logits)["lwf"].item() == pytest.approx(0.0, abs=1e-3)
        shifted = logits + torch.randn_like(logits)
        assert method.extra_losses(model, batch, shifted)["lwf"].item() > 0.01


def test_seqft_trains_every_weight_but_the_embeddings(toy_data):
    prep, method, model, stages, services = _setup(toy_data, "seqft")
    embeddings = {id(p) for p in model.get_input_embeddings().parameters()}
    trainable = [p for p in model.parameters() if p.requires_grad]
    assert all(id(p) not in embeddings for p in trainable)
    assert sum(p.numel() for p in trainable) == sum(p.numel() for p in model.parameters()) - sum(
        p.numel() for p in model.get_input_embeddings().parameters())


def test_mtl_is_one_joint_stage_evaluated_on_every_task(toy_data, tmp_path):
    results = run_continual(tiny_run_config(toy_data, method="mtl", tasks=["toyA", "toyB", "toyC"]), tmp_path / "r",
                            progress=False)
    assert results["joint"] is True and len(results["accuracy_matrix"]) == 1
    assert None not in results["accuracy_matrix"][0]
    assert results["backward_transfer"] is None
    assert (tmp_path / "r" / "outputs" / "1-joint" / "predict_results.json").is_file()
