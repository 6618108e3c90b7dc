"""Loading tasks (CL_Benchmark and custom directories), data-dir discovery, and download errors."""
from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
from pathlib import Path

import pytest

from dealcl.data import download
from dealcl.data.loading import (
    default_data_dir,
    find_task_dir,
    load_instructions,
    load_task,
    load_task_with_validation,
    sha256_file,
)
from dealcl.data.types import Example
from dealcl.errors import UserError

DATA = Path(__file__).resolve().parents[2] / "shared" / "CL_Benchmark"
needs_data = pytest.mark.skipif(not DATA.is_dir(), reason="shared CL_Benchmark not present")


def raw_records(task_type: str, name: str, split: str) -> list[Example]:
    with open(DATA / task_type / name / f"{split}.json", encoding="utf-8") as handle:
        return [Example(r["sentence"], r["label"]) for r in json.load(handle)]


# --- the shared CL_Benchmark --------------------------------------------------------------------

@needs_data
def test_load_instructions_verbatim_first_zero_shot():
    instructions = load_instructions(DATA)
    assert instructions["TC"] == "What is the topic of the following paragraph? Choose one from the option.\n"
    assert set(instructions) == {"NLI", "QQP", "SC", "TC", "BoolQA", "MultiRC", "WiC"}  # COPA has none


@needs_data
def test_find_task_dir():
    assert find_task_dir("MNLI", DATA) == ("NLI", DATA / "NLI" / "MNLI")
    with pytest.raises(UserError) as info:
        find_task_dir("mnli", DATA)
    message = str(info.value)
    assert "'mnli'" in message and "MNLI" in message and "dbpedia" in message and "WiC" in message


@needs_data
def test_mnli_full_test_counts_unknown_labels():
    task = load_task("MNLI", DATA)
    assert (task.name, task.task_type) == ("MNLI", "NLI")
    assert task.labels == ["neutral", "entailment", "contradiction"]
    assert len(task.train) == 3000 and len(task.test) == 7600
    assert task.unknown_test_labels == 131
    assert sum(e.label == "-" for e in task.test) == 131
    assert task.test == raw_records("NLI", "MNLI", "test")
    assert task.files["train"] == str((DATA / "NLI" / "MNLI" / "train.json").resolve())
    assert task.files["labels"] == str((DATA / "NLI" / "MNLI" / "labels.json").resolve())
    assert Path(task.files["instructions"]).name == "instruction_config.json"


@needs_data
def test_every_shared_task_loads():
    for task_type, name in [("TC", "dbpedia"), ("TC", "yahoo"), ("SC", "yelp"), ("COPA", "COPA")]:
        task = load_task(name, DATA)
        assert task.task_type == task_type and task.unknown_test_labels == 0
        assert len(task.test) == len(raw_records(task_type, name, "test"))
    assert load_task("COPA", DATA).instruction == ""


@needs_data
def test_caps_first_take_the_file_prefix():
    task = load_task("CB", DATA, train_per_task=5, test_per_task=3)
    assert task.train == raw_records("NLI", "CB", "train")[:5]
    assert task.test == raw_records("NLI", "CB", "test")[:3]
    big = load_task("CB", DATA, train_per_task=10_000)  # a cap above the size takes everything
    assert len(big.train) == 250


@needs_data
def test_caps_random_are_seeded_stable_and_in_file_order():
    full = raw_records("NLI", "CB", "train")
    a = load_task("CB", DATA, train_per_task=20, sample="random", seed=3)
    b = load_task("CB", DATA, train_per_task=20, sample="random", seed=3)
    c = load_task("CB", DATA, train_per_task=20, sample="random", seed=4)
    assert a.train == b.train and a.train != c.train
    assert a.train != full[:20] and len(a.train) == 20
    positions = [full.index(e) for e in a.train]
    assert positions == sorted(positions)  # kept in file order
    bigger = load_task("CB", DATA, train_per_task=40, sample="random", seed=3)
    assert set(a.train) <= set(bigger.train)  # a larger cap extends the same pick


