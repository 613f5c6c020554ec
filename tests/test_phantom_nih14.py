"""The phantom re-published in NIH ChestX-ray14's layout round-trips through the real nih14 importer."""

import pyarrow.parquet as pq

from medfilip.config import DataParams, PhantomParams, SplitParams
from medfilip.data.ingest import ingest
from medfilip.data.phantom import synthesize
from medfilip.data.phantom_nih14 import nih_names, write_phantom_nih14


def test_phantom_in_nih_layout_imports_with_the_phantom_truth(tmp_path):
    phantom = tmp_path / "phantom"
    synthesize(PhantomParams(n_patients=30, max_studies_per_patient=2, image_size=64, seed=5, workers=1),
               SplitParams(), phantom)
    summary = write_phantom_nih14(phantom, tmp_path / "nih")
    ingest(DataParams(source="nih14", root=str(tmp_path / "nih"), metadata="Data_Entry_2017_v2020.csv"),
           tmp_path / "interim")

    studies = pq.read_table(phantom / "studies.parquet").to_pylist()
    truth = pq.read_table(phantom / "truth.parquet").to_pylist()
    found: dict[str, set] = {}
    for row in truth:
        found.setdefault(row["study_id"], set()).add(row["category"])
    published = [s for s in studies if "covid-19" not in found.get(s["study_id"], set())]
    assert summary["n_images"] == len(published)
    assert summary["n_left_out_unseen_class"] == len(studies) - len(published)

    # Same images in NIH's naming: patient and follow-up order; labels = truth in NIH's label space.
    names = nih_names()
    expected = sorted(tuple(sorted({c for c in found.get(s["study_id"], ()) if c in names}) or ("no finding",))
                      for s in published)
    reference = pq.read_table(tmp_path / "interim" / "reference.parquet").to_pylist()
    got: dict[str, set] = {}
    for row in reference:
        got.setdefault(row["study_id"], set()).add(row["category"])
    assert sorted(tuple(sorted(v)) for v in got.values()) == expected

    # test_list.txt is the phantom's test patients: the model never trained on them.
    imported = pq.read_table(tmp_path / "interim" / "studies.parquet").to_pylist()
    n_test = sum(s["split"] == "test" for s in published)
    assert sum(s["split"] == "test" for s in imported) == n_test == summary["n_test"]
    assert {s["split"] for s in imported} <= {"train", "val", "test"}
