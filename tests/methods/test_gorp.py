"""GORP: the memory math, the projected Adam, and the method's task-to-task behaviour."""
from __future__ import annotations

import json

import pytest
import torch

from conftest import tiny_run_config
from dealcl.errors import UserError
from dealcl.methods import _projected_adam as projected_adam
from dealcl.methods.gorp import Gorp, GorpConfig
from dealcl.methods._projected_adam import (
    ProjectedAdam, energy_threshold_rank, extend_memory, galore_projector, project_out,
)
from dealcl.runs.config import method_config
from dealcl.runs.driver import run_continual
from dealcl.runs.session import build_session
from dealcl.train.loop import TrainSettings, train_stage


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
        session = build_session(config, prepare_model=False)
        self.prep, self.services = session.prep, session.services
        self.method: Gorp = session.method
        self.pretrained = {n: m.weight.detach().clone() for n, m in self.prep.loaded.model.named_modules()
                           if isinstance(m, torch.nn.Linear)}
        self.model = session.prepare_model()
        self.stages = session.stages()

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
    """(LoRA A, LoRA B, full-rank G) parameters trained per task: r·d_in, r·d_out per LoRA module, m·n per G."""
    if model_name == "tiny-llama":  # hidden 64, q 64→64, v 64→32 (2 kv heads × 16), gate 64→128, 2 layers
        return 2 * (8 * 64 + 8 * 64), 2 * (8 * 64 + 8 * 32), 2 * 128 * 64
    # tiny T5: self-attention q,v 64→64 in 2 encoder + 2 decoder blocks; cross q,v 64×64 in 2 decoder blocks
    return 4 * 2 * 8 * 64, 4 * 2 * 8 * 64, 2 * 2 * 64 * 64


@pytest.mark.parametrize("model_name", ["tiny-llama", "tiny-t5"])
def test_trainable_parameter_count_and_frozen_previous_lora(toy_data_session, model_name):
    h = Harness(toy_data_session, model_name)
    a_count, b_count, g_count = _expected_counts(model_name)
    h.run_stage(h.stages[0])
    first = {n: p.detach().clone() for n, p in h.model.named_parameters() if ".lora_" in n and ".task1." in n}
    assert first and sum(p.numel() for p in first.values()) == a_count + b_count
    h.method.on_task_start(h.model, h.stages[1])
    trainable = [(n, p) for n, p in h.model.named_parameters() if p.requires_grad]
    assert sum(p.numel() for _, p in trainable) == a_count + b_count + g_count
    assert all(".task2." in n for n, _ in trainable if ".lora_" in n)
    optimizer = h.method.build_optimizer(h.model, 5e-3)
    kinds = {g["kind"]: sum(p.numel() for p in g["params"]) for g in optimizer.param_groups}
    assert kinds == {"galore": g_count, "lora_a": a_count, "plain": b_count}
    assert {g["kind"]: g["lr"] for g in optimizer.param_groups} == {"galore": 1e-4, "lora_a": 5e-3, "plain": 5e-3}
    settings = TrainSettings(lr=5e-3, epochs=1, batch_size=4, seed=0)
    train_stage(h.model, h.method, h.stages[1], h.method.training_items(h.stages[1]), settings, h.services,
                progress=False)
    for n, p in h.model.named_parameters():
        if n in first:
            assert torch.equal(p, first[n]), f"task 1 LoRA changed: {n}"


@pytest.mark.parametrize("model_name", ["tiny-llama", "tiny-t5"])
def test_task_two_projects_with_task_one_memory(toy_data_session, monkeypatch, model_name):
    h = Harness(toy_data_session, model_name)
    calls = []
    real = projected_adam.project_out

    def spy(G, M, side="left"):
        out = real(G, M, side)
        residual = M.T @ out if side == "left" else out @ M
        calls.append((M.detach().clone(), side, float(torch.linalg.norm(residual))))
        return out

    monkeypatch.setattr(projected_adam, "project_out", spy)
    h.run_stage(h.stages[0])
    assert not calls, "task 1 has no memory to project with"
    memory = {k: v.clone() for k, v in h.method.memory.items()}
    galore = [k for k in memory if k.startswith("galore:")]
    lora = [k for k in memory if k.startswith("lora_a:")]
    assert len(galore) == len(h.method.g_names) and lora
    assert all(v.shape[1] >= 1 for v in memory.values())  # k ≥ 1 for a non-zero moment
    for k in galore:  # output space: m rows
        name = k.split(":", 1)[1]
        assert memory[k].shape[0] == dict(h.model.get_base_model().named_modules())[name].weight.shape[0]

    h.run_stage(h.stages[1])
    steps = 3  # 12 examples, batch 4
    assert len(calls) == steps * sum(1 for v in memory.values() if v.shape[1] > 0)
    used = {(tuple(M.shape), side) for M, side, _ in calls}
    assert ("left" in {s for _, s in used}) and ("right" in {s for _, s in used})
    for M, side, residual in calls:
        assert any(torch.equal(M, m) for m in memory.values()), "projection used a memory not built by task 1"
        assert residual < 1e-5
    # Task 2 extends (never replaces) task 1's memory: the old basis stays its leading block.
    for k, old in memory.items():
        assert torch.equal(h.method.memory[k][:, : old.shape[1]], old)


