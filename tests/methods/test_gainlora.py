"""GainLoRA: the gate map, pooling, projected update and gated sum against the hand values of
new_methods_spec.md §2.9; the key in the complement and a_t ≈ 0 on old inputs; gates computed
from the prompt alone in training, generation and scoring."""
from __future__ import annotations

import math

import pytest
import torch
from peft import LoraConfig, get_peft_model

from conftest import tiny_run_config
from dealcl.eval.generate import generate_answers
from dealcl.eval.score import label_scores
from dealcl.methods._gpm import memory_rank
from dealcl.methods.gainlora import (
    GateBank, GateProjectedAdamW, TaskGate, gate_hook, gate_value, pool_prompt, projected_update,
)
from dealcl.runs.session import build_session
from dealcl.train.loop import TrainSettings, train_stage


# ---- §2.9 test 1: the gate map ------------------------------------------------------------------
@pytest.mark.parametrize("c, a", [(1 / math.sqrt(2), 0.8884), (0.0, 0.0), (-1 / math.sqrt(2), 0.8884),
                                  (1.0, 0.9640), (0.05, 0.0997)])
def test_gate_map(c, a):
    assert float(gate_value(torch.tensor(c))) == pytest.approx(a, abs=1e-4)


# ---- §2.9 test 2: pooling -----------------------------------------------------------------------
def test_pooling():
    embeddings = torch.tensor([[[1.0, 1.0], [3.0, 3.0], [7.0, 7.0]]])  # the third position is a pad
    mask = torch.tensor([[1, 1, 0]])
    assert torch.allclose(pool_prompt(embeddings, mask, "padded_mean"), torch.tensor([[4 / 3, 4 / 3]]))
    assert torch.allclose(pool_prompt(embeddings, mask, "masked_mean"), torch.tensor([[2.0, 2.0]]))


# ---- §2.9 test 3: the update projection ---------------------------------------------------------
def test_update_projection():
    old, new, memory = torch.tensor([[1.0, 0, 0]]), torch.tensor([[2.0, 2, 0]]), [torch.eye(3)[:, :1]]
    projected = projected_update(old, new, memory)
    assert torch.allclose(projected, torch.tensor([[1.0, 2, 0]]))
    assert float(projected[0, 0]) == 1.0  # W·e₁: the old input's output is unchanged
    renormed = projected_update(old, new, memory, row_renorm=True)
    assert torch.allclose(renormed, torch.tensor([[1.2649, 2.5298, 0]]), atol=1e-4)  # W·e₁ = 1.2649 (G-3)


# ---- §2.9 test 5: the gated sum ------------------------------------------------------------------
def test_gated_sum_on_a_2x2_layer():
    base = torch.nn.Sequential(torch.nn.Linear(2, 2, bias=False))
    with torch.no_grad():
        base[0].weight.copy_(torch.eye(2))
    config = LoraConfig(r=1, lora_alpha=1, target_modules=["0"], lora_dropout=0.0)
    model = get_peft_model(base, config, adapter_name="task1")
    model.add_adapter("task2", config)
    layer = model.base_model.model[0]
    with torch.no_grad():  # B₁A₁ = [[0,0],[0,1]], B₂A₂ = [[1,0],[0,0]]
        layer.lora_A["task1"].weight.copy_(torch.tensor([[0.0, 1.0]]))
        layer.lora_B["task1"].weight.copy_(torch.tensor([[0.0], [1.0]]))
        layer.lora_A["task2"].weight.copy_(torch.tensor([[1.0, 0.0]]))
        layer.lora_B["task2"].weight.copy_(torch.tensor([[1.0], [0.0]]))
    model.base_model.set_adapter(["task1", "task2"])
    bank = GateBank(2, 1, "silu", torch.device("cpu"))
    bank.coefficients = torch.tensor([[1.0, 0.5]])  # (a₁, a₂)
    for index, name in ((1, "task1"), (2, "task2")):
        layer.lora_B[name].register_forward_hook(gate_hook(bank, index))
    with torch.no_grad():
        assert torch.allclose(layer(torch.tensor([[2.0, 3.0]])), torch.tensor([[3.0, 6.0]]))


