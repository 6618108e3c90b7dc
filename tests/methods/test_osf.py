"""OSF through PEFT's own tuner against the hand values of new_methods_spec.md §4.8 (W = diag(3, 2, 1), k = 1),
and the plugin's task-sequence driving (schedule, merge between tasks, dtype, validation)."""
from __future__ import annotations

import pytest
import torch
from peft import OSFConfig, get_peft_model

from conftest import tiny_run_config
from dealcl.errors import UserError
from dealcl.methods.osf import OrthogonalAdamW, frozen_rank, osf_layers, scheduled_rank
from dealcl.runs.session import build_session
from dealcl.train.loop import TrainSettings, train_stage


class OneLinear(torch.nn.Module):
    def __init__(self, weight: torch.Tensor) -> None:
        super().__init__()
        self.lin = torch.nn.Linear(weight.shape[1], weight.shape[0], bias=False)
        with torch.no_grad():
            self.lin.weight.copy_(weight)

    def forward(self, x):
        return self.lin(x)


def _wrapped(weight: torch.Tensor, k=1):
    model = OneLinear(weight)
    peft = get_peft_model(model, OSFConfig(target_modules=["lin"], effective_rank=k))
    return model, peft, osf_layers(model)[0][1]


def _effective_weight(layer) -> torch.Tensor:
    """The weight the OSF layer computes with: base + ΔW (what merge writes)."""
    return layer.get_base_layer().weight + layer.get_delta_weight("default")


W = torch.diag(torch.tensor([3.0, 2.0, 1.0]))
E1 = torch.tensor([1.0, 0.0, 0.0])


def test_decomposition_keeps_the_top_triplet_frozen_and_reconstructs():
    model, _, layer = _wrapped(W)
    params = layer.osf_svd_params["default"]
    assert params["S_low"].detach().tolist() == pytest.approx([2.0, 1.0], abs=1e-6)
    low = (params["U_low"] * params["S_low"]) @ params["V_low"]
    # The trainable part is diag(0, 2, 1): the frozen part is 3·e1e1ᵀ (U_h = ±e1, S_h = 3, V_h = ±e1ᵀ).
    torch.testing.assert_close(low, torch.diag(torch.tensor([0.0, 2.0, 1.0])), atol=1e-6, rtol=0)
    x = torch.randn(5, 3, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(model(x), x @ W.T, atol=1e-6, rtol=0)
    # A non-square factor is stored as such: U (4×3 weight) has U_high = ±e1.
    _, _, tall = _wrapped(torch.cat([W, torch.zeros(1, 3)]))
    torch.testing.assert_close(tall._osf_U_high["default"].abs().flatten(), torch.tensor([1.0, 0, 0, 0]), atol=1e-6, rtol=0)


def test_hooks_project_the_gradients_off_the_frozen_directions():
    _, _, layer = _wrapped(W)
    params = layer.osf_svd_params["default"]
    (params["U_low"].sum() + params["S_low"].sum() + params["V_low"].sum()).backward()  # all-ones gradients
    torch.testing.assert_close(params["U_low"].grad, torch.tensor([[0.0, 0], [1, 1], [1, 1]]), atol=1e-6, rtol=0)
    torch.testing.assert_close(params["V_low"].grad, torch.tensor([[0.0, 1, 1], [0, 1, 1]]), atol=1e-6, rtol=0)
    assert params["S_low"].grad.tolist() == [1.0, 1.0]  # S_low is not projected


def _step(model, optimizer, steps=1, seed=0):
    generator = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        x, y = torch.randn(8, 3, generator=generator), torch.randn(8, 3, generator=generator)
        loss = ((model(x) - y) ** 2).sum()
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()


def test_exact_preservation_under_sgd():
    model, _, layer = _wrapped(W)
    _step(model, torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1))
    merged = _effective_weight(layer).detach()
    assert not torch.allclose(merged, W, atol=1e-3)  # it did train
    torch.testing.assert_close(merged @ E1, 3 * E1, atol=1e-6, rtol=0)
    torch.testing.assert_close(E1 @ merged, 3 * E1, atol=1e-6, rtol=0)


