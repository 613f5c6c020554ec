"""Deterministic, patient-grouped train/val/test split."""

from __future__ import annotations

import hashlib
from typing import Iterable

from medfilip.config import SplitParams

SPLITS = ("train", "val", "test")


def patient_unit(patient_id: str, seed: int) -> float:
    """Map a patient id to a stable number in [0, 1) (independent of other patients)."""
    digest = hashlib.blake2b(f"{seed}:{patient_id}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") / 2**64


def assign_split(patient_id: str, params: SplitParams) -> str:
    """The split of one patient: same id and seed give the same split on every machine."""
    u = patient_unit(patient_id, params.seed)
    if u < params.train:
        return "train"
    if u < params.train + params.val:
        return "val"
    return "test"


def assign_splits(patient_ids: Iterable[str], params: SplitParams) -> list[str]:
    """Split for each patient id in order; every study of a patient lands in one split."""
    return [assign_split(str(p), params) for p in patient_ids]
