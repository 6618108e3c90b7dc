"""`dealcl sweep`: learning rates chosen on examples held out of the training files."""
from __future__ import annotations

import json

import dealcl.runs.session as session
from dealcl.cli import main
from dealcl.data.loading import load_task_with_validation


def _args(data, out, *extra):
    return ["sweep", "--tasks", "toyA,toyB", "--method", "seqlora", "--model", "tiny-llama", "--data", str(data),
            "--output", str(out), "--precision", "fp32", "--batch-size", "4", "--train-per-task", "8",
            "--test-per-task", "6", "--quiet", "--lrs", "1e-3,5e-3", *extra]


def test_sweep_scores_held_out_examples_and_picks_the_best_rate(toy_data, tmp_path, monkeypatch, capsys):
    out = tmp_path / "sweep"
    assert main(_args(toy_data, out, "--val-per-task", "4")) == 0
    summary = json.loads((out / "sweep.json").read_text())
    assert [r["lr"] for r in summary["runs"]] == [1e-3, 5e-3]
    best = max(summary["runs"], key=lambda r: (r["validation_aa"], -r["lr"]))
    assert summary["chosen_lr"] == best["lr"]
    # Each run was scored on the 4 held-out training examples per task, not on the test set.
    _, held_out = load_task_with_validation("toyA", toy_data, train_per_task=8, test_per_task=6, val_per_task=4)
    predictions = json.loads((out / "lr-0.001" / "outputs" / "2-toyB" / "predictions.json").read_text())
    assert predictions["toyA"]["labels"] == [e.label for e in held_out]
    results = json.loads((out / "lr-0.001" / "results.json").read_text())
    assert results["average_accuracy"] == summary["runs"][0]["validation_aa"]
    assert "(chosen)" in (out / "sweep.md").read_text()
    assert summary["chosen_at_edge"] is True  # two rates: either one is an end of the grid
    assert "end of the grid" in (out / "sweep.md").read_text()

    def no_training(*args, **kwargs):
        raise AssertionError("a finished sweep run was trained again")

    monkeypatch.setattr(session, "train_stage", no_training)
    assert main(_args(toy_data, out, "--val-per-task", "4")) == 0


def test_sweep_without_held_out_examples_is_one_error_line(toy_data, tmp_path, capsys):
    assert main(_args(toy_data, tmp_path / "s")) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error:") and "--val-per-task" in err[0]
    assert not (tmp_path / "s").exists()


def test_sweep_rejects_a_bad_rate_list(toy_data, tmp_path, capsys):
    assert main(_args(toy_data, tmp_path / "s", "--val-per-task", "4", "--lrs", "1e-3,-1")) == 2
    assert "--lrs" in capsys.readouterr().err


def test_a_run_made_before_a_config_key_existed_still_resumes(toy_data, tmp_path, monkeypatch):
    """run.yaml of an older dealcl lacks keys added since (eval_split here); they count as
    their defaults, so the finished run is re-read, not refused as "a different config"."""
    import yaml

    from conftest import tiny_run_config
    from dealcl.runs.driver import run_continual

    config = tiny_run_config(toy_data, train_per_task=4, test_per_task=4)
    run_continual(config, tmp_path / "run", progress=False)
    path = tmp_path / "run" / "run.yaml"
    data = yaml.safe_load(path.read_text())
    del data["config"]["eval_split"]
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    monkeypatch.setattr(session, "train_stage", lambda *a, **k: (_ for _ in ()).throw(AssertionError("retrained")))
    run_continual(config, tmp_path / "run", progress=False)


def test_a_swept_rate_is_the_default_for_its_model_only(monkeypatch):
    from dealcl.methods import REGISTRY

    seqlora, mtl = REGISTRY["seqlora"], REGISTRY["mtl"]
    monkeypatch.setattr(seqlora, "tuned_lrs", {"tiny-llama": 2e-3})
    assert seqlora.lr_for("tiny-llama") == 2e-3
    assert seqlora.lr_for("tiny-t5") == seqlora.default_lr
    assert issubclass(mtl, seqlora) and mtl.lr_for("tiny-llama") == mtl.default_lr  # swept on its own


def test_a_changed_default_rate_does_not_pass_for_the_old_run(toy_data, tmp_path, monkeypatch, capsys):
    """A run made with the old default: re-running with the new default is refused (its
    numbers were made at another rate), `--lr <old rate>` and `dealcl resume` accept it."""
    import yaml

    from dealcl.methods import REGISTRY

    base = ["run", "--tasks", "toyA", "--method", "seqlora", "--model", "tiny-llama", "--data", str(toy_data),
            "--precision", "fp32", "--train-per-task", "4", "--test-per-task", "4", "--quiet"]
    out = tmp_path / "run"
    monkeypatch.setattr(REGISTRY["seqlora"], "tuned_lrs", {"tiny-llama": 1e-3})
    assert main([*base, "--output", str(out)]) == 0
    assert yaml.safe_load((out / "run.yaml").read_text())["effective"]["lr"] == 1e-3
    monkeypatch.setattr(REGISTRY["seqlora"], "tuned_lrs", {"tiny-llama": 2e-3})
    capsys.readouterr()
    assert main([*base, "--output", str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "lr: 0.001 → 0.002" in err[0]
    monkeypatch.setattr(session, "train_stage", lambda *a, **k: (_ for _ in ()).throw(AssertionError("retrained")))
    assert main([*base, "--output", str(out), "--lr", "1e-3"]) == 0
    assert main(["resume", str(out), "--quiet"]) == 0


def test_a_sweep_with_a_bad_sequence_stops_before_its_first_run(toy_data, tmp_path, capsys):
    assert main(_args(toy_data, tmp_path / "s", "--val-per-task", "4", "--benchmark", "standard")) == 2
    captured = capsys.readouterr()
    assert "== lr-" not in captured.out
    err = captured.err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error:")
    assert not (tmp_path / "s").exists()


def test_compare_runs_each_method_at_the_rate_its_sweep_chose(toy_data, tmp_path, capsys):
    sweeps = tmp_path / "sweeps"
    assert main(_args(toy_data, sweeps / "seqlora", "--val-per-task", "4")) == 0
    chosen = json.loads((sweeps / "seqlora" / "sweep.json").read_text())["chosen_lr"]
    compare = ["compare", "--tasks", "toyA,toyB", "--methods", "seqlora,zero-shot", "--model", "tiny-llama",
               "--data", str(toy_data), "--output", str(tmp_path / "cmp"), "--precision", "fp32", "--batch-size", "4",
               "--train-per-task", "8", "--test-per-task", "6", "--quiet", "--lrs-from", str(sweeps)]
    # inclora has no sweep there: refused before any run starts (zero-shot trains nothing).
    with_inclora = [a if a != "seqlora,zero-shot" else "seqlora,zero-shot,inclora" for a in compare]
    assert main(with_inclora) == 2
    assert "no readable sweep for method inclora" in capsys.readouterr().err
    assert not (tmp_path / "cmp").exists()
    assert main(compare) == 0
    import yaml

    recorded = yaml.safe_load((tmp_path / "cmp" / "custom-seqlora" / "run.yaml").read_text())
    assert recorded["effective"]["lr"] == chosen and recorded["config"]["lr"] == chosen
    assert main(compare + ["--lr", "1e-3"]) == 2
    assert "not both" in capsys.readouterr().err
