"""How fast ``ingest`` imports a MIMIC-CXR-JPG-sized tree, and how much memory it needs.

A synthetic tree in PhysioNet's layout (:mod:`medfilip.testing.mimic_layout`) with
``n_studies`` studies is written to a temp folder: the three metadata CSVs, one report
file per study, and **zero-byte placeholder** JPGs (the importer never opens an image;
ingest only stat()s them). Then ``medfilip.data.ingest.ingest`` runs in a fresh Python
process, which reports its own wall time, the importer's share of it and its peak RSS,
so nothing the generator allocated counts against the import. The tree goes to
/dev/shm when it has room (see :func:`default_workdir`) and is deleted afterwards.

    python -m medfilip.benchmarks.import_rate --studies 100000
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Optional

_CHILD = r"""
import json, resource, sys, time
from pathlib import Path
root, out = Path(sys.argv[1]), Path(sys.argv[2])
from medfilip.config import DataParams
from medfilip.data import ingest as ingest_module
from medfilip.data.importers import mimic_cxr
timing = {}
plain_load = mimic_cxr.load
def timed_load(root, params):  # the importer's share of the ingest time
    start = time.perf_counter()
    dataset = plain_load(root, params)
    timing["import_seconds"] = time.perf_counter() - start
    return dataset
mimic_cxr.load = timed_load  # get_importer looks the function up at call time
params = DataParams(source="mimic-cxr", root=str(root), metadata="mimic-cxr-2.0.0-metadata.csv.gz")
start = time.perf_counter()
summary = ingest_module.ingest(params, out)
seconds = time.perf_counter() - start
print(json.dumps({"ingest_seconds": seconds, **timing, "n_studies": summary["n_studies"],
                  "n_images": summary["n_images"],
                  "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))
"""


_SHM = Path("/dev/shm")
_BYTES_PER_STUDY = 16 * 1024  # a report page, folder and placeholder inodes, with room to spare


def default_workdir(n_studies: int) -> Optional[Path]:
    """RAM-backed /dev/shm when it has room, else the system temp folder (None).

    The tree is ~4 files per study; creating and deleting hundreds of thousands of files on a
    disk mounted with online discard takes minutes that measure the disk, not the importer.
    """
    try:
        free = shutil.disk_usage(_SHM).free
    except OSError:
        return None
    return _SHM if os.access(_SHM, os.W_OK) and free > 4 * n_studies * _BYTES_PER_STUDY else None


def benchmark(n_studies: int = 100_000, *, workdir: Optional[Path] = None, seed: int = 0) -> dict:
    """Generate a tree of ``n_studies`` studies, ingest it in a fresh process, and report the rates.

    ``workdir``: where the temporary tree goes (default :func:`default_workdir`); it is removed after.
    """
    from medfilip.testing.mimic_layout import synthetic_mimic_studies, write_mimic_cxr

    workdir = default_workdir(n_studies) if workdir is None else Path(workdir)
    tmp = Path(tempfile.mkdtemp(prefix="medfilip-import-", dir=workdir))
    try:
        start = time.perf_counter()
        studies = synthetic_mimic_studies(n_studies, seed=seed)
        root = write_mimic_cxr(tmp / "mimic-cxr-jpg", studies, image_bytes=b"", orphan_reports=())
        generation_seconds = time.perf_counter() - start
        n_files = sum(len(s.images) for s in studies)
        del studies
        proc = subprocess.run([sys.executable, "-c", _CHILD, str(root), str(tmp / "interim")],
                              capture_output=True, text=True, check=False)
        if proc.returncode != 0:
            raise RuntimeError(f"ingest of the benchmark tree failed:\n{proc.stderr[-4000:]}")
        child = json.loads(proc.stdout.strip().splitlines()[-1])
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    seconds = child["ingest_seconds"]
    return {
        "n_studies_generated": n_studies,
        "n_image_files_generated": n_files,
        "n_studies": child["n_studies"],
        "n_images": child["n_images"],
        "image_files": "zero-byte placeholders",
        "workdir": str(tmp.parent),
        "generation_seconds": round(generation_seconds, 2),
        "import_seconds": round(child["import_seconds"], 2),
        "ingest_seconds": round(seconds, 2),
        "studies_per_s": round(child["n_studies"] / seconds, 1),
        "images_per_s": round(child["n_images"] / seconds, 1),
        "peak_rss_mb": round(child["peak_rss_mb"], 1),
    }


def main(argv: Optional[list[str]] = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--studies", type=int, default=100_000)
    parser.add_argument("--workdir", type=Path, default=None,
                        help="where the temporary tree goes (default: /dev/shm when it has room, else system temp)")
    args = parser.parse_args(argv)
    print(json.dumps(benchmark(args.studies, workdir=args.workdir), indent=2))


if __name__ == "__main__":
    main()
