"""DEAL (`deal`, `deal-code`): the Haar filter, the regulariser, task boundaries, counts, resume."""
from __future__ import annotations

import json

import numpy as np
import pytest
import pywt
import torch

from conftest import tiny_run_config
from dealcl.errors import UserError
from dealcl.methods.deal import DealConfig, DealLoraA, UpdateMLP, haar_retention_filter, theta_shape
from dealcl.runs.config import method_config
from dealcl.runs.driver import run_continual
from dealcl.runs.session import build_session
from dealcl.train.loop import TrainSettings, train_stage


# ---- pure math ---------------------------------------------------------------------------------
@pytest.mark.parametrize("shape", [(2, 2), (4, 6), (16, 64), (8, 10)])
def test_filter_equals_haar_dwt_with_gain(shape):
    g = torch.Generator().manual_seed(0)
    A = torch.randn(*shape, generator=g, dtype=torch.float64)
    theta = torch.rand(*theta_shape(*shape), generator=g, dtype=torch.float64) * 3 - 1
    cA, details = pywt.dwt2(A.numpy(), "haar")
    reference = pywt.idwt2((cA * theta.numpy(), details), "haar")
    assert np.allclose(haar_retention_filter(A, theta).numpy(), reference, atol=1e-12)


@pytest.mark.parametrize("shape", [(4, 6), (5, 7), (1, 3), (3, 1)])
def test_filter_identity_at_theta_one_and_odd_shapes(shape):
    A = torch.randn(*shape)
    assert torch.equal(haar_retention_filter(A, torch.ones(theta_shape(*shape))), A)
    if shape == (5, 7):  # the ragged last blocks: θ acts on the mean of the entries that exist
        theta = torch.ones(3, 4)
        theta[2, 3] = 3.0  # the 1×1 corner block: A + 2·A
        theta[0, 3] = 0.0  # a 2×1 edge block: its mean removed
        out = haar_retention_filter(A, theta)
        assert torch.allclose(out[4, 6], 3 * A[4, 6])
        assert torch.allclose(out[0:2, 6], A[0:2, 6] - A[0:2, 6].mean())
        assert torch.equal(out[:4, :6], A[:4, :6])


def test_wrapper_accepts_any_input_rank_and_mlp_starts_as_identity():
    A = torch.randn(8, 12)
    wrapper = DealLoraA(A, UpdateMLP(8, 128, residual=True, like=A))
    for shape in [(12,), (3, 12), (2, 3, 12), (2, 2, 3, 12)]:
        x = torch.randn(*shape)
        assert torch.equal(wrapper(x), torch.nn.functional.linear(x, A))
    assert isinstance(wrapper.weight, torch.nn.Parameter) and wrapper.weight.dtype == A.dtype


def test_config_validation():
    for options in ({"theta_norm_p": "0.5"}, {"lambda1": "-1"}, {"rank": "0"}, {"mlp_hidden": "0"}):
        with pytest.raises(UserError):
            method_config(DealConfig, options, "deal")
    assert method_config(DealConfig, {"update_b": "true"}, "deal").update_b is True


# ---- the methods on tiny models ----------------------------------------------------------------
class Harness:
    def __init__(self, data, model, method="deal", **options):
        self.config = tiny_run_config(data, method=method, model=model, train_per_task=8, epochs=1, lr=5e-3,
                                      method_options={"dropout": 0.0, **options})
        session = build_session(self.config)
        self.prep, self.services, self.method, self.model = session.prep, session.services, session.method, session.model
        self.stages = session.stages()

    def train(self, stage):
        settings = TrainSettings(lr=5e-3, epochs=1, batch_size=2, seed=0)
        return train_stage(self.model, self.method, stage, self.method.training_items(stage), settings,
                           self.services, progress=False)

    def run_stage(self, stage):
        self.method.on_task_start(self.model, stage)
        stats = self.train(stage)
        self.method.on_task_end(self.model, stage)
        return stats

    @torch.no_grad()
    def outputs(self):
        self.model.eval()
        items = [(t, e) for t in self.prep.tasks for e in t.test[:4]]
        return torch.cat([self.services.answer_logits(self.model, b) for b in self.services.batches(items, 4)])

    def trainable(self):
        return sum(p.numel() for p in self.model.parameters() if p.requires_grad)


