"""InfLoRA: the GPM memory and A design against the hand values of new_methods_spec.md §1.9, the
interference-free property on tiny models, the per-input memories (I-3) and the padding mask (I-4)."""
from __future__ import annotations

import pytest
import torch

from conftest import tiny_run_config
from dealcl.errors import UserError
from dealcl.methods._gpm import InputCovariances, extend_basis, initial_basis, project_rows, threshold_at
from dealcl.methods.inflora import design_a_input_svd, design_a_random_projected
from dealcl.runs.session import build_session
from dealcl.train.loop import TrainSettings, train_stage


def e(i: int, d: int = 3) -> torch.Tensor:
    return torch.eye(d)[:, i : i + 1]


# ---- §1.9 test 1: basis size after task 1 ------------------------------------------------------
@pytest.mark.parametrize("eps, energy, k", [(0.9, "squared", 1), (0.995, "squared", 2), (0.9, "eigenvalue", 2)])
def test_task1_basis_size(eps, energy, k):
    # eigenvalues (4, 2, 1, 0): ρ = (16, 4, 1, 0)/21, cumulative (0.7619, 0.9524, 1, 1);
    # eigenvalue energy: cumulative (0.5714, 0.8571, 1, 1). The crossing direction is excluded.
    C = torch.diag(torch.tensor([4.0, 2.0, 1.0, 0.0]))
    M = initial_basis(C, eps, energy)
    assert M.shape == (4, k)
    assert torch.allclose(M.abs(), torch.eye(4)[:, :k], atol=1e-7)


def test_task1_basis_keeps_one_direction_at_least():
    # ρ₁ = 16/21 ≥ ε = 0.5: no cumulative share is below ε, and the floor keeps one.
    assert initial_basis(torch.diag(torch.tensor([4.0, 2.0, 1.0, 0.0])), 0.5).shape == (4, 1)


# ---- §1.9 test 2: memory update after task t > 1 -----------------------------------------------
@pytest.mark.parametrize("eps, expected", [(0.9, 2), (0.95, 3)])
def test_memory_update_adds_residual_directions(eps, expected):
    # M = e₁, C = diag(3, 2, 1): E = 14, Ĉ = diag(0, 2, 1), acc₀ = 9/14 = 0.6429, ratios 4/14, 1/14:
    # ε 0.9 adds e₂ (acc 0.9286); ε 0.95 adds e₂ and e₃ (M = I₃).
    M = extend_basis(e(0), torch.diag(torch.tensor([3.0, 2.0, 1.0])), eps)
    assert M.shape == (3, expected)
    assert torch.allclose(M.abs(), torch.eye(3)[:, :expected], atol=1e-7)


def test_memory_update_adds_nothing_when_the_old_memory_explains_enough():
    # acc₀ = 9/14 ≥ ε = 0.6: the memory stays e₁.
    assert torch.equal(extend_basis(e(0), torch.diag(torch.tensor([3.0, 2.0, 1.0])), 0.6), e(0))


# ---- §1.9 test 3: the threshold schedule --------------------------------------------------------
def test_threshold_schedule():
    assert threshold_at(1, 0.995, 15) == pytest.approx(0.995)
    assert threshold_at(4, 0.995, 15) == pytest.approx(0.996)
    assert threshold_at(15, 0.995, 15) == pytest.approx(0.999667, abs=1e-6)
    assert threshold_at(40, 0.995, 15) == 1.0  # longer than T + 1 tasks: capped


# ---- §1.9 test 4: the A designs ------------------------------------------------------------------
def test_a_design_input_svd():
    C = torch.tensor([[5.0, 0, 0], [0, 3, 1], [0, 1, 3]])  # Ĉ = (I − e₁e₁ᵀ)C: singular values 4, 2, 0
    A = design_a_input_svd(C, [e(0)], rank=1)
    assert torch.allclose(A.abs(), torch.tensor([[0.0, 0.4082, 0.4082]]), atol=1e-4)
    assert A.norm() == pytest.approx(0.57735, abs=1e-5)
    assert abs(float(A @ e(0))) < 1e-7


def test_a_design_random_projected():
    A = design_a_random_projected(torch.tensor([[1.0, 2.0, 3.0]]), [e(0)])
    assert torch.allclose(A, torch.tensor([[0.0, 0.3203, 0.4804]]), atol=1e-4)
    assert A.norm() == pytest.approx(0.57735, abs=1e-5)
    assert abs(float(A @ e(0))) < 1e-7


def test_a_design_input_svd_rank_deficient_rows_stay_orthogonal():
    # Ĉ has rank 2 here; asking for 3 rows must not bring back e₁ (its third singular vector).
    A = design_a_input_svd(torch.tensor([[5.0, 0, 0], [0, 3, 1], [0, 1, 3]]), [e(0)], rank=3)
    assert (A @ e(0)).abs().max() < 1e-7
    assert A[:2].norm(dim=1).allclose(torch.full((2,), 0.57735), atol=1e-5)


def test_chunked_projection_acts_per_block():
    # d = 4 in two blocks; block 0 remembers its first axis, block 1 nothing.
    memory = [e(0, 2), torch.zeros(2, 0)]
    assert torch.equal(project_rows(torch.tensor([[1.0, 2.0, 3.0, 4.0]]), memory), torch.tensor([[0.0, 2.0, 3.0, 4.0]]))


