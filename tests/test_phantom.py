"""The phantom benchmark: truth agrees with reports, determinism, splits, and pictures that change with severity.

The report checks use their own phrase lists (not data/phantom/report_phrases.yaml), so a
template that drops a severity word or negates a present finding is caught here.
"""

import re
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image

from medfilip.config import PhantomParams, SplitParams
from medfilip.data import phantom_anatomy as pa
from medfilip.data.phantom import (
    CATEGORIES,
    _clear_previous_images,
    _study_rngs,
    benchmark,
    demo_finding,
    plan_patient_studies,
    render_example,
    synthesize,
)
from medfilip.data.phantom_findings import LOCATIONS, SEVERITIES, Finding
from medfilip.data.phantom_reports import PhraseError, load_phrases, write_report
from medfilip.data.split import assign_split

SPLIT = SplitParams()
SMALL = {"n_patients": 40, "max_studies_per_patient": 3, "image_size": 96, "seed": 3, "normal_fraction": 0.3}

# ----------------------------------------------------------------- independent phrase lists

MENTION = {
    "pleural effusion": r"effusion",
    "pneumothorax": r"pneumothorax",
    "consolidation": r"consolidat\w*|airspace (?:opacity|opacities|disease)",
    "cardiomegaly": r"cardiomegaly|enlarged (?:cardiac silhouette|heart)|enlargement of the cardiac silhouette"
    r"|(?:cardiac silhouette|heart size|heart) is (?:\w+ )?enlarged",
    "pulmonary edema": r"edema|vascular congestion",
    "atelectasis": r"atelecta\w*|collapse|volume loss",
    "nodule": r"nodul\w*|\bmass\b",
    "emphysema": r"emphysem\w*|hyperinflat\w*|copd",
    "support device": r"endotracheal|\bet tube|enteric tube|nasogastric|\bng tube|central venous catheter"
    r"|central line|pacemaker|support devices|lines and tubes",
    "covid-19": r"covid|ground-glass|viral pneumonia",
}
SEVERITY_WORDS = {
    "mild": r"mild|mildly|minimal|slight|slightly|small|trace|tiny|subtle|faint|subsegmental|plate-like|linear"
    r"|subcentimeter",
    "moderate": r"moderate|moderately|segmental|multifocal",
    "severe": r"severe|severely|marked|markedly|extensive|large|dense|complete|advanced|mass-like|diffuse",
}
SIDE_WORDS = {"left": r"\bleft\b|lingul\w*|retrocardiac", "right": r"\bright\b"}
HEDGES = r"possible|possibly|cannot|questionable|may represent"
NEG_BEFORE = re.compile(r"\b(?:no|without|negative for)\b|\bresolution of\b")
NEG_AFTER = re.compile(r"^\W*(?:is|are) not\b|\bhas resolved\b|\bresolved\b|\bno longer\b")


def sentences(report: str) -> list[str]:
    return [s.strip().lower() for s in re.split(r"(?<=[.!?])\s+|\n", report) if s.strip()]


def mentions(report: str):
    """(sentence, category, negated) for every category mention."""
    out = []
    for sent in sentences(report):
        for cat, pattern in MENTION.items():
            for m in re.finditer(pattern, sent):
                negated = bool(
                    NEG_BEFORE.search(sent[: m.start()])
                    or NEG_AFTER.search(sent[m.end():])
                    or re.search(r"\bnot\b", m.group(0))
                )
                out.append((sent, cat, negated))
    return out


def nodule_severity(sent: str) -> str | None:
    m = re.search(r"(\d+(?:\.\d+)?) (mm|cm)\b", sent)
    if not m:
        return None
    mm = float(m.group(1)) * (10 if m.group(2) == "cm" else 1)
    return "mild" if mm < 10 else "moderate" if mm < 20 else "severe"


