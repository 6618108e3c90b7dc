"""PerTask: an independent LoRA per task, each task evaluated with its own adapter."""
from __future__ import annotations

import json

import pytest
import torch

from conftest import tiny_run_config
from dealcl.runs.driver import run_continual

from .test_olora import _method, _outputs, _train


def _run_stage(prep, method, model, stage):
    method.on_task_start(model, stage)
    _train(prep, method, model, stage)
    method.on_task_end(model, stage)


def test_each_task_is_evaluated_with_its_own_adapter(toy_data):
    prep, method, model = _method(toy_data, "pertask")
    first, second = method.stages(prep.tasks)
    toy_a, toy_b = prep.tasks
    base = _outputs(prep, method, model)  # nothing trained yet: every task on the base model
    assert method.eval_fingerprint(toy_a, None) == "base-model"
    _run_stage(prep, method, model, first)
    after_first = _outputs(prep, method, model)
    assert not torch.equal(after_first["toyA"], base["toyA"])
    assert torch.equal(after_first["toyB"], base["toyB"])  # toyB not trained yet: base model

    method.on_task_start(model, second)
    # Training sees only the current task's adapter, which alone is trainable.
    assert list(model.base_model.active_adapters) == ["task2"]
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all(".task2." in n for n in trainable)
    task1 = {n: p.detach().clone() for n, p in model.named_parameters() if ".task1." in n}
    _train(prep, method, model, second)
    method.on_task_end(model, second)

    after_second = _outputs(prep, method, model)
    assert torch.equal(after_second["toyA"], after_first["toyA"])  # toyA: still its own, untouched adapter
    assert not torch.equal(after_second["toyB"], base["toyB"])
    params = dict(model.named_parameters())
    assert all(torch.equal(params[n], v) for n, v in task1.items())
    # eval_model restores the adapters it found
    assert list(model.base_model.active_adapters) == ["task2"]
    assert method.eval_fingerprint(toy_a, second) == "adapter:task1"
    assert method.eval_fingerprint(toy_b, second) == "adapter:task2"


def test_save_load_round_trip(toy_data, tmp_path):
    prep, method, model = _method(toy_data, "pertask")
    stages = method.stages(prep.tasks)
    for stage in stages:
        _run_stage(prep, method, model, stage)
    method.save_state(model, tmp_path)
    assert not any(p.suffix in (".pt", ".pkl", ".bin") for p in tmp_path.rglob("*"))
    prep2, fresh, fresh_model = _method(toy_data, "pertask")
    fresh.load_state(fresh_model, tmp_path, stages[-1])
    reference = _outputs(prep, method, model)
    for name, logits in _outputs(prep2, fresh, fresh_model).items():
        assert torch.equal(logits, reference[name])
    assert fresh.task_adapter == {"toyA": "task1", "toyB": "task2"}


def test_predictions_are_reused_for_tasks_whose_adapter_is_unchanged(toy_data, tmp_path):
    out = tmp_path / "run"
    results = run_continual(tiny_run_config(toy_data, method="pertask", tasks=["toyA", "toyB", "toyC"],
                                            train_per_task=8, test_per_task=4), out, progress=False)
    matrix = results["accuracy_matrix"]
    assert matrix[0][0] == matrix[1][0] == matrix[2][0] and matrix[1][1] == matrix[2][1]
    assert results["backward_transfer"] == 0
    efficiency = json.loads((out / "efficiency.json").read_text())["stages"]
    # Stage 3 generates for toyC only: toyA's and toyB's predictions are provably unchanged.
    assert efficiency[2]["eval_examples"] == 4
    fingerprints = json.loads((out / "outputs" / "3-toyC" / "eval_fingerprints.json").read_text())
    assert fingerprints == {"toyA": "adapter:task1", "toyB": "adapter:task2", "toyC": "adapter:task3"}


@pytest.mark.parametrize("model_name", ["tiny-t5"])
def test_end_to_end_two_tasks_on_t5(toy_data, tmp_path, model_name):
    config = tiny_run_config(toy_data, method="pertask", model=model_name, train_per_task=8, test_per_task=4)
    results = run_continual(config, tmp_path / "run", progress=False)
    assert len(results["accuracy_matrix"]) == 2
    assert results["backward_transfer"] == 0
