"""constraints.txt, the exact versions CI tests, against pyproject.toml's ranges (.ci/check_lock.py)."""
from __future__ import annotations

import importlib.metadata
import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
_spec = importlib.util.spec_from_file_location("check_lock", ROOT / ".ci" / "check_lock.py")
check_lock = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(check_lock)

PYPROJECT = """
[project]
name = "x"
dependencies = ["torch==2.13.0", "peft>=0.17", "old-thing>=1; python_version < '3.0'"]
[project.optional-dependencies]
test = ["pytest>=8"]
docs = ["sphinx>=7"]
"""
LOCK = "# comment\ntorch==2.13.0\npeft==0.21.2\npytest==9.2.0\n"


def test_the_repository_lock_fits_pyproject():
    makefile = (ROOT / "Makefile").read_text()
    extras = check_lock.setup_extras(makefile)
    assert extras == ["test"]
    assert check_lock.check((ROOT / "pyproject.toml").read_text(), (ROOT / "constraints.txt").read_text(), extras) == []


def test_makefile_installs_with_the_lock_and_rebuilds_when_it_changes():
    makefile = (ROOT / "Makefile").read_text()
    assert "LOCK := constraints.txt" in makefile
    assert "-c $(LOCK) -e '.[test]'" in makefile and "-c $(LOCK) torch" in makefile
    assert "$(STAMP): pyproject.toml $(LOCK)" in makefile
    assert "cat pyproject.toml $(LOCK) | cksum" in makefile


def test_agreeing_lock_passes_and_unneeded_extra_or_marker_may_be_absent():
    assert check_lock.check(PYPROJECT, LOCK, ["test"]) == []


def test_locked_version_outside_range():
    problems = check_lock.check(PYPROJECT, LOCK.replace("peft==0.21.2", "peft==0.16.0"), ["test"])
    assert len(problems) == 1 and "peft==0.16.0" in problems[0] and "'peft>=0.17'" in problems[0]


def test_declared_dependency_missing_from_lock():
    problems = check_lock.check(PYPROJECT, LOCK.replace("pytest==9.2.0\n", ""), ["test"])
    assert len(problems) == 1 and "pytest" in problems[0] and "missing" in problems[0]


def test_locked_optional_dependency_is_range_checked_even_if_not_installed():
    problems = check_lock.check(PYPROJECT, LOCK + "sphinx==6.0\n", ["test"])
    assert len(problems) == 1 and "sphinx==6.0" in problems[0]


def test_loose_duplicate_and_cuda_lines_are_refused():
    bad = LOCK + "numpy>=2\npeft==0.21.2\nnvidia-cublas-cu12==12.8.4.1\n"
    problems = check_lock.check(PYPROJECT, bad, ["test"])
    assert any("'numpy>=2' is not an exact pin" in p for p in problems)
    assert any("peft is pinned twice" in p for p in problems)
    assert any("CUDA" in p and "nvidia-cublas-cu12" in p for p in problems)


def test_torch_other_than_2_13_0_is_outside_the_declared_pin():
    problems = check_lock.check(PYPROJECT, LOCK.replace("torch==2.13.0", "torch==2.14.0"), ["test"])
    assert len(problems) == 1 and "torch==2.14.0" in problems[0]


def test_script_exit_code_and_message(tmp_path):
    (tmp_path / "pyproject.toml").write_text(PYPROJECT)
    (tmp_path / "Makefile").write_text("\tpip install -c x -e '.[test]'\n")
    (tmp_path / "constraints.txt").write_text(LOCK)
    argv = [sys.executable, str(ROOT / ".ci" / "check_lock.py"), "--pyproject", str(tmp_path / "pyproject.toml"),
            "--lock", str(tmp_path / "constraints.txt"), "--makefile", str(tmp_path / "Makefile")]
    ok = subprocess.run(argv, capture_output=True, text=True)
    assert ok.returncode == 0 and "3 pins fit" in ok.stdout, ok.stderr
    (tmp_path / "constraints.txt").write_text(LOCK.replace("peft==0.21.2", "peft==0.1"))
    bad = subprocess.run(argv, capture_output=True, text=True)
    assert bad.returncode == 1 and "make lock" in bad.stderr.splitlines()[-1]
    assert all(line.startswith("error: ") for line in bad.stderr.splitlines()) and "Traceback" not in bad.stderr


def test_a_make_setup_venv_holds_exactly_the_locked_versions():
    """What `make test` runs under is what the lock says (only in a venv `make setup` built)."""
    if not list(Path(sys.prefix).glob(".installed-*")):
        pytest.skip("not a venv made by `make setup`")
    pins, problems = check_lock.read_lock((ROOT / "constraints.txt").read_text())
    assert problems == []
    drift = []
    for written, version in pins.values():
        try:
            installed = importlib.metadata.version(written)
        except importlib.metadata.PackageNotFoundError:
            drift.append(f"{written} not installed")
            continue
        if check_lock.Version(check_lock.Version(installed).public) != version:  # torch 2.13.0+cpu is 2.13.0
            drift.append(f"{written} {installed} (lock {version})")
    assert not drift, f"installed versions differ from constraints.txt: {drift}; run `make setup` or `make lock`"
