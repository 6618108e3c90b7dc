"""`dealcl data download`: fetch CL_Benchmark from the public O-LoRA repository.

A sparse, shallow, blob-less clone downloads only the data folder (plus the upstream
`configs/instruction_config.json`, which `load_task` needs at the data root) instead of the
whole repository history. The clone goes to a temporary directory next to `dest` and is moved
into place in one rename, so an interrupted or failed download never leaves a half-written
`dest` behind. Note that the public snapshot lacks some large splits (yelp/IMDB/MultiRC test,
dbpedia train, all of yahoo); the shared copy's PROVENANCE.md says how they were rebuilt.
"""
from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
from pathlib import Path

from ..errors import UserError

REPO_URL = "https://github.com/cmnfriend/O-LoRA"
FOLDER = "CL_Benchmark"
INSTRUCTIONS = "configs/instruction_config.json"
GIT = "git"
TIMEOUT_S = 600


def _git(args: list[str], cwd: Path | None = None) -> str:
    """Run git without prompts; any failure becomes the reason string of a RuntimeError."""
    env = dict(os.environ, GIT_TERMINAL_PROMPT="0")
    try:
        done = subprocess.run([GIT, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=TIMEOUT_S)
    except FileNotFoundError:
        raise RuntimeError(f"git not found ({GIT})") from None
    except subprocess.TimeoutExpired:
        raise RuntimeError(f"git {args[0]} timed out after {TIMEOUT_S} s") from None
    except OSError as exc:
        raise RuntimeError(f"cannot run {GIT}: {exc.strerror or exc}") from None
    if done.returncode != 0:
        lines = [line.strip() for line in (done.stderr or done.stdout).splitlines() if line.strip()]
        raise RuntimeError(f"git {args[0]} failed: {lines[-1] if lines else f'exit code {done.returncode}'}")
    return done.stdout.strip()


def download_cl_benchmark(dest: Path) -> None:
    """Download CL_Benchmark into `dest` (which must not exist, or be an empty directory)."""
    dest = Path(dest).expanduser().absolute()
    if dest.exists() and (not dest.is_dir() or any(dest.iterdir())):
        raise UserError(f"{dest} already exists and is not empty; choose another destination")
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.download-", dir=dest.parent))
    try:
        clone = tmp / "repo"
        _git(["clone", "--filter=blob:none", "--sparse", "--depth", "1", REPO_URL, str(clone)])
        _git(["sparse-checkout", "set", FOLDER, os.path.dirname(INSTRUCTIONS)], cwd=clone)
        data = clone / FOLDER
        if not data.is_dir():
            raise RuntimeError(f"the repository has no {FOLDER} folder")
        config = data / "instruction_config.json"
        if not config.exists() and (clone / INSTRUCTIONS).is_file():
            shutil.copyfile(clone / INSTRUCTIONS, config)
        commit = _git(["rev-parse", "HEAD"], cwd=clone)
        (data / "SOURCE.txt").write_text(f"{REPO_URL} {FOLDER} at commit {commit}\n", encoding="utf-8")
        if dest.exists():
            dest.rmdir()  # empty, checked above; os.replace cannot rename onto it on every OS
        os.replace(data, dest)
    except (RuntimeError, OSError) as exc:
        raise UserError(
            f"could not download {FOLDER} from {REPO_URL}: {exc}; are you offline? copy the data by hand and pass --data"
        ) from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
