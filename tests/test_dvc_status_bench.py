"""The dvc-status benchmark runs end to end on a tiny tree (its figures live in the closing note, not here)."""

import shutil

import pytest

from medfilip.benchmarks.dvc_status import benchmark, make_tree


def test_make_tree_writes_a_manifest_of_every_file(tmp_path):
    make_tree(tmp_path, 2500)
    lines = (tmp_path / "manifest.csv").read_text().splitlines()
    assert lines[0] == "path,report" and len(lines) == 2501
    assert all((tmp_path / line.split(",")[0]).is_file() for line in lines[1:])
    assert len(list((tmp_path / "files").iterdir())) == 3  # 1000 files per folder


@pytest.mark.skipif(shutil.which("git") is None, reason="needs git")
def test_benchmark_reports_both_layouts():
    result = benchmark(n_files=50, repeats=1)
    layouts = result["layouts"]
    assert [v["dep"] for v in layouts.values()] == ["raw", "raw/manifest.csv"]
    assert all(v["status_s"] > 0 and v["first_repro_s"] > 0 for v in layouts.values())
    assert result["ingest_fingerprint_files"] == 50  # every image stat'ed, with its size
