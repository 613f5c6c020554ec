"""Patient anatomy and study pose of the phantom chest radiograph, as a few numbers.

Coordinates are *anatomy units*: X to the image right (= patient's LEFT on a PA film),
Y downwards; 1 unit is half the image width at zoom 1. The thorax is drawn around the
origin; the pose (zoom, rotation, shift) maps it onto the image. A patient keeps one
:class:`Anatomy` over all studies; each study gets its own :class:`Pose` (positioning,
inspiration, exposure). Findings that change anatomy (cardiomegaly, emphysema, volume
loss) do so through :func:`apply_findings`, before drawing.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import numpy as np

from medfilip.data.phantom_findings import Finding

# Cardiothoracic ratio by cardiomegaly severity (normal hearts are drawn at 0.41-0.50).
CTR = {"mild": 0.55, "moderate": 0.62, "severe": 0.70}


@dataclass(frozen=True)
class Anatomy:
    """One patient's body: sizes in anatomy units (see module docstring)."""

    W: float  # lateral lung border (inner thoracic half-width) at the costophrenic level
    apex_y: float  # top of the lung apices
    dome_right: float  # top of the right hemidiaphragm dome (higher, i.e. smaller Y)
    dome_left: float
    cp_drop: float  # lateral costophrenic angle below the dome top
    dome_peak: float  # |X| of the dome top
    med: float  # upper mediastinal half-width
    ctr: float  # cardiothoracic ratio
    heart_left: float  # fraction of the heart width left of the midline (patient's left)
    heart_waist: float  # the heart is widest this far above the left dome
    heart_top: float  # below the hilum, where the cardiac arcs leave the mediastinum
    hilum_y: float
    carina_y: float
    margin: float  # chest wall soft tissue outside the ribs
    neck: float  # neck half-width
    shoulder: float  # extra half-width of the shoulders
    clav_y: float  # clavicle medial end
    rib_top: float
    rib_power: float  # <1: ribs spaced wider towards the bases
    n_ribs: int
    rib_width: float  # fraction of the rib period covered by bone
    spine: float  # vertebral half-width
    soft: float  # soft tissue attenuation (habitus)
    breast: float  # 0 = none
    vessel_seed: int
    mediastinal_shift: float = 0.0  # +: towards patient's left
    air_gain: float = 1.0  # >1: more lucent lungs (emphysema)
    vessel_gain: float = 1.0  # <1: sparse markings (emphysema)
    vessel_blur: float = 0.0  # extra blur of the markings (edema: indistinct vessels)
    upper_vessels: float = 1.0  # >1: cephalisation (edema)


@dataclass(frozen=True)
class Pose:
    """One study's positioning and exposure."""

    zoom: float
    rotation: float  # radians
    shift_x: float
    shift_y: float
    inspiration: float  # added to the dome heights (negative: deeper breath)
    exposure: float  # centre of the film's characteristic curve (density units)
    contrast: float
    gamma: float
    noise: float
    marker_left: bool  # side marker letter in the upper corner


def sample_anatomy(rng: np.random.Generator) -> Anatomy:
    """A plausible adult chest; normal CTR stays within 0.41-0.50."""
    W = rng.uniform(0.72, 0.82)
    apex = rng.uniform(-0.76, -0.68)
    dome_r = rng.uniform(0.30, 0.40)
    return Anatomy(
        W=W,
        apex_y=apex,
        dome_right=dome_r,
        dome_left=dome_r + rng.uniform(0.03, 0.07),
        cp_drop=rng.uniform(0.17, 0.24),
        dome_peak=rng.uniform(0.32, 0.42) * W / 0.77,
        med=rng.uniform(0.12, 0.15),
        ctr=float(np.clip(rng.normal(0.455, 0.022), 0.41, 0.5)),
        heart_left=rng.uniform(0.62, 0.70),
        heart_waist=rng.uniform(0.03, 0.08),
        heart_top=rng.uniform(-0.02, 0.05),
        hilum_y=rng.uniform(-0.12, -0.04),
        carina_y=rng.uniform(-0.26, -0.18),
        margin=rng.uniform(0.08, 0.13),
        neck=rng.uniform(0.2, 0.27),
        shoulder=rng.uniform(0.12, 0.22),
        clav_y=apex + rng.uniform(0.26, 0.33),
        rib_top=apex - rng.uniform(0.02, 0.06),
        rib_power=rng.uniform(0.8, 0.9),
        n_ribs=10,
        rib_width=rng.uniform(0.36, 0.44),
        spine=rng.uniform(0.05, 0.062),
        soft=rng.uniform(0.9, 1.1),
        breast=float(rng.uniform(0.08, 0.16)) if rng.random() < 0.35 else 0.0,
        vessel_seed=int(rng.integers(2**31)),
    )


def sample_pose(rng: np.random.Generator) -> Pose:
    return Pose(
        zoom=rng.uniform(1.07, 1.17),
        rotation=math.radians(rng.normal(0, 1.5)),
        shift_x=rng.normal(0, 0.025),
        shift_y=rng.normal(0.06, 0.02),
        inspiration=rng.normal(0, 0.02),
        exposure=rng.uniform(0.44, 0.54),
        contrast=rng.uniform(3.2, 4.2),
        gamma=rng.uniform(0.9, 1.15),
        noise=rng.uniform(0.008, 0.02),
        marker_left=bool(rng.random() < 0.5),
    )


