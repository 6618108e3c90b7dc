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


@pytest.mark.parametrize("method,reason", [("deal", "MLP"), ("pertask", "own adapter")])
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
