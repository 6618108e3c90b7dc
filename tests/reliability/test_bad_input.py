"""Every mistake a user can make: exit code 2, one `error:` line naming the culprit, no traceback,
and no output directory left behind (or an existing one left untouched)."""
from __future__ import annotations

import hashlib
import json
import shutil
import struct
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import write_toy_benchmark
from dealcl.cli import main


def _tree(path: Path) -> dict[str, str]:
    if not path.exists():
        return {}
    return {str(p.relative_to(path)): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(path.rglob("*")) if p.is_file()}


def _data(tmp: Path) -> Path:
    return write_toy_benchmark(tmp / "data", n_train=8, n_test=4)


def _run_args(tmp: Path, *extra: str, tasks: str = "toyA,toyB") -> list[str]:
    return ["run", "--tasks", tasks, "--model", "tiny-llama", "--data", str(tmp / "data"), "--output", str(tmp / "out"),
            "--quiet", "--precision", "fp32", *extra]


def _write(path: Path, content: bytes | str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(content if isinstance(content, bytes) else content.encode())
    return path


def _custom_task(tmp: Path, train: str = "sentence,label\nhello there,yes\n", ext: str = "csv") -> Path:
    folder = tmp / "mytask"
    _write(folder / f"train.{ext}", train)
    _write(folder / "test.csv", "sentence,label\nhi,yes\n")
    _write(folder / "labels.json", json.dumps(["yes", "no"]))
    return folder


def _finished_run(tmp: Path) -> None:
    assert main(_run_args(tmp, "--train-per-task", "4", "--test-per-task", "2")) == 0


# Each case: (id, setup(tmp) -> argv, text the error line must contain)
CASES = [
    ("truncated-json", lambda t: (_write(t / "data/TC/toyA/train.json", '[{"sentence": "a", "lab'), _run_args(t))[1], "train.json"),
    ("wrong-top-level-type", lambda t: (_write(t / "data/TC/toyA/train.json", '{"sentence": "a"}'), _run_args(t))[1], "train.json"),
    ("record-without-sentence", lambda t: (_write(t / "data/TC/toyA/train.json", '[{"label": "apple"}]'), _run_args(t))[1], "sentence"),
    ("record-without-label", lambda t: (_write(t / "data/TC/toyA/train.json", '[{"sentence": "x"}]'), _run_args(t))[1], "label"),
    ("label-not-in-labels-json", lambda t: (_write(t / "data/TC/toyA/train.json", '[{"sentence": "x", "label": "kiwi"}]'), _run_args(t))[1], "kiwi"),
    ("empty-task", lambda t: (_write(t / "data/TC/toyA/train.json", "[]"), _run_args(t))[1], "toyA"),
    ("labels-json-not-a-list", lambda t: (_write(t / "data/TC/toyA/labels.json", '"apple"'), _run_args(t))[1], "labels.json"),
    ("non-utf8-data", lambda t: (_write(t / "data/TC/toyA/train.json", b'[{"sentence": "caf\xe9", "label": "apple"}]'), _run_args(t))[1], "train.json"),
    ("csv-missing-column", lambda t: _run_args(t, tasks=str(_custom_task(t, train="sentence,labl\nhi,yes\n"))), "label"),
    ("unknown-task", lambda t: _run_args(t, tasks="toyA,nosuchtask"), "nosuchtask"),
    ("unknown-benchmark", lambda t: ["run", "--benchmark", "nosuchbench", "--data", str(t / "data"), "--output", str(t / "out")], "nosuchbench"),
    ("unknown-order", lambda t: ["run", "--benchmark", "standard", "--order", "9", "--data", str(t / "data"), "--output", str(t / "out")], "9"),
    ("unknown-method", lambda t: _run_args(t, "--method", "nosuchmethod"), "nosuchmethod"),
    ("unknown-method-file", lambda t: _run_args(t, "--method", str(t / "missing.py") + ":Mine"), "missing.py"),
    ("unknown-method-option", lambda t: _run_args(t, "method.bogus_option=1"), "bogus_option"),
    ("unknown-yaml-key", lambda t: _run_args(t, "--config", str(_write(t / "c.yaml", "learning_rate: 0.1\n"))), "learning_rate"),
    ("negative-lr-yaml", lambda t: _run_args(t, "--config", str(_write(t / "c.yaml", "lr: -0.001\n"))), "lr"),
    ("string-batch-size-yaml", lambda t: _run_args(t, "--config", str(_write(t / "c.yaml", "batch_size: eight\n"))), "batch_size"),
    ("invalid-yaml", lambda t: _run_args(t, "--config", str(_write(t / "c.yaml", "lr: [1, 2\n"))), "c.yaml"),
    ("override-without-equals", lambda t: _run_args(t, "lr"), "lr"),
    ("unknown-flag", lambda t: _run_args(t, "--bogus-flag"), "--bogus-flag"),
    ("zero-test-cap", lambda t: _run_args(t, "--test-per-task", "0"), "test_per_task"),
    ("bad-precision", lambda t: _run_args(t, "--precision", "fp8"), "precision"),
    ("validation-split-without-held-out", lambda t: _run_args(t, "eval_split=validation"), "--val-per-task"),
    ("unknown-eval-split", lambda t: _run_args(t, "eval_split=dev"), "eval_split"),
    ("task-epochs-unknown-task", lambda t: _run_args(t, "task_epochs={MNLI: 2}"), "MNLI"),
    ("model-path-missing", lambda t: _run_args(t, "--model", str(t / "nosuchmodel")), "nosuchmodel"),
    ("model-dir-not-a-model", lambda t: (_write(t / "notamodel/readme.txt", "hi"), _run_args(t, "--model", str(t / "notamodel")))[1], "notamodel"),
    ("gguf-not-gguf", lambda t: _run_args(t, "--model", str(_write(t / "fake.gguf", b"NOPE" + b"\0" * 64))), "fake.gguf"),
    # GGUF header: magic, version uint32, tensor count and metadata count uint64, little-endian.
    ("gguf-truncated-header", lambda t: _run_args(t, "--model", str(_write(t / "short.gguf", b"GGUF" + struct.pack("<I", 3) + b"\0\0"))),
     "short.gguf is not a usable GGUF file: its header is truncated"),
    ("gguf-no-tensors", lambda t: _run_args(t, "--model", str(_write(t / "empty.gguf", b"GGUF" + struct.pack("<IQQ", 3, 0, 0)))),
     "empty.gguf is not a usable GGUF file: it holds no tensors"),
    ("gguf-unknown-version", lambda t: _run_args(t, "--model", str(_write(t / "v9.gguf", b"GGUF" + struct.pack("<IQQ", 9, 1, 1) + b"\0" * 64))),
     "GGUF version 9"),
    ("gguf-counts-past-end", lambda t: _run_args(t, "--model", str(_write(t / "cut.gguf", b"GGUF" + struct.pack("<IQQ", 3, 200, 20) + b"\0" * 64))),
     "cut.gguf is not a usable GGUF file: truncated"),
    ("gguf-damaged-metadata", lambda t: _run_args(t, "--model", str(_write(t / "bad.gguf", b"GGUF" + struct.pack("<IQQ", 3, 1, 1) + b"\xff" * 200))),
     "bad.gguf"),
    ("output-holds-other-config", lambda t: (_finished_run(t), _run_args(t, "--train-per-task", "4", "--test-per-task", "2", "--lr", "0.5"))[1], "lr"),
    ("output-holds-other-things", lambda t: (_write(t / "out/notes.txt", "mine"), _run_args(t))[1], "out"),
    ("resume-not-a-run", lambda t: ["resume", str(t / "data")], "data"),
    ("predict-wrong-format", lambda t: (_finished_run(t), ["predict", str(t / "out"), "--input", str(_write(t / "in.json", '{"not": "a list"}'))])[1], "in.json"),
    ("report-not-a-run", lambda t: ["report", str(t / "data")], "data"),
    ("compare-orders-not-numbers", lambda t: ["compare", "--benchmark", "standard", "--orders", "1,two", "--methods",
                                              "seqlora", "--data", str(t / "data"), "--output", str(t / "out")], "--orders"),
    ("num-processes-zero", lambda t: _run_args(t, "--num-processes", "0"), "--num-processes"),
    # The four cases of issue 16 (tracebacks or silent acceptance before the declared domains and path checks).
    ("output-under-a-file", lambda t: (_write(t / "file", "mine"), _run_args(t, "--output", str(t / "file" / "run")))[1],
     "cannot be created"),
    ("output-on-a-special-file-system", lambda t: _run_args(t, "--output", "/proc/dealcl-test/run"), "/proc"),
    ("export-to-a-file", lambda t: (_finished_run(t), _write(t / "file", "mine"),
                                    ["export", str(t / "out"), "--to", str(t / "file")])[2], "is a file"),
    ("method-rank-zero", lambda t: _run_args(t, "method.rank=0"), "'method.rank' must be in [1, 65536], got 0"),
    ("export-destination-not-empty", lambda t: (_finished_run(t), _write(t / "dest/x.txt", "mine"),
                                                ["export", str(t / "out"), "--to", str(t / "dest")])[2], "dest"),
]


@pytest.mark.parametrize("setup,expected", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_bad_input_is_one_error_line_and_exit_2(tmp_path, capsys, setup, expected):
    _data(tmp_path)
    argv = setup(tmp_path)
    capsys.readouterr()
    out_before = _tree(tmp_path / "out")
    code = main(argv)
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 2, err
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    assert "Traceback" not in err
    assert expected in lines[0], lines[0]
    assert _tree(tmp_path / "out") == out_before  # nothing half-written, an existing run untouched


def test_at_least_25_cases():
    assert len(CASES) >= 25


def test_real_process_prints_one_line_and_exits_2(tmp_path):
    _data(tmp_path)
    proc = subprocess.run([sys.executable, "-m", "dealcl", *_run_args(tmp_path, "--method", "nosuchmethod")],
                          capture_output=True, text=True)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [proc.stderr.strip()] and proc.stderr.startswith("error: ")
    assert not (tmp_path / "out").exists()


def test_real_process_refuses_a_truncated_gguf_header(tmp_path):
    """The case that ended in a struct.error traceback under transformers 5.24: one line, exit 2."""
    _data(tmp_path)
    fake = _write(tmp_path / "x.gguf", b"GGUF" + struct.pack("<I", 3) + b"\0\0")
    proc = subprocess.run([sys.executable, "-m", "dealcl", *_run_args(tmp_path, "--model", str(fake))],
                          capture_output=True, text=True)
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.strip().splitlines() == [f"error: {fake} is not a usable GGUF file: its header is truncated (10 bytes)"]
    assert not (tmp_path / "out").exists()