def test_adam_drifts_off_the_frozen_triplet_and_strict_orthogonal_restores_it():
    # A rotated W, so that Adam's elementwise normalisation mixes the projected gradient's entries.
    q, _ = torch.linalg.qr(torch.randn(3, 3, generator=torch.Generator().manual_seed(1)))
    rotated = q @ W @ q.T
    top = q[:, 0]
    drift = {}
    for strict in (False, True):
        model, _, layer = _wrapped(rotated)
        params = [p for p in model.parameters() if p.requires_grad]
        optimizer = (OrthogonalAdamW(params, [layer], lr=0.05, weight_decay=0.0) if strict
                     else torch.optim.AdamW(params, lr=0.05, weight_decay=0.0))
        _step(model, optimizer, steps=20)
        merged = _effective_weight(layer).detach()
        drift[strict] = max((merged @ top - 3 * top).abs().max().item(), (top @ merged - 3 * top).abs().max().item())
    assert drift[False] > 1e-3
    assert drift[True] < 1e-5


def test_merge_and_unload_carries_the_task_unload_would_discard_it():
    weights = []
    for finish in ("merge_and_unload", "unload"):
        model, peft, layer = _wrapped(W)
        _step(model, torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1))
        trained = _effective_weight(layer).detach().clone()
        plain = getattr(peft, finish)()
        assert type(plain.lin) is torch.nn.Linear
        weights.append((trained, plain.lin.weight.detach().clone()))
    (trained, merged), (_, unloaded) = weights
    torch.testing.assert_close(merged, trained, atol=1e-6, rtol=0)
    assert not torch.allclose(merged, W, atol=1e-3)
    assert torch.equal(unloaded, W)  # spec O-1: the pretrained weights come back


def test_peft_rank_resolution_at_q_1024():
    weight = torch.randn(1024, 1024, generator=torch.Generator().manual_seed(0))
    for value, k in ((None, 512), (0.3, 307), (2000, 1024), (1.0, 1024), (1, 1)):
        _, _, layer = _wrapped(weight, value)
        assert layer.effective_rank["default"] == k
        assert layer.osf_svd_params["default"]["S_low"].numel() == 1024 - k  # 2000 and 1.0: nothing trains
    with pytest.raises(ValueError, match="positive integer"):
        _wrapped(weight, 0)


def test_plugin_rank_resolution_and_schedule():
    assert frozen_rank(0.3, 1024) == 307
    assert frozen_rank(1, 1024) == 1  # values ≥ 1 are ranks: the config cannot tell 1 from 1.0
    assert frozen_rank(2000, 1024) == 2000  # refused per module by the method (below)
    assert [scheduled_rank(1024, t, 4) for t in (1, 2, 3, 4)] == [1, 256, 512, 768]
    assert scheduled_rank(64, 1, 2) == 1 and scheduled_rank(64, 2, 2) == 32


def _session(data, model="tiny-llama", **options):
    return build_session(tiny_run_config(data, method="osf", model=model, method_options=options))


@pytest.mark.parametrize("ranks, message", [([2000, 0.5], "freezes all"), ([0.001, 0.5], "freezes no direction")])
def test_ranks_that_train_nothing_or_freeze_nothing_are_refused(toy_data, ranks, message):
    session = _session(toy_data, effective_ranks=ranks)
    stage = session.stages()[0]
    with pytest.raises(UserError, match=message) as caught:
        session.method.on_task_start(session.model, stage)
    assert "model.layers.0.self_attn.q_proj" in str(caught.value) and "\n" not in str(caught.value)


@pytest.mark.parametrize("ranks", [[0, 0.5], [1.5, 0.5], [-0.2, 0.5], [float("nan"), 0.5], []])
def test_invalid_schedule_values_are_refused_by_the_config(toy_data, ranks):
    with pytest.raises(UserError, match="effective_ranks"):
        _session(toy_data, effective_ranks=ranks)


def test_a_schedule_must_give_one_value_per_task(toy_data):
    with pytest.raises(UserError, match="gives 1 values for 2 tasks"):
        _session(toy_data, effective_ranks=[0.5]).stages()


