"""The paper's published numbers that reports put beside ours: the project's copy is the shared spec's."""

from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
COPY = ROOT / "data" / "paper" / "medfilip_tables.yaml"
SHARED = ROOT.parent / "shared" / "paper" / "medfilip_tables.yaml"


def test_the_copy_has_every_table_and_the_ablation_rows():
    tables = yaml.safe_load(COPY.read_text())
    for key in ("table1_zero_shot", "table2_linear_probe", "table3_unseen_covid", "table4_segmentation_dice",
                "table5_retrieval", "table6_ablation"):
        assert key in tables
    rows = tables["table6_ablation"]["rows"]
    assert [r["name"] for r in rows][0] == "report" and len(rows) == 5
    assert all(len(r["values"]) == len(tables["table6_ablation"]["columns"]) for r in rows)


@pytest.mark.skipif(not SHARED.is_file(), reason="no shared spec beside this checkout (a clone has none)")
def test_the_copy_equals_the_shared_file():
    assert yaml.safe_load(COPY.read_text()) == yaml.safe_load(SHARED.read_text())
