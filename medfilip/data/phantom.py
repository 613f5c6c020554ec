"""The phantom chest X-ray benchmark: seeded synthetic PA radiographs, reports and ground truth.

No real chest X-ray set is reachable offline, yet later stages must prove that training
learns; the phantom gives images whose findings (category, side/zone, severity) are
known exactly and visible, with reports in the varied style of real ones.

Layout written under ``root``::

    images/<patient_id>/<study_id>.png   8-bit grayscale, image_size square, one PA view per study
    studies.parquet                      study_id, patient_id, split, image_id, path, view, report, study_index
    truth.parquet                        one row per rendered finding (see TRUTH_SCHEMA)

Randomness: patient ``i`` draws from ``SeedSequence(seed, spawn_key=(i,))`` (anatomy and
findings of all its studies), study ``k`` of it from ``spawn_key=(i, k, 0)`` (pose, noise)
and ``(i, k, 1)`` (report wording). Output is therefore byte-identical for the same
params whatever ``workers`` is. covid-19, the unseen class, is drawn only for patients
whose split is ``test``.
"""

from __future__ import annotations

import ctypes
import io
import multiprocessing as mp
import re
import shutil
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image, ImageDraw, ImageFont
from tqdm import tqdm

from medfilip.config import PhantomParams, SplitParams
from medfilip.data.phantom_anatomy import Anatomy, sample_anatomy, sample_pose
from medfilip.data.phantom_findings import (
    CATEGORIES,
    NODULE_MM,
    SEVERITIES,
    Finding,
    StudyPlan,
    plan_patient,
)
from medfilip.data.phantom_render import render
from medfilip.data.phantom_reports import DEFAULT_PHRASES, load_phrases, write_report
from medfilip.data.split import assign_split

VIEW = "PA"
STUDY_SCHEMA = pa.schema(
    [
        ("study_id", pa.string()),
        ("patient_id", pa.string()),
        ("split", pa.string()),
        ("image_id", pa.string()),
        ("path", pa.string()),
        ("view", pa.string()),
        ("report", pa.string()),
        ("study_index", pa.int32()),
    ]
)
TRUTH_SCHEMA = pa.schema(
    [
        ("study_id", pa.string()),
        ("category", pa.string()),
        ("severity", pa.string()),  # null for support device
        ("location", pa.string()),  # null for cardiomegaly and support device
        ("side", pa.string()),
        ("zone", pa.string()),
        ("uncertain", pa.bool_()),  # hedged in the report, rendered mild
        ("change", pa.string()),  # vs the prior study: null (new), unchanged, increased, decreased
        ("size_mm", pa.float32()),  # nodule: largest diameter
        ("count", pa.int32()),  # nodule: how many
        ("devices", pa.string()),  # support device: '; '-joined names
    ]
)


def patient_id(index: int) -> str:
    return f"p{index:05d}"


def study_id(index: int, study_index: int) -> str:
    return f"s{index:05d}_{study_index}"


def _keep_freed_memory() -> None:
    """Keep freed numpy temporaries in the heap (glibc only; about 2x faster rendering).

    glibc returns every freed block above 128 KiB to the OS, so each fresh 256 px float
    temporary page-faults again; raising the mmap and trim thresholds avoids that.
    """
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return  # not glibc (macOS, musl): rendering is just slower
    m_trim_threshold, m_mmap_threshold = -1, -3
    libc.mallopt(m_mmap_threshold, 16 << 20)
    libc.mallopt(m_trim_threshold, 256 << 20)