def apply_findings(anatomy: Anatomy, pose: Pose, findings: tuple[Finding, ...]) -> Anatomy:
    """Anatomy as this study shows it: inspiration, then findings that change shape or size."""
    a = replace(anatomy, dome_right=anatomy.dome_right + pose.inspiration,
                dome_left=anatomy.dome_left + pose.inspiration)
    by_cat = {f.category: f for f in findings}
    emph = by_cat.get("emphysema")
    if emph is not None:
        k = emph.level
        # Hyperinflation: lower, flatter domes; taller, wider, more lucent lungs; narrow heart.
        lower = (0.045, 0.1, 0.16)[k - 1]
        a = replace(
            a,
            dome_right=a.dome_right + lower,
            dome_left=a.dome_left + lower * 0.85,
            cp_drop=a.cp_drop * (0.8, 0.5, 0.3)[k - 1],
            apex_y=a.apex_y - 0.02 * k,
            W=a.W + 0.015 * k,
            ctr=a.ctr * (0.93, 0.87, 0.82)[k - 1],
            heart_top=a.heart_top + lower * 0.8,  # long narrow heart hanging on flat domes
            air_gain=(1.07, 1.18, 1.32)[k - 1],
            vessel_gain=(0.75, 0.55, 0.4)[k - 1],
        )
    cardio = by_cat.get("cardiomegaly")
    if cardio is not None:
        ctr = CTR[cardio.severity]
        a = replace(a, ctr=ctr, heart_left=max(a.heart_left, 0.68), heart_waist=a.heart_waist + 0.1 * (ctr - 0.45))
    edema = by_cat.get("pulmonary edema")
    if edema is not None:
        k = edema.level
        a = replace(a, vessel_blur=(0.6, 1.1, 1.6)[k - 1], upper_vessels=(1.5, 1.7, 1.8)[k - 1])
    atel = by_cat.get("atelectasis")
    if atel is not None and atel.zone == "lower":
        # Volume loss: elevated hemidiaphragm, severe collapse pulls the mediastinum across.
        up = (0.015, 0.045, 0.08)[atel.level - 1]
        if atel.side in ("right", "bilateral"):
            a = replace(a, dome_right=a.dome_right - up)
        if atel.side in ("left", "bilateral"):
            a = replace(a, dome_left=a.dome_left - up)
        if atel.level == 3 and atel.side != "bilateral":
            a = replace(a, mediastinal_shift=a.mediastinal_shift + (0.035 if atel.side == "left" else -0.035))
    return a


# --------------------------------------------------------------------------- derived geometry


def dome(a: Anatomy, left: bool) -> float:
    return a.dome_left if left else a.dome_right


def cp_y(a: Anatomy) -> float:
    """Costophrenic angle level (same both sides; the lower dome sets it)."""
    return max(a.dome_left, a.dome_right) + a.cp_drop


def lung_ellipse(a: Anatomy) -> tuple[float, float, float]:
    """(centre a, centre Y, vertical radius) of the superior/lateral lung outline."""
    ac = 0.30 * a.W / 0.77
    cy = cp_y(a) - 0.04
    return ac, cy, cy - a.apex_y


def lateral_border(a: Anatomy, y: float) -> float:
    """|X| of the lateral lung border at height ``y``."""
    ac, cy, ry = lung_ellipse(a)
    v = min(y - cy, 0.0) / ry
    return ac + (a.W - ac) * math.sqrt(max(1.0 - v * v, 0.0))


def heart_levels(a: Anatomy) -> tuple[float, float]:
    """(Y where the cardiac arcs start below the hilum, Y where the heart is widest)."""
    return a.hilum_y + a.heart_top, a.dome_left - a.heart_waist


def heart_borders(a: Anatomy) -> tuple[float, float]:
    """X of the right (image left, negative) and left heart borders; their gap / 2W is the CTR."""
    width = a.ctr * 2 * a.W
    return -(1 - a.heart_left) * width + a.mediastinal_shift, a.heart_left * width + a.mediastinal_shift


def zone_centre(a: Anatomy, side: str, zone: str) -> tuple[float, float]:
    """A point inside the lung zone (upper / middle / lower) of one side."""
    left = side == "left"
    s = 1.0 if left else -1.0
    top, base = a.apex_y, dome(a, left)
    if zone == "upper":
        y = top + 0.3 * (base - top)
    elif zone == "middle":
        y = top + 0.55 * (base - top)
    else:
        y = base - 0.12
    inner = a.med + 0.04
    if zone != "upper":
        right_border, left_border = heart_borders(a)
        inner = max(inner, 0.9 * left_border if left else -right_border)
    outer = lateral_border(a, y)
    frac = 0.5 if zone != "lower" else 0.55
    return s * (inner + frac * max(outer - inner, 0.1)), y