def _modules(model_name):
    """(d_in, d_out) of every adapted module, and the default rank."""
    if model_name == "tiny-llama":  # 2 layers: q 64→64, v 64→32
        return [(64, 64), (64, 32)] * 2, 32
    return [(64, 64)] * 12, 16  # T5: q,v of 2 enc self + 2 dec self + 2 dec cross attention blocks


def _expected(model_name, update_b=False):
    dims, r = _modules(model_name)
    h = max(128, r // 2)
    first = sum(r * (d_in + d_out) for d_in, d_out in dims)
    later = sum(r * d_in + theta_shape(r, d_in)[0] * theta_shape(r, d_in)[1] + 2 * r * h + h + r
                + (r * d_out if update_b else 0) for d_in, d_out in dims)
    return first, later


@pytest.mark.parametrize("model_name", ["tiny-llama", "tiny-t5"])
def test_counts_fold_carry_and_frozen_b(toy_data_session, model_name):
    h = Harness(toy_data_session, model_name)
    first, later = _expected(model_name)
    h.method.on_task_start(h.model, h.stages[0])
    assert h.trainable() == first
    h.train(h.stages[0])
    h.method.on_task_end(h.model, h.stages[0])
    after_task1 = h.outputs()
    # Task 2 starts from exactly the task-1 function (filter at θ = 1, residual MLP with fc2 = 0).
    h.method.on_task_start(h.model, h.stages[1])
    assert h.trainable() == later
    assert torch.equal(h.outputs(), after_task1)
    B = {n: w.lora_B["default"].weight.detach().clone() for n, w in h.method.layers.items()}
    h.train(h.stages[1])
    for name, layer in h.method.layers.items():
        assert torch.equal(layer.lora_B["default"].weight, B[name]), "B trained although frozen"
    wrappers = h.method.wrappers
    assert any(not torch.equal(w.theta, torch.ones_like(w.theta)) for w in wrappers.values())
    assert any(w.mlp.fc2.weight.abs().sum() > 0 for w in wrappers.values())
    before_end = h.outputs()
    mlp = {n: {k: v.clone() for k, v in w.mlp.state_dict().items()} for n, w in wrappers.items()}
    h.method.on_task_end(h.model, h.stages[1])
    # The fold keeps the function bit for bit; θ back to 1; the MLP carried unchanged.
    assert torch.equal(h.outputs(), before_end)
    for name, w in wrappers.items():
        assert torch.equal(w.theta, torch.ones_like(w.theta))
        assert all(torch.equal(v, mlp[name][k]) for k, v in w.mlp.state_dict().items())
    # A third task keeps the same MLP module and function at its start.
    third = type(h.stages[1])(index=3, name="again", train_tasks=h.stages[1].train_tasks)
    h.method.on_task_start(h.model, third)
    assert torch.equal(h.outputs(), before_end) and h.trainable() == later
    assert all(torch.equal(v, mlp[n][k]) for n, w in wrappers.items() for k, v in w.mlp.state_dict().items())


def test_update_b_trains_b(toy_data_session):
    h = Harness(toy_data_session, "tiny-llama", update_b=True)
    h.run_stage(h.stages[0])
    h.method.on_task_start(h.model, h.stages[1])
    assert h.trainable() == _expected("tiny-llama", update_b=True)[1]
    B = {n: w.lora_B["default"].weight.detach().clone() for n, w in h.method.layers.items()}
    h.train(h.stages[1])
    assert any(not torch.equal(l.lora_B["default"].weight, B[n]) for n, l in h.method.layers.items())


def test_regulariser_changes_loss_and_gradient(toy_data_session):
    grads = {}
    for regularize in (True, False):
        h = Harness(toy_data_session, "tiny-llama", regularize=regularize)
        h.run_stage(h.stages[0])
        h.method.on_task_start(h.model, h.stages[1])
        batch = next(h.services.batches(h.method.training_items(h.stages[1]), 2))
        loss, logits = h.services.task_loss_sum(h.model, batch)
        extras = h.method.extra_losses(h.model, batch, logits)
        assert set(extras) == ({"reg"} if regularize else set())
        (loss + sum(extras.values(), torch.zeros(()))).backward()
        grads[regularize] = torch.cat([w.theta.grad.reshape(-1) for w in h.method.wrappers.values()])
        if regularize:
            # un-powered norms, summed over modules; at θ = 1 the θ term is λ1·n^(1/10) per module
            c = h.method.config
            expected = sum(c.lambda1 * w.theta.numel() ** (1 / 10) + c.lambda2 * torch.linalg.vector_norm(
                torch.cat([p.reshape(-1) for p in w.mlp.parameters()])) for w in h.method.wrappers.values())
            assert torch.allclose(extras["reg"], expected)
            stats = h.train(h.stages[1])
            assert stats["mean_loss_terms"]["reg"] > 0
    assert not torch.allclose(grads[True], grads[False])
    # At θ = 1 the regulariser's gradient of θ is λ1·θ^(p−1)/‖θ‖^(p−1), the same for every entry.
    difference = grads[True] - grads[False]
    assert torch.all(difference > 0)


@pytest.mark.parametrize("model_name", ["tiny-llama", "tiny-t5"])
def test_save_load_round_trip_at_task_two(toy_data_session, tmp_path, model_name):
    h = Harness(toy_data_session, model_name)
    h.run_stage(h.stages[0])
    h.run_stage(h.stages[1])
    expected = h.outputs()
    h.method.save_state(h.model, tmp_path)
    assert {p.name for p in tmp_path.iterdir()} == {"deal_state.safetensors", "deal_state.json"}
    meta = json.loads((tmp_path / "deal_state.json").read_text())
    assert meta["wrapped"] and meta["tasks_done"] == 2
    fresh = Harness(toy_data_session, model_name)
    fresh.method.load_state(fresh.model, tmp_path, fresh.stages[1])
    assert torch.equal(fresh.outputs(), expected)
    assert fresh.method.wrappers.keys() == h.method.wrappers.keys()


def test_deal_code_breaks_the_chain_and_accumulates_a_grad(toy_data_session, tmp_path):
    h = Harness(toy_data_session, "tiny-llama", method="deal-code")
    h.run_stage(h.stages[0])
    h.run_stage(h.stages[1])
    after_task2 = h.outputs()
    A = {n: w.weight.detach().clone() for n, w in h.method.wrappers.items()}
    # save → load rebuilds the task-2 model (with its MLP_2) exactly
    h.method.save_state(h.model, tmp_path)
    fresh = Harness(toy_data_session, "tiny-llama", method="deal-code")
    fresh.method.load_state(fresh.model, tmp_path, fresh.stages[1])
    assert torch.equal(fresh.outputs(), after_task2)
    # The documented break: the next task starts with a fresh Kaiming MLP, not MLP_2.
    third = type(h.stages[1])(index=3, name="again", train_tasks=h.stages[1].train_tasks)
    h.method.on_task_start(h.model, third)
    assert not torch.allclose(h.outputs(), after_task2, atol=1e-4)
    assert all(torch.equal(w.weight, A[n]) for n, w in h.method.wrappers.items())  # filtered A carried
    assert all(torch.equal(w.theta, torch.ones_like(w.theta)) for w in h.method.wrappers.values())

    # The gradient-accumulation flag: A's grad survives zero_grad and grows step by step.
    for flag in (False, True):
        h = Harness(toy_data_session, "tiny-llama", method="deal-code", accumulate_a_grad_bug=flag)
        h.run_stage(h.stages[0])
        h.method.on_task_start(h.model, h.stages[1])
        fresh_grads, stepped, norms = [], [], []
        original_after = h.method.after_backward
        wrapper = next(iter(h.method.wrappers.values()))

        def after(model):
            fresh_grads.append(wrapper.weight.grad.detach().clone())  # this step's own gradient
            original_after(model)
            stepped.append(wrapper.weight.grad.detach().clone())      # what the optimizer steps on
            norms.append(float(stepped[-1].norm()))

        h.method.after_backward = after
        settings = TrainSettings(lr=5e-3, epochs=1, batch_size=1, seed=0)
        stats = train_stage(h.model, h.method, h.stages[1], h.method.training_items(h.stages[1])[:5], settings,
                            h.services, progress=False)
        assert len(stepped) == 5
        if flag:  # A steps on the running sum of every gradient since the task began
            for k in range(5):
                assert torch.allclose(stepped[k], torch.stack(fresh_grads[: k + 1]).sum(0), atol=1e-6)
            assert norms[-1] > norms[0] and max(norms) > 1.5 * norms[0]
            # A trains, outside the loop's gradient clipping (the hook that says so).
            assert {id(p) for p in h.method.unclipped_parameters(h.model)} == \
                {id(w.weight) for w in h.method.wrappers.values()}
            assert stats["trainable_parameters"] == h.trainable()
        else:  # zeroed every step: only this step's gradient
            assert all(torch.equal(a, b) for a, b in zip(stepped, fresh_grads))
            assert h.method.unclipped_parameters(h.model) == []
            assert stats["trainable_parameters"] == h.trainable()
        h.method.on_task_end(h.model, h.stages[1])
        assert wrapper.weight.grad is None


@pytest.mark.parametrize("model_name", ["tiny-llama", "tiny-t5"])
@pytest.mark.parametrize("method", ["deal", "deal-code"])
def test_two_task_run_end_to_end(toy_data_session, tmp_path, model_name, method):
    config = tiny_run_config(toy_data_session, method=method, model=model_name, train_per_task=8)
    results = run_continual(config, tmp_path / "run", progress=False)
    assert results["task_order"] == ["toyA", "toyB"] and None not in results["accuracy_matrix"][1]
    meta = json.loads((tmp_path / "run" / "adapters" / "2-toyB" / "deal_state.json").read_text())
    assert meta["wrapped"] and meta["tasks_done"] == 2
    efficiency = json.loads((tmp_path / "run" / "efficiency.json").read_text())
    assert [s["trainable_parameters"] for s in efficiency["stages"]] == list(_expected(model_name))


@pytest.mark.parametrize("method", ["deal", "deal-code"])
def test_resumed_run_equals_uninterrupted_run(toy_data_session, tmp_path, method):
    """Three tasks; stage 3 lost: load_state after stage 2 rebuilds the wrappers, then task 3 trains
    exactly as in the uninterrupted run (deal-code's per-task MLP init is seeded by stage)."""
    import shutil

    config = tiny_run_config(toy_data_session, method=method, tasks=["toyA", "toyB", "toyC"], train_per_task=4,
                             test_per_task=3, reference_stage=False, eval_mode="score")
    whole = run_continual(config, tmp_path / "whole", progress=False)
    resumed_dir = tmp_path / "resumed"
    run_continual(config, resumed_dir, progress=False)
    shutil.rmtree(resumed_dir / "adapters" / "3-toyC")
    shutil.rmtree(resumed_dir / "outputs" / "3-toyC")
    assert run_continual(config, resumed_dir, progress=False) == whole
    name = "deal_state.safetensors"
    assert (resumed_dir / "adapters" / "3-toyC" / name).read_bytes() == \
        (tmp_path / "whole" / "adapters" / "3-toyC" / name).read_bytes()
