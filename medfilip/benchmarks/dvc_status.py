"""What `dvc status` costs when a stage depends on the raw image tree, and when it does not.

Issue 9: ingest and pixels used to depend on ``${data.root}``, so DVC stat'ed and hashed
every image of the dataset (550 GB for MIMIC-CXR-JPG) on each ``dvc status`` and
``dvc repro``. They now depend on the metadata file and on ingest's fingerprint
(``image_files.parquet``). This benchmark builds a tree of ``n`` small files plus a manifest
in a throw-away DVC project and times, for both layouts, the first ``dvc repro`` (DVC
hashes every dependency once) and then ``dvc status`` with nothing changed.
"""

from __future__ import annotations

import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

_FILES_PER_DIR = 1000  # like MIMIC's pXX/pNNNNNNNN/sNNNNNNNN folders: never one huge directory

# The stage's own work is the same in both layouts (read the manifest); only its deps differ.
_STAGE_CMD = "python -c \"import shutil; shutil.copy('raw/manifest.csv', 'out.csv')\""
_LAYOUTS = {
    "before: deps on data.root": "raw",
    "after: deps on the metadata file": "raw/manifest.csv",
}


def make_tree(root: Path, n: int) -> None:
    """``n`` files of 64 bytes under ``root/files/dNNNN/`` and a manifest listing them."""
    lines = ["path,report"]
    for i in range(n):
        folder = root / "files" / f"d{i // _FILES_PER_DIR:04d}"
        if i % _FILES_PER_DIR == 0:
            folder.mkdir(parents=True, exist_ok=True)
        rel = f"files/d{i // _FILES_PER_DIR:04d}/{i:07d}.png"
        (root / rel).write_bytes(i.to_bytes(8, "little") * 8)
        lines.append(f"{rel},report {i}")
    (root / "manifest.csv").write_text("\n".join(lines) + "\n")


def _dvc(project: Path, *args: str) -> float:
    """Run one dvc command in ``project``; its wall-clock seconds."""
    env = {**os.environ, "DVC_NO_ANALYTICS": "1"}
    start = time.perf_counter()
    subprocess.run([sys.executable, "-m", "dvc", *args], cwd=project, env=env, check=True,
                   stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    return time.perf_counter() - start


def _project(base: Path, raw: Path, dep: str) -> Path:
    project = base / "project"
    if project.exists():
        shutil.rmtree(project)
    project.mkdir()
    os.symlink(raw, project / "raw")  # one tree for both layouts; DVC follows the link like a folder
    subprocess.run(["git", "init", "-q"], cwd=project, check=True)
    _dvc(project, "init", "-q")
    (project / "dvc.yaml").write_text(
        f"stages:\n  ingest:\n    cmd: {_STAGE_CMD}\n    deps:\n      - {dep}\n    outs:\n      - out.csv\n"
    )
    return project


def _fingerprint_seconds(raw: Path) -> tuple[float, int]:
    """What ingest pays instead of DVC's hashing: one stat per image (``image_files``); and how
    many files it fingerprinted."""
    import pyarrow as pa

    from medfilip.data.ingest import image_files

    paths = [str(raw / line.split(",", 1)[0]) for line in (raw / "manifest.csv").read_text().splitlines()[1:]]
    table = pa.table({"image_id": [str(i) for i in range(len(paths))], "path": paths})
    start = time.perf_counter()
    stats = image_files(table)
    seconds = time.perf_counter() - start
    return seconds, sum(1 for b in stats.column("bytes").to_pylist() if b and b > 0)


def benchmark(n_files: int = 100_000, repeats: int = 3) -> dict:
    """Seconds of the first ``dvc repro`` and of ``dvc status`` (median of ``repeats``), per layout."""
    with tempfile.TemporaryDirectory(prefix="medfilip-dvc-status-") as tmp:
        base = Path(tmp)
        start = time.perf_counter()
        make_tree(base / "raw", n_files)
        result: dict = {"n_files": n_files, "tree_build_s": round(time.perf_counter() - start, 1), "layouts": {}}
        seconds, n_files_seen = _fingerprint_seconds(base / "raw")
        result["ingest_fingerprint_s"] = round(seconds, 2)
        result["ingest_fingerprint_files"] = n_files_seen
        for name, dep in _LAYOUTS.items():
            project = _project(base, base / "raw", dep)
            repro = _dvc(project, "repro", "-q")
            status = [_dvc(project, "status", "-q") for _ in range(repeats)]
            result["layouts"][name] = {"dep": dep, "first_repro_s": round(repro, 2),
                                      "status_s": round(statistics.median(status), 2),
                                      "status_runs_s": [round(s, 2) for s in status]}
        before, after = (result["layouts"][k]["status_s"] for k in _LAYOUTS)
        result["status_speedup"] = round(before / after, 1) if after else None
        return result