def stated(sent: str, t: dict) -> bool:
    """Does this sentence give the finding's severity (nodules: by size) and its side?"""
    if t["severity"] is not None:
        if t["category"] == "nodule":
            if nodule_severity(sent) != t["severity"]:
                return False
        elif not re.search(rf"\b(?:{SEVERITY_WORDS[t['severity']]})\b", sent):
            return False
    return t["side"] not in SIDE_WORDS or bool(re.search(SIDE_WORDS[t["side"]], sent))


def check_report(report: str, truth: list[dict]) -> None:
    """Every truth finding is stated (category + severity + side); negations name only absent ones."""
    found = mentions(report)
    present = {t["category"] for t in truth}
    for _, cat, negated in found:
        if negated:
            assert cat not in present, f"negated '{cat}' is in truth:\n{report}"
        else:
            assert cat in present, f"'{cat}' stated but not in truth ({sorted(present)}):\n{report}"
    for t in truth:
        cat = t["category"]
        positive = [s for s, c, neg in found if c == cat and not neg]
        assert positive, f"truth '{cat}' never stated:\n{report}"
        assert any(stated(s, t) for s in positive), f"{t} not stated with its severity and side:\n{report}"
        if t["uncertain"]:
            assert any(re.search(HEDGES, s) for s in positive), f"uncertain {cat} not hedged:\n{report}"


# ----------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    root = tmp_path_factory.mktemp("phantom_w1")
    figures = tmp_path_factory.mktemp("figures")
    summary = synthesize(PhantomParams(**SMALL, workers=1), SPLIT, root, figures_dir=figures)
    return root, summary, figures


@pytest.fixture(scope="module")
def planned_corpus():
    """Plans and reports of many patients (no pixels): enough covid-19 and rare wordings to check."""
    out = []
    for i in range(700):
        split = assign_split(f"p{i:05d}", SPLIT)
        _, plans = plan_patient_studies(0, i, 3, 0.3, split)
        for plan in plans:
            report = write_report(plan, _study_rngs(0, i, plan.study_index)[1])
            truth = [{"category": f.category, "severity": f.severity, "side": f.side, "uncertain": f.uncertain}
                     for f in plan.findings]
            out.append((split, plan, report, truth))
    return out


def tables(root: Path):
    return pq.read_table(root / "studies.parquet").to_pylist(), pq.read_table(root / "truth.parquet").to_pylist()


# ----------------------------------------------------------------- layout and contracts


def test_layout_ids_and_summary(dataset):
    root, summary, _ = dataset
    studies, truth = tables(root)
    assert summary["n_studies"] == summary["n_images"] == len(studies) > SMALL["n_patients"]
    assert summary["n_findings"] == len(truth)
    assert sum(summary["categories"].values()) == len(truth)
    assert summary["images_per_s"] > 0
    for s in studies:
        assert re.fullmatch(r"p\d{5}", s["patient_id"]) and re.fullmatch(r"s\d{5}_\d", s["study_id"])
        assert s["study_id"][1:6] == s["patient_id"][1:]
        assert s["view"] == "PA" and s["path"] == f"images/{s['patient_id']}/{s['study_id']}.png"
        assert (root / s["path"]).exists()
        assert "FINDINGS:" in s["report"] and "IMPRESSION:" in s["report"]
    ids = {s["study_id"] for s in studies}
    assert {t["study_id"] for t in truth} <= ids
    for t in truth:
        assert t["category"] in CATEGORIES
        assert t["severity"] in SEVERITIES or (t["severity"] is None and t["category"] == "support device")
        no_site = ("cardiomegaly", "support device")
        assert t["location"] in LOCATIONS or (t["location"] is None and t["category"] in no_site)
    # normal studies at about the configured rate; abnormal ones carry 1-3 findings
    per_study = {sid: 0 for sid in ids}
    for t in truth:
        per_study[t["study_id"]] += 1
    assert max(per_study.values()) <= 3
    assert 0.1 < sum(n == 0 for n in per_study.values()) / len(ids) < 0.55


