"""Each source imports its fixture through `dvc repro ingest` (issue 10), watching only its metadata.

The per-importer tests check counts, splits and labels against hand-made fixtures; here the same
fixtures go through DVC in a project copy, and the stage's outputs must equal an in-process import.
"""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import yaml

from medfilip.config import DataParams
from medfilip.data.ingest import ingest
from pipeline_project import dvc, make_project, ran_stages

pytestmark = pytest.mark.slow


def _mimic(root: Path) -> Path:
    from medfilip.testing.mimic_layout import write_mimic_cxr

    return write_mimic_cxr(root)


def _chexpert(root: Path) -> Path:
    from medfilip.testing.chexpert_layout import write_chexpert

    return write_chexpert(root, with_test=True)


def _openi(root: Path) -> Path:
    from medfilip.testing.openi_layout import write_openi_tree

    return write_openi_tree(root)


def _nih14(root: Path) -> Path:
    from medfilip.testing.nih14_layout import write_nih14

    return write_nih14(root)


def _covid(root: Path) -> Path:
    from medfilip.testing.covid_layout import write_covid

    return write_covid(root)


def _rsna(root: Path) -> Path:
    from medfilip.testing.rsna_layout import write_rsna

    return write_rsna(root)


def _vindr(root: Path) -> Path:
    from medfilip.testing.vindr_layout import write_vindr

    return write_vindr(root)


def _siim(root: Path) -> Path:
    from medfilip.testing.siim_layout import write_siim

    return write_siim(root)


# source -> (fixture writer, data.metadata)
SOURCES = {
    "mimic-cxr": (_mimic, "mimic-cxr-2.0.0-metadata.csv.gz"),
    "openi": (_openi, "ecgen-radiology"),
    "chexpert": (_chexpert, "."),
    "nih14": (_nih14, "Data_Entry_2017_v2020.csv"),
    "covid": (_covid, "."),
    "rsna": (_rsna, "stage_2_train_labels.csv"),
    "vindr": (_vindr, "annotations"),
    "siim": (_siim, "train-rle.csv"),
}


@pytest.fixture(scope="module")
def project(tmp_path_factory):
    return make_project(tmp_path_factory.mktemp("sources") / "project", {})


@pytest.mark.parametrize("source", sorted(SOURCES))
def test_dvc_repro_ingest_imports_the_fixture(project, tmp_path, source):
    write, metadata = SOURCES[source]
    root = write(project / "data" / "raw" / source).resolve()
    rel_root = root.relative_to(project).as_posix()
    params_path = project / "params.yaml"
    params = yaml.safe_load(params_path.read_text())
    params["data"].update({"source": source, "root": rel_root, "metadata": metadata})
    params_path.write_text(yaml.safe_dump(params, sort_keys=False))

    proc = dvc(["repro", "ingest"], project)
    assert ran_stages(proc) == {"ingest"}, proc.stdout  # the raw tree of another source is not upstream
    summary = json.loads((project / "reports" / "ingest.json").read_text())
    assert summary["source"] == source and summary["n_studies"] > 0

    # The same import in process gives the same tables and counts.
    expected = ingest(DataParams(source=source, root=str(root), metadata=metadata), tmp_path / "interim")
    for key in ("n_studies", "n_images", "n_patients", "studies_per_split", "n_reference_rows"):
        assert summary[key] == expected[key], key
    for name in ("studies", "reference"):
        got = pq.read_table(project / "data" / "interim" / f"{name}.parquet")
        assert got.equals(pq.read_table(tmp_path / "interim" / f"{name}.parquet")), name
    lock = yaml.safe_load((project / "dvc.lock").read_text())["stages"]["ingest"]
    assert f"{rel_root}/{metadata}".rstrip("/.") in {d["path"].rstrip("/.") for d in lock["deps"]}
    assert dvc(["status", "ingest"], project).stdout.strip().endswith("up to date.")
