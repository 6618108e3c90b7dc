"""Fuzz the whole CLI with bad input: every case must end in exit 2 and one `error:` line.

    python bench/fuzz.py [--examples 3000] [--seed 0]

Property-based (hypothesis). A case is drawn from one of these families:

- `config`: a RunConfig key or an option of a registered method, with a value outside its
  declared type or domain (dealcl/domains.py), given through a YAML file, a `--flag` or a
  `key=value` / `method.KEY=VALUE` override, or as a per-stage value (`task_overrides`);
- `data`: a malformed data file of the toy benchmark (empty, truncated, binary, wrong types,
  huge numbers, NaN/inf, unicode labels not in labels.json, missing keys), or a task name or
  data path through `..`;
- `paths`: an output the CLI cannot write (a file, a folder under a file, inside another run,
  a special file system) for run, compare, sweep, demo, report, export, predict and
  `data download`;
- `runs`: a folder that is not a usable run (missing, a file, no run.yaml, a run.yaml that is
  binary, truncated YAML, not a mapping, or holds a bad value) for resume, report, predict
  and export, and a malformed `predict --input` file next to a real finished run.

Each case runs `dealcl.cli.main` in this process in a fresh folder (the working directory
too), stdout and stderr captured, and must: return 2 (no exception escapes, no traceback),
print exactly one non-empty stderr line starting with `error: ` (naming the key where the case
is about one), and leave every file under the folder as it was: nothing written outside a run
directory, nothing half-written inside one. The values are built outside the domains by
construction (below a lower bound, above an upper one, not parseable), not by asking the
validator, so a domain that let a bad value through would show up as a run that starts (and
fails the case).

tests/reliability/test_fuzz.py runs a short derandomized profile of the same strategies in
`make test`; this script runs a longer random one and prints the cases tried per family and
the failures.
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import hashlib
import io
import json
import math
import os
import re
import sys
import tempfile
import time
import typing
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from dealcl.cli import main
from dealcl.data.toy import write_toy_benchmark
from dealcl.domains import INT_LIMIT, ExistingPath, NonEmpty, OneOf, Range, Regexes, domain_of

BOOL_WORDS = ("true", "yes", "1", "false", "no", "0")
NULL_WORDS = ("none", "null")
TASKS = "toyA,toyB"


@dataclass
class Case:
    family: str
    what: str  # shown on failure
    setup: Callable[[Path], list[str]]  # writes what the case needs under the folder, returns argv
    expect: str = ""  # text the error line must contain


# ---- values outside a type or domain, built by construction --------------------------------------
def _base(tp: Any) -> tuple[Any, bool]:
    """(type without None, whether None is allowed)."""
    args = typing.get_args(tp)
    if type(None) in args:
        return next(a for a in args if a is not type(None)), True
    return tp, False


def _parses(kind: type, text: str) -> bool:
    try:
        kind(text)
        return True
    except (ValueError, OverflowError):
        return False


def _junk() -> st.SearchStrategy:
    """Containers where a scalar is expected."""
    return st.one_of(st.lists(st.integers(-5, 5), min_size=1, max_size=3),
                     st.dictionaries(st.text(min_size=1, max_size=4), st.integers(), min_size=1, max_size=2))


def _range_violations(domain: Range, integer: bool) -> st.SearchStrategy:
    """Numbers just or far outside the range, and the non-finite ones."""
    options = []
    if domain.low is not None:
        edge = domain.low if domain.low_open else (domain.low - 1 if integer else None)
        if integer:
            options.append(st.integers(max_value=int(math.floor(edge))))
        else:
            options.append(st.floats(max_value=domain.low, allow_nan=False, allow_infinity=False,
                                     exclude_max=not domain.low_open))
    if domain.high is not None:
        if integer:
            options.append(st.integers(min_value=int(domain.high) + (0 if domain.high_open else 1)))
        else:
            options.append(st.floats(min_value=domain.high, allow_nan=False, allow_infinity=False,
                                     exclude_min=not domain.high_open))
    if not integer:
        options.append(st.sampled_from([math.nan, math.inf, -math.inf]))
    return st.one_of(options) if options else st.nothing()


def bad_value(tp: Any, domain: Any) -> st.SearchStrategy:
    """Python values (as YAML holds them) outside the field's type or declared domain."""
    kind, optional = _base(tp)
    out: list[st.SearchStrategy] = []
    if not optional:
        out.append(st.none())
    if kind is bool:
        out += [st.integers(), st.floats(allow_nan=True), _junk(),
                st.text(max_size=6).filter(lambda s: s.lower() not in BOOL_WORDS + (NULL_WORDS if optional else ()))]
    elif kind is int:
        out += [st.booleans(), st.floats(allow_nan=True, allow_infinity=True), _junk(),
                st.text(max_size=8).filter(lambda s: not _parses(int, s) and s.lower() not in NULL_WORDS),
                st.integers(min_value=INT_LIMIT + 1), st.integers(max_value=-INT_LIMIT - 1)]
        if isinstance(domain, Range):
            out.append(_range_violations(domain, integer=True))
    elif kind is float:
        out += [st.booleans(), _junk(),
                st.text(max_size=8).filter(lambda s: not _parses(float, s) and s.lower() not in NULL_WORDS)]
        if isinstance(domain, Range):
            out += [_range_violations(domain, integer=False), st.integers(min_value=10**400, max_value=10**401)]
    elif kind is str:
        out += [st.booleans(), _junk()]
        if isinstance(domain, OneOf):
            out.append(st.text(max_size=12).filter(lambda s: s not in domain.choices and s.lower() not in NULL_WORDS))
        elif isinstance(domain, NonEmpty):
            out.append(st.sampled_from(["", " ", "\t"]))
        elif isinstance(domain, ExistingPath):
            out.append(st.text(alphabet="abcé🙂", min_size=1, max_size=8).map(lambda s: f"/nonexistent-{s}/../x"))
    elif typing.get_origin(kind) is list:
        out += [st.booleans(), st.integers(), st.dictionaries(st.text(min_size=1, max_size=3), st.integers(), min_size=1),
                st.lists(_junk(), min_size=1, max_size=2)]
        if isinstance(domain, NonEmpty):
            out.append(st.sampled_from([[], [""], ["ok", " "]]))
        elif isinstance(domain, Regexes):
            out.append(st.sampled_from([["("], ["a", "[z"], ["x{2,1}"], ["*"]]))
    elif typing.get_origin(kind) is dict:
        out += [st.booleans(), st.integers(), st.lists(st.integers(), max_size=2), st.text(max_size=0)]
    return st.one_of(out)


