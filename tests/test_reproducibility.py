"""DVC state that a fresh clone can trust: the lock matches the code, and stages depend only on what shapes them.

The lock check runs `dvc status` in this checkout. On a fresh clone the DVC outputs
(data/raw, data/interim, ...) are absent and show as deleted; that is not a stale lock.
What is: a git-tracked dependency (code, data file, params) whose hash or value differs
from dvc.lock. After changing code or params, run `dvc repro` and commit dvc.lock with it.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
# Keys that change how fast or how loudly a stage runs, or where a cache lives, never its outputs.
NON_OUTPUT_KEYS = {
    "phantom.workers", "pixels.workers", "train.workers", "train.progress", "train.checkpoints",
    "extract.progress", "extract.max_failure_fraction", "extract.cache", "ssm.batch_size", "ssm.cache",
    "evaluate.batch_size",
}
# Scoring, benchmarks and stand-ins: editing them must re-run no stage (the `score` stage aside: it scores).
OUTSIDE_STAGES = ("medfilip/benchmarks", "medfilip/testing", "medfilip/bench.py", "medfilip/train_bench.py",
                  "tests")
SCORING = {"score": {"medfilip/benchmarks/quality.py"}}


def _git_tracked() -> set[str] | None:
    if shutil.which("git") is None:
        return None
    proc = subprocess.run(["git", "ls-files", "-z"], cwd=ROOT, capture_output=True, text=True)
    if proc.returncode != 0:
        return None
    return {p for p in proc.stdout.split("\0") if p}


def _is_tracked(path: str, tracked: set[str]) -> bool:
    path = path.rstrip("/")
    return path in tracked or any(t.startswith(path + "/") for t in tracked)


def stale_lock_entries(status: dict, tracked: set[str]) -> list[str]:
    """What `dvc status --json` says differs from dvc.lock in git-tracked inputs (absent outputs ignored)."""
    stale = []
    for stage, changes in status.items():
        for change in changes:
            if isinstance(change, str):
                if change != "always changed":
                    stale.append(f"{stage}: {change}")
                continue
            for path, state in change.get("changed deps", {}).items():
                if isinstance(state, dict):  # a params file: key -> new / modified / deleted
                    stale += [f"{stage}: param {key} {what}" for key, what in state.items()]
                elif _is_tracked(path, tracked):
                    stale.append(f"{stage}: {path} {state}")
    return stale


def test_stale_lock_entries_ignore_absent_outputs_and_flag_tracked_changes():
    status = {
        "ingest": [{"changed deps": {"data/raw/phantom": "deleted"}}, {"changed outs": {"data/interim": "deleted"}}],
        "extract": [{"changed deps": {"medfilip/extract": "modified", "params.yaml": {"llm.model": "modified"}}}],
        "train": ["changed command"],
    }
    tracked = {"medfilip/extract/run.py", "params.yaml"}
    assert stale_lock_entries(status, tracked) == [
        "extract: medfilip/extract modified", "extract: param llm.model modified", "train: changed command"]


def test_dvc_lock_matches_the_committed_code_and_params():
    tracked = _git_tracked()
    if tracked is None or "dvc.lock" not in tracked:
        pytest.skip("not a git checkout with a committed dvc.lock")
    proc = subprocess.run([sys.executable, "-m", "dvc", "status", "--json"], cwd=ROOT, capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr
    stale = stale_lock_entries(json.loads(proc.stdout or "{}"), tracked)
    assert not stale, ("dvc.lock is older than the code or params: run `dvc repro` and commit dvc.lock.\n"
                       + "\n".join(stale))


def test_dvcignore_ignores_bytecode_and_caches():
    from dvc.repo import Repo

    with Repo(str(ROOT)) as repo:
        for path in ("medfilip/extract/__pycache__/run.cpython-311.pyc", "medfilip/__pycache__/cli.cpython-311.pyc",
                     "medfilip/extract/run.pyc", ".pytest_cache/v/cache/nodeids"):
            assert repo.dvcignore.is_ignored_file(str(ROOT / path)), path
        assert not repo.dvcignore.is_ignored_file(str(ROOT / "medfilip/extract/run.py"))


def _stages() -> dict:
    return yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]


def _leaf_keys(node, prefix: str) -> set[str]:
    if isinstance(node, dict) and node:
        return set().union(*(_leaf_keys(v, f"{prefix}.{k}") for k, v in node.items()))
    return {prefix}


def test_no_stage_depends_on_scoring_benchmarks_or_stand_ins():
    for name, stage in _stages().items():
        spec = stage.get("do", stage)
        for dep in spec.get("deps", []):
            dep = dep.rstrip("/")
            if not dep.startswith(("medfilip", "tests")):
                continue
            files = [p.relative_to(ROOT).as_posix() for p in (ROOT / dep).rglob("*.py")] if (ROOT / dep).is_dir() \
                else [dep]
            inside = [f for f in files if f.startswith(OUTSIDE_STAGES) and f not in SCORING.get(name, ())]
            assert not inside, f"stage {name} depends on {inside}"
    extract = {p.name for p in (ROOT / "medfilip/extract").glob("*.py")}
    assert not extract & {"quality.py", "throughput.py", "standin.py"}


def test_no_stage_reruns_for_a_param_that_changes_no_output():
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    for name, stage in _stages().items():
        spec = stage.get("do", stage)
        keys: set[str] = set()
        for entry in spec.get("params", []):
            if "$" in str(entry):
                continue  # a foreach item's own entry
            node = params
            for part in str(entry).split("."):
                node = node[part]
            keys |= _leaf_keys(node, str(entry))
        assert not keys & NON_OUTPUT_KEYS, f"stage {name} re-runs for {sorted(keys & NON_OUTPUT_KEYS)}"


def test_explain_reads_a_timing_free_extraction_status(tmp_path):
    from medfilip.config import ExtractParams, LLMParams
    from medfilip.extract.run import run_extract

    stages = _stages()
    assert "data/interim/extraction_status.parquet" in stages["extract"]["outs"]
    assert "data/interim/extractions.parquet" not in stages["explain"]["deps"]
    assert "data/interim/extraction_status.parquet" in stages["explain"]["deps"]
    assert "extraction_status.parquet" in (ROOT / "pipeline/explain.py").read_text()

    studies = pa.table({"study_id": ["s1", "s2"], "report": ["Small left pleural effusion.", "No acute process."]})
    params = ExtractParams(cache=str(tmp_path / "llm.sqlite"), progress=False)
    digests = []
    for run in ("first", "cached"):
        out = tmp_path / run
        run_extract(studies, LLMParams(), params, out)
        digests.append((out / "extraction_status.parquet").read_bytes())
        status = pq.read_table(out / "extraction_status.parquet")
        assert status.column("status").to_pylist() == ["ok", "ok"]
        assert not {"latency_s", "cache_hit", "attempts"} & set(status.column_names)
    assert digests[0] == digests[1]  # a re-run that finds the same answers changes nothing explain reads
    assert pq.read_table(tmp_path / "cached/extractions.parquet").column("cache_hit").to_pylist() == [True, True]


def test_no_stage_depends_on_a_raw_image_tree():
    """`${data.root}` alone is the whole dataset folder (550 GB of JPGs for MIMIC-CXR): DVC would stat and
    hash every image on each `dvc status`. Stages watch the metadata and ingest's image fingerprint."""
    for name, stage in _stages().items():
        spec = stage.get("do", stage)
        for dep in spec.get("deps", []):
            assert str(dep).rstrip("/") not in ("${data.root}", "${item.root}"), f"stage {name} depends on {dep}"
    deps = {n: (s.get("do", s)).get("deps", []) for n, s in _stages().items()}
    assert "${data.root}/${data.metadata}" in deps["ingest"]
    assert "data/interim/image_files.parquet" in deps["pixels"]
    assert "data/interim/reference.parquet" in deps["evaluate"]


def test_every_key_dvc_yaml_interpolates_is_written_in_params():
    """DVC does not know medfilip.config's defaults: a key dvc.yaml interpolates must be in params.yaml."""
    import re

    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    for key in set(re.findall(r"\$\{([a-z_.]+)\}", (ROOT / "dvc.yaml").read_text())):
        if key.split(".")[0] in ("item", "key"):
            continue
        node = params
        for part in key.split("."):
            assert isinstance(node, dict) and part in node, f"dvc.yaml uses ${{{key}}}, missing in params.yaml"
            node = node[part]
