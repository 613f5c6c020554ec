"""Draw a phantom PA chest radiograph: numpy masks on a coordinate grid, PIL for thin lines.

The picture is built in *density* (tissue thickness along the beam): a soft-tissue body,
minus lung air, plus bone and metal. Findings act where physics puts them -- an airspace
or pleural opacity replaces lung air (so it has water density and silhouettes the heart
or diaphragm it touches), a pneumothorax adds air without lung markings. Density goes
through a film-like sigmoid (exposure, contrast), then quantum noise and detector blur.

Everything is vectorised over the pixel grid; small structures are computed inside
their bounding box only, which keeps one 256 px image at a few milliseconds.
"""

from __future__ import annotations

import math

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

from medfilip.data import phantom_anatomy as pa
from medfilip.data.phantom_anatomy import Anatomy, Pose
from medfilip.data.phantom_findings import Finding

MM_PER_UNIT = 200.0  # apex to costophrenic angle (~1.3 units) is ~26 cm in an adult

# Density weights of the layers (tuned by eye against real PA films).
AIR_K = 0.66
RIB_K = 0.17
BONE_K = 0.22
METAL_K = 0.85


def _clip01(x: np.ndarray) -> np.ndarray:
    return np.clip(x, 0.0, 1.0, out=x)


class Canvas:
    """Pixel grid of one image in anatomy units, for one study pose."""

    def __init__(self, n: int, pose: Pose):
        self.n = n
        self.pose = pose
        p = ((np.arange(n, dtype=np.float32) + 0.5) * (2.0 / n) - 1.0).astype(np.float32)
        c, s = math.cos(pose.rotation), math.sin(pose.rotation)
        dx = (p - pose.shift_x)[None, :] / pose.zoom
        dy = (p - pose.shift_y)[:, None] / pose.zoom
        self.X = (c * dx + s * dy).astype(np.float32)
        self.Y = (-s * dx + c * dy).astype(np.float32)
        self.px = 2.0 / (n * pose.zoom)  # anatomy units per pixel

    def to_pixel(self, x: float, y: float) -> tuple[float, float]:
        """Anatomy point -> (column, row) in pixels (PIL's coordinate convention)."""
        c, s = math.cos(self.pose.rotation), math.sin(self.pose.rotation)
        px = self.pose.zoom * (c * x - s * y) + self.pose.shift_x
        py = self.pose.zoom * (s * x + c * y) + self.pose.shift_y
        return (px + 1.0) * self.n / 2.0 - 0.5, (py + 1.0) * self.n / 2.0 - 0.5

    def box(self, x0: float, x1: float, y0: float, y1: float) -> tuple[slice, slice] | None:
        """Pixel slices covering an anatomy-space rectangle (None if off the image)."""
        cols, rows = zip(*(self.to_pixel(x, y) for x in (x0, x1) for y in (y0, y1)), strict=True)
        r0, r1 = max(int(min(rows)) - 2, 0), min(int(max(rows)) + 3, self.n)
        c0, c1 = max(int(min(cols)) - 2, 0), min(int(max(cols)) + 3, self.n)
        if r0 >= r1 or c0 >= c1:
            return None
        return slice(r0, r1), slice(c0, c1)

    def noise_field(self, rng: np.random.Generator, cells: int) -> np.ndarray:
        """Smooth random field in about [-1, 1] with ``cells`` features across the image."""
        g = rng.standard_normal((cells, cells)).astype(np.float32) * 0.6
        return np.asarray(Image.fromarray(g, "F").resize((self.n, self.n), Image.BICUBIC))

    def ramp(self, d: np.ndarray, width_px: float = 1.0) -> np.ndarray:
        """Anti-aliased inside-mask from a signed distance (anatomy units, > 0 inside)."""
        return _clip01(d * (1.0 / (width_px * self.px)) + 0.5)


def _segment_distance(X, Y, x0, y0, x1, y1):
    dx, dy = x1 - x0, y1 - y0
    t = np.clip(((X - x0) * dx + (Y - y0) * dy) / (dx * dx + dy * dy), 0.0, 1.0)
    return np.hypot(X - x0 - t * dx, Y - y0 - t * dy)


# --------------------------------------------------------------------------- anatomy


def lung_distance(X: np.ndarray, Y: np.ndarray, a: Anatomy) -> np.ndarray:
    """Approximate signed distance to the lung outline (> 0 inside either lung)."""
    d = _pleural_outline(X, Y, a)
    return np.minimum(d, _mediastinal_and_diaphragm(X, Y, a), out=d)


def _pleural_outline(X: np.ndarray, Y: np.ndarray, a: Anatomy) -> np.ndarray:
    """Distance to the apical/lateral (costal) pleura: an ellipse per lung."""
    ac, cy, ry = pa.lung_ellipse(a)
    absx = np.abs(X - a.mediastinal_shift)
    rx_lat, rx_med = a.W - ac, ac - 0.02
    du = absx - ac
    u = du / np.where(du > 0, np.float32(rx_lat), np.float32(rx_med))
    v = np.minimum(Y - cy, 0.0) * (1.0 / ry)
    r = np.sqrt(u * u + v * v)
    return (1.0 - r) * np.where(np.abs(u) > np.abs(v), np.float32(rx_lat), np.float32(ry))


