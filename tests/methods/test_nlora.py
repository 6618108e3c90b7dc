"""N-LoRA against the hand-computed values of new_methods_spec.md §3.8 (d_in = d_out = 3, r = 2, s = 1)."""
from __future__ import annotations

import pytest
import torch

from conftest import tiny_run_config
from dealcl.errors import UserError
from dealcl.methods._lora import lora_layers
from dealcl.methods.nlora import l1_penalty
from dealcl.runs.driver import run_continual
from dealcl.runs.session import build_session
from dealcl.train.loop import TrainSettings, train_stage

A = [[1.0, 0.0, -1.0], [2.0, 1.0, 0.0]]  # r×d_in
B = [[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]]  # d_out×r


def _factors():
    return torch.tensor(A, requires_grad=True), torch.tensor(B, requires_grad=True)


def test_code_form_is_the_r_by_r_loop_matrix():
    a, b = _factors()
    # A·B = [[0, −1], [2, 1]]
    assert l1_penalty(a, b, "code").item() == 4.0


def test_paper_form_is_the_update_and_optionally_scaled():
    a, b = _factors()
    # B·A = [[1, 0, −1], [2, 1, 0], [3, 1, −1]]
    assert l1_penalty(a, b, "paper").item() == 10.0
    assert l1_penalty(a, b, "paper", scaling=4.0).item() == 40.0


def test_subgradients_by_hand():
    a, b = _factors()
    grad_a, grad_b = torch.autograd.grad(l1_penalty(a, b, "code"), (a, b))
    assert grad_a.tolist() == [[0, -1, -1], [1, 1, 2]]  # sign(AB) Bᵀ
    assert grad_b.tolist() == [[2, 1], [1, 1], [0, 1]]  # Aᵀ sign(AB)
    a, b = _factors()
    grad_a, grad_b = torch.autograd.grad(l1_penalty(a, b, "paper"), (a, b))
    assert grad_a.tolist() == [[2, 1, -2], [2, 2, -1]]  # Bᵀ sign(BA)
    assert grad_b.tolist() == [[2, 2], [1, 3], [2, 3]]  # sign(BA) Aᵀ


def test_code_form_refuses_non_square_in_one_line_paper_works():
    a = torch.tensor(A)  # 2×3
    b = torch.ones(4, 2)  # d_out 4 ≠ d_in 3
    with pytest.raises(UserError) as caught:
        l1_penalty(a, b, "code")
    assert "\n" not in str(caught.value) and "form=paper" in str(caught.value)
    assert torch.isfinite(l1_penalty(a, b, "paper"))


def _session(data, method="nlora", model="tiny-llama", **options):
    return build_session(tiny_run_config(data, method=method, model=model,
                                         method_options={"dropout": 0.0, **options}))


def test_code_form_is_refused_at_prepare_time_on_a_gqa_model(toy_data):
    # tiny-llama has 4 query and 2 key-value heads: v_proj maps 64 → 32.
    with pytest.raises(UserError, match=r"model.layers.0.self_attn.v_proj maps 64 → 32"):
        _session(toy_data, form="code", lambda1=0.4)
    session = _session(toy_data, model="tiny-t5", form="code", lambda1=0.4)  # T5 q,v: 64 → 64
    assert session.method.config.form == "code"


def test_code_form_refusal_comes_before_the_run_directory_exists(toy_data, tmp_path):
    # Before stage 0: a refused run leaves nothing half-written (the check used to come after
    # the reference evaluation had been written).
    config = tiny_run_config(toy_data, method="nlora", model="tiny-llama", method_options={"form": "code"})
    with pytest.raises(UserError, match=r"v_proj maps 64 → 32"):
        run_continual(config, tmp_path / "run", progress=False)
    assert not (tmp_path / "run").exists()


def test_include_scaling_is_refused_with_the_code_form(toy_data):
    with pytest.raises(UserError, match="include_scaling"):
        _session(toy_data, model="tiny-t5", form="code", include_scaling=True)


