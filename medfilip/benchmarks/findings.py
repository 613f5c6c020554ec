"""Synthetic finding tables at MIMIC scale, and rows/s of the normalize and explain stages over them."""

from __future__ import annotations

import time

import numpy as np
import pyarrow as pa

from medfilip.vocab import Vocabulary, load_vocabulary

_SEVERITIES = ["mild", "Small", "large", "trace", "moderate", "severe", "8 mm", "very weird", "minimal", "", None]
_LOCATIONS = ["left base", "right apex", "bilateral", "left lower lobe", "right upper lobe", "somewhere",
              "at the left base", "retrocardiac", "", None]
_OOV = ["flux capacitor malfunction", "lines and tubes", "support devices", "chronic changes", "", "  ", None]
_REPORTS = ["Mild left effusion. No pneumothorax.", "No acute cardiopulmonary process.", "Normal chest.",
            "Stable appearance.", "", "Heart size normal. Lungs clear."]


def _typo(phrase: str, rng: np.random.Generator) -> str:
    i = int(rng.integers(0, len(phrase)))
    return phrase[:i] + phrase[i + 1:] if len(phrase) > 6 else phrase.upper()


def synthetic_findings(n_rows: int, seed: int = 0, vocabulary: Vocabulary | None = None,
                       rows_per_study: float = 3.0) -> dict[str, pa.Table]:
    """Raw findings (``triplets_raw``), studies and extractions of ``n_rows`` findings.

    Categories are the vocabulary's phrases with case changes, misspellings and out-of-vocabulary
    terms mixed in: a few thousand distinct strings however many rows, as an LLM writes them.
    """
    rng = np.random.default_rng(seed)
    vocabulary = vocabulary or load_vocabulary()
    phrases = sorted(vocabulary.mention_phrases)
    # Every phrase in two spellings; one in ten also misspelt (each misspelling costs a fuzzy search).
    misspelt = [_typo(p, rng) for p in phrases if rng.random() < 0.1]
    pool = phrases + [p.title() for p in phrases] + misspelt + ["no finding"] * 20 + _OOV * 5
    n_studies = max(1, int(n_rows / rows_per_study))
    study_ids = np.array([f"s{i:08d}" for i in range(n_studies)], dtype=object)

    def pick(values: list, size: int) -> list:
        return [values[i] for i in rng.integers(0, len(values), size)]

    raw = pa.table({
        "study_id": pa.array(study_ids[np.sort(rng.integers(0, n_studies, n_rows))], pa.string()),
        "severity": pa.array(pick(_SEVERITIES, n_rows), pa.string()),
        "location": pa.array(pick(_LOCATIONS, n_rows), pa.string()),
        "category": pa.array(pick(pool, n_rows), pa.string()),
        "negated": pa.array(rng.random(n_rows) < 0.2),
        "uncertain": pa.array(rng.random(n_rows) < 0.1),
        "evidence": pa.nulls(n_rows, pa.string()),
        "provider": pa.array(["rules"] * n_rows, pa.string()),
        "model": pa.array(["rules"] * n_rows, pa.string()),
    })
    reports = pick(_REPORTS, n_studies)
    studies = pa.table({
        "study_id": pa.array(study_ids, pa.string()),
        "patient_id": pa.array(study_ids, pa.string()),
        "split": pa.array(pick(["train", "val", "test"], n_studies), pa.string()),
        "report": pa.array(reports, pa.string()),
        "findings": pa.array([r if rng.random() < 0.5 else None for r in reports], pa.string()),
        "impression": pa.nulls(n_studies, pa.string()),
    })
    extractions = pa.table({
        "study_id": pa.array(study_ids, pa.string()),
        "status": pa.array(np.where(rng.random(n_studies) < 0.95, "ok", "failed"), pa.string()),
        "n_dropped": pa.array(np.where(rng.random(n_studies) < 0.05, 1, 0)),
    })
    return {"triplets_raw": raw, "studies": studies, "extractions": extractions}


def benchmark(n_rows: int = 1_000_000, explain: bool = True, seed: int = 0) -> dict:
    """Finding rows/s through ``normalize_triplets`` (and ``build_labels``) on synthetic data."""
    from medfilip.config import ExplainParams
    from medfilip.explain import build_labels
    from medfilip.knowledge import knowledge_base
    from medfilip.config import KnowledgeParams
    from medfilip.normalize import normalize_triplets

    vocabulary = load_vocabulary()
    tables = synthetic_findings(n_rows, seed, vocabulary)
    start = time.perf_counter()
    triplets, summary = normalize_triplets(tables["triplets_raw"], vocabulary)
    seconds = time.perf_counter() - start
    result = {"n_rows": n_rows, "normalize_s": round(seconds, 3), "normalize_rows_per_s": round(n_rows / seconds),
              "n_kept": summary["n_kept"], "n_unique_categories": len(set(tables["triplets_raw"].column("category").to_pylist()))}
    if explain:
        explanations, _ = knowledge_base(KnowledgeParams(), vocabulary)
        texts = {c: e.text for c, e in explanations.items()}
        start = time.perf_counter()
        labels, _, _ = build_labels(triplets, tables["studies"], tables["extractions"], texts, ExplainParams())
        seconds = time.perf_counter() - start
        result.update(explain_s=round(seconds, 3), explain_rows_per_s=round(n_rows / seconds), n_labels=labels.num_rows)
    return result