def _mediastinal_and_diaphragm(X: np.ndarray, Y: np.ndarray, a: Anatomy) -> np.ndarray:
    """Distance to the mediastinal border and the diaphragm (where a collapsing lung stays attached)."""
    xm = X - a.mediastinal_shift
    absx = np.abs(xm)
    left = xm > 0
    # Mediastinal border: straight, with the aortic knob bulging into the left lung.
    knob = 0.065 * np.exp(-(((Y - (a.carina_y - 0.02)) * (1 / 0.055)) ** 2))
    knob += 0.04 * np.exp(-(((Y - (a.hilum_y + 0.02)) * (1 / 0.1)) ** 2))  # pulmonary trunk
    # Cardiac borders: elliptic arcs from below the hilum, widest just above the diaphragm
    # (left ventricle on the patient's left, right atrium on the right); their span sets the CTR.
    right_border, left_border = pa.heart_borders(a)
    top, waist = pa.heart_levels(a)
    h = np.minimum(Y - waist, 0.0) * (1.0 / (waist - top))
    arc = np.sqrt(_clip01(1.0 - h * h))
    border = np.where(left, np.maximum(a.med + knob, (left_border - a.mediastinal_shift) * arc),
                      np.maximum(a.med + 0.012, (a.mediastinal_shift - right_border) * arc))
    d = absx - border
    # Diaphragm domes: parabolas reaching the costophrenic angle at the lateral wall.
    dome_top = np.where(left, np.float32(a.dome_left), np.float32(a.dome_right))
    cp = pa.cp_y(a)
    k_r = (cp - a.dome_right) / (a.W - a.dome_peak) ** 2
    k_l = (cp - a.dome_left) / (a.W - a.dome_peak) ** 2
    k = np.where(left, np.float32(k_l), np.float32(k_r))
    d_dia = (dome_top + k * (absx - a.dome_peak) ** 2 - Y) * 0.8
    np.minimum(d, d_dia, out=d)
    return d


def _body(cv: Canvas, a: Anatomy) -> np.ndarray:
    """Soft-tissue thickness: chest cylinder, shoulders, neck."""
    X, Y = cv.X, cv.Y
    ax = np.abs(X)
    chest = a.W + a.margin
    yn = (Y - a.apex_y) * (1.0 / (pa.cp_y(a) - a.apex_y))
    sh = _clip01((0.3 - yn) * 2.2)  # 1 at the shoulders, 0 from mid-chest down
    B = chest + 0.03 * _clip01(yn) + a.shoulder * sh * sh
    t = _clip01((ax - a.neck) * (1.0 / (chest + a.shoulder - a.neck)))
    top = a.apex_y - 0.32 + 0.42 * t * t  # shoulder contour
    inside = cv.ramp(B - ax, 2.5) * cv.ramp(Y - top, 3.0)
    prof = np.sqrt(_clip01(1.0 - (X / B) ** 2))
    body = inside * (0.22 + 0.78 * prof)
    neck = cv.ramp(a.neck - ax, 1.5) * (0.4 + 0.5 * np.sqrt(_clip01(1.0 - (X / a.neck) ** 2)))
    return np.maximum(body, neck * cv.ramp(a.apex_y + 0.1 - Y, 4.0), out=body)


def _ribs(cv: Canvas, a: Anatomy, bone: np.ndarray) -> None:
    X, Y = cv.X, cv.Y
    ax = np.abs(X - a.mediastinal_shift * 0.5)
    s = ax * (1.0 / (a.W + 0.03))
    s2 = s * s
    span = pa.cp_y(a) + 0.08 - a.rib_top
    # Posterior ribs: arch up from the spine, then turn down along the lateral wall.
    v = _clip01((Y - a.rib_top) * (1.0 / span))  # lower ribs run more steeply down laterally
    yw = Y + 0.22 * s - (0.5 + 0.2 * v) * s2 * s
    u = _clip01((yw - a.rib_top) * (1.0 / span))
    c = 1.0 - a.rib_power  # ~u**rib_power without a pow: ribs spaced wider towards the bases
    r = a.n_ribs * u * ((1.0 + c) - c * u)
    f = r - np.floor(r)
    e = a.n_ribs * cv.px / span * 1.3
    w = a.rib_width + 0.12 * s
    band = _clip01(f / e) * _clip01((w - f) / e)
    q = f / w - 0.5
    cortex = 0.55 + 1.8 * q * q  # cortical margins brighter than the medulla
    keep = (r > 0.15) & (r < a.n_ribs)
    lateral = _clip01((1.04 - s) * (a.W / (1.5 * cv.px)))
    medial = _clip01((ax - a.spine - 0.005) / (3 * cv.px)) * (0.45 + 0.55 * _clip01((ax - a.med) * 12))
    post = band * cortex * lateral * medial * keep
    # Anterior ribs: fainter, running down and medially from the lateral wall.
    yw2 = Y - 0.42 * (1.0 - s)
    u2 = _clip01((yw2 - (a.rib_top - 0.12)) * (1.0 / (span * 0.95)))
    r2 = 6.0 * u2 * (1.1 - 0.1 * u2)
    f2 = r2 - np.floor(r2)
    band2 = _clip01(f2 / (e * 0.6)) * _clip01((0.5 - f2) / (e * 0.6)) * (r2 > 0.4) * (r2 < 6.0)
    ant = band2 * _clip01((s - 0.32) * 6.0) * lateral * _clip01(1.3 - 1.2 * v)
    bone += RIB_K * (post + 0.25 * ant)


