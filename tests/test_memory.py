"""Bounded memory: micro-batches built to a token budget, the attention kernel per width, and
no growth of a run's memory from stage to stage."""
from __future__ import annotations

import json

import pytest
import torch

from conftest import tiny_run_config
from dealcl.data.loading import load_task
from dealcl.methods import REGISTRY, Stage
from dealcl.models.loading import load_model
from dealcl.runs.driver import run_continual
from dealcl.prompts import PromptEncoder
from dealcl.train.loop import TrainingAttention, TrainingServices, TrainSettings, micro_batch_chunks, train_stage


def test_micro_batches_keep_every_example_once_within_the_budget():
    lengths = [10, 50, 12, 48, 30, 11, 9, 60, 25, 5]
    indices = list(range(10))
    assert micro_batch_chunks(indices, lengths, 4, None) == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9]]
    assert micro_batch_chunks(indices, lengths, 4, 240) == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9]]  # within: unchanged
    chunks = micro_batch_chunks(indices, lengths, 4, 100)
    assert sorted(i for c in chunks for i in c) == indices
    assert all(len(c) == 1 or len(c) * max(lengths[i] for i in c) <= 100 for c in chunks)
    assert all(len(c) <= 4 for c in chunks)
    assert micro_batch_chunks([7], lengths, 4, 10) == [[7]]  # one example over the budget still trains


