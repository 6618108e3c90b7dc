"""The speed-ups change no results: answer-only logits, dynamic padding, batched generation,
and no reuse of stale predictions."""
from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F

from conftest import tiny_run_config
from dealcl.data.loading import load_task
from dealcl.models.loading import load_model
from dealcl.runs.driver import run_continual
from dealcl.prompts import PromptEncoder
from dealcl.train.batching import collate_train
from dealcl.train.loop import TrainingServices


@pytest.mark.parametrize("model", ["tiny-llama", "tiny-t5"])
def test_answer_only_loss_equals_the_full_forward_loss(toy_data, model):
    """The loop's loss (LM head at answer positions only, per-batch padding) equals the plain
    Hugging Face loss with labels on the answer tokens, computed example by example."""
    loaded = load_model(model)
    task = load_task("toyB", toy_data)
    encoder = PromptEncoder(loaded.tokenizer, loaded.arch)
    services = TrainingServices(encoder, loaded.arch, "fp32", torch.device("cpu"))
    encoded = [encoder.encode(task, e.sentence, e.label) for e in task.train[:6]]
    batch = collate_train(encoded, loaded.arch, encoder.pad_id)
    with torch.no_grad():
        ours, _ = services.task_loss_sum(loaded.model, batch)
        plain = torch.zeros(())
        for example in encoded:
            if loaded.arch == "causal":
                ids = torch.tensor([example.prompt_ids + example.answer_ids])
                labels = torch.full_like(ids, -100)
                labels[0, len(example.prompt_ids):] = torch.tensor(example.answer_ids)
                logits = loaded.model(input_ids=ids).logits[0, :-1]
                plain += F.cross_entropy(logits, labels[0, 1:], ignore_index=-100, reduction="sum")
            else:
                out = loaded.model(input_ids=torch.tensor([example.prompt_ids]), labels=torch.tensor([example.answer_ids]))
                plain += out.loss * len(example.answer_ids)
    assert ours.item() == pytest.approx(plain.item(), rel=1e-5)


def test_earlier_task_predictions_are_recomputed_after_every_stage(toy_data, tmp_path):
    """Under seqlora at a high learning rate, later tasks move the shared adapter: the accuracy
    on the first task must be re-measured (and here changes) after each stage."""
    config = tiny_run_config(toy_data, tasks=["toyA", "toyB"], lr=1e-2, epochs=15,
                             method_options={"dropout": 0.0, "rank": 16})
    results = run_continual(config, tmp_path / "run", progress=False)
    column = [row[0] for row in results["accuracy_matrix"]]
    predictions = [
        (tmp_path / "run" / "outputs" / stage / "predict_eval_predictions.jsonl").read_text()
        for stage in ("1-toyA", "2-toyB")
    ]
    first_task = [[json.loads(line)["prediction"] for line in p.splitlines() if '"toyA"' in line] for p in predictions]
    assert first_task[0] != first_task[1]
    assert column[0] != column[1], column  # learned toyA, then forgot it


def test_gradient_checkpointing_and_length_grouping_keep_the_gradients(toy_data):
    """Checkpointing recomputes activations: the adapter gradients must be the same."""
    from dealcl.methods import REGISTRY
    from dealcl.train.loop import enable_gradient_checkpointing

    grads = []
    for checkpointing in (False, True):
        loaded = load_model("tiny-llama")
        task = load_task("toyB", toy_data)
        encoder = PromptEncoder(loaded.tokenizer, loaded.arch)
        # Checkpointing alone (it also turns off the shared prompt prefix, which needs a cache).
        services = TrainingServices(encoder, loaded.arch, "fp32", torch.device("cpu"), share_prefix=False)
        method = REGISTRY["seqlora"](REGISTRY["seqlora"].config_class(dropout=0.0), services)
        torch.manual_seed(0)
        model = method.prepare_model(loaded.model)
        if checkpointing:
            enable_gradient_checkpointing(model)
        model.train()
        batch = collate_train([encoder.encode(task, e.sentence, e.label) for e in task.train[:4]], "causal", encoder.pad_id)
        loss, _ = services.task_loss_sum(model, batch)
        loss.backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad})
    assert grads[0].keys() == grads[1].keys() and grads[0]
    for name in grads[0]:
        torch.testing.assert_close(grads[0][name], grads[1][name], rtol=1e-5, atol=1e-7)


def test_length_grouping_keeps_every_example_once_per_epoch():
    from dealcl.train.loop import _epoch_steps

    lengths = [(i * 37) % 101 for i in range(200)]
    order = torch.randperm(200, generator=torch.Generator().manual_seed(0)).tolist()
    steps = _epoch_steps(order, 8, lengths, True, torch.Generator().manual_seed(1))
    assert sorted(i for step in steps for i in step) == list(range(200))
    spread = sum(max(lengths[i] for i in s) - min(lengths[i] for i in s) for s in steps) / len(steps)
    plain = _epoch_steps(order, 8, lengths, False, torch.Generator().manual_seed(1))
    plain_spread = sum(max(lengths[i] for i in s) - min(lengths[i] for i in s) for s in plain) / len(plain)
    assert spread < plain_spread / 4  # grouped batches pad far less