def _clavicles(cv: Canvas, a: Anatomy, bone: np.ndarray) -> None:
    sl = cv.box(-1.2, 1.2, a.clav_y - 0.3, a.clav_y + 0.1)
    if sl is None:
        return
    X, Y = cv.X[sl], cv.Y[sl]
    ax = np.abs(X)
    length = a.W + a.margin
    t = (ax - 0.1) * (1.0 / length)  # medial ends stop at the sternoclavicular joints
    yc = a.clav_y - 0.28 * t + 0.035 * np.sin(2 * np.pi * t)
    half = 0.03 + 0.006 * _clip01(1.0 - 2 * t)
    d = half - np.abs(Y - yc)
    m = cv.ramp(d) * _clip01(t * 25.0) * _clip01((1.0 - t) * 25.0)
    cortex = 0.7 + 0.5 * _clip01(1.0 - d / half) ** 2
    bone[sl] += BONE_K * 1.2 * m * cortex


def _spine(cv: Canvas, a: Anatomy, bone: np.ndarray) -> None:
    sl = cv.box(-0.15, 0.15, -1.3, 1.3)
    if sl is None:
        return
    X, Y = cv.X[sl] - a.mediastinal_shift * 0.3, cv.Y[sl]
    ax = np.abs(X)
    pv = 0.088
    f = (Y - a.rib_top) * (1 / pv)
    f -= np.floor(f)
    column = cv.ramp(a.spine - ax, 1.2)
    disc = _clip01((np.abs(f - 0.5) * 2 - 0.78) * 8.0)
    pedicle = np.exp(-(((ax - 0.72 * a.spine) * (1 / 0.016)) ** 2 + ((f - 0.35) * (pv / 0.022)) ** 2))
    process = np.exp(-((X * (1 / 0.011)) ** 2 + ((f - 0.65) * (pv / 0.028)) ** 2))
    edge = np.exp(-(((ax - a.spine) * (1 / 0.009)) ** 2))
    bone[sl] += BONE_K * (column * (0.32 - 0.18 * disc) + 0.35 * pedicle + 0.25 * process + 0.2 * edge)


def _shoulder_girdle(cv: Canvas, a: Anatomy, bone: np.ndarray) -> None:
    for s in (-1.0, 1.0):
        # Scapula: a faint plate over the upper lateral chest with a visible medial border.
        sl = cv.box(s * (a.W - 0.07), s * (a.W + a.margin + 0.1), a.apex_y - 0.05, a.apex_y + 0.72)
        if sl is not None:
            X, Y = cv.X[sl] * s, cv.Y[sl]
            t = (Y - a.apex_y) * (1 / 0.68)
            border = a.W - 0.07 + 0.12 * t
            lat = a.W + a.margin * 0.6 + 0.05 * (1 - t)
            plate = cv.ramp(X - border, 1.5) * cv.ramp(lat - X, 3.0) * _clip01(t * 12) * _clip01((1 - t) * 6)
            rim = np.exp(-(((X - border) * (1 / 0.01)) ** 2)) * _clip01(t * 12) * _clip01((1 - t) * 8)
            bone[sl] += BONE_K * (0.35 * plate + 0.45 * rim)
        # Humeral head at the upper corner.
        hx, hy, R = s * (a.W + a.margin + a.shoulder * 0.55), a.apex_y + 0.03, 0.125
        sl = cv.box(hx - R - 0.05, hx + R + 0.05, hy - R - 0.05, hy + R + 0.4)
        if sl is not None:
            X, Y = cv.X[sl], cv.Y[sl]
            r2 = ((X - hx) ** 2 + (Y - hy) ** 2) * (1 / R**2)
            head = _clip01(1.0 - r2)
            shaft = cv.ramp(0.065 - np.abs(X - hx - s * 0.03), 1.5) * _clip01((Y - hy) * 10) * (r2 > 0.6)
            ring = np.exp(-(((np.sqrt(r2) - 1.0) * (R / 0.012)) ** 2))
            bone[sl] += BONE_K * (0.8 * np.sqrt(head) + 0.5 * ring * (Y > hy - R * 0.2) + 0.7 * shaft)


def _hila_and_airways(cv: Canvas, a: Anatomy, soft: np.ndarray, air: np.ndarray) -> None:
    xt = 0.012 + a.mediastinal_shift * 0.6
    sl = cv.box(-0.35, 0.35, -1.3, a.carina_y + 0.25)
    X, Y = cv.X[sl], cv.Y[sl]
    tw = 0.032
    trachea = cv.ramp(tw - np.abs(X - xt), 1.2) * cv.ramp(a.carina_y - Y, 2.0)
    lb = _segment_distance(X, Y, xt, a.carina_y - 0.01, xt + 0.17, a.carina_y + 0.14)
    rb = _segment_distance(X, Y, xt, a.carina_y - 0.01, xt - 0.15, a.carina_y + 0.11)
    bronchi = cv.ramp(0.022 - np.minimum(lb, rb), 1.2)
    air[sl] += 0.3 * np.maximum(trachea, bronchi)
    # Hilar vessels: lobulated soft-tissue density, the left hilum a little higher.
    for s, dy in ((-1.0, 0.0), (1.0, -0.035)):
        hx, hy = s * (a.med + 0.1) + a.mediastinal_shift, a.hilum_y + dy
        sl = cv.box(hx - 0.15, hx + 0.15, hy - 0.18, hy + 0.18)
        X, Y = cv.X[sl], cv.Y[sl]
        g = np.exp(-(((X - hx) * (1 / 0.055)) ** 2 + ((Y - hy) * (1 / 0.1)) ** 2))
        g += 0.6 * np.exp(-(((X - hx - s * 0.03) * (1 / 0.035)) ** 2 + ((Y - hy - 0.08) * (1 / 0.05)) ** 2))
        soft[sl] += 0.14 * g


