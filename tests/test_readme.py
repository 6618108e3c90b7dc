"""Every command line in README.md is one the CLI accepts: each `dealcl ...`, `python -m dealcl ...`
and `make ...` line of its code blocks is parsed by the real parser (and a run's settings by the
real config), so a README that drifts from the CLI fails here."""
from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest

from dealcl.cli import _flags, parse_args
from dealcl.errors import UserError
from dealcl.runs.config import user_config, validate

REPO = Path(__file__).resolve().parents[1]
README = (REPO / "README.md").read_text(encoding="utf-8")
MAKEFILE = (REPO / "Makefile").read_text(encoding="utf-8")


def command_lines(text: str) -> list[str]:
    """The command lines of the fenced code blocks, continuation lines joined, comments dropped."""
    lines, inside, pending = [], False, ""
    for raw in text.splitlines():
        if raw.startswith("```"):
            inside, pending = not inside, ""
            continue
        if not inside:
            continue
        line = pending + raw.strip()
        if line.endswith("\\"):
            pending = line[:-1] + " "
            continue
        pending = ""
        if re.match(r"(dealcl|make|python -m dealcl)( |$)", line):
            lines.append(line)
    return lines


COMMANDS = command_lines(README)


def test_the_readme_has_the_commands_it_should():
    assert len(COMMANDS) >= 20
    assert any(c.startswith("make demo") for c in COMMANDS) and any("data download" in c for c in COMMANDS)


@pytest.mark.parametrize("line", COMMANDS)
def test_every_readme_command_parses(line):
    words = shlex.split(line, comments=True)
    if words[0] == "make":
        for target in words[1:]:
            assert re.search(rf"^{re.escape(target)}:", MAKEFILE, re.MULTILINE), f"no make target {target}"
        return
    argv = words[3:] if words[0] == "python" else words[1:]
    try:
        args = parse_args(argv)
    except SystemExit as done:  # --version, --help
        assert done.code == 0
        return
    except UserError as exc:
        pytest.fail(f"README command refused: {line}\n  error: {exc}")
    if args.command in ("run", "compare", "sweep") and not args.config:
        flags = _flags(args)
        if args.command == "compare":
            flags["method"] = args.methods.split(",")[0]
        try:
            validate(user_config(None, flags, args.overrides)[0])
        except UserError as exc:
            pytest.fail(f"README command has a bad setting: {line}\n  error: {exc}")


def test_the_extractor_sees_continuations_and_drops_comments():
    text = "```bash\ndealcl run --tasks a \\\n    --method seqlora   # note\nls -l\n```\n"
    assert shlex.split(command_lines(text)[0], comments=True) == ["dealcl", "run", "--tasks", "a", "--method", "seqlora"]
    assert len(command_lines(text)) == 1


@pytest.mark.parametrize("wrong", ["dealcl data download --dest data/CL_Benchmark", "dealcl report",
                                   "dealcl run --benchmark tc epochz=2"])
def test_a_wrong_command_line_would_fail(wrong):
    """What the README once said (`--dest`), and typos: the check above has teeth."""
    with pytest.raises(pytest.fail.Exception):
        test_every_readme_command_parses(wrong)
