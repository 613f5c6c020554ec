"""The Open-i importer: a tiny tree in NLM's layout, then all 3,955 real reports (torchxrayvision's archive)."""

from __future__ import annotations

import builtins
import io
import os
import tarfile
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from medfilip.config import DataParams
from medfilip.data.importers import DatasetError
from medfilip.data.importers.openi import load, view_from_caption
from medfilip.data.ingest import ingest
from medfilip.data.mesh import MeshMapError, load_mesh_map, map_mesh_term, map_study_terms
from medfilip.data.openi import N_REPORTS, OpenIError, locate_openi_archive
from medfilip.testing.openi_layout import (DEFAULT_MISSING_PNG, DEFAULT_STUDIES, IMAGES_DIR, REPORTS_DIR,
                                           OpenIStudy, openi_xml, write_openi_tree, write_pngs)
from medfilip.vocab import load_vocabulary


def _params(root: Path, metadata: str = REPORTS_DIR) -> DataParams:
    return DataParams(source="openi", root=str(root), metadata=metadata)


@pytest.fixture
def tree(tmp_path):
    return write_openi_tree(tmp_path / "openi")


def test_tiny_tree_ingests_studies_images_and_mesh_reference(tree, tmp_path):
    summary = ingest(_params(tree), tmp_path / "interim")
    assert summary["n_studies"] == 5 and summary["n_patients"] == 5
    assert summary["n_images"] == 7
    assert summary["n_studies_without_image"] == 1  # CXR3 is kept, text only
    assert summary["n_missing_image_files"] == 1  # a listed PNG that is not there is counted, not an error
    assert summary["one_patient_per_study"] and summary["warnings"]
    assert summary["n_studies_not_indexed"] == 1 and summary["n_studies_no_mapped_mesh"] == 1
    assert summary["mesh_unmapped_terms"] == {"Made Up Heading/left": 1}
    assert summary["labels_without_counterpart"] == {"Epicardial Fat/prominent": 1}
    assert summary["image_views"] == {"AP": 1, "unknown": 6}

    studies = {r["study_id"]: r for r in pq.read_table(tmp_path / "interim" / "studies.parquet").to_pylist()}
    assert set(studies) == {s.uid for s in DEFAULT_STUDIES}
    assert all(r["patient_id"] == sid for sid, r in studies.items())
    cxr2 = studies["CXR2"]
    assert cxr2["report"].splitlines()[0] == "COMPARISON: Prior study of last year."
    assert cxr2["findings"] == "Mild opacity at the left lung base. The heart is mildly enlarged."
    assert cxr2["impression"] == "Left basilar opacity, possibly atelectasis. Mild cardiomegaly."
    assert studies["CXR4"]["findings"] is None and studies["CXR4"]["impression"] == "Limited study."

    images = pq.read_table(tmp_path / "interim" / "images.parquet").to_pylist()
    expected = {i: s.uid for s in DEFAULT_STUDIES for i in s.images}
    assert {im["image_id"]: im["study_id"] for im in images} == expected
    for im in images:
        assert im["path"] == str(tree / IMAGES_DIR / f"{im['image_id']}.png")
        assert Path(im["path"]).exists() == (im["image_id"] not in DEFAULT_MISSING_PNG)
        assert im["view"] == ("AP" if im["study_id"] == "CXR5" else None)

    reference = pq.read_table(tmp_path / "interim" / "reference.parquet").to_pylist()
    rows = {(r["study_id"], r["category"]): r for r in reference}
    assert set(rows) == {("CXR1", "no finding"), ("CXR2", "lung opacity"), ("CXR2", "cardiomegaly"),
                         ("CXR3", "pleural effusion")}
    assert (rows["CXR2", "lung opacity"]["severity"], rows["CXR2", "lung opacity"]["location"]) == \
        ("mild", "left lower zone")
    assert rows["CXR2", "cardiomegaly"]["severity"] == "mild"
    assert (rows["CXR3", "pleural effusion"]["severity"], rows["CXR3", "pleural effusion"]["location"]) == \
        ("mild", "right")
    assert not any(r["negated"] or r["uncertain"] for r in reference)
    assert summary["n_reference_rows"] == 4 and summary["n_reference_studies"] == 3