@pytest.mark.parametrize("form, scaled", [("paper", False), ("paper", True), ("code", False)])
def test_term_sums_the_current_adapter_over_modules(toy_data, form, scaled):
    session = _session(toy_data, model="tiny-t5", form=form, include_scaling=scaled, lambda1=0.5)
    method, model = session.method, session.model
    stages = session.stages()
    method.on_task_start(model, stages[0])
    method.on_task_end(model, stages[0])
    method.on_task_start(model, stages[1])
    generator = torch.Generator().manual_seed(3)
    expected = 0.0
    with torch.no_grad():
        for _, layer in lora_layers(model):
            for name in ("task1", "task2"):  # both adapters non-zero: only task2 may count
                layer.lora_B[name].weight.copy_(torch.randn(layer.lora_B[name].weight.shape, generator=generator))
            a, b = layer.lora_A["task2"].weight.double(), layer.lora_B["task2"].weight.double()
            if form == "paper":
                expected += (b @ a).abs().sum().item() * (layer.scaling["task2"] if scaled else 1.0)
            else:
                expected += (a @ b).abs().sum().item()
    terms = method.extra_losses(model, {}, torch.zeros(1))
    assert terms["l1"].item() == pytest.approx(0.5 * expected, rel=1e-5)
    assert lora_layers(model)[0][1].scaling["task2"] == 4.0  # s = α 32 / r 8


def test_old_adapters_get_no_gradient_from_the_term(toy_data):
    session = _session(toy_data, lambda1=0.1)
    method, model = session.method, session.model
    stages = session.stages()
    method.on_task_start(model, stages[0])
    method.on_task_end(model, stages[0])
    method.on_task_start(model, stages[1])
    old = [p for n, p in model.named_parameters() if ".task1." in n]
    new = [p for n, p in model.named_parameters() if ".task2." in n]
    for p in old:
        p.requires_grad_(True)  # even if they could train, R must not reach them
    with torch.no_grad():
        for _, layer in lora_layers(model):
            layer.lora_B["task1"].weight.fill_(0.3)
            layer.lora_B["task2"].weight.fill_(0.2)
    term = method.extra_losses(model, {}, torch.zeros(1))["l1"]
    grads = torch.autograd.grad(term, old + new, allow_unused=True)
    assert all(g is None or not g.any() for g in grads[: len(old)])
    assert any(g is not None and g.any() for g in grads[len(old):])


def _two_stage_losses(data, method, **options):
    session = _session(data, method=method, **options)
    settings = TrainSettings(lr=5e-3, epochs=1, batch_size=4, seed=0)
    losses, model = [], session.model
    for stage in session.stages():
        session.method.on_task_start(model, stage)
        stats = train_stage(model, session.method, stage, session.method.training_items(stage), settings,
                            session.services, progress=False)
        session.method.on_task_end(model, stage)
        losses += stats["step_losses"]
    weights = {n: p.detach().clone() for n, p in model.named_parameters() if ".lora_" in n}
    return losses, weights


def test_lambda_zero_is_inclora_bit_for_bit_and_lambda_changes_training(toy_data):
    inc_losses, inc_weights = _two_stage_losses(toy_data, "inclora")
    zero_losses, zero_weights = _two_stage_losses(toy_data, "nlora", lambda1=0.0)
    assert zero_losses == inc_losses
    assert inc_weights.keys() == zero_weights.keys()
    assert all(torch.equal(inc_weights[n], zero_weights[n]) for n in inc_weights)
    l1_losses, l1_weights = _two_stage_losses(toy_data, "nlora", lambda1=0.05)
    assert l1_losses != inc_losses
    # the term shrinks the new adapter's update: Σ‖B A‖₁ of task 2 is smaller than IncLoRA's
    def update_norm(weights):
        total = 0.0
        for name, value in weights.items():
            if ".lora_B.task2." in name:
                total += (value @ weights[name.replace("lora_B", "lora_A")]).abs().sum().item()
        return total
    assert update_norm(l1_weights) < update_norm(inc_weights)


def test_order4_recipe_has_upstreams_lambda_per_task_and_the_code_form():
    from dealcl.recipes import get_recipe

    # PKU-YuanGroup/N-LoRA@7301afe scripts/order_4.sh (new_methods_spec.md §3.5)
    expected = {"MNLI": 0.4, "CB": 0.4, "WiC": 1.2, "COPA": 0.4, "QQP": 0.4, "BoolQA": 0.4, "RTE": 1.2, "IMDB": 1.2,
                "yelp": 1.2, "amazon": 0.4, "SST-2": 1.2, "dbpedia": 1.2, "agnews": 0.4, "MultiRC": 0.4, "yahoo": 1.2}
    recipe = get_recipe("nlora-long4-t5")
    assert {task: values["method.lambda1"] for task, values in recipe.task_overrides.items()} == expected
    assert recipe.settings["method.form"] == "code" and recipe.settings["lr"] == 5e-4
