"""Recipes: upstream's settings as data, applied under the user's own flags, recorded in run.yaml."""
from __future__ import annotations

import dataclasses

import pytest
import yaml

import dealcl.runs.session as session
from conftest import tiny_run_config
from dealcl.cli import main
from dealcl.data.benchmarks import BENCHMARKS
from dealcl.errors import UserError
from dealcl.methods import REGISTRY
from dealcl.recipes import all_recipes, resolve_recipe
from dealcl.runs.config import apply_values, build_config, method_config, stage_overrides, validate
from dealcl.runs.config import recipe_record
from dealcl.runs.driver import run_continual
from dealcl.runs.session import check_task_overrides

# scripts/long.sh of cmnfriend/O-LoRA@07117e1 (gorp_olora_spec.md §2.4): task → (λ1, λ2).
OLORA_LONG_LAMBDAS = {
    "yelp": (0, 0), "amazon": (0.5, 0), "MNLI": (0.5, 0), "CB": (0.5, 0), "COPA": (0.5, 0.1), "QQP": (0.5, 0.1),
    "RTE": (0.5, 0.3), "IMDB": (0.5, 0), "SST-2": (0.5, 0.1), "dbpedia": (5, 0), "agnews": (5, 0),
    "yahoo": (5, 0.1), "MultiRC": (5, 0), "BoolQA": (5, 0.1), "WiC": (5, 0.3),
}


@pytest.mark.parametrize("recipe", all_recipes(), ids=lambda r: r.name)
def test_every_recipe_applies_to_each_of_its_methods(recipe):
    orders = recipe.orders or [None]
    for method in recipe.methods:
        assert method in REGISTRY
        for order in orders:
            sequence = BENCHMARKS[recipe.benchmark][order]
            config = apply_values(dataclasses.replace(tiny_run_config("."), method=method, benchmark=recipe.benchmark,
                                                      order=order, tasks=None, method_options={}),
                                  recipe.settings, source=recipe.name)
            config.task_overrides = recipe.overrides_for(sequence)
            validate(config)
            method_config(REGISTRY[method].config_class, config.method_options, method)
            check_task_overrides(config, sequence, REGISTRY[method])  # per-task options allowed, values valid
            assert resolve_recipe("upstream", method, recipe.benchmark, order, recipe.family).name == recipe.name
    assert recipe.source or recipe.basis.startswith(("upstream", "GORP's")), "say why there is no upstream file"


def test_every_main_method_has_a_recipe_for_both_families_on_standard_and_long():
    for method in ("olora", "inclora", "gorp", "deal", "deal-code"):
        for benchmark, orders in (("standard", (1, 2, 3)), ("long", (4, 5, 6))):
            for family in ("t5", "llama"):
                for order in orders:
                    assert resolve_recipe("upstream", method, benchmark, order, family)


def fake_benchmark(root, tasks: dict[str, str]):
    """A CL_Benchmark folder with the real task names (and types), two records each."""
    import json

    for name, task_type in tasks.items():
        folder = root / task_type / name
        folder.mkdir(parents=True)
        for split in ("train", "test", "dev"):
            (folder / f"{split}.json").write_text(json.dumps([{"sentence": "a b", "label": "x"}] * 2))
        (folder / "labels.json").write_text(json.dumps(["x", "y"]))
    (root / "instruction_config.json").write_text(json.dumps(
        {t: [{"instruction_type": "zero-shot", "instruction": "Pick.\n"}] for t in set(tasks.values())}))
    return root


LONG_TYPES = {"yelp": "SC", "amazon": "SC", "MNLI": "NLI", "CB": "NLI", "COPA": "COPA", "QQP": "QQP", "RTE": "NLI",
              "IMDB": "SC", "SST-2": "SC", "dbpedia": "TC", "agnews": "TC", "yahoo": "TC", "MultiRC": "MultiRC",
              "BoolQA": "BoolQA", "WiC": "WiC"}


def test_olora_long_order6_run_yaml_has_upstreams_lambdas_per_task(tmp_path, capsys):
    out = tmp_path / "o6"
    data = fake_benchmark(tmp_path / "CL_Benchmark", LONG_TYPES)
    args = ["run", "--benchmark", "long", "--order", "6", "--method", "olora", "--recipe", "upstream",
            "--model", "tiny-t5", "--train-per-task", "1", "--test-per-task", "1", "--output", str(out), "--quiet",
            "--data", str(data)]
    assert main(args) == 0
    recorded = yaml.safe_load((out / "run.yaml").read_text())
    assert recorded["config"]["recipe"] == "olora-long-t5"
    effective = recorded["effective"]
    assert effective["recipe"]["source"].endswith("scripts/long.sh (order 6)")
    assert effective["recipe"]["replaced_by_user"] == []
    per_task = {row["task"]: row for row in effective["per_task"]}
    assert list(per_task) == list(OLORA_LONG_LAMBDAS)
    for task, (lambda1, lambda2) in OLORA_LONG_LAMBDAS.items():
        assert per_task[task]["method_options"] == {"lambda1": lambda1, "lambda2": lambda2}
        assert per_task[task]["epochs"] == (2 if task == "MNLI" else 1)
        assert per_task[task]["lr"] == 1e-3
    assert effective["global_batch"] == 64


