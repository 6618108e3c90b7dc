"""The continual driver end to end on tiny random models, both architectures."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

from conftest import tiny_run_config
from dealcl.data.loading import load_task
from dealcl.eval.generate import generate_answers
from dealcl.models.loading import load_model
from dealcl.runs.driver import run_continual
from dealcl.prompts import PromptEncoder


@pytest.mark.parametrize("model", ["tiny-llama", "tiny-t5"])
def test_seqlora_run_writes_the_run_directory(toy_data, tmp_path, model):
    out = tmp_path / "run"
    results = run_continual(tiny_run_config(toy_data, model=model), out, progress=False)

    assert (out / "run.yaml").is_file() and (out / "logs" / "train_and_infer.log").is_file()
    for stage in ("1-toyA", "2-toyB"):
        assert (out / "adapters" / stage / "adapter_model.safetensors").is_file()
        predict = json.loads((out / "outputs" / stage / "predict_results.json").read_text())
        assert "predict_exact_match" in predict and "predict_exact_match_for_toyA" in predict
        lines = (out / "outputs" / stage / "predict_eval_predictions.jsonl").read_text().splitlines()
        assert {"Dataset", "sentence", "label", "prediction"} <= set(json.loads(lines[0]))
    assert (out / "outputs" / "0-reference" / "predict_results.json").is_file()

    on_disk = json.loads((out / "results.json").read_text())
    assert on_disk == json.loads(json.dumps(results))
    assert on_disk["task_order"] == ["toyA", "toyB"]
    matrix = on_disk["accuracy_matrix"]
    assert len(matrix) == 2 and matrix[0][1] is None and None not in matrix[1]  # tasks 1..k only
    assert on_disk["average_accuracy"] == pytest.approx(sum(matrix[1]) / 2, abs=1e-3)
    assert on_disk["backward_transfer"] == pytest.approx(matrix[1][0] - matrix[0][0], abs=1e-3)

    efficiency = json.loads((out / "efficiency.json").read_text())
    assert [s["stage"] for s in efficiency["stages"]] == [1, 2]
    assert all(s["trainable_parameters"] > 0 and s["train_examples"] == 24 for s in efficiency["stages"])

    run = yaml.safe_load((out / "run.yaml").read_text())
    files = run["provenance"]["data_files"]["toyA"]
    assert len(files["train"]["sha256"]) == 64 and "torch" in run["provenance"]["packages"]


def test_same_config_and_seed_give_identical_results(toy_data, tmp_path):
    a = run_continual(tiny_run_config(toy_data), tmp_path / "a", progress=False)
    b = run_continual(tiny_run_config(toy_data), tmp_path / "b", progress=False)
    assert (tmp_path / "a" / "results.json").read_bytes() == (tmp_path / "b" / "results.json").read_bytes()
    for stage in ("1-toyA", "2-toyB"):
        name = "predict_eval_predictions.jsonl"
        assert (tmp_path / "a" / "outputs" / stage / name).read_bytes() == (tmp_path / "b" / "outputs" / stage / name).read_bytes()
    assert a == b


def _cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "dealcl", *args]


def test_resume_after_sigkill_gives_identical_results(toy_data, tmp_path):
    common = ["run", "--tasks", "toyA,toyB,toyC", "--model", "tiny-llama", "--data", str(toy_data), "--precision", "fp32",
              "--batch-size", "4", "--lr", "5e-3", "--seed", "1", "--quiet", "method.dropout=0.0", "epochs=2"]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    whole = tmp_path / "whole"
    subprocess.run(_cli(*common, "--output", str(whole)), check=True, env=env, capture_output=True)

    killed = tmp_path / "killed"
    proc = subprocess.Popen(_cli(*common, "--output", str(killed)), env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    # Kill it once stage 1 is finished, while stage 2 is in progress.
    while not (killed / "outputs" / "1-toyA" / "manifest.json").exists():
        assert proc.poll() is None, "run ended before it could be killed"
        assert time.time() < deadline
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (killed / "outputs" / "3-toyC").exists()

    resumed = subprocess.run(_cli("resume", str(killed), "--quiet"), env=env, capture_output=True, text=True)
    assert resumed.returncode == 0, resumed.stderr
    assert "resuming" in resumed.stderr
    assert (killed / "results.json").read_bytes() == (whole / "results.json").read_bytes()


@pytest.mark.parametrize("model", ["tiny-llama", "tiny-t5"])
def test_batched_generation_equals_one_at_a_time(toy_data, model):
    loaded = load_model(model)
    task = load_task("toyA", toy_data)
    encoder = PromptEncoder(loaded.tokenizer, loaded.arch)
    sentences = [e.sentence for e in task.test] + ["a much longer sentence to force some padding " * 3]
    kwargs = dict(arch=loaded.arch, device=torch.device("cpu"), autocast=lambda: torch.autocast("cpu", enabled=False),
                  progress=False)
    batched, _ = generate_answers(loaded.model, encoder, task, sentences, batch_size=16, **kwargs)
    single = [generate_answers(loaded.model, encoder, task, [s], batch_size=1, **kwargs)[0][0] for s in sentences]
    assert batched == single
    assert any(batched)  # a random model still says something


def test_shared_prefix_generation_equals_plain_generation(toy_data):
    loaded = load_model("tiny-llama")
    task = load_task("toyC", toy_data)
    encoder = PromptEncoder(loaded.tokenizer, loaded.arch)
    sentences = [e.sentence for e in task.test] + ["a much longer sentence to force some padding " * 3]
    kwargs = dict(arch="causal", device=torch.device("cpu"), autocast=lambda: torch.autocast("cpu", enabled=False),
                  progress=False, batch_size=4)
    shared, _ = generate_answers(loaded.model, encoder, task, sentences, share_prefix=True, **kwargs)
    plain, _ = generate_answers(loaded.model, encoder, task, sentences, share_prefix=False, **kwargs)
    single = [generate_answers(loaded.model, encoder, task, [s], share_prefix=False, **kwargs)[0][0] for s in sentences]
    assert shared == plain == single
    assert any(shared)


def test_predict_answers_new_inputs_with_the_final_model(toy_data, tmp_path, capsys):
    from dealcl.cli import main

    out = tmp_path / "run"
    run_continual(tiny_run_config(toy_data), out, progress=False)
    inputs = tmp_path / "in.jsonl"
    inputs.write_text('{"sentence": "the good cat"}\n{"sentence": "a bad sun"}\n')
    capsys.readouterr()
    assert main(["predict", str(out), "--input", str(inputs), "--task", "toyB"]) == 0
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [r["sentence"] for r in rows] == ["the good cat", "a bad sun"] and all("prediction" in r for r in rows)
    # With labels the predictions are scored; they equal the run's own predictions on its test set.
    test = json.loads((toy_data / "SC" / "toyB" / "test.json").read_text())
    labelled = tmp_path / "test.json"
    labelled.write_text(json.dumps(test))
    assert main(["predict", str(out), "--input", str(labelled), "--task", "toyB", "--output", str(tmp_path / "p.jsonl")]) == 0
    assert "exact match" in capsys.readouterr().err
    ours = [json.loads(l)["prediction"] for l in (tmp_path / "p.jsonl").read_text().splitlines()]
    run_rows = [json.loads(l) for l in (out / "outputs" / "2-toyB" / "predict_eval_predictions.jsonl").read_text().splitlines()]
    assert ours == [r["prediction"] for r in run_rows if r["Dataset"] == "toyB"]