@needs_data
def test_random_pick_depends_on_task_and_split_not_on_other_tasks():
    alone = load_task("RTE", DATA, train_per_task=10, test_per_task=10, sample="random", seed=1)
    load_task("CB", DATA, train_per_task=10, sample="random", seed=1)  # another task in between
    again = load_task("RTE", DATA, train_per_task=10, test_per_task=10, sample="random", seed=1)
    assert alone.train == again.train and alone.test == again.test
    train_pos = [raw_records("NLI", "RTE", "train").index(e) for e in alone.train]
    test_pos = [raw_records("NLI", "RTE", "test").index(e) for e in alone.test]
    assert train_pos != test_pos  # separate streams per split


@needs_data
def test_validation_first_is_the_next_n_after_the_training_cap():
    full = raw_records("NLI", "CB", "train")
    task, val = load_task_with_validation("CB", DATA, train_per_task=5, val_per_task=3)
    assert task.train == full[:5] and val == full[5:8]
    assert load_task("CB", DATA, train_per_task=5, val_per_task=3).train == full[:5]
    task, val = load_task_with_validation("CB", DATA, val_per_task=10)  # no cap: last 10 held out
    assert task.train == full[:240] and val == full[240:]


@needs_data
def test_validation_random_is_disjoint_from_train():
    full = raw_records("NLI", "CB", "train")
    task, val = load_task_with_validation("CB", DATA, train_per_task=50, val_per_task=30, sample="random", seed=7)
    train_pos = {full.index(e) for e in task.train}  # CB sentences are unique
    val_pos = {full.index(e) for e in val}
    assert len(train_pos) == 50 and len(val_pos) == 30 and not train_pos & val_pos


# --- default_data_dir ---------------------------------------------------------------------------

def test_default_data_dir_env(monkeypatch, tmp_path):
    monkeypatch.setenv("DEALCL_DATA", str(tmp_path))
    assert default_data_dir(tmp_path / "elsewhere") == tmp_path.resolve()
    monkeypatch.setenv("DEALCL_DATA", str(tmp_path / "missing"))
    with pytest.raises(UserError, match="DEALCL_DATA.*missing"):
        default_data_dir(tmp_path)


def test_default_data_dir_search_order(monkeypatch, tmp_path):
    monkeypatch.delenv("DEALCL_DATA", raising=False)
    repo = tmp_path / "repo"
    (repo / "data" / "CL_Benchmark").mkdir(parents=True)
    assert default_data_dir(repo) == (repo / "data" / "CL_Benchmark").resolve()
    (tmp_path / "shared" / "CL_Benchmark").mkdir(parents=True)
    assert default_data_dir(repo) == (tmp_path / "shared" / "CL_Benchmark").resolve()
    with pytest.raises(UserError, match=r"no benchmark data found.*dealcl data download data/CL_Benchmark"):
        default_data_dir(tmp_path / "empty")


# --- custom task directories ---------------------------------------------------------------------

TRAIN = [{"sentence": f"s{i}", "label": "yes" if i % 2 else "no"} for i in range(10)]
TEST = [{"sentence": "t0", "label": "no"}, {"sentence": "t1", "label": "maybe"}, {"sentence": "t2", "label": "yes"}]


def make_task_dir(root: Path, name: str = "mytask", *, train=TRAIN, test=TEST, labels=("yes", "no"),
                  yaml_text: str | None = None) -> Path:
    task_dir = root / name
    task_dir.mkdir(parents=True)
    for split, rows in (("train", train), ("test", test)):
        if rows is not None:
            (task_dir / f"{split}.json").write_text(json.dumps(rows), encoding="utf-8")
    if labels is not None:
        (task_dir / "labels.json").write_text(json.dumps(list(labels)), encoding="utf-8")
    if yaml_text is not None:
        (task_dir / "task.yaml").write_text(yaml_text, encoding="utf-8")
    return task_dir