def encode_png(img: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(img, mode="L").save(buf, format="PNG", compress_level=1)
    return buf.getvalue()


@dataclass(frozen=True)
class _PatientJob:
    index: int
    split: str
    seed: int
    image_size: int
    max_studies: int
    normal_fraction: float
    root: str
    phrases: str


def plan_patient_studies(seed: int, index: int, max_studies: int, normal_fraction: float,
                         split: str) -> tuple[Anatomy, list[StudyPlan]]:
    """Anatomy and study plans of patient ``index``: a pure function of its arguments."""
    rng = np.random.default_rng(np.random.SeedSequence(seed, spawn_key=(index,)))
    anatomy = sample_anatomy(rng)
    n_studies = 1 + int(rng.integers(max(max_studies, 1)))
    plans = plan_patient(rng, n_studies, normal_fraction, allow_unseen=split == "test")
    return anatomy, plans


def _study_rngs(seed: int, index: int, k: int) -> tuple[np.random.Generator, np.random.Generator]:
    render_rng = np.random.default_rng(np.random.SeedSequence(seed, spawn_key=(index, k, 0)))
    report_rng = np.random.default_rng(np.random.SeedSequence(seed, spawn_key=(index, k, 1)))
    return render_rng, report_rng


def _truth_row(sid: str, f: Finding) -> dict:
    return {
        "study_id": sid,
        "category": f.category,
        "severity": f.severity,
        "location": f.location,
        "side": f.side,
        "zone": f.zone,
        "uncertain": f.uncertain,
        "change": f.change,
        "size_mm": f.size_mm,
        "count": f.count if f.category == "nodule" else None,
        "devices": "; ".join(f.devices) if f.devices else None,
    }


def _make_patient(job: _PatientJob) -> tuple[list[dict], list[dict]]:
    """Render, report and write every study of one patient; return its study and truth rows."""
    pid = patient_id(job.index)
    anatomy, plans = plan_patient_studies(job.seed, job.index, job.max_studies, job.normal_fraction, job.split)
    phrases = load_phrases(job.phrases)
    folder = Path(job.root) / "images" / pid
    folder.mkdir(parents=True, exist_ok=True)
    studies, truth = [], []
    for plan in plans:
        sid = study_id(job.index, plan.study_index)
        render_rng, report_rng = _study_rngs(job.seed, job.index, plan.study_index)
        pose = sample_pose(render_rng)
        img = render(anatomy, pose, plan.findings, job.image_size, render_rng)
        rel = f"images/{pid}/{sid}.png"
        (Path(job.root) / rel).write_bytes(encode_png(img))
        studies.append(
            {
                "study_id": sid,
                "patient_id": pid,
                "split": job.split,
                "image_id": f"{sid}_pa",
                "path": rel,
                "view": VIEW,
                "report": write_report(plan, report_rng, phrases),
                "study_index": plan.study_index,
            }
        )
        truth.extend(_truth_row(sid, f) for f in plan.findings)
    return studies, truth


_PHANTOM_ENTRY = re.compile(r"p\d+(/s\d+_\d+\.png)?")


def _clear_previous_images(images: Path) -> None:
    """Remove images of an earlier run (stale studies would linger); refuse anything else."""
    if not images.exists():
        return
    for path in images.rglob("*"):
        if not _PHANTOM_ENTRY.fullmatch(path.relative_to(images).as_posix()):
            raise FileExistsError(
                f"{images} holds '{path.name}', which the phantom did not write; "
                "point phantom output at an empty folder or remove it"
            )
    shutil.rmtree(images)


def synthesize(params: PhantomParams, split: SplitParams, root: Path, figures_dir: Path | None = None,
               phrases: Path = DEFAULT_PHRASES) -> dict:
    """Generate the phantom dataset under ``root`` (and severity montages); return a summary."""
    start = time.perf_counter()
    root = Path(root)
    load_phrases(phrases)  # fail before any work if the phrase file is broken
    _clear_previous_images(root / "images")
    root.mkdir(parents=True, exist_ok=True)
    jobs = [
        _PatientJob(i, assign_split(patient_id(i), split), params.seed, params.image_size,
                    params.max_studies_per_patient, params.normal_fraction, str(root), str(phrases))
        for i in range(params.n_patients)
    ]
    studies: list[dict] = []
    truth: list[dict] = []
    bar = tqdm(total=len(jobs), desc="synthesize", unit="patient", disable=None)
    if params.workers > 1:
        ctx = mp.get_context("fork")
        chunk = max(1, len(jobs) // (params.workers * 16))
        with ctx.Pool(params.workers, initializer=_keep_freed_memory) as pool:
            for s_rows, t_rows in pool.imap(_make_patient, jobs, chunksize=chunk):
                studies += s_rows
                truth += t_rows
                bar.update()
    else:
        _keep_freed_memory()
        for job in jobs:
            s_rows, t_rows = _make_patient(job)
            studies += s_rows
            truth += t_rows
            bar.update()
    bar.close()
    pq.write_table(pa.Table.from_pylist(studies, schema=STUDY_SCHEMA), root / "studies.parquet")
    pq.write_table(pa.Table.from_pylist(truth, schema=TRUTH_SCHEMA), root / "truth.parquet")
    seconds = time.perf_counter() - start
    if figures_dir is not None:
        write_montages(Path(figures_dir), seed=params.seed)

    categories = Counter(t["category"] for t in truth)
    return {
        "n_patients": params.n_patients,
        "n_studies": len(studies),
        "n_images": len(studies),
        "n_findings": len(truth),
        "n_normal_studies": len(studies) - len({t["study_id"] for t in truth}),
        "categories": {c: categories.get(c, 0) for c in CATEGORIES},
        "severities": dict(sorted(Counter(str(t["severity"]) for t in truth).items())),
        "studies_per_split": dict(sorted(Counter(s["split"] for s in studies).items())),
        "image_size": params.image_size,
        "workers": params.workers,
        "seconds": round(seconds, 3),
        "images_per_s": round(len(studies) / seconds, 2) if seconds > 0 else 0.0,
    }


# --------------------------------------------------------------------------- examples, montages


DEMO_PATIENT = 7  # a typical adult chest: the montages and the severity tests draw this patient

_DEMO_SITES = {
    "pleural effusion": ("right", None),
    "pneumothorax": ("left", None),
    "consolidation": ("right", "lower"),
    "cardiomegaly": (None, None),
    "pulmonary edema": ("bilateral", "perihilar"),
    "atelectasis": ("left", "lower"),
    "nodule": ("right", "upper"),
    "emphysema": ("bilateral", None),
    "support device": (None, None),
    "covid-19": ("bilateral", "lower"),
}


def demo_finding(category: str, severity: str | None) -> Finding:
    """A fixed example finding of ``category`` at ``severity`` (fixed shape seed)."""
    side, zone = _DEMO_SITES[category]
    if category == "support device":
        return Finding(category, None, None, None, seed=11,
                       devices=("endotracheal tube", "central venous catheter", "enteric tube", "pacemaker"))
    size = float(np.mean(NODULE_MM[severity])) if category == "nodule" else None
    return Finding(category, severity, side, zone, seed=11, size_mm=size)


def render_example(findings: tuple[Finding, ...], image_size: int = 256, seed: int = 0) -> np.ndarray:
    """The demo patient's first study showing exactly ``findings`` (same anatomy, pose and noise)."""
    rng = np.random.default_rng(np.random.SeedSequence(seed, spawn_key=(DEMO_PATIENT,)))
    anatomy = sample_anatomy(rng)
    render_rng, _ = _study_rngs(seed, DEMO_PATIENT, 1)
    pose = sample_pose(render_rng)
    return render(anatomy, pose, tuple(findings), image_size, render_rng)


def _font(size: int) -> ImageFont.ImageFont:
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1 has only the fixed bitmap font
        return ImageFont.load_default()


_SEVERITY_NOTES = {
    "mild": "subtle: blunted costophrenic angle, thin apical rim, CTR 0.55, 8 mm nodule",
    "moderate": "effusion up to ~1/3 of the hemithorax, CTR 0.62, 15 mm nodule, air bronchograms",
    "severe": "effusion up to ~1/2 of the hemithorax, CTR 0.70, lobar collapse, 2.8 cm mass",
}


def write_montages(figures_dir: Path, image_size: int = 256, seed: int = 0) -> list[Path]:
    """phantom_<severity>.png: the normal demo patient and every category at that severity."""
    figures_dir.mkdir(parents=True, exist_ok=True)
    cols, cap = 4, 36
    font, small = _font(13), _font(11)
    paths = []
    for severity in SEVERITIES:
        panels = [("normal\nno finding", render_example((), image_size, seed))]
        for cat in CATEGORIES:
            f = demo_finding(cat, severity)
            where = ", ".join(x for x in (f.location, f.severity or "no severity") if x)
            panels.append((f"{cat}\n{where}", render_example((f,), image_size, seed)))
        rows = -(-(len(panels) + 1) // cols)
        sheet = Image.new("L", (cols * image_size, rows * (image_size + cap)), 0)
        draw = ImageDraw.Draw(sheet)
        for j, (label, img) in enumerate(panels):
            x, y = (j % cols) * image_size, (j // cols) * (image_size + cap)
            sheet.paste(Image.fromarray(img), (x, y + cap))
            title, where = label.split("\n")
            draw.text((x + 4, y + 3), title, fill=255, font=font)
            draw.text((x + 4, y + 19), where, fill=200, font=small)
        j = len(panels)
        x, y = (j % cols) * image_size, (j // cols) * (image_size + cap)
        detail = _SEVERITY_NOTES[severity].replace(": ", ":\n").replace(", ", "\n")
        note = f"Phantom PA chest radiographs\nseverity: {severity}\n\n{detail}"
        draw.multiline_text((x + 8, y + cap + 8), note, fill=255, font=font, spacing=6)
        path = figures_dir / f"phantom_{severity}.png"
        sheet.save(path, optimize=False)
        paths.append(path)
    return paths


# --------------------------------------------------------------------------- speed


def benchmark(n_images: int = 200, image_size: int = 256) -> dict:
    """Single-process generation rate (plan + render + report + PNG encode) on typical studies."""
    _keep_freed_memory()
    phrases = load_phrases()
    render_s = encode_s = 0.0
    done = 0
    index = 0
    start = time.perf_counter()
    while done < n_images:
        anatomy, plans = plan_patient_studies(0, index, 3, 0.3, "test")
        for plan in plans[: n_images - done]:
            render_rng, report_rng = _study_rngs(0, index, plan.study_index)
            t0 = time.perf_counter()
            img = render(anatomy, sample_pose(render_rng), plan.findings, image_size, render_rng)
            t1 = time.perf_counter()
            encode_png(img)
            encode_s += time.perf_counter() - t1
            render_s += t1 - t0
            write_report(plan, report_rng, phrases)
            done += 1
        index += 1
    seconds = time.perf_counter() - start
    return {
        "n_images": done,
        "image_size": image_size,
        "seconds": round(seconds, 3),
        "images_per_s": round(done / seconds, 1),
        "render_ms": round(1000 * render_s / done, 2),
        "encode_ms": round(1000 * encode_s / done, 2),
    }