def test_targets_per_architecture_never_the_output_layer(toy_data):
    llama = _session(toy_data).method.targets
    assert len(llama) == 2 * 7 and all(n.rsplit(".", 1)[-1] in
                                       {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}
                                       for n in llama)
    t5 = _session(toy_data, model="tiny-t5").method.targets
    suffixes = {n.rsplit(".", 1)[-1] for n in t5}
    assert suffixes == {"q", "k", "v", "o", "wi", "wo"} and "lm_head" not in t5
    assert len(t5) == 2 * (4 + 2) + 2 * (4 + 4 + 2)  # encoder: self-attn + FF; decoder: self, cross, FF
    with pytest.raises(UserError, match="output layer"):
        _session(toy_data, model="tiny-t5", target_modules=["q", "lm_head"])


def test_two_tasks_carry_the_merged_weights_and_resvd_them(toy_data):
    session = _session(toy_data)
    method, model = session.method, session.model
    first, second = session.stages()
    modules = dict(model.named_modules())
    pretrained = {n: modules[n].weight.detach().clone() for n in method.targets}
    method.on_task_start(model, first)
    layers = dict(osf_layers(model))
    assert set(layers) == set(method.targets) and all(l.effective_rank["default"] == 1 for l in layers.values())
    # The driver's model is the plain one, with PEFT's layers in it; only their factors train.
    trainable = method.trainable_parameters(model)
    expected = sum((min(l.in_features, l.out_features) - 1) * (l.in_features + l.out_features + 1) for l in layers.values())
    assert sum(p.numel() for p in trainable) == expected
    assert {id(p) for p in trainable} == {id(p) for l in layers.values() for p in l.osf_svd_params.parameters()}
    settings = TrainSettings(lr=1e-3, epochs=1, batch_size=4, seed=0)
    train_stage(model, method, first, method.training_items(first), settings, session.services, progress=False)
    trained = {n: (l.get_base_layer().weight + l.get_delta_weight("default")).detach().clone() for n, l in layers.items()}
    method.on_task_end(model, first)
    modules = dict(model.named_modules())
    assert not osf_layers(model) and not any(p.requires_grad for p in model.parameters())
    for name in method.targets:
        assert type(modules[name]) is torch.nn.Linear
        torch.testing.assert_close(modules[name].weight, trained[name], atol=1e-6, rtol=0)
        assert not torch.equal(modules[name].weight, pretrained[name])
    merged = {n: modules[n].weight.detach().clone() for n in method.targets}
    method.on_task_start(model, second)
    for name, layer in osf_layers(model):
        q = min(layer.in_features, layer.out_features)
        assert layer.effective_rank["default"] == q // 2  # freeze (t−1)/T = 1/2 at task 2 of 2
        assert torch.equal(layer.get_base_layer().weight, merged[name])
        singular = torch.linalg.svdvals(merged[name])[q // 2:]
        torch.testing.assert_close(layer.osf_svd_params["default"]["S_low"].detach(), singular, atol=1e-5, rtol=1e-5)


def test_bf16_weights_get_fp32_factors(toy_data):
    session = build_session(tiny_run_config(toy_data, method="osf", model_dtype="bf16", precision="bf16",
                                                   method_options={}))
    method, model = session.method, session.model
    stage = session.stages()[0]
    method.on_task_start(model, stage)
    for _, layer in osf_layers(model):
        assert layer.get_base_layer().weight.dtype == torch.bfloat16
        assert all(p.dtype == torch.float32 for p in layer.osf_svd_params.parameters())
        assert layer.get_delta_weight("default").abs().max().item() == 0.0  # ΔW is exactly 0 at the wrap
    settings = TrainSettings(lr=1e-3, epochs=1, batch_size=4, seed=0)
    train_stage(model, method, stage, method.training_items(stage)[:8], settings, session.services, progress=False)
    method.on_task_end(model, stage)
    modules = dict(model.named_modules())
    assert all(modules[n].weight.dtype == torch.bfloat16 for n in method.targets)
