"""`dealcl export`: the exported model gives exactly the outputs of the run's final model."""
from __future__ import annotations

import pytest
import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM

from conftest import tiny_run_config
from dealcl.cli import main
from dealcl.models.loading import load_model
from dealcl.runs.driver import run_continual
from dealcl.runs.predict import load_final_model

IDS = torch.tensor([[5, 40, 77, 90, 12, 33, 61]])


def _final_logits(run_dir):
    final = load_final_model(run_dir)
    with torch.no_grad():
        return final.model(input_ids=IDS).logits


@pytest.mark.parametrize("method", ["seqlora", "olora"])
def test_adapter_export_loads_into_stock_peft(toy_data, tmp_path, method):
    run_continual(tiny_run_config(toy_data, method=method), tmp_path / "run", progress=False)
    assert main(["export", str(tmp_path / "run"), "--to", str(tmp_path / "out")]) == 0
    base = load_model("tiny-llama").model
    exported = PeftModel.from_pretrained(base, tmp_path / "out").eval()
    with torch.no_grad():
        ours = exported(input_ids=IDS).logits
    torch.testing.assert_close(ours, _final_logits(tmp_path / "run"), rtol=1e-5, atol=1e-5)
    if method == "olora":  # two tasks of rank 8 summed into one rank-16 adapter
        assert exported.peft_config["default"].r == 16


