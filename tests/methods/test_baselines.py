"""SeqFT, Replay, EWC, LwF and MTL against hand-checkable values, and end to end on tiny models."""
from __future__ import annotations

import json

import pytest
import torch

from conftest import tiny_run_config
from dealcl.errors import UserError
from dealcl.methods.ewc import evenly_spaced
from dealcl.methods.lwf import distillation_kl, teacher_targets
from dealcl.methods.replay import buffer_size
from dealcl.runs.driver import run_continual
from dealcl.runs.session import build_session, prepare
from dealcl.train.loop import TrainSettings, train_stage


def _setup(data, name, model="tiny-llama", train_per_task=12, **options):
    config = tiny_run_config(data, method=name, model=model, train_per_task=train_per_task, method_options=options)
    session = build_session(config)
    return session.prep, session.method, session.model, session.stages(), session.services


def _train(method, model, stage, services, lr=5e-3):
    method.on_task_start(model, stage)
    stats = train_stage(model, method, stage, method.training_items(stage),
                        TrainSettings(lr=lr, batch_size=4, seed=0), services, progress=False)
    method.on_task_end(model, stage)
    return stats


def _trainable(model):
    return {n: p for n, p in model.named_parameters() if p.requires_grad}


# ---- replay ------------------------------------------------------------------------------------
def test_replay_buffer_sizes_seeded_and_from_past_tasks_only(toy_data_session):
    assert buffer_size(14000, 0.02, 8) == 280 and buffer_size(250, 0.02, 8) == 8
    assert buffer_size(5, 0.02, 8) == 5 and buffer_size(1000, 0.02, 8) == 20
    data = toy_data_session
    prep, method, _, stages, _ = _setup(data, "replay", train_per_task=None)
    prep3 = prepare(tiny_run_config(data, method="replay", tasks=["toyA", "toyB", "toyC"]))
    method3 = prep3.method_class(prep3.method_options, method.services)
    stages3 = method3.stages(prep3.tasks)
    # Task 1 replays nothing.
    assert method3.buffer(stages3[0]) == [] and len(method3.training_items(stages3[0])) == len(prep3.tasks[0].train)
    # Task 2: 8 examples of toyA (24 training examples: 2 % rounds up to 1, at least 8), all real toyA examples.
    second = method3.buffer(stages3[1])
    assert len(second) == 8 and {t.name for t, _ in second} == {"toyA"}
    assert all(ex in prep3.tasks[0].train for _, ex in second)
    items = method3.training_items(stages3[1])
    assert len(items) == len(prep3.tasks[1].train) + 8
    # Task 3: the same toyA sample again plus one of toyB, never toyC itself.
    third = method3.buffer(stages3[2])
    assert [t.name for t, _ in third].count("toyA") == 8 and [t.name for t, _ in third].count("toyB") == 8
    assert third[:8] == second
    # Deterministic: a fresh method, or the same task in another sequence, draws the same sample.
    again = prep.method_class(prep.method_options, method.services)
    again.stages(prep.tasks)
    assert again.buffer(stages[1]) == second
    # The seed option changes the sample; the fraction option its size.
    other = prep.method_class(type(prep.method_options)(seed=1), method.services)
    other.stages(prep.tasks)
    assert [ex for _, ex in other.buffer(stages[1])] != [ex for _, ex in second]
    big = prep.method_class(type(prep.method_options)(replay_fraction=0.5), method.services)
    big.stages(prep.tasks)
    assert len(big.buffer(stages[1])) == 12
    with pytest.raises(UserError, match="replay_fraction"):
        prepare(tiny_run_config(data, method="replay", method_options={"replay_fraction": 2}))