# ---- §2.9 test 4, unit level: old inputs keep a_t ≈ 0 through training ---------------------------
def test_old_inputs_keep_a_zero_gate_through_projected_training():
    torch.manual_seed(0)
    d, h = 6, 4
    old_gate = TaskGate(d, h, "silu")
    with torch.no_grad():
        for p in old_gate.parameters():
            p.normal_()
    p0_old = torch.randn(3, d)
    p1_old, p2_old = old_gate.features(p0_old)
    memory = {name: [torch.linalg.qr(rows.T.detach())[0]] for name, rows in
              (("input", p0_old), ("hidden", p1_old), ("output", p2_old))}
    gate = TaskGate(d, h, "silu")
    with torch.no_grad():
        gate.w1.copy_(old_gate.w1)
        gate.w2.copy_(old_gate.w2)
        key = torch.randn(d)
        gate.key.copy_(key - memory["output"][0] @ (memory["output"][0].T @ key))
    assert (memory["output"][0].T @ gate.key).abs().max() < 1e-6
    assert gate(p0_old).max() < 1e-6
    optimizer = GateProjectedAdamW(gate.parameters(), 1e-2, [(gate.w1, memory["input"]), (gate.w2, memory["hidden"]),
                                                             (gate.key, memory["output"])], row_renorm=False)
    p0_new = torch.randn(5, d)
    start = gate(p0_new).mean()
    for _ in range(10):
        loss = -gate(p0_new).mean()  # push the new task's gate open
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    assert gate(p0_new).mean() > start  # it learned
    assert gate(p0_old).max() < 1e-6  # and old inputs still see a closed gate


# ---- on tiny models ------------------------------------------------------------------------------
def session_for(data, model="tiny-llama", **options):
    config = tiny_run_config(data, method="gainlora", model=model, tasks=["toyA", "toyB"], lr=5e-3, epochs=2,
                             train_per_task=12, method_options={"dropout": 0.0, **options})
    return build_session(config)


def train(session, stage):
    settings = TrainSettings(lr=5e-3, epochs=2, batch_size=4, seed=0)
    train_stage(session.model, session.method, stage, session.method.training_items(stage), settings,
                session.services, progress=False)


def first_task_done(data, model="tiny-llama", **options):
    session = session_for(data, model, **options)
    first, second = session.stages()
    session.method.on_task_start(session.model, first)
    train(session, first)
    session.method.on_task_end(session.model, first)
    return session, second


@pytest.mark.parametrize("key_init", ["complement_random", "complement_top_eig"])
def test_new_key_lies_in_the_complement_of_the_old_features(toy_data_session, key_init):
    """§2.9 test 4 on a tiny model: ‖M²ᵀk_t‖ < 1e-6 once gate 2 exists (after `before_training`
    for the data-driven key), and gate 2 starts as a copy of gate 1."""
    session, second = first_task_done(toy_data_session, key_init=key_init)
    method, model = session.method, session.model
    method.on_task_start(model, second)
    method.before_training(model, second, method.training_items(second))
    (M2,) = method.gate_memory["output"]
    assert 0 < M2.shape[1] < M2.shape[0]
    gate1, gate2 = method.bank.gates
    assert (M2.T @ gate2.key.detach()).abs().max() < 1e-6
    assert torch.equal(gate1.w1, gate2.w1) and torch.equal(gate1.w2, gate2.w2)
    trainable = {id(p) for p in model.parameters() if p.requires_grad}
    assert {id(p) for p in gate2.parameters()} <= trainable
    assert not {id(p) for p in gate1.parameters()} & trainable