def _stomach_and_breasts(cv: Canvas, a: Anatomy, soft: np.ndarray, air: np.ndarray) -> None:
    gx, gy = 0.33 * a.W / 0.77 + a.mediastinal_shift, a.dome_left + 0.1
    sl = cv.box(gx - 0.14, gx + 0.14, gy - 0.1, gy + 0.1)
    if sl is not None:
        X, Y = cv.X[sl], cv.Y[sl]
        e = 1.0 - np.sqrt(((X - gx) * (1 / 0.1)) ** 2 + ((Y - gy) * (1 / 0.06)) ** 2)
        bubble = cv.ramp(e * 0.06) * cv.ramp(gy + 0.015 - Y)  # flat air-fluid level below
        air[sl] += 0.3 * bubble
    if a.breast > 0:
        for s in (-1.0, 1.0):
            bx, by, R = s * (a.W * 0.62), pa.dome(a, s > 0) + 0.02, 0.36
            sl = cv.box(bx - R, bx + R, by - R, by + R)
            if sl is None:
                continue
            X, Y = cv.X[sl], cv.Y[sl]
            r2 = ((X - bx) ** 2 + ((Y - by) * 1.15) ** 2) * (1 / R**2)
            soft[sl] += a.breast * np.sqrt(_clip01(1.0 - r2)) * _clip01((Y - by + R) * 3)


# --------------------------------------------------------------------------- thin lines (PIL)


def _vessel_tree(cv: Canvas, a: Anatomy, draw: ImageDraw.ImageDraw) -> None:
    """Pulmonary vessels branching from the hila, drawn as tapering lines (one branching level at a time)."""
    rng = np.random.default_rng(a.vessel_seed)
    scale = cv.n / 256.0 * a.W / 0.77
    # Trunks per hilum: angle from the lateral horizontal (negative = upwards), length, calibre.
    base = np.array([-82, -55, -25, 5, 35, 62], np.float64)
    length = np.array([0.22, 0.2, 0.16, 0.15, 0.16, 0.18])
    calibre = np.array([a.upper_vessels, a.upper_vessels, 1.0, 1.0, 1.15, 1.25])
    side = np.repeat([-1.0, 1.0], len(base))
    x = side * (a.med + 0.1) + a.mediastinal_shift
    y = np.where(side > 0, a.hilum_y - 0.035, a.hilum_y)
    ang = np.radians(np.tile(base, 2) + rng.normal(0, 10, 2 * len(base)))
    x = x + side * rng.uniform(0.0, 0.05, x.size)
    y = y + rng.normal(0.0, 0.04, y.size)
    ln = np.tile(length, 2)
    width = 2.0 * np.tile(calibre, 2)
    c, s = math.cos(cv.pose.rotation), math.sin(cv.pose.rotation)
    z, half = cv.pose.zoom * cv.n / 2.0, cv.n / 2.0
    for depth in range(5):
        x1, y1 = x + side * np.cos(ang) * ln, y + np.sin(ang) * ln
        # Anatomy -> pixel for both ends of every segment at this level at once.
        px0 = (c * x - s * y) * z + (cv.pose.shift_x + 1.0) * half - 0.5
        py0 = (s * x + c * y) * z + (cv.pose.shift_y + 1.0) * half - 0.5
        px1 = (c * x1 - s * y1) * z + (cv.pose.shift_x + 1.0) * half - 0.5
        py1 = (s * x1 + c * y1) * z + (cv.pose.shift_y + 1.0) * half - 0.5
        wpx = width * scale
        fill = np.clip(255 * np.minimum(wpx, 1.0) * (1.0 - 0.15 * depth), 0, 255).astype(int).tolist()
        wint = np.maximum(np.rint(wpx), 1).astype(int).tolist()
        for seg in zip(px0.tolist(), py0.tolist(), px1.tolist(), py1.tolist(), fill, wint, strict=True):
            draw.line(seg[:4], fill=seg[4], width=seg[5])
        if depth == 4:
            break
        turn = np.radians(rng.uniform(8, 38, (2, x.size)))
        shrink = rng.uniform(0.62, 0.8, (2, x.size))
        x, y, side = np.tile(x1, 2), np.tile(y1, 2), np.tile(side, 2)
        ang = np.concatenate([ang - turn[0], ang + turn[1]])
        ln = np.concatenate([ln * shrink[0], ln * shrink[1]])
        width = np.tile(width * 0.72, 2)