# ---- EWC ---------------------------------------------------------------------------------------
def test_ewc_fisher_is_the_mean_squared_gradient_of_each_examples_log_likelihood(toy_data_session):
    """F = mean over examples of (∇ log p(y|x))², log p(y|x) summed over the answer tokens: an
    example's weight must not depend on its label's length (a mean over tokens would scale it
    by 1/L²). Two examples whose answers differ in length, checked by a hand forward."""
    prep, method, model, stages, services = _setup(toy_data_session, "ewc", dropout=0.0, fisher_examples=2)
    _train(method, model, stages[0], services)
    task = prep.tasks[0]
    chosen = evenly_spaced(task.train, 2)
    assert chosen == [task.train[0], task.train[6]]
    assert {e.label for e in chosen} == {"apple", "plum"}  # answers of 6 and 5 tokens + EOS
    encoder = services.encoder
    params = _trainable(model)
    expected = {n: torch.zeros_like(p) for n, p in params.items()}
    model.eval()
    for example in chosen:
        prompt = encoder.prompt_ids(task, example.sentence)
        answer = encoder.label_ids(example.label) + [encoder.eos_id]
        ids = torch.tensor([prompt + answer])
        log_probs = torch.log_softmax(model(input_ids=ids).logits[0].float(), dim=-1)
        # Token k of the answer is predicted at position len(prompt) + k - 1.
        log_likelihood = sum(log_probs[len(prompt) + k - 1, token] for k, token in enumerate(answer))
        grads = torch.autograd.grad(log_likelihood, list(params.values()))
        for (n, _), g in zip(params.items(), grads):
            expected[n] += g**2 / 2
    assert method.fisher_sum.keys() == expected.keys()
    for n in expected:
        torch.testing.assert_close(method.fisher_sum[n], expected[n], rtol=1e-4, atol=1e-12)
    assert sum(f.sum() for f in expected.values()) > 0


def test_ewc_penalty_zero_at_anchor_positive_elsewhere_and_pulls_back(toy_data_session):
    prep, method, model, stages, services = _setup(toy_data_session, "ewc", dropout=0.0, fisher_examples=4)
    _train(method, model, stages[0], services)
    params = _trainable(model)
    assert method.penalty(model).item() == 0.0
    assert method.extra_losses(model, {}, torch.zeros(1))["ewc"].item() == 0.0
    torch.manual_seed(1)
    deltas = {n: 0.01 * torch.randn_like(p) for n, p in params.items()}
    with torch.no_grad():
        for n, p in params.items():
            p.add_(deltas[n])
    penalty = method.penalty(model)
    expected = 0.5 * method.config.ewc_lambda * sum((method.fisher_sum[n] * deltas[n] ** 2).sum() for n in params)
    assert penalty.item() > 0 and penalty.item() == pytest.approx(expected.item(), rel=1e-4)
    penalty.backward()
    # ∇ = λ F (θ − θ*): along the displacement, so a gradient step moves back toward the anchor.
    for n, p in params.items():
        torch.testing.assert_close(p.grad, method.config.ewc_lambda * method.fisher_sum[n] * deltas[n],
                                   rtol=1e-3, atol=1e-8)
    assert sum((p.grad * deltas[n]).sum() for n, p in params.items()) > 0


def test_ewc_accumulated_form_equals_the_per_task_sum(toy_data_session):
    prep, method, model, stages, services = _setup(toy_data_session, "ewc", dropout=0.0)
    params = _trainable(model)
    torch.manual_seed(2)
    pairs = [({n: torch.rand_like(p) * (torch.rand_like(p) > 0.3) for n, p in params.items()},
              {n: torch.randn_like(p) for n, p in params.items()}) for _ in range(3)]
    for fisher, anchor in pairs:
        method.absorb(fisher, anchor)
    with torch.no_grad():
        for p in params.values():
            p.normal_()
    by_task = 0.5 * method.config.ewc_lambda * sum(
        (f[n].double() * (p.double() - a[n].double()) ** 2).sum() for f, a in pairs for n, p in params.items())
    assert method.penalty(model).item() == pytest.approx(by_task.item(), rel=1e-4)
    assert method.tasks_seen == 3


