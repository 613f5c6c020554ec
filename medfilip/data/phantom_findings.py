"""Ground-truth vocabulary of the phantom benchmark and the sampling of findings per study.

A finding is what the image shows and the truth table records: a category, a severity,
a side and a zone. Everything random about *how* it is drawn (blob positions, vessel
branches) comes from ``Finding.seed``, so the same finding renders identically at
another severity -- that is what makes the severity montages comparable.

Location vocabulary (kept small on purpose; ``location`` = side [+ zone]):

=================  ==========================================================
location           used for
=================  ==========================================================
left / right       pleural effusion, pneumothorax, several nodules on one side
bilateral          pleural effusion, emphysema, nodules on both sides
<side> upper zone  consolidation, nodule            (side: left / right)
<side> middle zone consolidation (right), atelectasis (right), nodule
<side> lower zone  consolidation, atelectasis, nodule
bilateral lower zone   atelectasis (bibasilar), covid-19
bilateral perihilar    pulmonary edema
null               cardiomegaly, support device
=================  ==========================================================
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np

CATEGORIES = (
    "pleural effusion",
    "pneumothorax",
    "consolidation",
    "cardiomegaly",
    "pulmonary edema",
    "atelectasis",
    "nodule",
    "emphysema",
    "support device",
    "covid-19",
)
UNSEEN_CATEGORIES = ("covid-19",)  # only in test-split patients, never in a train/val report
SEVERITIES = ("mild", "moderate", "severe")
SIDES = ("left", "right", "bilateral")
ZONES = ("upper", "middle", "lower", "perihilar")
LOCATIONS = (
    "left",
    "right",
    "bilateral",
    "left upper zone",
    "left middle zone",
    "left lower zone",
    "right upper zone",
    "right middle zone",
    "right lower zone",
    "bilateral lower zone",
    "bilateral perihilar",
)
DEVICES = ("endotracheal tube", "central venous catheter", "enteric tube", "pacemaker")

# Nodule diameter (mm) by severity: the report states the size, the truth the severity.
NODULE_MM = {"mild": (7.0, 9.0), "moderate": (12.0, 18.0), "severe": (23.0, 32.0)}

# How often a category is chosen for an abnormal study (relative weights).
CATEGORY_WEIGHTS = {
    "pleural effusion": 0.17,
    "pneumothorax": 0.08,
    "consolidation": 0.14,
    "cardiomegaly": 0.13,
    "pulmonary edema": 0.09,
    "atelectasis": 0.13,
    "nodule": 0.09,
    "emphysema": 0.07,
    "support device": 0.10,
}
COVID_WEIGHT_TEST = 0.45  # relative weight of covid-19 in abnormal test-split studies
SEVERITY_P = (0.40, 0.35, 0.25)
N_FINDINGS_P = (0.45, 0.35, 0.20)  # 1, 2 or 3 findings in an abnormal study
UNCERTAIN_P = 0.12  # hedged in the report, rendered mild, kept in truth

# (side, zone, weight) per category.
SITES: dict[str, tuple[tuple[str | None, str | None, float], ...]] = {
    "pleural effusion": (("right", None, 0.4), ("left", None, 0.35), ("bilateral", None, 0.25)),
    "pneumothorax": (("right", None, 0.5), ("left", None, 0.5)),
    "consolidation": (
        ("right", "lower", 0.3),
        ("left", "lower", 0.25),
        ("right", "middle", 0.15),
        ("right", "upper", 0.15),
        ("left", "upper", 0.15),
    ),
    "cardiomegaly": ((None, None, 1.0),),
    "pulmonary edema": (("bilateral", "perihilar", 1.0),),
    "atelectasis": (
        ("right", "lower", 0.3),
        ("left", "lower", 0.3),
        ("bilateral", "lower", 0.3),
        ("right", "middle", 0.1),
    ),
    "nodule": tuple((s, z, 1.0) for s in ("right", "left") for z in ("upper", "middle", "lower")),
    "emphysema": (("bilateral", None, 1.0),),
    "support device": ((None, None, 1.0),),
    "covid-19": (("bilateral", "lower", 1.0),),
}


def location_of(side: str | None, zone: str | None) -> str | None:
    """The canonical location string for a side and zone (see the table above)."""
    if side is None:
        return None
    if zone is None:
        return side
    if zone == "perihilar":
        return f"{side} perihilar"
    return f"{side} {zone} zone"


@dataclass(frozen=True)
class Finding:
    """One rendered abnormality; ``seed`` fixes its random shape independently of severity."""

    category: str
    severity: str | None
    side: str | None
    zone: str | None
    uncertain: bool = False
    seed: int = 0
    size_mm: float | None = None  # nodule: diameter of the largest one
    count: int = 1  # nodule: how many
    devices: tuple[str, ...] = ()  # support device: which ones
    change: str | None = None  # vs the prior study: None (new), "unchanged", "increased", "decreased"

    @property
    def location(self) -> str | None:
        return location_of(self.side, self.zone)

    @property
    def level(self) -> int:
        """Severity as 1/2/3 (0 where severity does not apply)."""
        return SEVERITIES.index(self.severity) + 1 if self.severity else 0


@dataclass(frozen=True)
class StudyPlan:
    """What one study shows and what its report must mention."""

    study_index: int  # 1-based order within the patient
    findings: tuple[Finding, ...]
    resolved: tuple[Finding, ...] = ()  # seen on the prior study, gone now (reported as resolved)


_CHRONIC = ("support device", "emphysema", "cardiomegaly")


def _pick(rng: np.random.Generator, options, weights) -> object:
    w = np.asarray(weights, dtype=float)
    return options[int(rng.choice(len(options), p=w / w.sum()))]


def nodule_size(rng: np.random.Generator, severity: str) -> float:
    lo, hi = NODULE_MM[severity]
    return round(float(rng.uniform(lo, hi)))


def new_finding(rng: np.random.Generator, category: str, taken_sides: dict[str, set]) -> Finding | None:
    """Sample side/zone/severity/shape for ``category``; None if it would clash with existing findings."""
    sites = SITES[category]
    side, zone, _ = _pick(rng, sites, [s[2] for s in sites])
    # A pneumothorax and an effusion on the same side would be a hydropneumothorax: keep them apart.
    if category in ("pneumothorax", "pleural effusion"):
        other = taken_sides.get("pneumothorax" if category == "pleural effusion" else "pleural effusion", set())
        if side in other or "bilateral" in other or (side == "bilateral" and other):
            free = [s for s in ("left", "right") if s not in other and "bilateral" not in other]
            if not free:
                return None
            side = free[int(rng.integers(len(free)))]
    seed = int(rng.integers(2**31))
    if category == "support device":
        n = 1 if rng.random() < 0.65 else 2
        devices = tuple(sorted(rng.choice(len(DEVICES), size=n, replace=False)))
        return Finding(category, None, None, None, seed=seed, devices=tuple(DEVICES[i] for i in devices))
    uncertain = bool(rng.random() < UNCERTAIN_P)
    severity = "mild" if uncertain else str(_pick(rng, SEVERITIES, SEVERITY_P))
    if category == "nodule":
        count = 1 if (uncertain or rng.random() < 0.75) else int(rng.integers(2, 4))
        if count > 1:
            side = str(_pick(rng, ("right", "left", "bilateral"), (0.4, 0.4, 0.2)))
            zone = None
        return Finding(
            category, severity, side, zone, uncertain, seed, size_mm=nodule_size(rng, severity), count=count
        )
    return Finding(category, severity, side, zone, uncertain, seed)


def _drift(rng: np.random.Generator, f: Finding) -> Finding:
    """A finding carried over from the prior study: same place, severity may change by one step."""
    if f.severity is None:
        return replace(f, uncertain=False, change="unchanged")
    step = int(_pick(rng, (-1, 0, 1), (0.3, 0.45, 0.25)))
    level = min(max(f.level + step, 1), 3)
    severity = SEVERITIES[level - 1]
    change = "unchanged" if level == f.level else ("increased" if level > f.level else "decreased")
    size = nodule_size(rng, severity) if f.category == "nodule" and level != f.level else f.size_mm
    return replace(f, severity=severity, uncertain=False, change=change, size_mm=size)


def plan_patient(
    rng: np.random.Generator, n_studies: int, normal_fraction: float, allow_unseen: bool
) -> list[StudyPlan]:
    """Findings for each study of one patient; later studies may carry findings from the prior."""
    weights = dict(CATEGORY_WEIGHTS)
    if allow_unseen:
        weights["covid-19"] = COVID_WEIGHT_TEST
    cats = tuple(weights)
    plans: list[StudyPlan] = []
    prior: tuple[Finding, ...] = ()
    for k in range(1, n_studies + 1):
        findings: list[Finding] = []
        if rng.random() >= normal_fraction:
            findings = [_drift(rng, f) for f in prior if rng.random() < 0.5][:3]
            n_target = max(len(findings), 1 + int(rng.choice(3, p=N_FINDINGS_P)))
            for _ in range(12):  # a few tries: clashes are rejected
                if len(findings) >= n_target:
                    break
                present = {f.category for f in findings}
                free = [c for c in cats if c not in present]
                category = str(_pick(rng, free, [weights[c] for c in free]))
                sides = {f.category: {f.side} for f in findings}
                f = new_finding(rng, category, sides)
                if f is not None:
                    findings.append(f)
        present = {f.category for f in findings}
        resolved = tuple(  # chronic findings and devices are not reported as resolved
            f for f in prior
            if f.category not in present and f.category not in _CHRONIC and rng.random() < 0.4
        )
        plans.append(StudyPlan(k, tuple(findings), resolved))
        prior = tuple(findings)
    return plans