def test_custom_json_dir_with_task_yaml(tmp_path):
    task_dir = make_task_dir(tmp_path, yaml_text="name: polar\ntype: QA\ninstruction: Answer yes or no.\n")
    task = load_task(str(task_dir), tmp_path / "no-such-root")
    assert (task.name, task.task_type, task.instruction) == ("polar", "QA", "Answer yes or no.\n")
    assert task.labels == ["yes", "no"] and len(task.train) == 10 and len(task.test) == 3
    assert task.unknown_test_labels == 1  # "maybe" is kept and counted
    assert task.test[1] == Example("t1", "maybe")
    assert set(task.files) == {"train", "test", "labels", "task_yaml"}
    assert all(Path(p).is_absolute() for p in task.files.values())


def test_custom_defaults_without_task_yaml(tmp_path):
    task = load_task(str(make_task_dir(tmp_path)), tmp_path)
    assert (task.name, task.task_type, task.instruction) == ("mytask", "custom", "")
    assert set(task.files) == {"train", "test", "labels"}


def test_custom_jsonl_and_csv(tmp_path):
    task_dir = make_task_dir(tmp_path, train=None, test=None)
    (task_dir / "train.jsonl").write_text("\n".join(json.dumps(r) for r in TRAIN) + "\n\n", encoding="utf-8")
    (task_dir / "test.csv").write_text('label,sentence\nno,"a, b"\nyes,"line1\nline2"\n', encoding="utf-8")
    task = load_task(str(task_dir), tmp_path)
    assert task.train == [Example(r["sentence"], r["label"]) for r in TRAIN]
    assert task.test == [Example("a, b", "no"), Example("line1\nline2", "yes")]


def test_cl_layout_root_without_instruction_config(tmp_path):
    make_task_dir(tmp_path / "TC", "toy")
    with pytest.raises(UserError, match="no zero-shot instruction for task type 'TC'"):
        load_task("toy", tmp_path)
    make_task_dir(tmp_path / "Polarity", "toy2")  # a type of the user's own: no instruction needed
    task = load_task("toy2", tmp_path)
    assert (task.task_type, task.instruction) == ("Polarity", "")


def test_name_that_is_neither_a_task_nor_a_directory(tmp_path):
    make_task_dir(tmp_path / "TC", "toy")
    with pytest.raises(UserError, match="unknown task 'nope'.*available: toy"):
        load_task("nope", tmp_path)


def write(task_dir: Path, filename: str, content: str | bytes) -> None:
    path = task_dir / filename
    path.write_bytes(content if isinstance(content, bytes) else content.encode())