def test_reports_read_from_the_archive_when_not_unpacked(tree, tmp_path):
    archive = tree / "NLMCXR_reports.tgz"
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(tree / REPORTS_DIR, arcname=REPORTS_DIR)
    for xml in (tree / REPORTS_DIR).iterdir():
        xml.unlink()
    (tree / REPORTS_DIR).rmdir()
    ds = load(tree, _params(tree, "NLMCXR_reports.tgz"))
    assert ds.studies.column("study_id").to_pylist() == [s.uid for s in DEFAULT_STUDIES]
    assert ds.images.num_rows == 7 and ds.notes["reports_from"] == str(archive)


# Captions written for this test in Open-i's style (XXXX is its de-identification mask); none is copied.
@pytest.mark.parametrize("caption, view", [
    ("Radiograph chest PA and lateral", None),
    ("CHEST TWO VIEWS FRONTAL/LATERAL", None),
    ("Frontal and lateral chest XXXX", None),
    ("Chest XXXX and lateral", None),
    ("Two views of the chest: XXXX", None),
    ("Portable chest, one view, AP view.", "AP"),
    ("Portable AP chest", "AP"),
    ("PA chest XXXX, comparison XXXX", "PA"),
    ("Lateral chest XXXX", "LATERAL"),
    ("Chest, one frontal view", None),
    ("Chest XXXX", None),
    (None, None),
])
def test_view_only_from_a_caption_naming_one_view(caption, view):
    assert view_from_caption(caption) == view