def test_images_look_like_chest_radiographs(dataset):
    root, _, _ = dataset
    studies, truth = tables(root)
    abnormal = {t["study_id"] for t in truth}
    normal = [s for s in studies if s["study_id"] not in abnormal]
    assert normal
    for s in normal[:10]:
        img = np.asarray(Image.open(root / s["path"]))
        assert img.shape == (96, 96) and img.dtype == np.uint8
        lo, hi = np.percentile(img, [1, 99])
        assert hi - lo > 120, "too little contrast"
        band = img[int(96 * 0.3) : int(96 * 0.55)].astype(float)
        lungs = np.r_[band[:, 17:32].ravel(), band[:, 64:79].ravel()]  # 18-33 % and 67-82 % of the width
        mediastinum = band[:, int(96 * 0.46) : int(96 * 0.54)]
        assert lungs.mean() + 40 < mediastinum.mean(), "lungs should be darker than the mediastinum"


def test_montages_written_and_labelled(dataset):
    _, _, figures = dataset
    for severity in SEVERITIES:
        img = Image.open(figures / f"phantom_{severity}.png")
        assert img.mode == "L" and img.width >= 4 * 256 and img.height >= 3 * 256


# ----------------------------------------------------------------- truth <-> report


def test_truth_agrees_with_reports(dataset):
    root, _, _ = dataset
    studies, truth = tables(root)
    by_study = {}
    for t in truth:
        by_study.setdefault(t["study_id"], []).append(t)
    for s in studies:
        check_report(s["report"], by_study.get(s["study_id"], []))


def test_truth_agrees_with_reports_over_many_wordings(planned_corpus):
    for _, _, report, truth in planned_corpus:
        check_report(report, truth)


def test_reports_vary_like_real_ones(planned_corpus):
    reports = [r for _, _, r, _ in planned_corpus]
    text = "\n".join(reports).lower()
    for phrase in ("no pneumothorax", "without", "cannot", "possible", "compared to the prior", "lungs are clear",
                   "within normal limits", "enlarged cardiac silhouette", "airspace opacity", "basilar",
                   "left lower lobe", "apical", "hyperinflated", "vascular congestion", "examination:", "indication:",
                   "comparison:", "1. "):
        assert phrase in text, phrase
    assert len(set(reports)) > 0.97 * len(reports)


# ----------------------------------------------------------------- splits and the unseen class


def test_patients_stay_in_one_split(dataset):
    root, _, _ = dataset
    studies, _ = tables(root)
    seen = {}
    for s in studies:
        assert seen.setdefault(s["patient_id"], s["split"]) == s["split"]
        assert s["split"] == assign_split(s["patient_id"], SPLIT)


def test_covid_only_in_test_split(dataset, planned_corpus):
    n_covid = 0
    for split, plan, report, _ in planned_corpus:
        has = any(f.category == "covid-19" for f in plan.findings)
        n_covid += has
        if split != "test":
            assert not has
            assert not re.search(MENTION["covid-19"], report.lower()), report
    assert n_covid >= 10
    root, _, _ = dataset
    studies, truth = tables(root)
    split_of = {s["study_id"]: s["split"] for s in studies}
    assert all(split_of[t["study_id"]] == "test" for t in truth if t["category"] == "covid-19")
    assert not any(re.search(MENTION["covid-19"], s["report"].lower()) for s in studies if s["split"] != "test")


# ----------------------------------------------------------------- determinism


def test_same_seed_same_bytes_whatever_workers(dataset, tmp_path):
    root, _, _ = dataset
    other = tmp_path / "w2"
    synthesize(PhantomParams(**SMALL, workers=2), SPLIT, other)
    files = sorted(p.relative_to(root) for p in root.rglob("*") if p.is_file())
    assert files == sorted(p.relative_to(other) for p in other.rglob("*") if p.is_file())
    for rel in files:
        assert (root / rel).read_bytes() == (other / rel).read_bytes(), rel


