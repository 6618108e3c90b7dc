#!/usr/bin/env python3
"""Does constraints.txt (the exact versions CI tests) still fit pyproject.toml's dependency ranges?

Fails, one line per problem, when a locked version lies outside its declared range, when a
dependency `make setup` installs (the required ones and the extras named in the Makefile's
`pip install -e '.[...]'`) is missing from the lock, when a line is not an exact `name==version`
pin, or when the lock would bring a CUDA build of torch. Runs in well under a second with the
standard library and `packaging` (pip's own copy when it is not installed).

    python3 .ci/check_lock.py [--pyproject P] [--lock L] [--makefile M]
"""
from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

try:
    import tomllib
except ImportError:  # Python 3.10
    from pip._vendor import tomli as tomllib

try:
    from packaging.requirements import InvalidRequirement, Requirement
    from packaging.utils import canonicalize_name
    from packaging.version import InvalidVersion, Version
except ImportError:
    from pip._vendor.packaging.requirements import InvalidRequirement, Requirement
    from pip._vendor.packaging.utils import canonicalize_name
    from pip._vendor.packaging.version import InvalidVersion, Version

ROOT = Path(__file__).resolve().parent.parent
_PIN = re.compile(r"^([A-Za-z0-9][A-Za-z0-9._-]*)==([^\s;#]+)$")
_EXTRAS = re.compile(r"-e\s+['\"]?\.\[([^\]]+)\]")
# Packages only a CUDA build of torch brings along.
_CUDA_ONLY = ("nvidia-", "triton")


def read_lock(text: str, name: str = "constraints.txt") -> tuple[dict[str, tuple[str, Version]], list[str]]:
    """Canonical name -> (name as written, version), and the problems found reading it."""
    pins: dict[str, tuple[str, Version]] = {}
    problems = []
    for number, raw in enumerate(text.splitlines(), 1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        match = _PIN.match(line)
        if not match:
            problems.append(f"{name}:{number}: {line!r} is not an exact pin `name==version`")
            continue
        written, version = match.groups()
        key = canonicalize_name(written)
        try:
            parsed = Version(version)
        except InvalidVersion:
            problems.append(f"{name}:{number}: {version!r} is not a version")
            continue
        if key in pins:
            problems.append(f"{name}:{number}: {written} is pinned twice")
        pins[key] = (written, parsed)
    return pins, problems


def setup_extras(makefile_text: str) -> list[str]:
    """The extras `make setup` installs, from its `pip install -e '.[a,b]'` line."""
    found = _EXTRAS.findall(makefile_text)
    return sorted({extra.strip() for group in found for extra in group.split(",") if extra.strip()})


def check(pyproject_text: str, lock_text: str, extras: list[str], lock_name: str = "constraints.txt") -> list[str]:
    """Every disagreement between the declared ranges and the lock, one line each."""
    project = tomllib.loads(pyproject_text).get("project", {})
    pins, problems = read_lock(lock_text, lock_name)
    optional = project.get("optional-dependencies", {})
    declared = [(spec, None) for spec in project.get("dependencies", [])]
    declared += [(spec, group) for group, specs in optional.items() for spec in specs]
    unknown = [e for e in extras if e not in optional]
    if unknown:
        problems.append(f"make setup installs extras {unknown} that pyproject.toml does not declare")
    for spec, group in declared:
        where = "dependencies" if group is None else f"optional-dependencies.{group}"
        try:
            requirement = Requirement(spec)
        except InvalidRequirement as exc:
            problems.append(f"pyproject.toml {where}: {spec!r} is not a requirement ({exc})")
            continue
        if requirement.marker is not None and not requirement.marker.evaluate({"extra": group or ""}):
            continue  # not for this platform / Python
        key = canonicalize_name(requirement.name)
        needed = group is None or group in extras
        if key not in pins:
            if needed:
                problems.append(f"{requirement.name} ({where}: {spec!r}) is missing from {lock_name}")
            continue
        written, version = pins[key]
        if not requirement.specifier.contains(version, prereleases=True):
            problems.append(f"{lock_name} pins {written}=={version}, outside pyproject.toml's {where} range {spec!r}")
    cuda = sorted(written for key, (written, _) in pins.items() if key.startswith(_CUDA_ONLY))
    if cuda:
        problems.append(f"{lock_name} holds CUDA packages ({', '.join(cuda)}): torch must stay the CPU wheel 2.13.0")
    return problems


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pyproject", type=Path, default=ROOT / "pyproject.toml")
    parser.add_argument("--lock", type=Path, default=ROOT / "constraints.txt")
    parser.add_argument("--makefile", type=Path, default=ROOT / "Makefile")
    args = parser.parse_args(argv)
    try:
        texts = [p.read_text(encoding="utf-8") for p in (args.pyproject, args.lock, args.makefile)]
    except OSError as exc:
        print(f"error: {exc.filename}: {exc.strerror}", file=sys.stderr)
        return 2
    pyproject_text, lock_text, makefile_text = texts
    extras = setup_extras(makefile_text)
    problems = check(pyproject_text, lock_text, extras, args.lock.name)
    if problems:
        for problem in problems:
            print(f"error: {problem}", file=sys.stderr)
        print(f"error: {args.lock.name} and pyproject.toml disagree ({len(problems)} problem(s)); "
              "refresh the lock with `make lock`, or fix the range in pyproject.toml", file=sys.stderr)
        return 1
    pins, _ = read_lock(lock_text)
    print(f"{args.lock.name}: {len(pins)} pins fit pyproject.toml's ranges (extras {', '.join(extras) or 'none'})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