def test_bf16_base_weights_keep_fp32_adapters(toy_data, tmp_path):
    from dealcl.methods import REGISTRY
    from dealcl.runs.session import prepare

    prep = prepare(tiny_run_config(toy_data, model_dtype="bf16"))
    services = TrainingServices(PromptEncoder(prep.loaded.tokenizer, "causal"), "causal", "bf16", torch.device("cpu"))
    method = REGISTRY["seqlora"](prep.method_options, services)
    model = method.prepare_model(prep.loaded.model)
    trainable = {p.dtype for p in model.parameters() if p.requires_grad}
    frozen = {p.dtype for p in model.parameters() if not p.requires_grad}
    assert trainable == {torch.float32} and frozen == {torch.bfloat16}
    results = run_continual(tiny_run_config(toy_data, model_dtype="bf16", precision="bf16"), tmp_path / "r", progress=False)
    assert len(results["accuracy_matrix"]) == 2


@pytest.mark.parametrize("method", ["seqlora", "olora", "gorp", "deal"])
def test_bf16_fast_paths_change_no_loss_and_restore_the_weights(toy_data, tmp_path, monkeypatch, method):
    """Holding frozen linear weights in bf16 and keeping LoRA inputs in bf16 is exact under bf16
    autocast (the casts are the ones autocast does anyway): per-step losses are bit-identical,
    and afterwards every weight is back in fp32 with its old values."""
    import contextlib

    import dealcl.train.loop as loop

    def run(name: str) -> tuple[list[list[float]], dict]:
        config = tiny_run_config(toy_data, method=method, precision="bf16", method_options={"dropout": 0.1})
        run_continual(config, tmp_path / name, progress=False)
        stages = json.loads((tmp_path / name / "efficiency.json").read_text())["stages"]
        return [s["step_losses"] for s in stages], json.loads((tmp_path / name / "results.json").read_text())

    seen: list[dict[str, torch.Tensor]] = []
    real = loop.bf16_fast_paths

    @contextlib.contextmanager
    def watched(model, precision, adapters):
        before = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
        with real(model, precision, adapters):
            assert any(p.dtype == torch.bfloat16 for p in model.parameters())
            yield
        after = dict(model.named_parameters())
        for name, value in before.items():
            assert after[name].dtype == value.dtype and torch.equal(after[name], value), name
        seen.append(before)

    monkeypatch.setattr(loop, "bf16_fast_paths", watched)
    cast_losses, cast_results = run("cast")
    assert seen
    monkeypatch.setattr(loop, "bf16_fast_paths", lambda model, precision, adapters: contextlib.nullcontext())
    plain_losses, plain_results = run("plain")
    assert cast_losses == plain_losses and len(cast_losses[0]) > 0
    assert cast_results["accuracy_matrix"] == plain_results["accuracy_matrix"]


@pytest.mark.parametrize("p", [0.05, 0.1, 0.5])
def test_fast_dropout_is_dropout(p):
    """The faster LoRA dropout drops each element with probability p (checked on 10^6 draws),
    scales the kept ones by 1/(1-p), passes gradients through the same mask, and is the
    identity in evaluation."""
    from dealcl.train.loop import FastDropout

    torch.manual_seed(0)
    dropout = FastDropout(p)
    x = torch.ones(1000, 1000, requires_grad=True)
    y = dropout(x)
    dropped = (y == 0).float().mean().item()
    assert abs(dropped - p) < 5 * (p * (1 - p) / 1e6) ** 0.5
    assert torch.allclose(y[y != 0], torch.tensor(1 / (1 - p)))
    y.sum().backward()
    assert torch.equal(x.grad, y.detach())
    assert (y[:, :500] == 0).float().mean().item() == pytest.approx(p, abs=0.01)  # no biased lanes
    dropout.eval()
    assert torch.equal(dropout(x), x)


def test_training_swaps_in_the_fast_dropout_on_lora_modules_only(toy_data):
    from dealcl.methods import REGISTRY
    from dealcl.train.loop import FastDropout, use_fast_dropout

    loaded = load_model("tiny-t5")
    services = TrainingServices(PromptEncoder(loaded.tokenizer, loaded.arch), loaded.arch, "fp32", torch.device("cpu"))
    method = REGISTRY["seqlora"](REGISTRY["seqlora"].config_class(dropout=0.1), services)
    model = method.prepare_model(loaded.model)
    from dealcl.methods import Stage

    method.on_task_start(model, Stage(1, "toyA", [load_task("toyA", toy_data)]))
    use_fast_dropout(method.adapter_modules(model))
    kinds = {name: type(m) for name, m in model.named_modules() if isinstance(m, torch.nn.Dropout)}
    assert any(k is FastDropout for k in kinds.values())
    assert all((k is FastDropout) == ("lora_dropout" in name) for name, k in kinds.items())
