"""Copy the project into a temporary git+DVC repo so tests can run `dvc repro` on it."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
GENERATED = {"raw", "interim", "processed", "models", "cache", "checkpoints"}


def _ignore_generated(dirpath: str, names: list[str]) -> set[str]:
    skip = {n for n in names if n in ("__pycache__", ".gitignore")}
    if Path(dirpath) == ROOT / "data":
        skip |= {n for n in names if n in GENERATED}
    return skip


def make_project(dest: Path, overrides: dict) -> Path:
    """A fresh git+DVC repo at ``dest`` with this project's code and ``params.yaml`` overridden."""
    dest.mkdir(parents=True, exist_ok=True)
    for name in ("dvc.yaml", ".dvcignore", "pipeline", "medfilip", "data"):
        src = ROOT / name
        if src.is_dir():
            shutil.copytree(src, dest / name, ignore=_ignore_generated)
        elif src.exists():
            shutil.copy2(src, dest / name)
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    for dotted, value in overrides.items():
        node = params
        *parents, leaf = dotted.split(".")
        for key in parents:
            node = node.setdefault(key, {})
        node[leaf] = value
    (dest / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    run(["git", "init", "-q"], dest)
    run(["git", "config", "user.email", "t@example.org"], dest)
    run(["git", "config", "user.name", "test"], dest)
    run([sys.executable, "-m", "dvc", "init", "-q"], dest)
    run([sys.executable, "-m", "dvc", "config", "core.analytics", "false"], dest)
    # A repo with history, as users have: dvclive cannot read the revision of an empty one.
    run(["git", "commit", "-q", "--allow-empty", "-m", "init"], dest)
    return dest


def env() -> dict:
    e = dict(os.environ)
    # Stage commands say `python`: make it this interpreter, and import medfilip from the copy.
    e["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{e.get('PATH', '')}"
    e["PYTHONPATH"] = "."
    e["HF_HUB_OFFLINE"] = "1"
    e["DVC_NO_ANALYTICS"] = "1"
    return e


def run(cmd: list[str], cwd: Path, check: bool = True) -> subprocess.CompletedProcess:
    proc = subprocess.run(cmd, cwd=cwd, env=env(), capture_output=True, text=True)
    if check and proc.returncode != 0:
        raise AssertionError(f"{' '.join(map(str, cmd))} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
    return proc


def dvc(args: list[str], cwd: Path, check: bool = True) -> subprocess.CompletedProcess:
    return run([sys.executable, "-m", "dvc", *args], cwd, check)


def ran_stages(proc: subprocess.CompletedProcess) -> set[str]:
    """Names of the stages a `dvc repro` actually executed."""
    out = proc.stdout + proc.stderr
    return {line.split("'")[1] for line in out.splitlines() if line.startswith("Running stage '")}