# (file to overwrite, its content, file named in the message, other words the message must hold)
MALFORMED = {
    "invalid utf-8": ("train.json", b'[{"sentence": "caf\xe9", "label": "yes"}]', "train.json", ["UTF-8", "line 1"]),
    "truncated json": ("train.json", '[\n{"sentence": "a", "label": "yes"},\n{"sentence": "b"', "train.json", ["line 3"]),
    "top-level object": ("test.json", '{"sentence": "a", "label": "yes"}', "test.json", ["list"]),
    "record not object": ("train.json", '[{"sentence": "a", "label": "yes"}, ["b", "no"]]', "train.json", ["record 1"]),
    "missing sentence": ("train.json", '[{"label": "yes"}]', "train.json", ["record 0", "'sentence'"]),
    "missing label": ("test.json", '[{"sentence": "a", "label": "no"}, {"sentence": "b"}]', "test.json", ["record 1", "'label'"]),
    "non-string label": ("train.json", '[{"sentence": "a", "label": 1}]', "train.json", ["record 0", "'label'", "string"]),
    "non-string sentence": ("test.json", '[{"sentence": null, "label": "no"}]', "test.json", ["'sentence'"]),
    "unknown train label": ("train.json", '[{"sentence": "a", "label": "yes"}, {"sentence": "b", "label": "nah"}]',
                            "train.json", ["'nah'", "record 1", "labels.json"]),
    "empty train": ("train.json", "[]", "train.json", ["no records"]),
    "empty test": ("test.json", "[]", "test.json", ["no records"]),
    "labels not list": ("labels.json", '{"yes": 1}', "labels.json", ["non-empty"]),
    "labels empty": ("labels.json", "[]", "labels.json", ["non-empty"]),
    "labels non-string": ("labels.json", '["yes", 2]', "labels.json", ["strings"]),
    "labels duplicate": ("labels.json", '["yes", "no", "yes"]', "labels.json", ["'yes' appears twice"]),
    "labels malformed": ("labels.json", '["yes", "no"', "labels.json", ["malformed JSON", "line 1"]),
    "bad task.yaml": ("task.yaml", "name: [unclosed\n", "task.yaml", ["YAML"]),
    "task.yaml unknown key": ("task.yaml", "name: ok\nlabels: [a]\n", "task.yaml", ["unknown key labels"]),
    "task.yaml not mapping": ("task.yaml", "- a\n- b\n", "task.yaml", ["mapping"]),
    "task.yaml unsafe name": ("task.yaml", "name: ../../etc\n", "task.yaml", ["'../../etc'"]),
    "task.yaml name with slash": ("task.yaml", "name: a/b\n", "task.yaml", ["'a/b'"]),
    "task.yaml non-string": ("task.yaml", "instruction: 3\n", "task.yaml", ["'instruction'"]),
}


@pytest.mark.parametrize("case", list(MALFORMED))
def test_malformed_input_names_the_file(tmp_path, case):
    filename, content, named, words = MALFORMED[case]
    task_dir = make_task_dir(tmp_path)
    write(task_dir, filename, content)
    with pytest.raises(UserError) as info:
        load_task(str(task_dir), tmp_path)
    message = str(info.value)
    assert str(task_dir / named) in message
    for word in words:
        assert word in message
    assert "\n" not in message


def test_csv_missing_column(tmp_path):
    task_dir = make_task_dir(tmp_path, test=None)
    write(task_dir, "test.csv", "sentence,answer\na,yes\n")
    with pytest.raises(UserError, match=r"test\.csv.*lacks column label"):
        load_task(str(task_dir), tmp_path)


def test_jsonl_malformed_line_number(tmp_path):
    task_dir = make_task_dir(tmp_path, train=None)
    write(task_dir, "train.jsonl", '{"sentence": "a", "label": "yes"}\n{"sentence": "b", "label": \n')
    with pytest.raises(UserError, match=r"train\.jsonl at line 2"):
        load_task(str(task_dir), tmp_path)


def test_missing_files(tmp_path):
    for missing in ("train", "test", "labels"):
        task_dir = make_task_dir(tmp_path / missing, **{missing: None})
        with pytest.raises(UserError) as info:
            load_task(str(task_dir), tmp_path)
        assert f"missing file {task_dir / (missing + '.json')}" in str(info.value)


def test_two_train_files_are_ambiguous(tmp_path):
    task_dir = make_task_dir(tmp_path)
    write(task_dir, "train.jsonl", json.dumps(TRAIN[0]))
    with pytest.raises(UserError, match="several train files"):
        load_task(str(task_dir), tmp_path)


def test_unsafe_directory_name_is_rejected(tmp_path):
    task_dir = make_task_dir(tmp_path, name="my task")
    with pytest.raises(UserError, match="invalid task name 'my task'"):
        load_task(str(task_dir), tmp_path)
    with pytest.raises(UserError, match="invalid task name"):
        find_task_dir("../etc", tmp_path)


@pytest.mark.parametrize("kwargs, words", [
    ({"train_per_task": 0}, "train_per_task=0"),
    ({"test_per_task": 0}, "test_per_task=0"),
    ({"train_per_task": -1}, "train_per_task must not be negative"),
    ({"test_per_task": -5}, "test_per_task must not be negative"),
    ({"val_per_task": -1}, "val_per_task must not be negative"),
    ({"val_per_task": 10}, "val_per_task=10 leaves none"),
    ({"sample": "shuffle"}, "sample must be one of first, random"),
])
def test_bad_caps(tmp_path, kwargs, words):
    task_dir = make_task_dir(tmp_path)
    with pytest.raises(UserError, match=words):
        load_task(str(task_dir), tmp_path, **kwargs)