def test_ewc_lambda_reduces_fisher_weighted_drift(toy_data_session):
    """The documented λ matters: after task 2 the Fisher-weighted distance from task 1's solution
    is far smaller than without the penalty (measured 1.2e-4 → 1e-5 at λ = 1e4 on tiny-llama)."""
    drift = {}
    for lam in (0.0, 1e4):
        prep, method, model, stages, services = _setup(toy_data_session, "ewc", dropout=0.0, ewc_lambda=lam,
                                                      train_per_task=12, fisher_examples=12)
        _train(method, model, stages[0], services)
        anchor = {n: p.detach().clone() for n, p in _trainable(model).items()}
        fisher = dict(method.fisher_sum)
        _train(method, model, stages[1], services)
        drift[lam] = sum((fisher[n] * (p.detach() - anchor[n]) ** 2).sum().item() for n, p in _trainable(model).items())
    assert drift[1e4] < 0.5 * drift[0.0]


# ---- LwF ---------------------------------------------------------------------------------------
def test_lwf_kl_zero_for_the_teacher_positive_after_perturbation_and_teacher_computed_once(toy_data_session):
    prep, method, model, stages, services = _setup(toy_data_session, "lwf", dropout=0.0, train_per_task=12)
    _train(method, model, stages[0], services)
    # Count every forward of the transformer body: the teacher pass, then training.
    body = model.get_base_model().model
    calls = []
    handle = body.register_forward_hook(lambda *_: calls.append(1))
    method.on_task_start(model, stages[1])
    items = method.training_items(stages[1])
    method.before_training(model, stages[1], items)  # the loop's hook, with the items it trains on
    teacher_calls = len(calls)

    def forwards(batch_size: int) -> int:  # a batch whose rows share a prompt prefix computes it first
        return sum(2 if services.share_prefix and b["prefix_len"] else 1 for b in services.batches(items, batch_size))

    assert teacher_calls == forwards(method.config.teacher_batch_size)
    assert sorted(method.teacher) == list(range(len(items)))
    # Student == teacher (same weights, eval mode): the distillation term is zero on every batch,
    # whatever the order of items in a batch (indices pick the right teacher rows).
    model.eval()
    with torch.no_grad():
        for batch in services.batches(list(reversed(items)), 5):
            batch["indices"] = [len(items) - 1 - i for i in batch["indices"]]
            logits = services.answer_logits(model, batch)
            assert method.extra_losses(model, batch, logits)["lwf"].item() == pytest.approx(0.0, abs=1e-5)
        batch = next(services.batches(items, 4))
        for p in _trainable(model).values():
            p.add_(0.05 * torch.randn_like(p))
        perturbed = services.answer_logits(model, batch)
        assert method.extra_losses(model, batch, perturbed)["lwf"].item() > 1e-4
    calls.clear()
    train_stage(model, method, stages[1], items, TrainSettings(lr=5e-3, batch_size=4, seed=0), services, progress=False)
    handle.remove()
    # One teacher pass (the loop calls before_training once), then the student's forwards.
    assert len(calls) == forwards(method.config.teacher_batch_size) + forwards(4)
    method.on_task_end(model, stages[1])
    assert method.teacher == {}


def test_lwf_top_k_kl_is_exact_at_equality_and_bounded_by_the_full_kl():
    torch.manual_seed(0)
    teacher_logits, student_logits = torch.randn(6, 40), torch.randn(6, 40)
    full = distillation_kl(student_logits, teacher_targets(teacher_logits, 2.0, 0), 2.0)
    top = distillation_kl(student_logits, teacher_targets(teacher_logits, 2.0, 5), 2.0)
    reference = torch.nn.functional.kl_div(torch.log_softmax(student_logits / 2, -1), torch.log_softmax(teacher_logits / 2, -1),
                                           log_target=True, reduction="sum")
    assert full.item() == pytest.approx(reference.item(), rel=1e-5)
    assert 0 < top.item() <= full.item()
    assert distillation_kl(teacher_logits, teacher_targets(teacher_logits, 2.0, 5), 2.0).item() == pytest.approx(0, abs=1e-6)


