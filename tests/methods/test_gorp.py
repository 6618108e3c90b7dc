"""GORP: the memory math, the projected Adam, and the method's task-to-task behaviour."""
from __future__ import annotations

import json

import pytest
import torch

from conftest import tiny_run_config
from dealcl.errors import UserError
from dealcl.methods import projected_adam
from dealcl.methods.gorp import Gorp, GorpConfig
from dealcl.methods.projected_adam import (
    ProjectedAdam, energy_threshold_rank, extend_memory, galore_projector, project_out,
)
from dealcl.runs.config import method_config
from dealcl.runs.driver import prepare, run_continual
from dealcl.train.batching import PromptEncoder
from dealcl.train.loop import TrainingServices, TrainSettings, train_stage


# ---- pure math ---------------------------------------------------------------------------------
def _with_singular_values(values, rows=12, cols=9, seed=0):
    g = torch.Generator().manual_seed(seed)
    U, _ = torch.linalg.qr(torch.randn(rows, rows, generator=g, dtype=torch.float64))
    V, _ = torch.linalg.qr(torch.randn(cols, cols, generator=g, dtype=torch.float64))
    S = torch.zeros(rows, cols, dtype=torch.float64)
    for i, v in enumerate(values):
        S[i, i] = v
    return U @ S @ V.T, U


@pytest.mark.parametrize("values, tau, expected", [
    ([3.0, 2.0, 1.0, 0.5], 0.9, 2),        # energies 9, 4, 1, .25 → 63 %, 91 %: the crossing one kept
    ([3.0, 1.2, 1.1, 1.0], 0.9, 3),        # 71 %, 83 %, 92 %: k = 3
    ([3.0, 1.0], 0.9, 1),                  # σ₁² = 90 % exactly → k = 1 (upstream gave 0)
    ([10.0, 1.0, 1.0], 0.9, 1),            # σ₁² ≥ 0.9 of the total → k = 1
    ([0.0, 0.0, 0.0], 0.9, 0),             # all-zero → k = 0
    ([1.0, 1.0, 1.0, 1.0], 1.0, 4),
])
def test_energy_threshold_rank(values, tau, expected):
    assert energy_threshold_rank(torch.tensor(values), tau) == expected
    F, U = _with_singular_values(values)
    M = extend_memory(None, F, tau)
    assert M.shape == (12, expected)
    if expected:  # the kept directions are the top singular vectors
        overlap = M.double().T @ U[:, :expected]  # same subspace ⇔ all cosines 1
        assert torch.allclose(torch.linalg.svdvals(overlap), torch.ones(expected, dtype=torch.float64), atol=1e-5)


def test_extend_memory_gpm_residual_and_orthonormal():
    g = torch.Generator().manual_seed(1)
    first = extend_memory(None, torch.randn(20, 3, generator=g) @ torch.randn(3, 8, generator=g), 0.9)
    assert 1 <= first.shape[1] <= 3
    # A moment lying inside the old memory adds nothing.
    inside = first @ torch.randn(first.shape[1], 5, generator=g)
    assert torch.equal(extend_memory(first, inside, 0.9), first)
    # A new direction is added, re-orthonormalised against the old basis.
    new = torch.randn(20, 2, generator=g) @ torch.randn(2, 8, generator=g)
    both = extend_memory(first, new, 0.9)
    assert both.shape[1] > first.shape[1] and torch.equal(both[:, : first.shape[1]], first)
    assert torch.allclose(both.T @ both, torch.eye(both.shape[1]), atol=1e-5)
    # A zero moment leaves the memory as it was; the memory never exceeds the dimension.
    assert torch.equal(extend_memory(both, torch.zeros(20, 4), 0.9), both)
    full = extend_memory(None, torch.randn(4, 30, generator=g), 1.0)
    assert full.shape == (4, 4) and extend_memory(full, torch.randn(4, 6, generator=g), 1.0).shape == (4, 4)


def test_projection_removes_the_memory_component():
    g = torch.Generator().manual_seed(2)
    M = extend_memory(None, torch.randn(16, 5, generator=g), 0.99)  # output space, 16 rows
    G = torch.randn(16, 10, generator=g)
    assert torch.linalg.norm(M.T @ project_out(G, M, "left")) < 1e-6
    Q = extend_memory(None, torch.randn(10, 4, generator=g), 0.99)  # input space, 10 columns
    A_grad = torch.randn(8, 10, generator=g)
    assert torch.linalg.norm(project_out(A_grad, Q, "right") @ Q) < 1e-6
    assert project_out(G, None) is G


def test_projected_adam_at_full_rank_is_adam():
    torch.manual_seed(0)
    w0 = torch.randn(6, 4)
    ours, ref = torch.nn.Parameter(w0.clone()), torch.nn.Parameter(w0.clone())
    opt = ProjectedAdam([dict(params=[ours], kind="galore", rank=4, gap=1, scale=1.0)], lr=1e-2, eps=1e-6)
    adam = torch.optim.Adam([ref], lr=1e-2, eps=1e-6)
    target = torch.randn(6, 4)
    for _ in range(6):
        for p, o in ((ours, opt), (ref, adam)):
            o.zero_grad()
            ((p - target) ** 2).sum().backward()
            o.step()
    # ε sits inside √v (HF style) versus after bias correction (torch): equal up to ~ε.
    assert torch.allclose(ours, ref, atol=1e-6, rtol=1e-5)
    assert not torch.equal(ours, w0)