def _train(toy_data, budget, long_sentences=False):
    loaded = load_model("tiny-llama")
    task = load_task("toyB", toy_data)
    if long_sentences:  # widths from ~150 to ~400 tokens, so the budget splits most steps
        task.train = [type(e)(e.sentence + " filler" * (8 * k % 40), e.label) for k, e in enumerate(task.train)]
    encoder = PromptEncoder(loaded.tokenizer, "causal", 512)
    # No shared prefix here: it would share more in the whole batch than in the split ones.
    services = TrainingServices(encoder, "causal", "fp32", torch.device("cpu"), share_prefix=False)
    method = REGISTRY["seqlora"](REGISTRY["seqlora"].config_class(dropout=0.0), services)
    torch.manual_seed(0)  # PEFT draws A from the global generator
    model = method.prepare_model(loaded.model)
    stats = train_stage(model, method, Stage(1, task.name, [task]), [(task, e) for e in task.train],
                        TrainSettings(lr=5e-3, batch_size=8, seed=0, micro_batch_tokens=budget), services, progress=False)
    return stats, {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


def test_a_token_budget_changes_no_step(toy_data):
    """Splitting a step into smaller micro-batches keeps its loss and update (fp32 rounding)."""
    whole, whole_params = _train(toy_data, None, long_sentences=True)
    split, split_params = _train(toy_data, 600, long_sentences=True)
    assert split["computed_tokens"] < whole["computed_tokens"]  # less padding, too
    torch.testing.assert_close(torch.tensor(split["step_losses"]), torch.tensor(whole["step_losses"]),
                               rtol=1e-5, atol=1e-6)
    for name in whole_params:
        # Adam divides by √v: an entry with a near-zero gradient turns fp32 rounding into ~1e-5.
        torch.testing.assert_close(split_params[name], whole_params[name], rtol=1e-4, atol=3e-5)


def test_eager_attention_for_short_micro_batches_only_and_restored():
    loaded = load_model("tiny-llama")
    config = loaded.model.config
    original = config._attn_implementation
    assert original == "sdpa"
    attention = TrainingAttention(loaded.model, torch.device("cpu"))
    attention.use_for(100)
    assert config._attn_implementation == "eager"
    attention.use_for(300)
    assert config._attn_implementation == original
    attention.use_for(200)
    attention.restore()
    assert config._attn_implementation == original
    gpu = TrainingAttention(loaded.model, torch.device("meta"))  # not a CPU: the model's own kernel
    gpu.use_for(100)
    assert config._attn_implementation == original


def test_a_runs_memory_does_not_grow_from_stage_to_stage(tmp_path):
    """Three stages on tasks of equal shape: the third stage's peak RSS stays within a margin
    of the first one's (which also holds loading and the reference stage)."""
    from dealcl.data.toy import write_toy_benchmark

    data = write_toy_benchmark(tmp_path / "CL", n_train=64, n_test=16)
    config = tiny_run_config(data, tasks=["toyA", "toyB", "toyC"], method="olora")
    run_continual(config, tmp_path / "run", progress=False)
    stages = json.loads((tmp_path / "run" / "efficiency.json").read_text())["stages"]
    peaks = [s["peak_memory_mb"] for s in stages]
    assert len(peaks) == 3 and all(p > 0 for p in peaks)
    assert peaks[2] <= peaks[0] * 1.10 + 32, peaks


@pytest.mark.parametrize("method", ["seqlora", "deal", "olora"])
def test_shared_prefix_training_equals_unshared(toy_data, tmp_path, method):
    """Each micro-batch computes its rows' common prompt prefix once: per-step losses and the
    trained adapters equal the unshared computation (fp32, no dropout: exact up to rounding)."""
    from safetensors.torch import load_file

    runs = {}
    for share in (False, True):
        config = tiny_run_config(toy_data, method=method, share_prompt_prefix=share, reference_stage=False)
        run_continual(config, tmp_path / f"share-{share}", progress=False)
        stages = json.loads((tmp_path / f"share-{share}" / "efficiency.json").read_text())["stages"]
        runs[share] = stages
    for plain, shared in zip(runs[False], runs[True]):
        torch.testing.assert_close(torch.tensor(shared["step_losses"]), torch.tensor(plain["step_losses"]),
                                   rtol=1e-5, atol=1e-6)
    for path in (tmp_path / "share-False" / "adapters" / "2-toyB").glob("*.safetensors"):
        plain, shared = load_file(str(path)), load_file(str(tmp_path / "share-True" / "adapters" / "2-toyB" / path.name))
        for name in plain:
            torch.testing.assert_close(shared[name], plain[name], rtol=1e-4, atol=3e-5)


def test_shared_prefix_gradient_equals_unshared_on_one_batch(toy_data):
    loaded = load_model("tiny-llama")
    task = load_task("toyB", toy_data)
    encoder = PromptEncoder(loaded.tokenizer, "causal", 512)
    from dealcl.train.batching import collate_train

    batch = collate_train([encoder.encode(task, e.sentence, e.label) for e in task.train[:6]], "causal", encoder.pad_id)
    assert batch["prefix_len"] > 0.5 * batch["input_ids"].shape[1]  # the toy prompts share most of their tokens
    grads, losses = {}, {}
    for share in (False, True):
        services = TrainingServices(encoder, "causal", "fp32", torch.device("cpu"), share_prefix=share)
        method = REGISTRY["seqlora"](REGISTRY["seqlora"].config_class(dropout=0.0), services)
        torch.manual_seed(0)
        model = method.prepare_model(load_model("tiny-llama").model)
        with torch.no_grad():  # B = 0 would make A's gradient zero: give both factors a gradient
            for name, p in model.named_parameters():
                if "lora_B" in name:
                    p.copy_(torch.randn(p.shape, generator=torch.Generator().manual_seed(1)) * 0.1)
        model.train()
        loss, _ = services.task_loss_sum(model, batch)
        loss.backward()
        losses[share] = loss.item()
        grads[share] = {n: p.grad for n, p in model.named_parameters() if p.requires_grad}
        assert services.computed_tokens(model, batch) == batch["input_ids"].numel() - share * 5 * batch["prefix_len"]
    assert losses[True] == pytest.approx(losses[False], rel=1e-6)
    for name in grads[False]:
        torch.testing.assert_close(grads[True][name], grads[False][name], rtol=1e-4, atol=1e-7)


def test_computed_tokens_count_the_prefix_whole_where_the_model_cannot_share_it(toy_data):
    """FLOP accounting follows what the forward does: a model marked as not sharing the prompt
    prefix (gainlora's gate reads each row's whole prompt) computes every position."""
    from dealcl.models import SHARES_PROMPT_PREFIX
    from dealcl.train.batching import collate_train

    loaded = load_model("tiny-llama")
    task = load_task("toyB", toy_data)
    encoder = PromptEncoder(loaded.tokenizer, "causal", 512)
    batch = collate_train([encoder.encode(task, e.sentence, e.label) for e in task.train[:4]], "causal", encoder.pad_id)
    services = TrainingServices(encoder, "causal", "fp32", torch.device("cpu"), share_prefix=True)
    whole = batch["input_ids"].numel()
    assert services.computed_tokens(loaded.model, batch) == whole - 3 * batch["prefix_len"]
    setattr(loaded.model, SHARES_PROMPT_PREFIX, False)
    assert services.computed_tokens(loaded.model, batch) == whole


def test_importing_dealcl_caps_the_onednn_kernel_cache_unless_the_user_set_it():
    """The cap must be in the environment before torch loads oneDNN; a user's value wins."""
    import os
    import subprocess
    import sys

    show = "import dealcl, os; print(os.environ['ONEDNN_PRIMITIVE_CACHE_CAPACITY'])"
    env = {k: v for k, v in os.environ.items() if k != "ONEDNN_PRIMITIVE_CACHE_CAPACITY"}
    assert subprocess.run([sys.executable, "-c", show], env=env, capture_output=True, text=True).stdout.strip() == "64"
    env["ONEDNN_PRIMITIVE_CACHE_CAPACITY"] = "8"
    assert subprocess.run([sys.executable, "-c", show], env=env, capture_output=True, text=True).stdout.strip() == "8"