# ---- SeqFT -------------------------------------------------------------------------------------
@pytest.mark.parametrize("model_name", ["tiny-llama", "tiny-t5"])
def test_seqft_trains_every_weight_and_round_trips(toy_data_session, tmp_path, model_name):
    prep, method, model, stages, services = _setup(toy_data_session, "seqft", model=model_name, train_per_task=8)
    assert all(p.requires_grad for p in model.parameters())
    total = sum(p.numel() for p in model.parameters())  # named_parameters counts tied weights once
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    stats = _train(method, model, stages[0], services, lr=1e-3)
    assert stats["trainable_parameters"] == total
    changed = [n for n, p in model.named_parameters() if not torch.equal(before[n], p)]
    assert model.get_input_embeddings().weight is not None and any("embed" in n or "shared" in n for n in changed)
    method.save_state(model, tmp_path)
    assert [p.name for p in tmp_path.iterdir()] == ["seqft_weights.safetensors"]
    fresh_prep, fresh_method, fresh_model, _, _ = _setup(toy_data_session, "seqft", model=model_name, train_per_task=8)
    fresh_method.load_state(fresh_model, tmp_path, stages[0])
    for (n, a), (_, b) in zip(model.state_dict().items(), fresh_model.state_dict().items()):
        assert torch.equal(a, b), n
    frozen_prep, frozen, frozen_model, _, _ = _setup(toy_data_session, "seqft", model=model_name, train_embeddings=False)
    embedding = frozen_model.get_input_embeddings().weight
    assert not embedding.requires_grad
    assert sum(p.numel() for p in frozen_model.parameters() if p.requires_grad) == total - embedding.numel()


# ---- MTL and end to end ------------------------------------------------------------------------
def test_mtl_is_one_joint_stage_evaluated_on_every_task(toy_data_session, tmp_path):
    config = tiny_run_config(toy_data_session, method="mtl", tasks=["toyA", "toyB", "toyC"], train_per_task=8,
                             test_per_task=4)
    results = run_continual(config, tmp_path / "r", progress=False)
    assert results["stages"] == ["mtl"] and results["joint"] is True
    assert len(results["accuracy_matrix"]) == 1 and None not in results["accuracy_matrix"][0]
    assert results["average_accuracy"] is not None and results["backward_transfer"] is None
    on_disk = json.loads((tmp_path / "r" / "results.json").read_text())
    assert on_disk["backward_transfer"] is None and on_disk["average_accuracy"] == results["average_accuracy"]
    assert (tmp_path / "r" / "outputs" / "1-mtl" / "predict_results.json").is_file()
    efficiency = json.loads((tmp_path / "r" / "efficiency.json").read_text())["stages"]
    assert efficiency[0]["train_examples"] == 3 * 8


@pytest.mark.parametrize("method,model", [
    ("seqft", "tiny-llama"), ("replay", "tiny-llama"), ("ewc", "tiny-llama"), ("lwf", "tiny-llama"),
    ("replay", "tiny-t5"), ("ewc", "tiny-t5"), ("lwf", "tiny-t5"),
])
def test_two_task_run_end_to_end(toy_data_session, tmp_path, method, model):
    options = {} if method == "seqft" else {"dropout": 0.0}
    if method == "ewc":
        options["fisher_examples"] = 4
    config = tiny_run_config(toy_data_session, method=method, model=model, train_per_task=8, test_per_task=4,
                             method_options=options)
    results = run_continual(config, tmp_path / "r", progress=False)
    assert results["stages"] == ["toyA", "toyB"] and len(results["accuracy_matrix"]) == 2
    assert results["backward_transfer"] is not None
    stages = json.loads((tmp_path / "r" / "efficiency.json").read_text())["stages"]
    if method == "replay":
        assert [s["train_examples"] for s in stages] == [8, 16]  # 8 of toyB + min(8, all 8) of toyA
    if method in ("ewc", "lwf"):
        losses = (tmp_path / "r" / "logs").rglob("*")
        text = "".join(p.read_text() for p in losses if p.is_file())
        assert f"{method}=" in text  # the regulariser is active (and logged) in stage 2