def _kerley_lines(cv: Canvas, a: Anatomy, f: Finding, draw: ImageDraw.ImageDraw) -> None:
    rng = np.random.default_rng(f.seed + 1)
    cp = pa.cp_y(a)
    for s in (-1.0, 1.0):
        for _ in range((5, 8, 11)[f.level - 1]):
            y = rng.uniform(cp - 0.32, cp - 0.06)
            xl = pa.lateral_border(a, y) - 0.006
            ln = rng.uniform(0.035, 0.06)
            draw.line([cv.to_pixel(s * xl, y), cv.to_pixel(s * (xl - ln), y + rng.normal(0, 0.004))], fill=230, width=1)


def _devices(cv: Canvas, a: Anatomy, f: Finding, draw: ImageDraw.ImageDraw) -> None:
    rng = np.random.default_rng(f.seed + 2)
    w1 = max(round(cv.n / 170), 1)

    def pts(*p):
        return [cv.to_pixel(x, y) for x, y in p]

    xt = 0.012 + a.mediastinal_shift * 0.6
    for device in f.devices:
        if device == "endotracheal tube":
            tip = a.carina_y - rng.uniform(0.05, 0.13)
            draw.line(pts((xt + 0.008, -1.4), (xt + 0.006, tip)), fill=255, width=w1 + 1)
            for dx in (-0.022, 0.024):
                draw.line(pts((xt + dx, -1.4), (xt + dx * 0.9, tip)), fill=90, width=1)
        elif device == "central venous catheter":
            tip = a.carina_y + rng.uniform(0.04, 0.16)
            draw.line(pts((-0.3, -1.4), (-0.21, a.apex_y), (-0.12, a.clav_y + 0.07), (-0.075, a.carina_y - 0.05),
                          (-0.065, tip)), fill=235, width=w1, joint="curve")
        elif device == "enteric tube":
            d = a.dome_left
            draw.line(pts((0.0, -1.4), (0.015, a.carina_y), (0.05, d - 0.06), (0.16, d + 0.1), (0.34, d + 0.14),
                          (0.42, d + 0.07)), fill=230, width=w1 + 1, joint="curve")
        elif device == "pacemaker":
            gx, gy = 0.52 * a.W / 0.77, a.apex_y + 0.14
            c0, c1 = cv.to_pixel(gx - 0.09, gy - 0.06), cv.to_pixel(gx + 0.09, gy + 0.06)
            box = [min(c0[0], c1[0]), min(c0[1], c1[1]), max(c0[0], c1[0]), max(c0[1], c1[1])]
            draw.rounded_rectangle(box, radius=max((box[2] - box[0]) / 4, 1), fill=255)
            _, left_border = pa.heart_borders(a)
            top, waist = pa.heart_levels(a)
            draw.line(pts((gx - 0.07, gy), (0.2, a.clav_y + 0.06), (0.02, a.carina_y - 0.04), (-0.07, a.hilum_y + 0.08),
                          (-0.04, top + 0.1), (left_border * 0.55, waist + 0.02)), fill=255, width=w1, joint="curve")


# --------------------------------------------------------------------------- findings


class _Lesions:
    """Accumulates what findings do to the lungs while the normal anatomy is drawn."""

    def __init__(self, cv: Canvas):
        n = cv.n
        self.opacity = np.zeros((n, n), np.float32)  # fraction of lung air replaced by water density
        self.keep_markings = np.ones((n, n), np.float32)
        self.extra_air = np.zeros((n, n), np.float32)  # pneumothorax rim, bullae
        self.extra_density = np.zeros((n, n), np.float32)  # pleural line, bulla walls
        self.clear_air = np.zeros((n, n), np.float32)  # lung replaced by pleural air

    def add(self, sl, o: np.ndarray) -> None:
        """Union of opacities: o = 1 - (1 - o1)(1 - o2)."""
        cur = self.opacity[sl] if sl is not None else self.opacity
        cur += o * (1.0 - cur)


def _sides(f: Finding) -> tuple[float, ...]:
    return {"left": (1.0,), "right": (-1.0,), "bilateral": (-1.0, 1.0)}[f.side]


def _effusion(cv, a, f, les):
    """Dependent fluid at the base: meniscus rising up the lateral wall; mild = blunted angle."""
    k = f.level
    cp = pa.cp_y(a)
    H = cp - a.apex_y
    h = (0.13, 0.3, 0.55)[k - 1] * H
    rise = (0.1, 0.2, 0.28)[k - 1]
    soft = (0.04, 0.1, 0.14)[k - 1]
    for s in _sides(f):
        y_lat = cp - h
        sl = cv.box(0.0, s * (a.W + 0.1), y_lat - 0.15, cp + 0.05)
        X, Y = cv.X[sl] * s, cv.Y[sl]
        t = _clip01(X * (1.0 / a.W))
        surface = y_lat + rise * (1.0 - t * t)  # meniscus: climbs the lateral wall
        o = _clip01((Y - surface) * (1.0 / soft) + 0.25) * (X > 0)
        les.add(sl, 0.97 * o)