def bad_text(tp: Any, domain: Any) -> st.SearchStrategy:
    """Text (a flag's or an override's value) that no conversion turns into a value in the domain."""
    kind, optional = _base(tp)
    nulls = NULL_WORDS if optional else ()
    out: list[st.SearchStrategy] = []
    if kind is bool:
        out.append(st.text(max_size=6).filter(lambda s: s.lower() not in BOOL_WORDS + nulls))
    elif kind is int:
        out += [st.text(max_size=8).filter(lambda s: not _parses(int, s) and s.lower() not in nulls),
                st.integers(min_value=INT_LIMIT + 1).map(str), st.sampled_from(["1.5", "nan", "1e3", "[1]"])]
        if isinstance(domain, Range):
            out.append(_range_violations(domain, integer=True).map(str))
    elif kind is float:
        out.append(st.text(max_size=8).filter(lambda s: not _parses(float, s) and s.lower() not in nulls))
        if isinstance(domain, Range):
            out += [_range_violations(domain, integer=False).map(repr), st.sampled_from(["nan", "inf", "-inf", "1e400"])]
    elif kind is str:
        if isinstance(domain, OneOf):
            out.append(st.text(max_size=12).filter(lambda s: s not in domain.choices and s.lower() not in nulls))
        elif isinstance(domain, NonEmpty):
            out.append(st.sampled_from(["", " "]))
        elif isinstance(domain, ExistingPath):
            out.append(st.text(alphabet="abcé🙂", min_size=1, max_size=8).map(lambda s: f"/nonexistent-{s}/../x"))
    elif typing.get_origin(kind) is list:
        if isinstance(domain, NonEmpty):
            out.append(st.sampled_from(["", ",", " , ,"]))
        elif isinstance(domain, Regexes):
            out.append(st.sampled_from(["(", "[z", "ok,(", "*"]))
    elif typing.get_origin(kind) is dict:
        out.append(st.sampled_from(["[1, 2]", "5", "{a: [", "- x", "true"]))
    return st.one_of(out) if out else st.nothing()


