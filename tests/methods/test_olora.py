"""O-LoRA and IncLoRA against hand-computed values (gorp_olora_spec.md §2)."""
from __future__ import annotations

import pytest
import torch

from conftest import tiny_run_config
from dealcl.methods import REGISTRY, Stage
from dealcl.methods._lora import lora_layers
from dealcl.methods.olora import orthogonal_overlap
from dealcl.runs.driver import run_continual
from dealcl.runs.session import build_session
from dealcl.train.loop import TrainSettings, train_stage


def _method(toy_data, name, model="tiny-llama", **options):
    session = build_session(tiny_run_config(toy_data, method=name, model=model,
                                            method_options={"dropout": 0.0, **options}))
    return session.prep, session.method, session.model


def _train(prep, method, model, stage, steps_items=8):
    settings = TrainSettings(lr=5e-3, epochs=1, batch_size=4, seed=0)
    items = method.training_items(stage)[:steps_items]
    train_stage(model, method, stage, items, settings, method.services, progress=False)


@torch.no_grad()
def _outputs(prep, method, model):
    """Answer-position logits on a few test inputs of every task, through the method's eval model."""
    services, result = method.services, {}
    for task in prep.tasks:
        items = [(task, example) for example in task.test[:4]]
        with method.eval_model(model, task) as eval_model:
            eval_model.eval()
            result[task.name] = torch.cat([services.answer_logits(eval_model, b) for b in services.batches(items, 4)])
    return result


def test_orthogonal_overlap_pure_function_by_hand():
    a_old = torch.tensor([[1.0, -2.0, 0.0], [0.5, 0.0, 2.0]])  # two earlier rows
    a_new = torch.tensor([[3.0, 1.0, 0.0], [0.0, 1.0, 1.0]])  # two new rows
    # A_old A_newᵀ = [[1·3 − 2·1 + 0, 0 − 2 + 0], [1.5 + 0 + 0, 0 + 0 + 2]] = [[1, −2], [1.5, 2]]
    assert orthogonal_overlap(a_old, a_new, "l1").item() == pytest.approx(1 + 2 + 1.5 + 2)  # 6.5
    assert orthogonal_overlap(a_old, a_new, "frobenius2").item() == pytest.approx(1 + 4 + 2.25 + 4)  # 11.25
    assert orthogonal_overlap(a_old, a_new, "fro2").item() == pytest.approx(11.25)
    assert orthogonal_overlap(a_old, torch.tensor([[0.0, 0.0, 1.0]]), "l1").item() == pytest.approx(2.0)


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


def test_l2_term_is_the_sum_of_frobenius_norms_of_the_new_lora(toy_data):
    prep, method, model = _method(toy_data, "olora", lambda1=0.0, lambda2=0.25)
    method.on_task_start(model, method.stages(prep.tasks)[0])
    with torch.no_grad():
        for i, (_, layer) in enumerate(lora_layers(model)):
            layer.lora_A["task1"].weight.zero_()
            layer.lora_B["task1"].weight.zero_()
            if i == 0:
                layer.lora_A["task1"].weight[0, :2] = torch.tensor([3.0, 4.0])  # ‖A‖_F = 5
                layer.lora_B["task1"].weight[:2, 0] = torch.tensor([1.0, 0.0])  # ‖B‖_F = 1
    terms = method.extra_losses(model, {}, torch.zeros(1))
    assert set(terms) == {"l2"}  # task 1: no earlier adapter, no overlap term
    assert terms["l2"].item() == pytest.approx(0.25 * (5 + 1))


def test_inclora_has_no_extra_loss(toy_data):
    prep, method, model = _method(toy_data, "inclora")
    assert method.config.lambda1 == 0 and method.config.lambda2 == 0
    for stage in method.stages(prep.tasks):
        method.on_task_start(model, stage)
        assert method.extra_losses(model, {}, torch.zeros(1)) == {}
        method.on_task_end(model, stage)


def test_previous_adapter_bit_identical_after_training_task_2(toy_data):
    prep, method, model = _method(toy_data, "olora")
    first, second = method.stages(prep.tasks)
    method.on_task_start(model, first)
    _train(prep, method, model, first)
    method.on_task_end(model, first)
    after_first = _outputs(prep, method, model)
    old = {n: p.detach().clone() for n, p in model.named_parameters() if ".task1." in n or ".lora_" not in n}
    method.on_task_start(model, second)
    # adding task2 (B = 0) keeps the function: the model task 2 starts from is the evaluated one
    for name, logits in _outputs(prep, method, model).items():
        assert torch.equal(logits, after_first[name])
    assert sorted(model.base_model.active_adapters) == ["task1", "task2"]
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all(".task2." in n for n in trainable)
    new_before = {n: p.detach().clone() for n, p in model.named_parameters() if ".task2." in n}
    _train(prep, method, model, second)
    method.on_task_end(model, second)
    params = dict(model.named_parameters())
    assert all(torch.equal(params[n], value) for n, value in old.items())
    assert any(not torch.equal(params[n], value) for n, value in new_before.items())


def test_save_load_round_trip_and_resume_builds_the_same_next_adapter(toy_data, tmp_path):
    prep, method, model = _method(toy_data, "olora")
    first, second = method.stages(prep.tasks)
    method.on_task_start(model, first)
    _train(prep, method, model, first)
    method.on_task_end(model, first)
    method.save_state(model, tmp_path)
    assert not any(p.suffix in (".pt", ".pkl", ".bin") for p in tmp_path.rglob("*"))
    prep2, fresh, fresh_model = _method(toy_data, "olora")
    fresh.load_state(fresh_model, tmp_path, first)
    reference = _outputs(prep, method, model)
    for name, logits in _outputs(prep2, fresh, fresh_model).items():
        assert torch.equal(logits, reference[name])
    method.on_task_start(model, second)
    fresh.on_task_start(fresh_model, second)
    ours, theirs = dict(model.named_parameters()), dict(fresh_model.named_parameters())
    assert ours.keys() == theirs.keys()
    assert all(torch.equal(ours[n], theirs[n]) for n in ours)


@pytest.mark.parametrize("model_name", ["tiny-llama", "tiny-t5"])
def test_end_to_end_two_tasks(toy_data, tmp_path, model_name):
    config = tiny_run_config(toy_data, method="olora", model=model_name, train_per_task=8, test_per_task=4)
    results = run_continual(config, tmp_path / "o", progress=False)
    assert len(results["accuracy_matrix"]) == 2
    assert "orth=" in (tmp_path / "o" / "logs" / "train_and_infer.log").read_text()


def test_inclora_logs_no_regulariser(toy_data, tmp_path):
    config = tiny_run_config(toy_data, method="inclora", train_per_task=8, test_per_task=4)
    run_continual(config, tmp_path / "inc", progress=False)
    assert "orth=" not in (tmp_path / "inc" / "logs" / "train_and_infer.log").read_text()


def test_bad_overlap_norm_is_a_user_error(toy_data):
    from dealcl.errors import UserError

    with pytest.raises(UserError, match="overlap_norm"):
        _method(toy_data, "olora", overlap_norm="l3")