def _pneumothorax(cv, a, f, les, lung_d):
    """Apicolateral lucent rim without markings outside a thin visceral pleural line."""
    k = f.level
    s = 1.0 if f.side == "left" else -1.0
    grow = (1.07, 1.2, 1.5)[k - 1]
    # The lung falls away from the chest wall towards the hilum and stays on mediastinum and diaphragm.
    ax, ay = s * (a.med + 0.02) + a.mediastinal_shift, pa.dome(a, s > 0)
    sl = cv.box(0.0, s * (a.W + 0.1), a.apex_y - 0.05, pa.cp_y(a) + 0.02)
    X, Y = cv.X[sl], cv.Y[sl]
    d_in = _pleural_outline(ax + (X - ax) * grow, ay + (Y - ay) * grow, a) * (1.0 / grow)
    np.minimum(d_in, _mediastinal_and_diaphragm(X, Y, a) + 3 * cv.px, out=d_in)
    same_side = (X - a.mediastinal_shift) * s > 0
    lung = cv.ramp(lung_d[sl]) * same_side
    inner = cv.ramp(d_in) * lung
    rim = lung - inner
    les.clear_air[sl] = np.maximum(les.clear_air[sl], rim)
    les.keep_markings[sl] *= 1.0 - rim
    line = np.exp(-((d_in * (1.0 / (0.7 * cv.px))) ** 2)) * cv.ramp(lung_d[sl] - 1.5 * cv.px) * same_side
    les.extra_density[sl] += 0.09 * line
    les.add(sl, (0.05 * k) * inner)  # the collapsed lung is denser


def _blobs(cv, rng, sl, cx, cy, R, n, field):
    """Sum of Gaussian puffs around (cx, cy), modulated by a noise field: a patchy opacity."""
    X, Y = cv.X[sl], cv.Y[sl]
    acc = np.zeros(X.shape, np.float32)
    for _ in range(n):
        rr = R * math.sqrt(rng.random()) * 0.6
        th = rng.uniform(0, 2 * math.pi)
        bx, by, br = cx + rr * math.cos(th), cy + rr * math.sin(th), R * rng.uniform(0.4, 0.7)
        acc += np.exp(-((X - bx) ** 2 + (Y - by) ** 2) * (1.0 / br**2))
    return acc * (0.85 + 0.3 * field[sl])


def _consolidation(cv, a, f, les, lung_d, field):
    """Patchy, confluent airspace opacity in a zone, with air bronchograms when moderate or worse."""
    rng = np.random.default_rng(f.seed)
    k = f.level
    cx, cy = pa.zone_centre(a, f.side, f.zone)
    cx += rng.normal(0, 0.03)
    cy += rng.normal(0, 0.03)
    R = (0.12, 0.18, 0.25)[k - 1]
    sl = cv.box(cx - 1.8 * R, cx + 1.8 * R, cy - 1.8 * R, cy + 1.8 * R)
    patch = _clip01((_blobs(cv, rng, sl, cx, cy, R, (4, 6, 8)[k - 1], field) - 0.15) * 0.9)
    patch *= cv.ramp(lung_d[sl], 3.0)
    if f.side == "right" and f.zone == "upper" and k >= 2:
        patch *= cv.ramp(cy + 0.8 * R - cv.Y[sl], 1.5)  # the minor fissure bounds the upper lobe
    o = (0.42, 0.62, 0.82)[k - 1] * patch
    if k >= 2:  # air bronchograms: lucent branching tubes inside the opacity
        X, Y = cv.X[sl], cv.Y[sl]
        hx, hy = (a.med + 0.1) * (1 if f.side == "left" else -1), a.hilum_y
        ang = math.atan2(cy - hy, cx - hx)
        tubes = np.zeros(X.shape, np.float32)
        for j in range(3):
            a0 = ang + rng.normal(0, 0.35)
            x0, y0 = cx - 0.6 * R * math.cos(ang), cy - 0.6 * R * math.sin(ang)
            x1, y1 = x0 + 1.1 * R * math.cos(a0), y0 + 1.1 * R * math.sin(a0)
            tubes = np.maximum(tubes, cv.ramp(0.005 + 0.002 * (2 - j) - _segment_distance(X, Y, x0, y0, x1, y1)))
        o *= 1.0 - 0.22 * tubes * patch
    les.add(sl, o)


def _edema(cv, a, f, les, field):
    """Bilateral perihilar haze sparing the periphery (bat wing); Kerley lines are drawn separately."""
    k = f.level
    rx, ry = (0.2, 0.26, 0.33)[k - 1], (0.28, 0.34, 0.42)[k - 1]
    dens = (0.3, 0.5, 0.72)[k - 1]
    hx = a.med + 0.1
    X = np.abs(cv.X - a.mediastinal_shift)
    g = np.exp(-(((X - hx) * (1 / rx)) ** 2 + ((cv.Y - a.hilum_y - 0.04) * (1 / ry)) ** 2))
    patch = _clip01(g * (0.75 + (0.3 + 0.15 * k) * field))
    les.add(None, dens * patch)


def _triangle(X, Y, p0, p1, p2, soft):
    """Soft mask of a triangle (vertices in any order)."""
    out = None
    pts = (p0, p1, p2)
    cx, cy = sum(p[0] for p in pts) / 3, sum(p[1] for p in pts) / 3
    for (x0, y0), (x1, y1) in ((p0, p1), (p1, p2), (p2, p0)):
        nx, ny = y1 - y0, -(x1 - x0)
        norm = math.hypot(nx, ny)
        nx, ny = nx / norm, ny / norm
        if (cx - x0) * nx + (cy - y0) * ny < 0:
            nx, ny = -nx, -ny
        d = (X - x0) * nx + (Y - y0) * ny
        m = _clip01(d * (1.0 / soft) + 0.5)
        out = m if out is None else out * m
    return out


