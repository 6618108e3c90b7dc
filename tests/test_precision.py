"""Trained weights stored in bf16 (model_dtype=bf16) step on fp32 master copies."""
from __future__ import annotations

import pytest
import torch

from conftest import tiny_run_config
from dealcl.methods._projected_adam import ProjectedAdam
from dealcl.runs.driver import run_continual
from dealcl.train.loop import MasterWeights


def _steps(weight: torch.nn.Parameter, grads: list[torch.Tensor], masters: bool) -> None:
    # GORP's full-rank group at its T5 settings (galore_lr 1e-5, rank 8, gap 10, scale 1, eps 1e-6).
    optimizer = ProjectedAdam([dict(params=[weight], lr=1e-5, kind="galore", rank=8, gap=10, scale=1.0)], eps=1e-6)
    master = MasterWeights([weight]) if masters else None
    for grad in grads:
        weight.grad = grad.to(weight.dtype)
        if master is None:
            optimizer.step()
        else:
            with master.fp32_step():
                optimizer.step()
        weight.grad = None


def test_a_bf16_weights_update_equals_the_fp32_update_rounded():
    torch.manual_seed(0)
    start = (torch.randn(512, 128) * 0.02).bfloat16()
    # bf16-representable gradients: both paths see exactly the same values.
    grads = [torch.randn(512, 128).bfloat16().float() for _ in range(30)]
    reference = torch.nn.Parameter(start.float())
    _steps(reference, grads, masters=False)
    stored = torch.nn.Parameter(start.clone())
    _steps(stored, grads, masters=True)
    assert stored.dtype == torch.bfloat16
    assert torch.equal(stored.data, reference.data.bfloat16())  # the fp32 result, rounded once
    changed = (stored.data != start).float().mean().item()
    # Stepping the bf16 tensor itself loses most updates (each is below half a rounding step).
    plain = torch.nn.Parameter(start.clone())
    _steps(plain, grads, masters=False)
    lost = (plain.data != start).float().mean().item()
    # (30 steps at lr 1e-5 move most entries by less than half a rounding step even in fp32:
    # the rounded fp32 result differs from the start in ~14 % of them, the plain bf16 one in ~4 %.)
    assert changed > 3 * lost > 0, (changed, lost)
    assert (reference.data != start.float()).float().mean() > 0.99


@pytest.mark.parametrize("method", ["seqft", "gorp"])
def test_the_loop_steps_trained_bf16_weights_on_masters(toy_data, tmp_path, monkeypatch, method):
    import dealcl.train.loop as loop

    seen = []

    class Recording(MasterWeights):
        def fp32_step(self):
            seen.append({p.dtype for p, _ in self.pairs})
            return super().fp32_step()

    monkeypatch.setattr(loop, "MasterWeights", Recording)
    options = {} if method == "seqft" else {"dropout": 0.0}
    config = tiny_run_config(toy_data, method=method, tasks=["toyA"], model_dtype="bf16", lr=5e-5,
                             method_options=options)
    run_continual(config, tmp_path / "run", progress=False)
    assert len(seen) == 6 and all(dtypes == {torch.bfloat16} for dtypes in seen)  # 24 examples, batch 4