def test_merged_export_loads_with_transformers(toy_data, tmp_path):
    run_continual(tiny_run_config(toy_data, method="gorp"), tmp_path / "run", progress=False)
    assert main(["export", str(tmp_path / "run"), "--to", str(tmp_path / "out")]) == 0
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "out").eval()
    with torch.no_grad():
        ours = merged(input_ids=IDS).logits
    torch.testing.assert_close(ours, _final_logits(tmp_path / "run"), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("method,reason", [("pertask", "own adapter")])
def test_unexportable_methods_are_one_error_line(toy_data, tmp_path, capsys, method, reason):
    run_continual(tiny_run_config(toy_data, method=method), tmp_path / "run", progress=False)
    capsys.readouterr()
    assert main(["export", str(tmp_path / "run"), "--to", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error:") and reason in err[0]
    assert not (tmp_path / "out").exists()


def test_export_kind_is_detected_for_methods_that_declare_nothing():
    """A plugin without export_as: plain LoRA → merged; extra modules or inactive adapters → refused."""
    from dealcl.methods import REGISTRY
    from dealcl.methods.base import ContinualMethod, LoraOptions
    from dealcl.methods._lora import TaskAdapters, lora_config
    from dealcl.runs.export import export_kind

    class Plugin(ContinualMethod):
        name = "plugin"

    method = Plugin.__new__(Plugin)
    plain = load_model("tiny-llama").model
    assert export_kind(method, plain)[0] == "merged"
    adapters = TaskAdapters(lora_config(plain, LoraOptions(), 4, 8.0), 0)
    model = adapters.wrap(plain)
    adapters.add(model)
    adapters.activate(model, ["task1", "task2"], None)
    assert export_kind(method, model)[0] == "merged"
    adapters.activate(model, ["task2"], None)
    kind, reason = export_kind(method, model)
    assert kind is None and "inactive" in reason
    adapters.activate(model, ["task1", "task2"], None)
    model.base_model.model.model.extra = torch.nn.Linear(2, 2)
    kind, reason = export_kind(method, model)
    assert kind is None and "besides" in reason
    # declared attributes win over detection
    pertask = REGISTRY["pertask"]
    assert export_kind(pertask.__new__(pertask), model) == (None, pertask.export_refusal)


def test_non_empty_destination_is_refused_before_any_work(tmp_path):
    from dealcl.errors import UserError
    from dealcl.runs.export import export_run

    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep.txt").write_text("x")
    with pytest.raises(UserError, match="not empty"):
        export_run(tmp_path / "no-such-run", tmp_path / "out")
    assert (tmp_path / "out" / "keep.txt").read_text() == "x"


def test_deal_export_is_the_base_model_plus_a_standalone_loader(toy_data, tmp_path):
    """deal (MLP between A and B after task 2): the exported folder rebuilds the final model
    exactly with transformers + the copied deal_loader.py, which imports no dealcl code."""
    import ast
    import importlib.util

    run_continual(tiny_run_config(toy_data, method="deal"), tmp_path / "run", progress=False)
    assert main(["export", str(tmp_path / "run"), "--to", str(tmp_path / "out")]) == 0
    loader_path = tmp_path / "out" / "deal_loader.py"
    imported = {alias.name.split(".")[0] for node in ast.walk(ast.parse(loader_path.read_text()))
                if isinstance(node, (ast.Import, ast.ImportFrom))
                for alias in (node.names if isinstance(node, ast.Import) else [ast.alias(node.module or "")])}
    assert imported <= {"__future__", "json", "pathlib", "torch", "safetensors"}, imported
    spec = importlib.util.spec_from_file_location("deal_loader_under_test", loader_path)
    loader = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(loader)
    model = loader.load_deal(AutoModelForCausalLM.from_pretrained(tmp_path / "out"), tmp_path / "out")
    assert sum(isinstance(m, loader.DealLinear) and m.has_mlp for m in model.modules()) > 0
    with torch.no_grad():
        ours = model(input_ids=IDS).logits
    torch.testing.assert_close(ours, _final_logits(tmp_path / "run"), rtol=1e-5, atol=1e-5)


def test_export_records_prompts_labels_and_tasks_and_answers_like_predict(tmp_path, capsys):
    """The README's recipe: stock transformers + PEFT, prompted from dealcl_export.json alone,
    greedy decoding, gives the answers `dealcl predict` gives (predict may stop earlier once no
    label can match, so its answer is a prefix of the full one)."""
    import json

    from transformers import AutoTokenizer

    from dealcl.data.toy import write_learnable_benchmark
    from dealcl.prompts import format_prompt

    # Tasks a tiny model learns in seconds, so that its answers are labels, not empty strings.
    data = write_learnable_benchmark(tmp_path / "CL_Benchmark", n_train=200)
    run_continual(tiny_run_config(data, tasks=["pickA", "pickB"], lr=1e-2, epochs=3), tmp_path / "run", progress=False)
    assert main(["export", str(tmp_path / "run"), "--to", str(tmp_path / "out")]) == 0
    record = json.loads((tmp_path / "out" / "dealcl_export.json").read_text())
    assert record["tasks"] == ["pickA", "pickB"] and record["kind"] == "adapter"
    final = load_final_model(tmp_path / "run")
    for task in final.prep.tasks:
        entry = record["per_task"][task.name]
        assert entry["labels"] == task.labels
        assert entry["prompt_template"] == format_prompt(task, "{sentence}")
    sentences = ["q c z k", "m w d x", "x c q m"]
    (tmp_path / "in.jsonl").write_text("".join(json.dumps({"sentence": s}) + "\n" for s in sentences))
    capsys.readouterr()
    assert main(["predict", str(tmp_path / "run"), "--input", str(tmp_path / "in.jsonl"), "--task", "pickB"]) == 0
    predicted = [json.loads(line)["prediction"] for line in capsys.readouterr().out.splitlines()]
    assert len(predicted) == 3 and any(p.strip() for p in predicted)  # a prefix test of "" would prove nothing

    tokenizer = AutoTokenizer.from_pretrained(tmp_path / "out")
    model = PeftModel.from_pretrained(load_model("tiny-llama").model, tmp_path / "out").eval()
    template = record["per_task"]["pickB"]["prompt_template"]
    for sentence, theirs in zip(sentences, predicted):
        ids = tokenizer(template.replace("{sentence}", sentence), return_tensors="pt")
        out = model.generate(**ids, max_new_tokens=record["answer"]["max_new_tokens"], do_sample=False,
                             pad_token_id=tokenizer.pad_token_id)
        answer = tokenizer.decode(out[0, ids["input_ids"].shape[1]:], skip_special_tokens=True)
        assert answer.strip().startswith(theirs.strip()), (answer, theirs)