def test_different_seed_differs(dataset, tmp_path):
    root, _, _ = dataset
    other = tmp_path / "seed4"
    synthesize(PhantomParams(**{**SMALL, "n_patients": 6, "seed": 4}, workers=1), SPLIT, other)
    a = (root / "images/p00000/s00000_1.png").read_bytes()
    b = (other / "images/p00000/s00000_1.png").read_bytes()
    assert a != b
    assert tables(root)[0][0]["report"] != tables(other)[0][0]["report"]


def test_rerun_replaces_stale_images_but_refuses_foreign_files(tmp_path):
    params = PhantomParams(**{**SMALL, "n_patients": 3}, workers=1)
    synthesize(params, SPLIT, tmp_path)
    stale = tmp_path / "images/p09999/s09999_1.png"
    stale.parent.mkdir()
    stale.write_bytes(b"x")
    synthesize(params, SPLIT, tmp_path)
    assert not stale.exists()
    (tmp_path / "images/notes.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="notes.txt"):
        _clear_previous_images(tmp_path / "images")


def test_missing_phrase_file_is_a_clear_error(tmp_path):
    with pytest.raises(PhraseError, match="not found"):
        load_phrases(tmp_path / "nope.yaml")


# ----------------------------------------------------------------- severity changes the picture

N = 128


@pytest.fixture(scope="module")
def normal_image():
    return render_example((), N).astype(float)


def series(category: str) -> list[np.ndarray]:
    return [render_example((demo_finding(category, s),), N).astype(float) for s in SEVERITIES]


@pytest.mark.parametrize("category", [c for c in CATEGORIES if c != "support device"])
def test_every_category_departs_further_from_normal_with_severity(category, normal_image):
    diffs = [np.abs(img - normal_image) for img in series(category)]
    changed = [int((d > 15).sum()) for d in diffs]  # pixels a reader would see change
    assert changed[0] >= 5, f"mild {category} invisible"
    assert changed[0] < changed[1] < changed[2], (category, changed)
    means = [d.mean() for d in diffs]
    assert means[0] < means[1] < means[2], (category, means)


def test_effusion_region_brightens_with_severity(normal_image):
    # demo effusion is on the patient's right = image left; lower lung zone
    rows, cols = slice(int(N * 0.5), int(N * 0.85)), slice(int(N * 0.05), int(N * 0.45))
    means = [normal_image[rows, cols].mean()] + [img[rows, cols].mean() for img in series("pleural effusion")]
    assert means == sorted(means) and means[1] > means[0] + 1 and means[3] > means[0] + 30, means


def test_heart_widens_with_cardiomegaly(normal_image):
    # the left heart border (image right) moves out: rightmost column that turned brighter
    borders = []
    for img in series("cardiomegaly"):
        diff = img - normal_image
        cols = np.nonzero((diff[int(N * 0.3) : int(N * 0.8)] > 25).any(axis=0))[0]
        borders.append(cols.max())
    assert borders[0] < borders[1] < borders[2], borders


def test_cardiothoracic_ratio_matches_severity():
    rng = np.random.default_rng(0)
    anatomy, pose = pa.sample_anatomy(rng), pa.sample_pose(rng)
    right, left = pa.heart_borders(pa.apply_findings(anatomy, pose, ()))
    assert 0.38 < (left - right) / (2 * anatomy.W) < 0.5
    for sev, ctr in pa.CTR.items():
        a = pa.apply_findings(anatomy, pose, (Finding("cardiomegaly", sev, None, None),))
        right, left = pa.heart_borders(a)
        assert abs((left - right) / (2 * a.W) - ctr) < 1e-6


def test_support_devices_are_bright_lines(normal_image):
    img = render_example((demo_finding("support device", None),), N).astype(float)
    assert (img - normal_image > 25).sum() > 0.003 * N * N


def test_benchmark_reports_a_rate():
    out = benchmark(n_images=4, image_size=64)
    assert out["n_images"] == 4 and out["images_per_s"] > 0