def _has_bad_text(tp: Any, domain: Any) -> bool:
    kind, _ = _base(tp)
    return kind in (bool, int, float) or typing.get_origin(kind) is dict or domain is not None


# ---- the keys ----------------------------------------------------------------------------------
def _run_config_keys() -> list[tuple[str, Any, Any, bool]]:
    from dealcl.runs.config import RunConfig

    hints = typing.get_type_hints(RunConfig)
    return [(f.name, hints[f.name], domain_of(f), bool(f.metadata.get("flag"))) for f in dataclasses.fields(RunConfig)]


def _method_keys() -> list[tuple[str, str, Any, Any]]:
    from dealcl.methods import REGISTRY

    keys = []
    for name in sorted(REGISTRY):
        config_class = REGISTRY[name].config_class
        hints = typing.get_type_hints(config_class)
        keys += [(name, f.name, hints[f.name], domain_of(f)) for f in dataclasses.fields(config_class)]
    return keys


BASE = {"tasks": TASKS, "model": "tiny-llama", "precision": "fp32", "train_per_task": 4, "test_per_task": 2}


def _base_flags(root: Path, skip: str = "") -> list[str]:
    values = {**BASE, "data": str(root / "data")}
    flags = []
    for key, value in values.items():
        if key != skip:
            flags += ["--" + key.replace("_", "-"), str(value)]
    return flags