def test_the_users_flags_win_over_the_recipe_on_every_stage():
    flags = dict(benchmark="standard", order=1, method="olora", model="tiny-llama", recipe="upstream", lr="5e-4")
    config = build_config(None, flags, ["method.lambda1=0.1"])
    assert config.recipe == "olora-standard-llama"
    assert config.lr == 5e-4 and config.method_options["lambda1"] == "0.1"
    assert config.grad_accum == 8  # from the recipe
    # The recipe's lr for stages 2- is replaced too: the user asked for one rate.
    assert stage_overrides(config, 2, ["amazon"]) == {}
    record = recipe_record(config)
    assert "lr" in record["replaced_by_user"] and "task_overrides.stages 2-.lr" in record["replaced_by_user"]
    assert "method.lambda1" in record["replaced_by_user"]
    plain = build_config(None, {k: v for k, v in flags.items() if k != "lr"}, [])
    assert plain.lr == 1e-3 and stage_overrides(plain, 1, ["dbpedia"]) == {}
    assert stage_overrides(plain, 2, ["amazon"]) == {"lr": 1e-4} == stage_overrides(plain, 4, ["agnews"])


@pytest.mark.parametrize("flags, overrides, message", [
    (dict(recipe="no-such"), [], "unknown recipe 'no-such'"),
    (dict(recipe="olora-standard-t5", method="seqlora"), [], "is for olora, not method seqlora"),
    (dict(recipe="olora-standard-t5", method="olora", model="tiny-llama"), [], "is for t5-family models"),
    (dict(recipe="olora-standard-t5", method="olora", benchmark="long", order=6), [], "not long"),
    (dict(recipe="upstream", method="olora", tasks="toyA,toyB"), [], "needs --benchmark"),
    (dict(recipe="upstream", method="mtl", benchmark="tc", model="tiny-t5"), [], "no recipe for method mtl"),
])
def test_a_recipe_that_does_not_fit_is_one_error(flags, overrides, message):
    values = dict(benchmark="standard", order=1, model="tiny-t5", method="olora")
    values.update(flags)
    if "tasks" in flags:
        values.pop("benchmark"), values.pop("order")
    with pytest.raises(UserError, match=message):
        build_config(None, values, overrides)


def test_per_task_values_reach_the_stage_they_name(toy_data, tmp_path, monkeypatch):
    seen = []
    real_train = session.train_stage

    def recording(model, method, stage, items, settings, services, progress=True):
        seen.append((stage.name, settings.lr, settings.epochs, method.config.lambda1))
        return real_train(model, method, stage, items, settings, services, progress)

    monkeypatch.setattr(session, "train_stage", recording)
    config = tiny_run_config(toy_data, method="olora", task_overrides={
        "toyB": {"method.lambda1": 7.0, "epochs": 2}, "stages 2-": {"lr": 1e-3}})
    run_continual(validate(config), tmp_path / "run", progress=False)
    assert seen == [("toyA", 5e-3, 1, 0.5), ("toyB", 1e-3, 2, 7.0)]


@pytest.mark.parametrize("overrides, message", [
    ({"toyB": {"method.rank": 4}}, "option 'rank' cannot vary per task"),
    ({"MNLI": {"epochs": 2}}, "not in the sequence: MNLI"),
    ({"stages 3-1": {"lr": 1e-3}}, "not a stage selector"),
    ({"toyB": {"warmup": 1}}, "unknown task_overrides.toyB key 'warmup'"),
    ({"toyB": {"epochs": 0}}, "must be positive"),
    ({"toyB": {"method.lambda1": -1}}, "'method.lambda1' must not be negative"),
])
def test_bad_per_task_values_stop_before_any_stage(toy_data, tmp_path, overrides, message):
    with pytest.raises(UserError, match=message):
        config = validate(tiny_run_config(toy_data, method="olora", task_overrides=overrides))
        run_continual(config, tmp_path / "run", progress=False)
    assert not (tmp_path / "run").exists()


def test_dealcl_recipes_lists_every_recipe_with_its_upstream_file(capsys):
    assert main(["recipes"]) == 0
    out = capsys.readouterr().out
    for recipe in all_recipes():
        assert recipe.name in out
    assert "scripts/long.sh (order 6)" in out and "no upstream settings" in out
    assert main(["recipes", "gorp-long56-t5"]) == 0
    shown = capsys.readouterr().out
    assert "method.galore_rank = 32" in shown and "[MNLI] epochs = 2" in shown


def test_compare_gives_each_method_its_own_recipe(tmp_path, capsys):
    data = fake_benchmark(tmp_path / "CL_Benchmark", {"dbpedia": "TC", "amazon": "SC", "yahoo": "TC", "agnews": "TC"})
    out = tmp_path / "cmp"
    args = ["compare", "--benchmark", "standard", "--orders", "1", "--methods", "olora,gorp", "--recipe", "upstream",
            "--model", "tiny-llama", "--train-per-task", "1", "--test-per-task", "1", "--output", str(out), "--quiet",
            "--data", str(data), "--grad-accum", "1"]
    assert main(args) == 0
    for method, recipe, lr in (("olora", "olora-standard-llama", 1e-3), ("gorp", "gorp-standard-llama", 2e-4)):
        recorded = yaml.safe_load((out / f"order1-{method}" / "run.yaml").read_text())
        assert recorded["config"]["recipe"] == recipe and recorded["effective"]["lr"] == lr
        assert recorded["config"]["grad_accum"] == 1  # the user's flag, not the recipe's 8
        assert recorded["effective"]["recipe"]["replaced_by_user"] == ["grad_accum"]


def test_methods_md_has_the_recipe_table():
    from pathlib import Path

    from dealcl.recipes import recipes_markdown

    page = (Path(__file__).resolve().parents[1] / "docs" / "METHODS.md").read_text()
    table = page.split("<!-- recipes:start -->\n", 1)[1].split("<!-- recipes:end -->", 1)[0]
    assert table == recipes_markdown(), "regenerate with `dealcl recipes --markdown`"