def _atelectasis(cv, a, f, les):
    """Plate-like bands; a lobar wedge with volume loss when moderate or worse (or a right middle lobe wedge)."""
    rng = np.random.default_rng(f.seed)
    k = f.level
    for s in _sides(f):
        if f.zone == "middle":  # right middle lobe: wedge against the right heart border
            right_border, _ = pa.heart_borders(a)
            hy = a.hilum_y + 0.06
            _, waist = pa.heart_levels(a)
            p = ((right_border + 0.03, hy), (right_border + 0.02, waist - 0.02), (-(a.W * 0.55), waist - 0.1))
            sl = cv.box(-(a.W * 0.6), 0.0, hy - 0.05, waist + 0.05)
            tri = _triangle(cv.X[sl], cv.Y[sl], *p, soft=(0.05, 0.03, 0.015)[k - 1])
            les.add(sl, (0.4, 0.62, 0.82)[k - 1] * tri)
            continue
        base = pa.dome(a, s > 0)
        right_border, left_border = pa.heart_borders(a)
        inner = max(left_border if s > 0 else -right_border, a.med + 0.05)
        sl = cv.box(0.0, s * (a.W + 0.05), a.hilum_y - 0.05, base + 0.05)
        X, Y = cv.X[sl], cv.Y[sl]
        o = np.zeros(X.shape, np.float32)
        # Plate-like (discoid) atelectasis: thin fuzzy bands roughly parallel to the diaphragm.
        for j in range((1, 2, 2)[k - 1]):
            y = base - 0.08 - 0.07 * j + rng.normal(0, 0.01)
            x0, x1 = s * (inner + 0.02), s * (inner + 0.2 + 0.04 * k + rng.uniform(0, 0.05))
            tilt = rng.uniform(-0.03, 0.01)
            d = _segment_distance(X, Y, x0, y - tilt, x1, y + tilt)
            width = (0.009, 0.013, 0.016)[k - 1]
            o = np.maximum(o, 0.42 * _clip01((width - d) * (1.0 / (3.0 * cv.px)) + 0.5))
        if k >= 2:  # lower-lobe collapse: a wedge from the hilum to the base with a sharp lateral edge
            reach = (0.14, 0.3)[k - 2]
            tri = _triangle(X, Y, (s * (inner - 0.08), a.hilum_y + 0.1), (s * (inner - 0.08), base + 0.02),
                            (s * (inner + reach), base + 0.02), soft=0.03)
            o = np.maximum(o, (0.5, 0.8)[k - 2] * tri)
        les.add(sl, o)


def _nodules(cv, a, f, les):
    """Round, well-defined soft-tissue balls; diameter from ``size_mm``."""
    rng = np.random.default_rng(f.seed)
    sides = ("left", "right") if f.side == "bilateral" else (f.side,)
    for j in range(f.count):
        side = sides[j % len(sides)]
        zone = f.zone if (j == 0 and f.zone) else ("upper", "middle", "lower")[int(rng.integers(3))]
        cx, cy = pa.zone_centre(a, side, zone)
        cx += rng.normal(0, 0.04)
        cy += rng.normal(0, 0.04)
        r = f.size_mm * (1.0 if j == 0 else rng.uniform(0.7, 1.0)) / 2 / MM_PER_UNIT
        sl = cv.box(cx - r - 0.02, cx + r + 0.02, cy - r - 0.02, cy + r + 0.02)
        X, Y = cv.X[sl], cv.Y[sl]
        d = r - np.hypot(X - cx, Y - cy)
        sphere = np.sqrt(_clip01(d * (2.0 / r)))  # thickness of a ball: brighter centre
        les.add(sl, (0.8 if r * MM_PER_UNIT * 2 < 10 else 0.72) * sphere * cv.ramp(d, 1.0))


def _emphysema_bullae(cv, a, f, les):
    """Thin-walled lucent bullae in the upper zones (hyperinflation itself is in apply_findings)."""
    if f.level < 2:
        return
    rng = np.random.default_rng(f.seed)
    for _ in range(f.level - 1):
        side = ("right", "left")[int(rng.integers(2))]
        cx, cy = pa.zone_centre(a, side, "upper")
        cx += rng.normal(0, 0.03)
        cy += rng.normal(0, 0.03) - 0.04
        R = rng.uniform(0.06, 0.1)
        sl = cv.box(cx - R - 0.02, cx + R + 0.02, cy - R - 0.02, cy + R + 0.02)
        X, Y = cv.X[sl], cv.Y[sl]
        d = R - np.hypot(X - cx, Y - cy)
        inside = cv.ramp(d)
        les.keep_markings[sl] *= 1.0 - inside
        les.extra_air[sl] += 0.18 * inside
        les.extra_density[sl] += 0.05 * np.exp(-((d * (1.0 / (0.8 * cv.px))) ** 2))


def _covid(cv, a, f, les, lung_d, field):
    """Bilateral peripheral, lower-zone-predominant hazy (ground-glass) opacity."""
    k = f.level
    cp = pa.cp_y(a)
    H = cp - a.apex_y
    start = cp - (0.45, 0.62, 0.85)[k - 1] * H
    dens = (0.55, 0.65, 0.78)[k - 1]
    periph = np.exp(-np.maximum(lung_d, 0.0) * (1.0 / (0.08 + 0.04 * k)))
    lower = _clip01((cv.Y - start) * (1.0 / (0.25 * H)))
    patch = _clip01(field * 1.2 + 0.7)
    les.add(None, dens * periph * lower * patch)