def _write(path: Path, content: bytes | str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(content if isinstance(content, bytes) else content.encode("utf-8"))
    return path


def _yaml_file(root: Path, values: dict) -> str:
    return str(_write(root / "config.yaml", yaml.safe_dump(values, allow_unicode=True)))


@st.composite
def config_cases(draw) -> Case:
    run_keys = [k for k in _run_config_keys()]
    method_keys = _method_keys()
    if draw(st.booleans()):
        key, tp, domain, is_flag = draw(st.sampled_from(run_keys))
        # Text has no bad value for a plain text key (any text is one): YAML only, for its types.
        texts = _has_bad_text(tp, domain)
        channels = ["yaml"] + (["override"] if texts else []) + (["flag"] if texts and is_flag and tp is not bool else [])
        if key in ("epochs", "lr", "batch_size", "grad_accum", "max_grad_norm"):
            channels.append("stage")
        channel = draw(st.sampled_from(channels))
        if channel in ("yaml", "stage"):
            value = draw(bad_value(tp, domain) if channel == "yaml" else bad_value(_base(tp)[0], domain))

            def setup(root: Path, key=key, value=value, channel=channel) -> list[str]:
                values = {**BASE, "data": str(root / "data")}
                if channel == "yaml":
                    values[key] = value
                else:
                    values["task_overrides"] = {"toyB": {key: value}}
                return ["run", "--config", _yaml_file(root, values), "--output", str(root / "out"), "--quiet"]
            return Case("config", f"{channel} {key}={value!r}", setup, key)
        text = draw(bad_text(tp, domain))

        def setup(root: Path, key=key, text=text, channel=channel) -> list[str]:
            if channel == "flag":
                # --flag=VALUE: a value starting with "-" stays a value.
                return ["run", *_base_flags(root, skip=key), f"--{key.replace('_', '-')}={text}",
                        "--output", str(root / "out"), "--quiet"]
            return ["run", *_base_flags(root), "--output", str(root / "out"), "--quiet", f"{key}={text}"]
        return Case("config", f"{channel} {key}={text!r}", setup, key)
    method, key, tp, domain = draw(st.sampled_from(method_keys))
    channel = draw(st.sampled_from(["yaml", "override"] if _has_bad_text(tp, domain) else ["yaml"]))
    if channel == "yaml":
        value = draw(bad_value(tp, domain))

        def setup(root: Path, method=method, key=key, value=value) -> list[str]:
            values = {**BASE, "data": str(root / "data"), "method": method, "method_options": {key: value}}
            return ["run", "--config", _yaml_file(root, values), "--output", str(root / "out"), "--quiet"]
        return Case("config", f"--method {method} yaml method_options.{key}={value!r}", setup, key)
    text = draw(bad_text(tp, domain))

    def setup(root: Path, method=method, key=key, text=text) -> list[str]:
        return ["run", *_base_flags(root), "--method", method, "--output", str(root / "out"), "--quiet",
                f"method.{key}={text}"]
    return Case("config", f"--method {method} method.{key}={text!r}", setup, key)


# ---- malformed data files ---------------------------------------------------------------------------
LABELS = ["apple", "plum"]  # toyA's labels (dealcl/data/toy.py)


def _records(draw) -> list[dict]:
    sentences = st.text(min_size=1, max_size=20).filter(str.strip)
    return draw(st.lists(st.fixed_dictionaries({"sentence": sentences, "label": st.sampled_from(LABELS)}),
                         min_size=1, max_size=4))


# Defects every split file and input file is refused for; a train file also for a label that
# labels.json lacks and a record without a label (a test file may hold unknown labels: they are
# counted, `unknown_test_labels`; a predict input needs no label at all).
DEFECTS = ("empty", "truncated", "binary", "top-level", "record-type", "sentence-type", "label-type", "no-records",
           "huge", "nan")
TRAIN_DEFECTS = DEFECTS + ("label-unknown", "missing-key")


@st.composite
def malformed_json(draw, defects: tuple[str, ...] = DEFECTS) -> tuple[str, bytes]:
    """(defect, file content) of a JSON list of records with exactly one defect."""
    records = _records(draw)
    defect = draw(st.sampled_from(defects))
    text = json.dumps(records, ensure_ascii=False)
    if defect == "empty":
        return defect, b""
    if defect == "truncated":
        return defect, text[: draw(st.integers(0, len(text) - 1))].encode()
    if defect == "binary":
        return defect, b"\xff\xfe" + draw(st.binary(max_size=40))
    if defect == "top-level":
        return defect, json.dumps(draw(st.one_of(st.dictionaries(st.text(max_size=3), st.integers(), max_size=2),
                                                 st.integers(), st.text(max_size=5), st.none()))).encode()
    if defect == "no-records":
        return defect, b"[]"
    index = draw(st.integers(0, len(records) - 1))
    if defect == "record-type":
        records[index] = draw(st.one_of(st.lists(st.text(max_size=3), max_size=2), st.integers(), st.none(), st.text(max_size=4)))
    elif defect == "sentence-type":
        records[index]["sentence"] = draw(st.one_of(st.integers(), st.floats(), st.none(), st.booleans(),
                                                    st.lists(st.text(max_size=3), max_size=2)))
    elif defect in ("label-type", "huge", "nan"):
        records[index]["label"] = {"label-type": draw(st.one_of(st.integers(), st.none(), st.lists(st.integers(), max_size=2))),
                                   "huge": 10**draw(st.integers(20, 400)), "nan": math.nan}[defect]
    elif defect == "label-unknown":
        records[index]["label"] = draw(st.text(min_size=1, max_size=8).filter(lambda s: s not in LABELS))
    elif defect == "missing-key":
        del records[index][draw(st.sampled_from(["sentence", "label"]))]
    # json.dumps writes NaN and 1e400-sized integers as Python's json reads them back.
    return defect, json.dumps(records, ensure_ascii=False).encode()


@st.composite
def data_cases(draw) -> Case:
    target = draw(st.sampled_from(["train.json", "test.json", "labels.json", "instruction_config.json", "task-name",
                                   "data-dir"]))
    if target in ("train.json", "test.json"):
        defect, content = draw(malformed_json(TRAIN_DEFECTS if target == "train.json" else DEFECTS))

        def setup(root: Path, target=target, content=content) -> list[str]:
            _write(root / "data" / "TC" / "toyA" / target, content)
            return ["run", *_base_flags(root), "--output", str(root / "out"), "--quiet"]
        return Case("data", f"toyA/{target}: {defect} {content[:60]!r}", setup, target)
    if target == "labels.json":
        content = draw(st.one_of(
            st.just(b""), st.just(b"[]"), st.just(b'["apple", "apple", "plum"]'), st.binary(max_size=20).map(lambda b: b"\xff" + b),
            st.lists(st.one_of(st.integers(), st.none(), st.just("")), min_size=1, max_size=3).map(lambda v: json.dumps(v).encode()),
            st.just(b'["apple", "pl'), st.just(b'"apple"')))

        def setup(root: Path, content=content) -> list[str]:
            _write(root / "data" / "TC" / "toyA" / "labels.json", content)
            return ["run", *_base_flags(root), "--output", str(root / "out"), "--quiet"]
        return Case("data", f"labels.json {content[:60]!r}", setup, "labels.json")
    if target == "instruction_config.json":
        content = draw(st.one_of(st.just(b""), st.just(b"[1, 2]"), st.just(b'{"TC": 5}'), st.just(b'{"TC": [{"x": 1}]}'),
                                 st.binary(max_size=20).map(lambda b: b"\xff" + b), st.just(b'{"TC": [')))

        def setup(root: Path, content=content) -> list[str]:
            _write(root / "data" / "instruction_config.json", content)
            return ["run", *_base_flags(root), "--output", str(root / "out"), "--quiet"]
        return Case("data", f"instruction_config.json {content[:60]!r}", setup, "instruction_config.json")
    if target == "task-name":
        name = draw(st.sampled_from(["../etc", "../../TC/toyA", "toyA/../../x", "a b", "tö/../y", "../data/TC/nope"]))

        def setup(root: Path, name=name) -> list[str]:
            flags = _base_flags(root, skip="tasks")
            return ["run", *flags, "--tasks", f"toyA,{name}", "--output", str(root / "out"), "--quiet"]
        return Case("data", f"--tasks toyA,{name}", setup)
    where = draw(st.text(alphabet="xyzé", min_size=1, max_size=5))

    def setup(root: Path, where=where) -> list[str]:
        return ["run", *_base_flags(root, skip="data"), "--data", str(root / f"missing-{where}" / ".." / "data"),
                "--output", str(root / "out"), "--quiet"]
    return Case("data", f"--data through a missing folder {where!r}", setup, "data")


# ---- outputs the CLI cannot write ------------------------------------------------------------------------
FINISHED: dict[str, Path] = {}


def finished_run() -> Path:
    """One real finished run (built once per process, outside the cases' folders)."""
    if "run" not in FINISHED:
        home = Path(tempfile.mkdtemp(prefix="dealcl-fuzz-run-"))
        write_toy_benchmark(home / "data", n_train=8, n_test=4)
        args = ["run", "--tasks", TASKS, "--model", "tiny-llama", "--data", str(home / "data"), "--output",
                str(home / "run"), "--quiet", "--precision", "fp32", "--train-per-task", "4", "--test-per-task", "2"]
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
            assert main(args) == 0, "the fuzzer's finished run failed"
        FINISHED["run"] = home / "run"
    return FINISHED["run"]


def _bad_folder(root: Path, how: str) -> Path:
    """A folder path the CLI cannot write as a new output."""
    if how == "file":
        return _write(root / "taken.txt", "mine")
    if how == "under-file":
        return _write(root / "taken.txt", "mine") / "sub"
    if how == "inside-run":
        _write(root / "oldrun" / "run.yaml", "config: {}\n")
        return root / "oldrun" / "inner"
    return Path("/proc/dealcl-fuzz/out")  # a special file system: nothing can be created there


@st.composite
def path_cases(draw) -> Case:
    how = draw(st.sampled_from(["file", "under-file", "inside-run", "proc"]))
    command = draw(st.sampled_from(["run", "compare", "sweep", "demo", "report", "export", "predict", "download"]))

    def setup(root: Path, how=how, command=command) -> list[str]:
        bad = _bad_folder(root, how)
        if command == "run":
            return ["run", *_base_flags(root), "--output", str(bad), "--quiet"]
        if command == "compare":
            return ["compare", *_base_flags(root), "--methods", "seqlora,zeroshot", "--output", str(bad), "--quiet"]
        if command == "sweep":
            return ["sweep", *_base_flags(root), "--val-per-task", "2", "--lrs", "1e-3", "--output", str(bad), "--quiet"]
        if command == "demo":
            return ["demo", "--output", str(bad), "--quiet"]
        if command == "report":
            return ["report", str(finished_run()), "--output", str(bad)]
        if command == "export":
            return ["export", str(finished_run()), "--to", str(bad)]
        if command == "predict":
            inputs = _write(root / "in.jsonl", '{"sentence": "hello"}\n')
            target = bad if how != "file" else root  # a folder where the file should go
            return ["predict", str(finished_run()), "--input", str(inputs), "--output", str(target)]
        return ["data", "download", str(bad)]
    return Case("paths", f"{command} writing to a {how} path", setup)


# ---- folders that are not usable runs, and predict inputs ------------------------------------------------
@st.composite
def run_cases(draw) -> Case:
    command = draw(st.sampled_from(["resume", "report", "export", "predict", "predict-input"]))
    if command == "predict-input":
        suffix = draw(st.sampled_from([".json", ".jsonl", ".csv", ".txt"]))
        defect, content = draw(malformed_json())
        if suffix == ".csv":
            content = draw(st.sampled_from([b"", b"text,label\nhi,x\n", b"\xff\xfe\x00", b"sentence\n", b"sentence,label\n"]))
        elif suffix == ".jsonl" and defect not in ("empty", "binary"):
            content = content.replace(b"}, {", b"}\n{")[1:-1] if content.startswith(b"[{") else content

        def setup(root: Path, suffix=suffix, content=content) -> list[str]:
            return ["predict", str(finished_run()), "--input", str(_write(root / f"in{suffix}", content))]
        return Case("runs", f"predict --input in{suffix} {content[:60]!r}", setup, "in")
    kind = draw(st.sampled_from(["missing", "file", "empty", "run-yaml", "bad-config"]))
    content = b""
    if kind == "run-yaml":
        content = draw(st.sampled_from([b"\xff\xfe", b"config: [1, 2", b"- a\n- b\n", b"config: 5\n", b"", b"\0\0\0"]))
    elif kind == "bad-config":
        key, tp, domain, _ = draw(st.sampled_from(_run_config_keys()))
        value = draw(bad_value(tp, domain))
        content = yaml.safe_dump({"config": {key: value}}, allow_unicode=True).encode()

    def setup(root: Path, command=command, kind=kind, content=content) -> list[str]:
        folder = root / "notarun"
        if kind == "file":
            _write(folder, "plain text")
        elif kind == "empty":
            folder.mkdir()
        elif kind in ("run-yaml", "bad-config"):
            _write(folder / "run.yaml", content)
        if command == "predict":
            return ["predict", str(folder), "--input", str(_write(root / "in.jsonl", '{"sentence": "hi"}\n'))]
        if command == "export":
            return ["export", str(folder), "--to", str(root / "exported")]
        return [command, str(folder)]
    # A run.yaml holding a bad value is refused for that value (the line names the key, not the folder).
    return Case("runs", f"{command} on a {kind} run folder {content[:60]!r}", setup, "" if kind == "bad-config" else "notarun")


def cases() -> st.SearchStrategy:
    return st.one_of(config_cases(), data_cases(), path_cases(), run_cases())


# ---- running a case ---------------------------------------------------------------------------
def _tree(root: Path) -> dict[str, str]:
    found = {}
    for path in sorted(root.rglob("*")):
        if path.is_file():
            found[str(path.relative_to(root))] = hashlib.sha256(path.read_bytes()).hexdigest()
        elif path.is_dir():
            found[str(path.relative_to(root)) + "/"] = ""
    return found


def run_case(case: Case) -> str | None:
    """None if the case ended as it must, else what went wrong."""
    with tempfile.TemporaryDirectory(prefix="dealcl-fuzz-") as tmp:
        root = Path(tmp)
        write_toy_benchmark(root / "data", n_train=8, n_test=4)
        argv = case.setup(root)
        watched = [root] + ([FINISHED["run"]] if "run" in FINISHED else [])
        before = [_tree(p) for p in watched]
        cwd = os.getcwd()
        out, err = io.StringIO(), io.StringIO()
        os.chdir(root)  # a default output (runs/...) would land here
        try:
            with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
                code = main(argv)
        except BaseException as exc:  # noqa: BLE001 (a traceback is what we are looking for)
            return f"{case.what}: {type(exc).__name__} escaped: {exc}"
        finally:
            os.chdir(cwd)
        lines = [line for line in err.getvalue().splitlines() if line.strip()]
        if code != 2:
            return f"{case.what}: exit {code}, stderr {lines[-3:]}"
        if len(lines) != 1 or not lines[0].startswith("error: ") or "Traceback" in err.getvalue():
            return f"{case.what}: stderr is not one error line: {lines[:4]}"
        # A flag's value refused by argparse (a declared set of choices) is named as the flag typed.
        named = (case.expect, "--" + case.expect.replace("_", "-")) if case.expect else ()
        if case.expect and not any(name in lines[0] for name in named):
            return f"{case.what}: the error line does not name {case.expect!r}: {lines[0]}"
        after = [_tree(p) for p in watched]
        if after != before:
            changed = sorted(set(after[0].items()) ^ set(before[0].items()))[:3]
            return f"{case.what}: files changed: {changed}"
    return None


def campaign(examples: int, seed: int | None, derandomize: bool = False) -> tuple[Counter, list[str]]:
    tried: Counter = Counter()
    failures: list[str] = []

    @settings(max_examples=examples, deadline=None, database=None, derandomize=derandomize,
              suppress_health_check=list(HealthCheck), print_blob=False)
    @given(cases())
    def property_holds(case: Case) -> None:
        tried[case.family] += 1
        problem = run_case(case)
        if problem is not None:
            failures.append(problem)

    if seed is not None and not derandomize:
        from hypothesis import seed as fix_seed

        property_holds = fix_seed(seed)(property_holds)
    property_holds()
    return tried, failures


def main_cli() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--examples", type=int, default=3000, help="cases to try (default 3000)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    started = time.perf_counter()
    tried, failures = campaign(args.examples, args.seed)
    for failure in failures:
        print(f"FAIL {failure}")
    total = sum(tried.values())
    print(f"cases tried: {total} ({', '.join(f'{k} {v}' for k, v in sorted(tried.items()))}); "
          f"failures: {len(failures)}; {time.perf_counter() - started:.0f} s")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main_cli())