def test_galore_update_lies_in_the_projector_row_space():
    torch.manual_seed(0)
    p = torch.nn.Parameter(torch.randn(10, 6))
    opt = ProjectedAdam([dict(params=[p], kind="galore", rank=2, gap=100, scale=0.5)], lr=1e-2)
    before = p.detach().clone()
    for _ in range(3):
        opt.zero_grad()
        (p.sum(dim=0) ** 2 * torch.arange(6.0)).sum().backward()
        opt.step()
    state = opt.state[p]
    assert state["side"] == "right" and state["projector"].shape == (2, 6) and state["exp_avg"].shape == (10, 2)
    P = state["projector"]
    delta = p.detach() - before
    assert torch.linalg.norm(delta - delta @ P.T @ P) < 1e-6 and torch.linalg.norm(delta) > 0


def test_config_validation():
    with pytest.raises(UserError, match="galore_rank"):
        method_config(GorpConfig, {"galore_rank": 0}, "gorp")
    with pytest.raises(UserError, match="energy_threshold"):
        method_config(GorpConfig, {"energy_threshold": "1.5"}, "gorp")
    with pytest.raises(UserError, match="galore_targets"):
        method_config(GorpConfig, {"galore_targets": "(unclosed"}, "gorp")
    assert method_config(GorpConfig, {"galore_lr": "3e-4"}, "gorp").galore_lr == 3e-4


# ---- the method on tiny models -----------------------------------------------------------------
class Harness:
    def __init__(self, data, model, **options):
        config = tiny_run_config(data, method="gorp", model=model, train_per_task=12, epochs=1, lr=5e-3,
                                 method_options={"dropout": 0.0, **options})
        self.prep = prepare(config)
        encoder = PromptEncoder(self.prep.loaded.tokenizer, self.prep.loaded.arch, config.max_source_length)
        self.services = TrainingServices(encoder, self.prep.loaded.arch, "fp32", torch.device("cpu"))
        torch.manual_seed(0)
        self.method: Gorp = self.prep.method_class(self.prep.method_options, self.services)
        self.pretrained = {n: m.weight.detach().clone() for n, m in self.prep.loaded.model.named_modules()
                           if isinstance(m, torch.nn.Linear)}
        self.model = self.method.prepare_model(self.prep.loaded.model)
        self.stages = self.method.stages(self.prep.tasks)

    def run_stage(self, stage):
        self.method.on_task_start(self.model, stage)
        settings = TrainSettings(lr=5e-3, epochs=1, batch_size=4, seed=0)
        train_stage(self.model, self.method, stage, self.method.training_items(stage), settings, self.services,
                    progress=False)
        self.method.on_task_end(self.model, stage)

    @torch.no_grad()
    def outputs(self):
        self.model.eval()
        items = [(t, e) for t in self.prep.tasks for e in t.test[:4]]
        return torch.cat([self.services.answer_logits(self.model, b) for b in self.services.batches(items, 4)])


def _expected_counts(model_name):
    if model_name == "tiny-llama":  # hidden 64, q 64→64, v 64→32 (2 kv heads × 16), gate 64→128, 2 layers
        return 2 * 8 * (64 + 64) + 2 * 8 * (64 + 32), 2 * 128 * 64
    # tiny T5: self-attention q,v 64→64 in 2 encoder + 2 decoder blocks; cross q,v in 2 decoder blocks
    return 4 * 2 * 8 * (64 + 64), 2 * 2 * 64 * 64


@pytest.mark.parametrize("model_name", ["tiny-llama", "tiny-t5"])
def test_trainable_parameter_count_and_frozen_previous_lora(toy_data_session, model_name):
    h = Harness(toy_data_session, model_name)
    lora_count, g_count = _expected_counts(model_name)
    h.run_stage(h.stages[0])
    first = {n: p.detach().clone() for n, p in h.model.named_parameters() if ".lora_" in n and ".task1." in n}
    h.method.on_task_start(h.model, h.stages[1])
    trainable = [(n, p) for n, p in h.model.named_parameters() if p.requires_grad]
    assert sum(p.numel() for _, p in trainable) == lora_count + g_count
    assert all(".task2." in n for n, _ in trainable if ".lora_" in n)
    optimizer = h.method.build_optimizer(h.model, 5e-3)
    kinds = {g["kind"]: sum(p.numel() for p in g["params"]) for g in optimizer.param_groups}
    assert kinds == {"galore": g_count, "lora_a": lora_count // 2 if model_name == "tiny-t5" else kinds["lora_a"],
                     "plain": lora_count - kinds["lora_a"]}
    h.method._optimizer = None
    h.method.on_task_end(h.model, h.stages[1])  # no step taken: harmless
    h.run_stage(h.stages[1])
    for n, p in h.model.named_parameters():
        if n in first:
            assert torch.equal(p, first[n]), f"task 1 LoRA changed: {n}"