# --------------------------------------------------------------------------- the image


def _blur3(img: np.ndarray) -> np.ndarray:
    """[1 2 1]/4 in both directions: detector blur (and correlated noise)."""
    p = np.pad(img, 1, mode="edge")
    h = 0.25 * p[:, :-2] + 0.5 * p[:, 1:-1] + 0.25 * p[:, 2:]
    return 0.25 * h[:-2] + 0.5 * h[1:-1] + 0.25 * h[2:]


def _marker(img: np.ndarray, cv: Canvas) -> None:
    """A lead 'L' marker in the patient's-left upper corner (image right)."""
    n = cv.n
    h = max(n // 20, 5)
    w = max(h // 4, 1)
    r0, c0 = n // 18, n - n // 12 - h
    img[r0 : r0 + h, c0 : c0 + w] = 0.97
    img[r0 + h - w : r0 + h, c0 : c0 + int(h * 0.7)] = 0.97


def render(anatomy: Anatomy, pose: Pose, findings: tuple[Finding, ...], n: int,
           rng: np.random.Generator) -> np.ndarray:
    """One PA chest radiograph as an (n, n) uint8 array; brighter = denser."""
    a = pa.apply_findings(anatomy, pose, findings)
    cv = Canvas(n, pose)
    by_cat = {f.category: f for f in findings}

    soft = _body(cv, a) * a.soft
    lung_d = lung_distance(cv.X, cv.Y, a)
    lung = cv.ramp(lung_d)
    depth = 0.55 + 0.45 * np.sqrt(_clip01(lung_d * (1 / 0.2)))  # lungs are thinner at their edges

    # Markings: vessels (+ Kerley lines), blurred; devices as a metal layer.
    marks_img = Image.new("L", (n, n), 0)
    draw = ImageDraw.Draw(marks_img)
    _vessel_tree(cv, a, draw)
    if "pulmonary edema" in by_cat:
        _kerley_lines(cv, a, by_cat["pulmonary edema"], draw)
    radius = (0.55 + a.vessel_blur) * n / 256
    marks = np.asarray(marks_img.filter(ImageFilter.GaussianBlur(radius)), dtype=np.float32) * (1 / 255)
    metal = None
    if "support device" in by_cat:
        metal_img = Image.new("L", (n, n), 0)
        _devices(cv, a, by_cat["support device"], ImageDraw.Draw(metal_img))
        metal = np.asarray(metal_img.filter(ImageFilter.GaussianBlur(0.4 * n / 256)), np.float32) * (1 / 255)

    texture = cv.noise_field(rng, 12)
    fine = cv.noise_field(rng, 48)
    les = _Lesions(cv)
    for f in findings:
        c = f.category
        if c == "pleural effusion":
            _effusion(cv, a, f, les)
        elif c == "pneumothorax":
            _pneumothorax(cv, a, f, les, lung_d)
        elif c == "consolidation":
            _consolidation(cv, a, f, les, lung_d, cv.noise_field(np.random.default_rng(f.seed + 7), 24))
        elif c == "pulmonary edema":
            _edema(cv, a, f, les, cv.noise_field(np.random.default_rng(f.seed + 7), 14))
        elif c == "atelectasis":
            _atelectasis(cv, a, f, les)
        elif c == "nodule":
            _nodules(cv, a, f, les)
        elif c == "emphysema":
            _emphysema_bullae(cv, a, f, les)
        elif c == "covid-19":
            _covid(cv, a, f, les, lung_d, cv.noise_field(np.random.default_rng(f.seed + 7), 16))

    # Lung air: deeper centrally and towards the bases, displaced by vessels and lesions.
    vessels = marks * les.keep_markings * (0.4 * a.vessel_gain)
    cp = pa.cp_y(a)
    apical = 0.62 + 0.38 * _clip01((cv.Y - a.apex_y) * (1.0 / (0.5 * (cp - a.apex_y))))
    air = lung * depth * apical * (1.0 - vessels) * (1.0 + 0.06 * texture + 0.09 * fine)
    air *= a.air_gain * (1.0 - les.opacity)
    air += les.clear_air * (apical * a.air_gain - air)  # pneumothorax: pleural air, no lung markings
    air += les.extra_air * lung

    bone = np.zeros((n, n), np.float32)
    _ribs(cv, a, bone)
    _clavicles(cv, a, bone)
    _spine(cv, a, bone)
    _shoulder_girdle(cv, a, bone)
    _hila_and_airways(cv, a, soft, air)
    _stomach_and_breasts(cv, a, soft, air)

    density = soft - AIR_K * air + bone * (0.6 + 0.4 * soft) + les.extra_density
    if metal is not None:
        density += METAL_K * metal
    img = 1.0 / (1.0 + np.exp(-pose.contrast * (density - pose.exposure)))
    img += rng.standard_normal((n, n), dtype=np.float32) * pose.noise
    img = _blur3(img)
    if pose.marker_left:
        _marker(img, cv)
    out = (np.clip(img, 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)
    lut = (np.linspace(0.0, 1.0, 256) ** pose.gamma * 255.0 + 0.5).astype(np.uint8)  # display gamma
    return lut[out]