def test_gate_updates_stay_off_the_old_features_during_training(toy_data_session):
    """Training task 2 changes gate 2, but only in directions orthogonal to M⁰, M¹, M²."""
    session, second = first_task_done(toy_data_session)
    method, model = session.method, session.model
    method.on_task_start(model, second)
    gate = method.bank.gates[1]
    before = {name: p.detach().clone() for name, p in gate.named_parameters()}
    train(session, second)
    for name, memory in (("w1", "input"), ("w2", "hidden"), ("key", "output")):
        (M,) = method.gate_memory[memory]
        delta = gate.get_parameter(name).detach() - before[name]
        assert delta.abs().max() > 0, f"{name} did not train"
        assert (delta @ M).abs().max() < 1e-6, f"{name} moved inside the old features"


def prompts_of(session, task, count=6):
    return [session.services.encoder.prompt_ids(task, e.sentence) for e in task.test[:count]]


@pytest.mark.parametrize("model", ["tiny-llama", "tiny-t5"])
def test_gates_see_the_prompt_only_in_training_generation_and_scoring(toy_data_session, model):
    """The gate coefficients of a training batch (prompt + answer, right-padded) equal those of
    each prompt alone, and those `generate` computes from a padded batch of prompts; generation
    in a batch answers as one prompt at a time (no shared prefix, no pad in the mean)."""
    session, second = first_task_done(toy_data_session, model)
    method, lm, services = session.method, session.model, session.services
    method.on_task_start(lm, second)
    train(session, second)
    method.on_task_end(lm, second)
    lm.eval()
    task = session.prep.tasks[0]
    items = [(task, e) for e in task.test[:6]]
    with torch.no_grad():
        batch = next(services.batches(items, 6))
        services.answer_logits(lm, batch)
        from_training = method.bank.coefficients.clone()
        alone = []
        for ids in prompts_of(session, task):
            one = torch.tensor([ids])
            if model == "tiny-t5":
                lm.get_base_model().get_encoder()(input_ids=one, attention_mask=torch.ones_like(one))
            else:
                lm(input_ids=one, attention_mask=torch.ones_like(one), logits_to_keep=1)
            alone.append(method.bank.coefficients)
    assert method.bank.coefficients.shape[1] == 2  # both tasks' gates
    assert torch.allclose(from_training, torch.cat(alone), atol=1e-6)
    assert not torch.allclose(from_training[:, 0], from_training[:, 1])  # two distinct gates
    sentences = [e.sentence for e in task.test[:6]]
    common = dict(arch=services.arch, device=services.device, autocast=services.autocast, progress=False)
    computed, compute = [], method.bank.compute
    method.bank.compute = lambda p0: (compute(p0), computed.append(method.bank.coefficients.clone()))
    batched, _ = generate_answers(lm, services.encoder, task, sentences, batch_size=6, **common)
    method.bank.compute = compute
    # every gate row generation computed is one of the prompts' (a shared prefix's would not be)
    assert computed and all(torch.cdist(rows, from_training).min(dim=1).values.max() < 1e-5 for rows in computed)
    single = [generate_answers(lm, services.encoder, task, [s], batch_size=1, **common)[0][0] for s in sentences]
    assert batched == single
    scored = label_scores(lm, services.encoder, task, sentences, batch_size=6, **common)
    scored_alone = torch.cat([label_scores(lm, services.encoder, task, [s], batch_size=1, **common) for s in sentences])
    assert torch.allclose(scored, scored_alone, atol=1e-4)


def test_memories_and_gates_survive_a_save_and_load(toy_data_session, tmp_path):
    session, second = first_task_done(toy_data_session)
    session.method.save_state(session.model, tmp_path)
    fresh = session_for(toy_data_session)
    fresh.method.load_state(fresh.model, tmp_path, session.stages()[0])
    for name, memory in session.method.gate_memory.items():
        assert torch.equal(memory[0], fresh.method.gate_memory[name][0])
    assert memory_rank(fresh.method.gate_memory["output"]) > 0
    # the next task's gate and key come out the same in the reloaded run (seeded draws)
    session.method.on_task_start(session.model, second)
    fresh.method.on_task_start(fresh.model, second)
    assert torch.equal(session.method.bank.gates[1].key, fresh.method.bank.gates[1].key)