# ---- I-4: padding left out of the covariance ------------------------------------------------------
def test_covariance_counts_only_the_masked_positions():
    layer = torch.nn.Linear(2, 2)
    x = torch.tensor([[[1.0, 0.0], [0.0, 2.0], [100.0, 100.0]]])  # the last position is a pad
    mask = torch.tensor([[True, True, False]])
    for padding, expected in [("exclude", torch.diag(torch.tensor([0.5, 2.0]))),
                              ("include", (torch.diag(torch.tensor([1.0, 4.0])) + 1e4) / 3)]:
        with torch.no_grad(), InputCovariances({"m": layer}, 1, lambda key, x: mask if padding == "exclude" else None) as c:
            layer(x)
        assert torch.allclose(c.covariances()["m"][0], expected.double())


# ---- on tiny models ------------------------------------------------------------------------------
def session_for(data, model="tiny-llama", **options):
    config = tiny_run_config(data, method="inflora", model=model, tasks=["toyA", "toyB"], lr=5e-3, epochs=2,
                             train_per_task=12, method_options={"dropout": 0.0, **options})
    return build_session(config)


def train(session, stage, steps_epochs=2):
    settings = TrainSettings(lr=5e-3, epochs=steps_epochs, batch_size=4, seed=0)
    train_stage(session.model, session.method, stage, session.method.training_items(stage), settings,
                session.services, progress=False)


@pytest.mark.parametrize("a_init", ["random_projected", "input_svd"])
def test_interference_free_on_a_tiny_model(toy_data_session, a_init):
    """§1.9 test 5: after task 2 trains, a module's output is unchanged for inputs in the span of
    task 1's memory (A₂ annihilates them) and changed for inputs orthogonal to it."""
    session = session_for(toy_data_session, a_init=a_init)
    method, model = session.method, session.model
    first, second = session.stages()
    method.on_task_start(model, first)
    train(session, first)
    method.on_task_end(model, first)
    method.on_task_start(model, second)
    name, layer = method.lora_modules(model)[0]
    (M,) = method.memory[method.groups[name]]
    d = M.shape[0]
    assert 0 < M.shape[1] < d, "the test needs a memory that is neither empty nor everything"
    generator = torch.Generator().manual_seed(0)
    inside = (M @ torch.randn(M.shape[1], 2, generator=generator)).T.reshape(2, 1, d)
    outside = torch.randn(2, d, generator=generator)
    outside = (outside - outside @ M @ M.T).reshape(2, 1, d)
    model.eval()
    with torch.no_grad():
        before = layer(inside), layer(outside)
    train(session, second)  # before_training designs A here for input_svd
    for _, each in method.lora_modules(model):
        a_new = each.lora_A["task2"].weight
        assert (a_new @ method.memory[method.groups[_]][0]).abs().max() < 1e-6
        assert not a_new.requires_grad and each.lora_B["task2"].weight.requires_grad
    model.eval()
    with torch.no_grad():
        after = layer(inside), layer(outside)
    assert (after[0] - before[0]).abs().max() < 1e-6
    assert (after[1] - before[1]).abs().max() > 1e-4


@pytest.mark.parametrize("cross_v, shared_with_q", [("separate", False), ("shared", True)])
def test_t5_cross_attention_v_keeps_its_own_memory(toy_data_session, cross_v, shared_with_q):
    """I-3: q and v of a self-attention block read one tensor and share a memory; every
    cross-attention v reads the encoder output, so they share one memory of that input, unless
    `cross_v_memory=shared` gives each its block's query-side memory (upstream)."""
    groups = session_for(toy_data_session, model="tiny-t5", cross_v_memory=cross_v).method.groups
    self_q = "encoder.block.0.layer.0.SelfAttention.q"
    assert groups[self_q] == groups["encoder.block.0.layer.0.SelfAttention.v"] == self_q
    for block in (0, 1):
        q, v = (f"decoder.block.{block}.layer.1.EncDecAttention.{x}" for x in "qv")
        assert (groups[v] == groups[q]) is shared_with_q
    if not shared_with_q:
        assert groups["decoder.block.0.layer.1.EncDecAttention.v"] == groups["decoder.block.1.layer.1.EncDecAttention.v"]


def test_t5_memories_cover_every_input_and_exclude_nothing_trained(toy_data_session):
    session = session_for(toy_data_session, model="tiny-t5")
    method, model = session.method, session.model
    first, _ = session.stages()
    method.on_task_start(model, first)
    train(session, first, steps_epochs=1)
    method.on_task_end(model, first)
    assert set(method.memory) == set(method.groups.values())
    assert all(0 < m[0].shape[1] <= m[0].shape[0] for m in method.memory.values())
    assert not any(p.requires_grad for p in model.parameters())  # task ended: everything frozen


@pytest.mark.parametrize("key, value", [("a_init", "paper"), ("energy", "sigma"), ("threshold", 0.0),
                                        ("schedule_T", 0), ("cross_v_memory", "both"), ("covariance_padding", "no")])
def test_bad_options_are_one_error(toy_data_session, key, value):
    with pytest.raises(UserError, match=f"method.{key}"):
        session_for(toy_data_session, **{key: value})


def test_chunk_must_divide_the_input_size(toy_data_session):
    with pytest.raises(UserError, match="chunk=3 does not divide"):
        session_for(toy_data_session, chunk=3)
