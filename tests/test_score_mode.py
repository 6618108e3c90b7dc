"""`--eval-mode score` picks the label with the highest likelihood, computed with a shared prompt."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from dealcl.data.loading import load_task
from dealcl.eval.score import label_scores, score_answers
from dealcl.models.loading import load_model
from dealcl.prompts import PromptEncoder

NO_AUTOCAST = lambda: torch.autocast("cpu", enabled=False)  # noqa: E731


def brute_force_scores(model, encoder, arch, task, sentence) -> list[float]:
    """Each label scored on its own, with a plain full forward pass and no padding."""
    prompt = encoder.prompt_ids(task, sentence)
    scores = []
    for label in task.labels:
        answer = encoder.label_ids(label) + [encoder.eos_id]
        if arch == "causal":
            ids = torch.tensor([prompt + answer])
            logp = F.log_softmax(model(input_ids=ids).logits[0, len(prompt) - 1 : -1], dim=-1)
        else:
            logp = F.log_softmax(model(input_ids=torch.tensor([prompt]), labels=torch.tensor([answer])).logits[0], dim=-1)
        scores.append(logp.gather(-1, torch.tensor(answer).unsqueeze(-1)).sum().item())
    return scores


@pytest.mark.parametrize("model_name", ["tiny-llama", "tiny-t5"])
def test_score_mode_equals_scoring_each_label_separately(toy_data, model_name):
    loaded = load_model(model_name)
    task = load_task("toyC", toy_data)  # three labels of different token lengths
    encoder = PromptEncoder(loaded.tokenizer, loaded.arch)
    sentences = [e.sentence for e in task.test] + ["a much longer sentence so that the batch needs padding " * 2]
    kwargs = dict(arch=loaded.arch, batch_size=4, device=torch.device("cpu"), autocast=NO_AUTOCAST, progress=False)
    scores = label_scores(loaded.model, encoder, task, sentences, **kwargs)
    with torch.no_grad():
        expected = torch.tensor([brute_force_scores(loaded.model, encoder, loaded.arch, task, s) for s in sentences])
    torch.testing.assert_close(scores, expected, atol=1e-4, rtol=1e-5)
    answers, _ = score_answers(loaded.model, encoder, task, sentences, **kwargs)
    assert answers == [task.labels[i] for i in expected.argmax(dim=-1).tolist()]


def test_eval_mode_score_runs_end_to_end(toy_data, tmp_path):
    from conftest import tiny_run_config
    from dealcl.runs.driver import run_continual

    results = run_continual(tiny_run_config(toy_data, eval_mode="score"), tmp_path / "run", progress=False)
    assert results["invalid_rate_matrix"][-1] == [0.0, 0.0]  # a prediction is always a label
    run_yaml = (tmp_path / "run" / "run.yaml").read_text()
    assert "eval_mode: score" in run_yaml