def test_caps_on_custom_task(tmp_path):
    task_dir = make_task_dir(tmp_path)
    task, val = load_task_with_validation(str(task_dir), tmp_path, train_per_task=8, val_per_task=4, test_per_task=2)
    # the hold-out wins over the cap: 10 records, 4 for validation, at most 6 left to train on
    assert [e.sentence for e in task.train] == [f"s{i}" for i in range(6)]
    assert [e.sentence for e in val] == ["s6", "s7", "s8", "s9"]
    assert [e.sentence for e in task.test] == ["t0", "t1"] and task.unknown_test_labels == 1


def test_sha256_file(tmp_path):
    path = tmp_path / "f.bin"
    path.write_bytes(b"x" * 3_000_000)
    assert sha256_file(path) == hashlib.sha256(b"x" * 3_000_000).hexdigest()


# --- download (no network here: error paths, plus a local repository) ---------------------------

def test_download_refuses_non_empty_dest(tmp_path):
    dest = tmp_path / "CL_Benchmark"
    dest.mkdir()
    (dest / "keep.txt").write_text("mine")
    with pytest.raises(UserError, match="not empty"):
        download.download_cl_benchmark(dest)
    assert (dest / "keep.txt").read_text() == "mine"


def test_download_failure_leaves_nothing(tmp_path, monkeypatch):
    monkeypatch.setattr(download, "REPO_URL", str(tmp_path / "no-such-repo"))
    dest = tmp_path / "data" / "CL_Benchmark"
    with pytest.raises(UserError) as info:
        download.download_cl_benchmark(dest)
    message = str(info.value)
    assert message.startswith("could not download CL_Benchmark from") and "are you offline?" in message
    assert "\n" not in message
    assert not dest.exists() and list(dest.parent.iterdir()) == []  # no temp directory left


def test_download_without_git(tmp_path, monkeypatch):
    monkeypatch.setattr(download, "GIT", str(tmp_path / "no-git-here"))
    dest = tmp_path / "CL_Benchmark"
    with pytest.raises(UserError, match="git not found"):
        download.download_cl_benchmark(dest)
    assert not dest.exists() and list(tmp_path.iterdir()) == []


@pytest.mark.skipif(shutil.which("git") is None, reason="git not installed")
def test_download_from_a_local_repository(tmp_path, monkeypatch):
    upstream = tmp_path / "upstream"
    make_task_dir(upstream / "CL_Benchmark" / "SC", "toy")
    (upstream / "configs").mkdir()
    (upstream / "configs" / "instruction_config.json").write_text(
        json.dumps({"SC": [{"instruction_type": "zero-shot", "instruction": "Sentiment?\n"}]}))
    (upstream / "src").mkdir()
    (upstream / "src" / "big.py").write_text("not wanted\n")
    git = ["git", "-C", str(upstream), "-c", "user.name=t", "-c", "user.email=t@t", "-c", "commit.gpgsign=false"]
    subprocess.run(["git", "init", "-q", str(upstream)], check=True)
    subprocess.run([*git, "add", "."], check=True)
    subprocess.run([*git, "commit", "-q", "-m", "data"], check=True)
    monkeypatch.setattr(download, "REPO_URL", upstream.as_uri())
    dest = tmp_path / "out" / "CL_Benchmark"
    download.download_cl_benchmark(dest)
    assert sorted(p.name for p in dest.iterdir()) == ["SC", "SOURCE.txt", "instruction_config.json"]
    assert list((tmp_path / "out").iterdir()) == [dest]
    task = load_task("toy", dest)
    assert task.instruction == "Sentiment?\n" and len(task.train) == 10
