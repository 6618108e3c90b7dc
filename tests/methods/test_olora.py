"""O-LoRA, IncLoRA and PerTask against hand-computed values."""
from __future__ import annotations

import json

import pytest
import torch

from conftest import tiny_run_config
from dealcl.methods import REGISTRY, Stage
from dealcl.methods.lora import lora_layers
from dealcl.runs.driver import prepare, run_continual
from dealcl.train.batching import PromptEncoder
from dealcl.train.loop import TrainingServices


def _method(toy_data, name, model="tiny-llama", **options):
    prep = prepare(tiny_run_config(toy_data, method=name, model=model, method_options={"dropout": 0.0, **options}))
    services = TrainingServices(PromptEncoder(prep.loaded.tokenizer, prep.loaded.arch), prep.loaded.arch, "fp32",
                                torch.device("cpu"))
    method = prep.method_class(prep.method_options, services)
    return prep, method, method.prepare_model(prep.loaded.model)


def test_overlap_on_a_hand_example(toy_data):
    prep, method, model = _method(toy_data, "olora")
    stages = method.stages(prep.tasks)
    method.on_task_start(model, stages[0])
    method.on_task_end(model, stages[0])
    method.on_task_start(model, stages[1])
    layers = lora_layers(model)
    a_old = torch.tensor([[1.0, -2.0], [0.5, 0.0]])
    a_new = torch.tensor([[3.0, 1.0]])
    with torch.no_grad():
        for i, (_, layer) in enumerate(layers):
            old, new = layer.lora_A["task1"].weight, layer.lora_A["task2"].weight
            old.zero_()
            new.zero_()
            if i == 0:  # one module carries the example, the others contribute 0
                old[:2, :2] = a_old
                new[:1, :2] = a_new
    # A_old A_newᵀ = [1·3 − 2·1, 0.5·3] = [1, 1.5]: L1 = 2.5, squared Frobenius = 3.25
    assert method.overlap(model).item() == pytest.approx(2.5)
    method.config.overlap_norm = "frobenius2"
    assert method.overlap(model).item() == pytest.approx(3.25)
    terms = method.extra_losses(model, {}, torch.zeros(1))
    assert terms["orth"].item() == pytest.approx(0.5 * 3.25)


def test_overlap_gradient_flows_to_the_new_adapter_only(toy_data):
    prep, method, model = _method(toy_data, "olora")
    stages = method.stages(prep.tasks)
    method.on_task_start(model, stages[0])
    method.on_task_end(model, stages[0])
    method.on_task_start(model, stages[1])
    method.extra_losses(model, {}, torch.zeros(1))["orth"].backward()
    for _, layer in lora_layers(model):
        assert layer.lora_A["task2"].weight.grad is not None and layer.lora_A["task2"].weight.grad.abs().sum() > 0
        assert layer.lora_A["task1"].weight.grad is None


@pytest.mark.parametrize("model_name", ["tiny-llama", "tiny-t5"])
def test_trainable_counts_follow_the_formula(toy_data, model_name):
    """Σ over q,v modules of r·(d_in + d_out), r = 8, the same for every task."""
    prep, method, model = _method(toy_data, "olora", model=model_name)
    base = prep.loaded.model
    config = base.config
    if model_name == "tiny-llama":
        d, kv = config.hidden_size, config.num_key_value_heads * (config.hidden_size // config.num_attention_heads)
        expected = config.num_hidden_layers * 8 * ((d + d) + (d + kv))
    else:  # q,v in encoder self-attention, decoder self- and cross-attention: d_model → heads·d_kv
        inner = config.num_heads * config.d_kv
        blocks = config.num_layers + 2 * config.num_decoder_layers
        expected = blocks * 2 * 8 * (config.d_model + inner)
    for stage in method.stages(prep.tasks):
        method.on_task_start(model, stage)
        assert sum(p.numel() for p in model.parameters() if p.requires_grad) == expected
        method.on_task_end(model, stage)


def test_inclora_has_no_regulariser_and_olora_logs_its_term(toy_data, tmp_path):
    run_continual(tiny_run_config(toy_data, method="inclora"), tmp_path / "inc", progress=False)
    run_continual(tiny_run_config(toy_data, method="olora"), tmp_path / "o", progress=False)
    assert "orth=" not in (tmp_path / "inc" / "logs" / "train_and_infer.log").read_text()
    assert "orth=" in (tmp_path / "o" / "logs" / "train_and_infer.log").read_text()


def test_bad_overlap_norm_is_a_user_error(toy_data):
    from dealcl.errors import UserError

    with pytest.raises(UserError, match="overlap_norm"):
        _method(toy_data, "olora", overlap_norm="l3")


def test_pertask_evaluates_each_task_with_its_own_adapter_and_reuses_predictions(toy_data, tmp_path):
    out = tmp_path / "run"
    results = run_continual(tiny_run_config(toy_data, method="pertask", tasks=["toyA", "toyB", "toyC"]), out,
                            progress=False)
    matrix = results["accuracy_matrix"]
    assert matrix[0][0] == matrix[1][0] == matrix[2][0] and matrix[1][1] == matrix[2][1]
    assert results["backward_transfer"] == 0
    efficiency = json.loads((out / "efficiency.json").read_text())["stages"]
    # Stage 3 generates for toyC only: toyA's and toyB's predictions are provably unchanged.
    assert efficiency[2]["eval_examples"] == 8
    fingerprints = json.loads((out / "outputs" / "3-toyC" / "eval_fingerprints.json").read_text())
    assert fingerprints == {"toyA": "adapter:task1", "toyB": "adapter:task2", "toyC": "adapter:task3"}