def test_missing_folders_and_bad_reports_are_sentences(tmp_path):
    with pytest.raises(DatasetError, match="Open-i folder not found"):
        load(tmp_path / "nowhere", _params(tmp_path / "nowhere"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(DatasetError, match="unpack NLMCXR_reports.tgz"):
        load(tmp_path / "empty", _params(tmp_path / "empty"))

    root = write_openi_tree(tmp_path / "noimages")
    for png in (root / IMAGES_DIR).iterdir():
        png.unlink()
    (root / IMAGES_DIR).rmdir()
    with pytest.raises(DatasetError, match=f"{IMAGES_DIR}: Open-i image folder not found"):
        load(root, _params(root))

    twice = DEFAULT_STUDIES + (OpenIStudy(6, "CXR2", findings="Again.", mesh_major=("normal",)),)
    root = write_openi_tree(tmp_path / "twice", twice)
    with pytest.raises(DatasetError, match=r"6\.xml: study 'CXR2' is also the uId of .*2\.xml"):
        load(root, _params(root))

    shared = DEFAULT_STUDIES + (OpenIStudy(6, "CXR6", mesh_major=("normal",), images=("CXR1_1_IM-0001-3001",)),)
    root = write_openi_tree(tmp_path / "shared", shared)
    with pytest.raises(DatasetError, match="image 'CXR1_1_IM-0001-3001' is also listed by study 'CXR1'"):
        load(root, _params(root))

    root = write_openi_tree(tmp_path / "broken")
    (root / REPORTS_DIR / "7.xml").write_text(openi_xml(DEFAULT_STUDIES[0])[:200])
    with pytest.raises(DatasetError, match=r"7\.xml: not valid XML"):
        load(root, _params(root))
    (root / REPORTS_DIR / "7.xml").write_text(openi_xml(OpenIStudy(7, "")))
    with pytest.raises(DatasetError, match=r"7\.xml: report has no <uId"):
        load(root, _params(root))


def test_mesh_terms_and_study_status():
    vocab = load_vocabulary()
    mesh = load_mesh_map(vocabulary=vocab)
    opacity = map_mesh_term("Opacity/lung/base/left/mild", mesh, vocab)
    assert (opacity.kind, opacity.category, opacity.severity, opacity.location) == \
        ("finding", "lung opacity", "mild", "left lower zone")
    assert map_mesh_term("Opacity/lung/round", mesh, vocab).category == "nodule"  # a qualifier decides
    assert map_mesh_term("NORMAL", mesh, vocab).kind == "normal"  # headings are case-insensitive
    assert map_mesh_term("Epicardial Fat", mesh, vocab).kind == "ignored"
    assert map_mesh_term("Cardiac Shadow/small", mesh, vocab).kind == "unmapped"  # qualifiers only, none fits
    assert map_study_terms(["normal", "Cardiomegaly"], mesh, vocab).status == "findings"
    assert map_study_terms(["normal", "Epicardial Fat"], mesh, vocab).status == "normal"
    assert map_study_terms(["No Indexing"], mesh, vocab).status == "not_indexed"
    assert map_study_terms(["Epicardial Fat", "Nowhere"], mesh, vocab).status == "no_mapped_tag"


def test_mesh_map_names_a_bad_category(tmp_path):
    path = tmp_path / "mesh_map.yaml"
    path.write_text("normal: [normal]\nterms:\n  Cardiomegaly: big heart\n")
    with pytest.raises(MeshMapError, match=r"terms\.Cardiomegaly: 'big heart' is not a category"):
        load_mesh_map(path)


# --------------------------------------------------------------------------- the real reports


@pytest.fixture(scope="module")
def archive():
    try:
        return locate_openi_archive()
    except OpenIError as exc:
        pytest.skip(f"the real Open-i reports come with torchxrayvision: {exc}")


def _record_writes(monkeypatch) -> list[str]:
    """Every path opened for writing through open(), os.open() or pyarrow's write_table."""
    written: list[str] = []
    real_open, real_os_open, real_write_table = builtins.open, os.open, pq.write_table

    def recording_open(file, mode="r", *args, **kwargs):
        if isinstance(file, (str, os.PathLike)) and any(c in mode for c in "wax+"):
            written.append(os.path.abspath(file))
        return real_open(file, mode, *args, **kwargs)

    def recording_os_open(path, flags, *args, **kwargs):
        if flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT):
            written.append(os.path.abspath(path))
        return real_os_open(path, flags, *args, **kwargs)

    def recording_write_table(table, where, *args, **kwargs):
        written.append(os.path.abspath(where))
        return real_write_table(table, where, *args, **kwargs)

    monkeypatch.setattr(builtins, "open", recording_open)
    monkeypatch.setattr(io, "open", recording_open)
    monkeypatch.setattr(os, "open", recording_os_open)
    monkeypatch.setattr(pq, "write_table", recording_write_table)
    return written


def test_all_real_openi_reports_import(archive, tmp_path, monkeypatch):
    with tarfile.open(archive, "r:gz") as tar:
        tar.extractall(tmp_path, filter="data")  # -> tmp_path/ecgen-radiology/<n>.xml
    xml_files = list((tmp_path / REPORTS_DIR).glob("*.xml"))
    assert len(xml_files) == N_REPORTS
    from medfilip.data.openi import read_openi_folder

    image_ids = [i for r in read_openi_folder(tmp_path / REPORTS_DIR) for i in r.image_ids]
    assert write_pngs(tmp_path / IMAGES_DIR, image_ids) == len(image_ids)

    monkeypatch.chdir(tmp_path)
    written = _record_writes(monkeypatch)
    start = time.perf_counter()
    summary = ingest(_params(tmp_path), tmp_path / "interim")
    seconds = time.perf_counter() - start
    print(f"Open-i import of {N_REPORTS} reports and {len(image_ids)} images: {seconds:.2f} s")

    assert summary["n_studies"] == N_REPORTS == 3955
    assert summary["n_images"] == len(image_ids) == len(set(image_ids))
    assert summary["n_missing_image_files"] == 0
    assert summary["n_reference_rows"] > 0
    assert summary["n_with_findings"] > 3000 and summary["n_with_impression"] > 3900
    assert summary["n_studies_with_mesh_findings"] + summary["n_studies_mesh_normal"] + \
        summary["n_studies_not_indexed"] + summary["n_studies_no_mapped_mesh"] == N_REPORTS
    assert len(summary["mesh_unmapped_terms"]) <= 25
    reference = pq.read_table(tmp_path / "interim" / "reference.parquet")
    assert set(reference.column("category").to_pylist()) <= set(load_vocabulary().info)
    # Open-i text stays in tmp_path: nothing was written anywhere else.
    assert written and all(Path(p).is_relative_to(tmp_path) for p in written), \
        [p for p in written if not Path(p).is_relative_to(tmp_path)]