@pytest.mark.parametrize("model_name", ["tiny-llama", "tiny-t5"])
def test_full_rank_weights_persist_through_save_and_load(toy_data_session, tmp_path, model_name):
    h = Harness(toy_data_session, model_name)
    h.run_stage(h.stages[0])
    after_task1 = h.outputs()
    g = dict(h.method.g_weights(h.model))
    for name, weight in g.items():
        assert not torch.equal(weight, h.pretrained[name]), f"{name} did not move"
    h.method.save_state(h.model, tmp_path)
    meta = json.loads((tmp_path / "gorp_state.json").read_text())
    assert meta["adapters"] == ["task1"] and meta["full_rank_modules"] == h.method.g_names
    assert not any(p.suffix in (".pt", ".pkl", ".bin") for p in tmp_path.iterdir())

    fresh = Harness(toy_data_session, model_name)
    fresh.method.load_state(fresh.model, tmp_path, fresh.stages[0])
    for name, weight in fresh.method.g_weights(fresh.model):
        assert torch.equal(weight, g[name]) and not torch.equal(weight, fresh.pretrained[name])
    assert fresh.method.memory.keys() == h.method.memory.keys()
    assert all(torch.equal(fresh.method.memory[k], v) for k, v in h.method.memory.items())
    assert torch.equal(fresh.outputs(), after_task1)

    # Starting task 2 does not change the function (new adapter has B = 0, G weights kept)...
    h.method.on_task_start(h.model, h.stages[1])
    assert torch.equal(h.outputs(), after_task1)
    # ...and the resumed model trains task 2 exactly as the uninterrupted one.
    h.run_stage(h.stages[1])
    fresh.run_stage(fresh.stages[1])
    assert torch.equal(h.outputs(), fresh.outputs())


@pytest.mark.parametrize("model_name", ["tiny-llama", "tiny-t5"])
def test_two_task_run_end_to_end(toy_data_session, tmp_path, model_name):
    config = tiny_run_config(toy_data_session, method="gorp", model=model_name, train_per_task=8,
                             method_options={"dropout": 0.0, "galore_gap": 2})
    results = run_continual(config, tmp_path / "run", progress=False)
    assert results["task_order"] == ["toyA", "toyB"] and None not in results["accuracy_matrix"][1]
    for stage in ("1-toyA", "2-toyB"):
        files = {p.name for p in (tmp_path / "run" / "adapters" / stage).iterdir()}
        assert {"gorp_lora.safetensors", "gorp_full_rank.safetensors", "gorp_memory.safetensors",
                "gorp_state.json"} <= files
    meta = json.loads((tmp_path / "run" / "adapters" / "2-toyB" / "gorp_state.json").read_text())
    assert meta["adapters"] == ["task1", "task2"] and all(k >= 1 for k in meta["memory_ranks"].values())
    efficiency = json.loads((tmp_path / "run" / "efficiency.json").read_text())
    a, b, g = _expected_counts(model_name)
    assert [s["trainable_parameters"] for s in efficiency["stages"]] == [a + b + g] * 2


def test_resumed_run_equals_uninterrupted_run(toy_data_session, tmp_path):
    import shutil

    config = tiny_run_config(toy_data_session, method="gorp", train_per_task=8, method_options={"dropout": 0.0})
    whole = run_continual(config, tmp_path / "whole", progress=False)
    resumed_dir = tmp_path / "resumed"
    run_continual(config, resumed_dir, progress=False)
    # Lose stage 2: the driver resumes from stage 1's checkpoint (load_state on a fresh model).
    shutil.rmtree(resumed_dir / "adapters" / "2-toyB")
    shutil.rmtree(resumed_dir / "outputs" / "2-toyB")
    resumed = run_continual(config, resumed_dir, progress=False)
    assert resumed == whole
    for name in ("gorp_lora.safetensors", "gorp_full_rank.safetensors", "gorp_memory.safetensors"):
        assert (resumed_dir / "adapters" / "2-toyB" / name).read_bytes() == \
            (tmp_path / "whole" / "adapters" / "2-toyB" / name).read_bytes()


def test_galore_target_options(toy_data_session):
    # An empty target list leaves GORP's LoRA half (IncLoRA + input-space LoRA-A memory).
    h = Harness(toy_data_session, "tiny-llama", galore_targets=[])
    assert h.method.g_names == []
    h.run_stage(h.stages[0])
    assert h.method.memory and all(k.startswith("lora_a:") for k in h.method.memory)
    # A regex that matches nothing is the user's mistake, reported before training.
    with pytest.raises(UserError, match="galore_targets"):
        Harness(toy_data_session, "tiny-llama", galore_targets=[r".*no_such_module"])
    # Custom targets: every LLaMA attention output projection.
    h = Harness(toy_data_session, "tiny-llama", galore_targets=[r".*self_attn\.o_proj"])
    assert h.method.g_names == ["model.layers.0.self_attn.o_proj", "model.layers.1.self_attn.o_proj"]


def test_projection_switches_turn_the_memory_off(toy_data_session, monkeypatch):
    h = Harness(toy_data_session, "tiny-t5", project_galore=False, project_lora=False)
    h.run_stage(h.stages[0])
    assert h.method.memory  # still built (and saved), just not applied
    h.method.on_task_start(h.model, h.stages[1])
    assert h.method.build_optimizer(h.model, 5e-3).memory == {}
