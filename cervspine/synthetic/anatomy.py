"""Analytic cervical-spine anatomy for the synthetic CT generator.

Every bone is a union of extruded 2-D shapes (ellipses, capsules, rings) described by approximate
signed distance functions (SDFs, mm, negative inside) in a *local* frame: x lateral (+ = patient left),
y posterior (+), origin at the vertebral-body centre line; ``s`` is the height along the spine in
anatomical mm, 0 at the top of C1, increasing inferiorly. A cortical shell is where -t < d <= 0,
cancellous bone where d <= -t; edges are anti-aliased over one pixel. Fractures are planes that cut a
gap through one component of a vertebra and shift the fragment on one side.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np

BIG = 1.0e4
_EPS = 1.0e-6
THORACIC = ("T1", "T2", "T3")
LEVELS = ("C1", "C2", "C3", "C4", "C5", "C6", "C7", *THORACIC)
LABELS = {name: i + 1 for i, name in enumerate(LEVELS)}  # 1..7 = C1..C7, 8.. = T1..


class Shape(Protocol):
    """A 2-D shape with an approximate SDF and a bounding box (x0, x1, y0, y1), local mm."""

    def sdf(self, x: np.ndarray, y: np.ndarray) -> np.ndarray: ...

    def bbox(self) -> tuple[float, float, float, float]: ...


@dataclass(frozen=True)
class Ellipse:
    cx: float
    cy: float
    a: float
    b: float

    def sdf(self, x: np.ndarray, y: np.ndarray) -> np.ndarray:
        u, v = (x - self.cx) / self.a, (y - self.cy) / self.b
        g = u * u + v * v - 1.0
        grad = 2.0 * np.sqrt((u / self.a) ** 2 + (v / self.b) ** 2) + _EPS
        return g / grad

    def bbox(self) -> tuple[float, float, float, float]:
        return (self.cx - self.a, self.cx + self.a, self.cy - self.b, self.cy + self.b)


@dataclass(frozen=True)
class Capsule:
    x0: float
    y0: float
    x1: float
    y1: float
    r: float

    def sdf(self, x: np.ndarray, y: np.ndarray) -> np.ndarray:
        bx, by = self.x1 - self.x0, self.y1 - self.y0
        px, py = x - self.x0, y - self.y0
        h = np.clip((px * bx + py * by) / (bx * bx + by * by + _EPS), 0.0, 1.0)
        return np.hypot(px - h * bx, py - h * by) - self.r

    def bbox(self) -> tuple[float, float, float, float]:
        return (
            min(self.x0, self.x1) - self.r,
            max(self.x0, self.x1) + self.r,
            min(self.y0, self.y1) - self.r,
            max(self.y0, self.y1) + self.r,
        )


@dataclass(frozen=True)
class Ring:
    """``outer`` minus ``inner``, optionally kept only where y < y_max or y > y_min."""

    outer: Ellipse
    inner: Ellipse
    y_min: float = -BIG
    y_max: float = BIG

    def sdf(self, x: np.ndarray, y: np.ndarray) -> np.ndarray:
        d = np.maximum(self.outer.sdf(x, y), -self.inner.sdf(x, y))
        if self.y_max < BIG:
            d = np.maximum(d, y - self.y_max)
        if self.y_min > -BIG:
            d = np.maximum(d, self.y_min - y)
        return d

    def bbox(self) -> tuple[float, float, float, float]:
        x0, x1, y0, y1 = self.outer.bbox()
        return (x0, x1, max(y0, self.y_min), min(y1, self.y_max))


@dataclass(frozen=True)
class Part:
    """A 2-D shape extruded over s in [s0, s1]; ``slope`` lowers it by slope·(y − y_ref) posteriorly."""

    shape: Shape
    s0: float
    s1: float
    slope: float = 0.0
    y_ref: float = 0.0
    tag: str = ""

    def s_bounds(self) -> tuple[float, float]:
        drop = self.slope * max(self.shape.bbox()[3] - self.y_ref, 0.0)
        return self.s0, self.s1 + drop

    def sdf(self, x: np.ndarray, y: np.ndarray, s: float) -> np.ndarray:
        d = self.shape.sdf(x, y)
        if self.slope:
            s_eff = s - self.slope * np.maximum(y - self.y_ref, 0.0)
            return np.maximum(d, np.maximum(self.s0 - s_eff, s_eff - self.s1))
        return np.maximum(d, max(self.s0 - s, s - self.s1))


@dataclass(frozen=True)
class Peg:
    """A vertical capsule (the dens): radius r around the segment s in [s0, s1] at (x, y)."""

    x: float
    y: float
    r: float
    s0: float
    s1: float

    def s_bounds(self) -> tuple[float, float]:
        return self.s0 - self.r, self.s1 + self.r

    def sdf(self, x: np.ndarray, y: np.ndarray, s: float) -> np.ndarray:
        dz = max(self.s0 - s, 0.0, s - self.s1)
        return np.sqrt((x - self.x) ** 2 + (y - self.y) ** 2 + dz * dz) - self.r

    @property
    def shape(self) -> Ellipse:
        return Ellipse(self.x, self.y, self.r, self.r)


@dataclass(frozen=True)
class Component:
    """A union of parts minus holes (holes are parts too, e.g. the canal or a foramen)."""

    parts: tuple[Part | Peg, ...]
    holes: tuple[Part, ...] = ()

    def s_bounds(self) -> tuple[float, float]:
        b = [p.s_bounds() for p in self.parts]
        return min(v[0] for v in b), max(v[1] for v in b)

    def bbox(self, s: float, margin: float) -> tuple[float, float, float, float] | None:
        boxes = [p.shape.bbox() for p in self.parts if _active(p, s, margin)]
        if not boxes:
            return None
        return (
            min(b[0] for b in boxes),
            max(b[1] for b in boxes),
            min(b[2] for b in boxes),
            max(b[3] for b in boxes),
        )


@dataclass(frozen=True)
class Bone:
    """A labelled bone (vertebra: label 1..10; other bones: label 0) made of named components."""

    name: str
    label: int
    components: dict[str, Component]

    def s_bounds(self) -> tuple[float, float]:
        b = [c.s_bounds() for c in self.components.values()]
        return min(v[0] for v in b), max(v[1] for v in b)


@dataclass(frozen=True)
class Fracture:
    """A fracture plane through one component of a vertebra (local mm, s anatomical mm)."""

    vertebra: str
    component: str
    kind: str  # "body" | "dens" | "arch"
    point: tuple[float, float, float]
    normal: tuple[float, float, float]
    gap_mm: float
    shift: tuple[float, float]
    radius: float = math.inf  # local fracture: gap and shift fade out beyond this distance


@dataclass
class Anatomy:
    """One study's anatomy: bones, discs, soft-tissue knots and the spine's extent in s."""

    bones: list[Bone]
    discs: list[Part]
    knots: dict[str, np.ndarray]  # s knots and per-knot values for outline, airway, canal
    levels: dict[str, tuple[float, float]]  # body (or C1 ring) s-range per level
    hu: dict[str, float]
    fat_mm: float
    s_top: float = 0.0
    s_bottom: float = 0.0
    lordosis_mm: float = 0.0
    lateral_tilt_mm: float = 0.0
    extra: dict[str, float] = field(default_factory=dict)


def _active(part: Part | Peg, s: float, margin: float) -> bool:
    s0, s1 = part.s_bounds()
    return s0 - margin <= s <= s1 + margin


# ---------------------------------------------------------------------------------------------------
# Anatomy construction


def _level_layout(rng: np.random.Generator, fz: float) -> dict[str, tuple[float, float]]:
    """Body s-ranges: C1 ring, C2 body (dens above it), C3..T3 bodies with discs between."""
    heights = {"C3": 14.0, "C4": 14.0, "C5": 14.0, "C6": 14.5, "C7": 15.0, "T1": 17.0, "T2": 18.0, "T3": 19.0}
    jitter = lambda: fz * rng.uniform(0.95, 1.05)
    levels = {"C1": (0.0, 11.0 * jitter())}
    c2_top = levels["C1"][1] + 3.0 * fz
    levels["C2"] = (c2_top, c2_top + 17.0 * jitter())
    s = levels["C2"][1]
    for name, h in heights.items():
        s += (4.5 if name in THORACIC else 5.0) * jitter()  # the disc above
        levels[name] = (s, s + h * jitter())
        s = levels[name][1]
    return levels


def _dims(rng: np.random.Generator, f: float) -> dict[str, tuple[float, float, float, float]]:
    """Per-level (body width, body depth, canal width, canal depth) in mm."""
    base = {
        "C2": (16, 15, 24, 16),
        "C3": (16, 15, 24, 15),
        "C4": (17, 15.5, 24, 15),
        "C5": (18, 16, 25, 15),
        "C6": (20, 16.5, 25, 15),
        "C7": (22, 17, 24, 15),
        "T1": (24, 18, 20, 14),
        "T2": (25, 19, 17, 14),
        "T3": (26, 21, 16, 14),
    }
    return {k: tuple(f * v * rng.uniform(0.95, 1.05) for v in vals) for k, vals in base.items()}


def _atlas(f: float, s0: float, s1: float) -> Bone:
    """C1: a ring around the dens and the canal, lateral masses, wide transverse processes."""
    h = s1 - s0
    ring = Ring(Ellipse(0, 9 * f, 24 * f, 19.5 * f), Ellipse(0, 9 * f, 20 * f, 15.5 * f))
    parts: list[Part | Peg] = [Part(ring, s0 + 0.15 * h, s1 - 0.1 * h)]
    holes = []
    for sx in (-1, 1):
        parts.append(Part(Ellipse(sx * 17 * f, 3 * f, 6.5 * f, 8.5 * f), s0, s1 + 1.5))
        parts.append(
            Part(Capsule(sx * 21 * f, 3 * f, sx * 34 * f, 4 * f, 3.5 * f), s0 + 0.25 * h, s1 - 0.2 * h)
        )
        holes.append(Part(Ellipse(sx * 27 * f, 3.5 * f, 2.4 * f, 2.4 * f), s0, s1))
    parts.append(Part(Capsule(0, 27 * f, 0, 31 * f, 3 * f), s0 + 0.25 * h, s1 - 0.1 * h))
    holes.append(Part(Ellipse(0, 14 * f, 11 * f, 9.5 * f), s0 - 2, s1 + 2))
    return Bone("C1", 1, {"post": Component(tuple(parts), tuple(holes))})


def _axis(f: float, s0: float, s1: float, dims: tuple[float, ...], c1_top: float) -> Bone:
    """C2: body, the dens rising into the C1 ring, large posterior elements."""
    bw, bd, cw, cd = dims
    body = Component(
        (Part(Ellipse(0, 0, bw / 2, bd / 2), s0, s1), Peg(0, -1 * f, 4.5 * f, c1_top + 5.0 * f, s0 + 2))
    )
    post = _posterior(f, s0 + 2.0, s1 + 1.0, bw, bd, cw, cd, spinous=24 * f, slope=0.3, mass=(6.5, 8.0))
    return Bone("C2", 2, {"body": body, "post": post})


def _posterior(
    f: float,
    s0: float,
    s1: float,
    bw: float,
    bd: float,
    cw: float,
    cd: float,
    *,
    spinous: float,
    slope: float,
    mass: tuple[float, float] = (5.0, 6.5),
    thoracic: bool = False,
) -> Component:
    """Pedicles, lateral masses, laminae, spinous and transverse processes around the canal."""
    cy = bd / 2 + cd / 2 + 0.5
    back = cy + cd / 2
    lx = cw / 2 + 3.5 * f
    parts: list[Part | Peg] = []
    holes = [Part(Ellipse(0, cy, cw / 2, cd / 2), s0 - 5, s1 + 40)]
    h = s1 - s0

    def part(shape: Shape, a: float, b: float, tag: str = "", steep: float = 1.0) -> Part:
        return Part(shape, s0 + a * h, s0 + b * h, slope * steep, cy, tag)

    for sx in (-1, 1):
        pedicle = Capsule(sx * (bw / 2 - 2 * f), bd / 2 - 2 * f, sx * lx, cy - 2 * f, 2.6 * f)
        parts.append(part(pedicle, 0.0, 0.6, "pedicle"))
        parts.append(part(Ellipse(sx * lx, cy, mass[0] * f, mass[1] * f), -0.05, 1.05))
        parts.append(part(Capsule(sx * lx, cy + 2 * f, 0, back + 2.5 * f, 2.4 * f), 0.1, 1.0, "lamina"))
        if thoracic:
            parts.append(part(Capsule(sx * lx, cy, sx * (lx + 20 * f), cy + 7 * f, 3.8 * f), 0.1, 0.8))
        else:
            parts.append(
                part(Capsule(sx * (bw / 2 - 1), -1 * f, sx * (bw / 2 + 13 * f), 1 * f, 3 * f), 0.1, 0.7)
            )
            holes.append(Part(Ellipse(sx * (bw / 2 + 5.5 * f), 0.3 * f, 2.2 * f, 2.2 * f), s0 - 2, s1 + 2))
    parts.append(part(Capsule(0, back + 1.5 * f, 0, back + 1.5 * f + spinous, 2.8 * f), 0.3, 0.85, steep=1.4))
    return Component(tuple(parts), tuple(holes))


def _subaxial(name: str, f: float, s0: float, s1: float, dims: tuple[float, ...]) -> Bone:
    """C3..T3: body plus posterior elements (longer, steeper spinous processes lower down)."""
    bw, bd, cw, cd = dims
    h = s1 - s0
    thoracic = name in THORACIC
    spinous = {"C3": 14, "C4": 14, "C5": 15, "C6": 19, "C7": 27}.get(name, 30) * f
    slope = 0.75 if thoracic else 0.35
    body = Component((Part(Ellipse(0, 0, bw / 2, bd / 2), s0, s1),))
    post = _posterior(
        f, s0 + 0.1 * h, s1 + 0.05 * h, bw, bd, cw, cd, spinous=spinous, slope=slope, thoracic=thoracic
    )
    return Bone(name, LABELS[name], {"body": body, "post": post})


def _skull_and_jaw(f: float) -> Bone:
    """Label-0 bones that hint at the head: skull base with foramen magnum, mastoids, mandible, hyoid."""
    parts: list[Part | Peg] = [
        Part(Ring(Ellipse(0, 14 * f, 42 * f, 36 * f), Ellipse(0, 15 * f, 15 * f, 18 * f)), -13, -5),
        Part(
            Ring(Ellipse(0, 10 * f, 56 * f, 60 * f), Ellipse(0, 10 * f, 50 * f, 54 * f), y_min=14 * f),
            -90,
            -10,
        ),
        Part(
            Ring(Ellipse(0, -28 * f, 44 * f, 46 * f), Ellipse(0, -28 * f, 39 * f, 41 * f), y_max=-28 * f),
            22,
            42,
        ),
        Part(
            Ring(Ellipse(0, -30 * f, 18 * f, 14 * f), Ellipse(0, -30 * f, 15 * f, 11 * f), y_max=-30 * f),
            50,
            55,
        ),
    ]
    for sx in (-1, 1):
        parts.append(Part(Ellipse(sx * 14 * f, 4 * f, 6 * f, 8 * f), -9, -1.5))
        parts.append(Part(Ellipse(sx * 46 * f, 8 * f, 7 * f, 9 * f), -25, -3))
        parts.append(Part(Ellipse(sx * 43 * f, -22 * f, 4 * f, 7 * f), -30, 30))
    return Bone("skull", 0, {"bone": Component(tuple(parts))})


def _ribs(f: float, vertebra: Bone, dims: tuple[float, ...]) -> Bone:
    """First ribs: neck, then a shaft curving laterally and anteriorly (label 0)."""
    bw, bd, cw, cd = dims
    cy = bd / 2 + cd / 2
    s0, s1 = vertebra.components["post"].parts[0].s0, vertebra.components["post"].parts[0].s1
    parts: list[Part | Peg] = []
    for sx in (-1, 1):
        a = (sx * (bw / 2 + 1), cy - 3 * f)
        b = (sx * (cw / 2 + 22 * f), cy + 6 * f)
        c = (sx * (cw / 2 + 48 * f), cy - 14 * f)
        for p, q in ((a, b), (b, c)):
            parts.append(Part(Capsule(*p, *q, 4.0 * f), s0, s1))
    return Bone(f"rib_{vertebra.name}", 0, {"bone": Component(tuple(parts))})


def _knots(f: float, fn: float, dims: dict[str, tuple[float, ...]], levels: dict) -> dict[str, np.ndarray]:
    """Knots in s for the body outline, airway and canal (interpolated per slice)."""
    mid = {k: 0.5 * (a + b) for k, (a, b) in levels.items()}
    c6, t1 = mid["C6"], mid["T1"]
    out = {
        "outline_s": np.array([-90, -10, 25, 45, c6 - 10, t1, t1 + 30, t1 + 90]),
        "outline_a": fn * np.array([75, 72, 68, 58, 58, 78, 98, 118]),
        "outline_b": fn * np.array([88, 86, 80, 60, 58, 64, 72, 82]),
        "outline_cy": np.array([-10, -15, -18, 0, 2, 5, 10, 15]) * fn,
        "airway_s": np.array([-40, 20, 45, c6 - 20, t1, t1 + 90]),
        "airway_a": f * np.array([14, 15, 12, 9, 8, 8]),
        "airway_b": f * np.array([9, 7, 7, 8, 8, 8]),
        "airway_cy": f * np.array([-24, -20, -22, -28, -32, -36]),
    }
    names = ["C2", "C3", "C4", "C5", "C6", "C7", *THORACIC]
    canal_s = [mid["C1"]] + [mid[n] for n in names]
    canal = [(14 * f, 11 * f, 9.5 * f)] + [
        (dims[n][1] / 2 + dims[n][3] / 2 + 0.5, dims[n][2] / 2, dims[n][3] / 2) for n in names
    ]
    out["canal_s"] = np.array(canal_s)
    out["canal_cy"], out["canal_a"], out["canal_b"] = (np.array(v) for v in zip(*canal))
    return out


def _discs(levels: dict, dims: dict) -> list[Part]:
    names = ["C2", "C3", "C4", "C5", "C6", "C7", *THORACIC]
    discs = []
    for up, lo in zip(names[:-1], names[1:]):
        a = 0.5 * (dims[up][0] + dims[lo][0]) / 2
        b = 0.5 * (dims[up][1] + dims[lo][1]) / 2
        discs.append(Part(Ellipse(0, 0, a * 0.97, b * 0.97), levels[up][1] - 0.5, levels[lo][0] + 0.5))
    return discs


def build_anatomy(rng: np.random.Generator) -> Anatomy:
    """Draw one study's anatomy: sizes, level heights, HU values and curvature."""
    f, fz, fn = rng.uniform(0.9, 1.12), rng.uniform(0.9, 1.1), rng.uniform(0.88, 1.12)
    levels = _level_layout(rng, fz)
    dims = _dims(rng, f)
    bones = [_atlas(f, *levels["C1"]), _axis(f, *levels["C2"], dims["C2"], levels["C1"][0])]
    bones += [_subaxial(n, f, *levels[n], dims[n]) for n in ("C3", "C4", "C5", "C6", "C7", *THORACIC)]
    bones.append(_skull_and_jaw(f))
    bones += [_ribs(f, b, dims[b.name]) for b in bones if b.name in THORACIC]
    hu = {
        "air": -1000.0,
        "fat": rng.uniform(-110, -80),
        "soft": rng.uniform(35, 55),
        "csf": rng.uniform(10, 30),
        "disc": rng.uniform(70, 95),
        "cortical": rng.uniform(1000, 1500),
        "cancellous": rng.uniform(220, 380),
    }
    hu["gap"] = hu["soft"] + 10.0
    return Anatomy(
        bones=bones,
        discs=_discs(levels, dims),
        knots=_knots(f, fn, dims, levels),
        levels=levels,
        hu=hu,
        fat_mm=rng.uniform(4, 12) * fn,
        s_top=-rng.uniform(8, 25),
        s_bottom=rng.uniform(0.5 * sum(levels["T1"]), levels["T3"][1]),
        lordosis_mm=rng.uniform(0, 10),
        lateral_tilt_mm=rng.uniform(-5, 5),
        extra={"scale_xy": f, "scale_z": fz, "scale_neck": fn},
    )


# ---------------------------------------------------------------------------------------------------
# Fractures


def _unit(v: np.ndarray) -> tuple[float, float, float]:
    v = np.asarray(v, dtype=np.float64)
    return tuple(float(x) for x in v / np.linalg.norm(v))


def _in_plane_shift(rng: np.random.Generator, normal: tuple[float, ...], mag: float) -> tuple[float, float]:
    """A shift mostly across the fracture plane (away from it), partly along it."""
    n2 = np.array(normal[:2])
    n2 = n2 / (np.linalg.norm(n2) + _EPS) if np.linalg.norm(n2) > 0.2 else np.array([0.0, 1.0])
    t = np.array([-n2[1], n2[0]])
    v = n2 * rng.uniform(0.5, 1.0) + t * rng.uniform(-0.7, 0.7)
    v = v / np.linalg.norm(v) * mag
    return float(v[0]), float(v[1])


def _sample_site(
    rng: np.random.Generator, bone: Bone, anat: Anatomy, gap: tuple[float, float], shift: tuple[float, float]
) -> Fracture:
    """One fracture site for a cervical vertebra: body, dens (C2) or posterior arch/ring."""
    name = bone.name
    s0, s1 = anat.levels[name]
    kinds = {"C1": ["arch"], "C2": ["body", "dens", "arch"]}.get(name, ["body", "arch"])
    kind = str(rng.choice(kinds))
    gap_mm, mag = rng.uniform(*gap), rng.uniform(*shift)
    if kind == "dens":
        peg = bone.components["body"].parts[1]
        point = (0.0, peg.y, rng.uniform(peg.s1 - 6.0, peg.s1))
        normal = _unit([rng.uniform(-0.3, 0.3), rng.uniform(-0.4, 0.4), 1.0])
        return Fracture(name, "body", kind, point, normal, gap_mm, _in_plane_shift(rng, (1, 0, 0), mag))
    if kind == "body":
        ell = bone.components["body"].parts[0].shape
        h = s1 - s0
        point = (
            rng.uniform(-0.4, 0.4) * ell.a,
            rng.uniform(-0.4, 0.4) * ell.b,
            0.5 * (s0 + s1) + rng.uniform(-0.2, 0.2) * h,
        )
        phi = rng.uniform(0, math.pi)
        tilt = rng.uniform(-0.5, 0.5)
        normal = _unit([math.cos(phi) * math.cos(tilt), math.sin(phi) * math.cos(tilt), math.sin(tilt)])
        return Fracture(name, "body", kind, point, normal, gap_mm, _in_plane_shift(rng, normal, mag))
    return _arch_site(rng, bone, anat, gap_mm, mag)


def _arch_site(rng: np.random.Generator, bone: Bone, anat: Anatomy, gap_mm: float, mag: float) -> Fracture:
    """A break across a pedicle, lamina or the C1 ring, perpendicular to the bone's long axis."""
    comp = bone.components["post"]
    if bone.name == "C1":
        ring = comp.parts[0]
        t = rng.uniform(0, 2 * math.pi)
        e = ring.shape.outer
        point2 = np.array([(e.a - 2) * math.cos(t), e.cy + (e.b - 2) * math.sin(t)])
        axis = np.array([-e.a * math.sin(t), e.b * math.cos(t)])
        s_mid = 0.5 * (ring.s0 + ring.s1)
    else:
        caps = [p for p in comp.parts if p.tag in ("pedicle", "lamina")]
        part = caps[int(rng.integers(0, len(caps)))]
        c = part.shape
        h = rng.uniform(0.3, 0.7)
        point2 = np.array([c.x0 + h * (c.x1 - c.x0), c.y0 + h * (c.y1 - c.y0)])
        axis = np.array([c.x1 - c.x0, c.y1 - c.y0])
        s_mid = 0.5 * (part.s0 + part.s1) + part.slope * max(point2[1] - part.y_ref, 0.0)
    axis = axis / np.linalg.norm(axis)
    normal = _unit(
        [axis[0] + rng.uniform(-0.3, 0.3), axis[1] + rng.uniform(-0.3, 0.3), rng.uniform(-0.4, 0.4)]
    )
    point = (float(point2[0]), float(point2[1]), float(s_mid))
    return Fracture(bone.name, "post", "arch", point, normal, gap_mm, _in_plane_shift(rng, normal, mag), 9.0)


def sample_fractures(
    rng: np.random.Generator,
    anat: Anatomy,
    gap_mm: tuple[float, float] = (1.5, 4.5),
    shift_mm: tuple[float, float] = (1.5, 4.5),
) -> dict[str, list[Fracture]]:
    """Fracture sites for every cervical vertebra (1 or 2 each); the caller keeps the fractured ones.

    Drawing sites for all seven vertebrae keeps a study's geometry identical whichever set is fractured.
    """
    out = {}
    for bone in anat.bones[:7]:
        n = 1 + int(rng.random() < 0.3)
        out[bone.name] = [_sample_site(rng, bone, anat, gap_mm, shift_mm) for _ in range(n)]
    return out


# ---------------------------------------------------------------------------------------------------
# Rendering


@dataclass(frozen=True)
class SliceBox:
    """A fracture bounding box on one slice (superior-first index), pixels."""

    slice_index: int
    vertebra: str
    x: int
    y: int
    width: int
    height: int


@dataclass
class Frame:
    """Pixel grid of one slice in local spine coordinates, and where it sits in the image."""

    r0: int
    c0: int
    x: np.ndarray  # (1, w) local mm
    y: np.ndarray  # (h, 1) local mm
    px: float

    @property
    def shape(self) -> tuple[int, int]:
        return self.y.shape[0], self.x.shape[1]


def _frame(
    box: tuple[float, float, float, float], centre: tuple[float, float], px: float, size: int
) -> Frame | None:
    """The pixel crop covering a local-mm box (x0, x1, y0, y1) around the spine centre."""
    cx, cy = centre
    c0, c1 = max(0, math.floor((cx + box[0]) / px)), min(size, math.ceil((cx + box[1]) / px) + 1)
    r0, r1 = max(0, math.floor((cy + box[2]) / px)), min(size, math.ceil((cy + box[3]) / px) + 1)
    if c0 >= c1 or r0 >= r1:
        return None
    x = (np.arange(c0, c1, dtype=np.float32) * px - cx)[None, :]
    y = (np.arange(r0, r1, dtype=np.float32) * px - cy)[:, None]
    return Frame(r0, c0, x, y, px)


def _sub(frame: Frame, x: np.ndarray, y: np.ndarray, box: tuple[float, ...], m: float) -> tuple[slice, slice]:
    """Index ranges of the frame that a shape's bbox (plus margin) can touch; x/y may be shifted."""
    h, w = frame.shape
    px = frame.px
    c0 = max(0, math.floor((box[0] - m - float(x[0, 0])) / px))
    c1 = min(w, math.ceil((box[1] + m - float(x[0, 0])) / px) + 1)
    r0 = max(0, math.floor((box[2] - m - float(y[0, 0])) / px))
    r1 = min(h, math.ceil((box[3] + m - float(y[0, 0])) / px) + 1)
    return slice(r0, max(r0, r1)), slice(c0, max(c0, c1))


def component_sdf(comp: Component, frame: Frame, s: float, dx: float = 0.0, dy: float = 0.0) -> np.ndarray:
    """SDF of a component on the frame, evaluated at coordinates shifted by (-dx, -dy)."""
    x, y = frame.x - dx, frame.y - dy
    m = 3.0 * frame.px
    d = np.full(frame.shape, BIG, dtype=np.float32)
    for p in comp.parts:
        if _active(p, s, frame.px):
            rs, cs = _sub(frame, x, y, p.shape.bbox(), m)
            if rs.stop > rs.start and cs.stop > cs.start:
                np.minimum(d[rs, cs], p.sdf(x[:, cs], y[rs, :], s), out=d[rs, cs])
    for p in comp.holes:
        if _active(p, s, 0.0):
            rs, cs = _sub(frame, x, y, p.shape.bbox(), m)
            if rs.stop > rs.start and cs.stop > cs.start:
                np.maximum(d[rs, cs], -p.sdf(x[:, cs], y[rs, :], s), out=d[rs, cs])
    return d


def _plane(site: Fracture, frame: Frame, s: float) -> tuple[np.ndarray, np.ndarray | None]:
    """Signed distance to the fracture plane and (for local fractures) the distance to its centre."""
    (px0, py0, ps0), (nx, ny, ns) = site.point, site.normal
    x, y = frame.x - px0, frame.y - py0
    val = nx * x + ny * y + ns * (s - ps0)
    dist = None if math.isinf(site.radius) else np.sqrt(x * x + y * y + (s - ps0) ** 2)
    return val, dist


def _displace(d: np.ndarray, comp: Component, site: Fracture, frame: Frame, s: float) -> np.ndarray:
    """Move the fragment on the positive side of the plane by the site's shift (fading for local sites)."""
    val, dist = _plane(site, frame, s)
    w = (val > 0).astype(np.float32)
    if dist is not None:
        w *= np.clip((site.radius - dist) / (0.5 * site.radius), 0.0, 1.0)
    if not w.any():
        return d
    shifted = component_sdf(comp, frame, s, *site.shift)
    return d + w * (shifted - d)


def _gap(site: Fracture, frame: Frame, s: float) -> np.ndarray:
    """Fraction of each pixel inside the fracture gap."""
    val, dist = _plane(site, frame, s)
    g = np.clip(0.5 - (np.abs(val) - 0.5 * site.gap_mm) / frame.px, 0.0, 1.0)
    if dist is not None:
        g *= np.clip((site.radius - dist) / frame.px + 0.5, 0.0, 1.0)
    return g


def _box(mask: np.ndarray, frame: Frame, pad: int, size: int) -> tuple[int, int, int, int] | None:
    rows, cols = np.flatnonzero(mask.any(axis=1)), np.flatnonzero(mask.any(axis=0))
    if rows.size == 0:
        return None
    y0, y1 = max(0, frame.r0 + rows[0] - pad), min(size - 1, frame.r0 + rows[-1] + pad)
    x0, x1 = max(0, frame.c0 + cols[0] - pad), min(size - 1, frame.c0 + cols[-1] + pad)
    return int(x0), int(y0), int(x1 - x0 + 1), int(y1 - y0 + 1)


@dataclass
class SliceCanvas:
    """One slice being drawn: HU image, labels, and the geometry needed to place shapes."""

    img: np.ndarray
    lab: np.ndarray
    index: int
    s: float
    centre: tuple[float, float]
    px: float
    hu: dict[str, float]
    boxes: list[SliceBox] = field(default_factory=list)

    def blend(self, frame: Frame, d: np.ndarray, value: float) -> None:
        """Paint a soft-tissue region (SDF d) with anti-aliased edges."""
        f = np.clip(0.5 - d / self.px, 0.0, 1.0)
        sub = self.img[frame.r0 : frame.r0 + d.shape[0], frame.c0 : frame.c0 + d.shape[1]]
        sub += f * (value - sub)


def _soft_ellipse(canvas: SliceCanvas, knots: dict, key: str, value: float) -> None:
    s = canvas.s
    cy = float(np.interp(s, knots[f"{key}_s"], knots[f"{key}_cy"]))
    a = float(np.interp(s, knots[f"{key}_s"], knots[f"{key}_a"]))
    b = float(np.interp(s, knots[f"{key}_s"], knots[f"{key}_b"]))
    e = Ellipse(0.0, cy, a, b)
    frame = _frame(e.bbox(), canvas.centre, canvas.px, canvas.img.shape[0])
    if frame is not None:
        canvas.blend(frame, e.sdf(frame.x, frame.y), value)


def draw_outline(canvas: SliceCanvas, anat: Anatomy) -> None:
    """Air outside an elliptical neck/head section: a fat ring around soft tissue (full slice)."""
    k, s, px = anat.knots, canvas.s, canvas.px
    a = float(np.interp(s, k["outline_s"], k["outline_a"]))
    b = float(np.interp(s, k["outline_s"], k["outline_b"]))
    cy = canvas.centre[1] + float(np.interp(s, k["outline_s"], k["outline_cy"]))
    cx = canvas.centre[0]
    n = canvas.img.shape[0]
    grid = np.arange(n, dtype=np.float32) * px
    hu = canvas.hu
    canvas.img[:] = hu["air"]
    for aa, bb, inside, outside in (
        (a, b, hu["fat"], hu["air"]),
        (a - anat.fat_mm, b - anat.fat_mm, hu["soft"], hu["fat"]),
    ):
        q = ((grid - cy) / bb)[:, None] ** 2 + ((grid - cx) / aa)[None, :] ** 2
        frac = np.clip(0.5 + (1.0 - q) * (min(aa, bb) / (2.0 * px)), 0.0, 1.0)
        canvas.img += frac * (inside - outside)


def draw_bone(canvas: SliceCanvas, bone: Bone, sites: list[Fracture]) -> None:
    """Composite one bone (cortex + cancellous bone, fractures applied) and write its label."""
    s, px = canvas.s, canvas.px
    shift = max((math.hypot(*f.shift) for f in sites), default=0.0)
    boxes = [c.bbox(s, px) for c in bone.components.values()]
    boxes = [b for b in boxes if b is not None]
    if not boxes:
        return
    m = 3.0 * px + shift
    box = (
        min(b[0] for b in boxes) - m,
        max(b[1] for b in boxes) + m,
        min(b[2] for b in boxes) - m,
        max(b[3] for b in boxes) + m,
    )
    frame = _frame(box, canvas.centre, px, canvas.img.shape[0])
    if frame is None:
        return
    names = list(bone.components)
    ds = []
    for name in names:
        comp = bone.components[name]
        d = component_sdf(comp, frame, s)
        for site in sites:
            if site.component == name:
                d = _displace(d, comp, site, frame, s)
        ds.append(d)
    stack = np.stack(ds) if len(ds) > 1 else ds[0][None]
    d = stack.min(axis=0)
    if d.min() > 0.5 * px:
        return
    t = max(0.9, 0.7 * px)
    bf = np.clip(0.5 - d / px, 0.0, 1.0)
    cf = np.clip(0.5 - (d + t) / px, 0.0, 1.0)
    if sites:
        keep = _fracture_gaps(canvas, bone, sites, frame, stack, names, bf, shift)
        bf, cf = bf * keep, cf * keep
    sub = canvas.img[frame.r0 : frame.r0 + d.shape[0], frame.c0 : frame.c0 + d.shape[1]]
    sub *= 1.0 - bf
    sub += canvas.hu["cortical"] * (bf - cf) + canvas.hu["cancellous"] * cf
    if bone.label:
        lab = canvas.lab[frame.r0 : frame.r0 + d.shape[0], frame.c0 : frame.c0 + d.shape[1]]
        lab[d <= 0] = bone.label


def _fracture_gaps(
    canvas: SliceCanvas,
    bone: Bone,
    sites: list[Fracture],
    frame: Frame,
    stack: np.ndarray,
    names: list[str],
    bf: np.ndarray,
    shift: float,
) -> np.ndarray:
    """The fraction of bone kept after cutting the gaps; records a box per site that cuts bone here."""
    owner = stack.argmin(axis=0)
    keep = np.ones_like(bf)
    pad = math.ceil(shift / canvas.px) + 1
    for site in sites:
        g = _gap(site, frame, canvas.s) * (owner == names.index(site.component))
        keep = np.minimum(keep, 1.0 - g)
        box = _box((g > 0.5) & (bf > 0.5), frame, pad, canvas.img.shape[0])
        if box is not None:
            canvas.boxes.append(SliceBox(canvas.index, bone.name, *box))
    return keep


def draw_slice(canvas: SliceCanvas, anat: Anatomy, fractures: dict[str, list[Fracture]]) -> None:
    """Outline, airway, canal, discs, then every bone that reaches this slice."""
    draw_outline(canvas, anat)
    _soft_ellipse(canvas, anat.knots, "airway", canvas.hu["air"])
    _soft_ellipse(canvas, anat.knots, "canal", canvas.hu["csf"])
    s, px = canvas.s, canvas.px
    for disc in anat.discs:
        if _active(disc, s, px):
            frame = _frame(disc.shape.bbox(), canvas.centre, px, canvas.img.shape[0])
            if frame is not None:
                canvas.blend(frame, disc.sdf(frame.x, frame.y, s), canvas.hu["disc"])
    for bone in anat.bones:
        lo, hi = bone.s_bounds()
        if lo - px <= s <= hi + px:
            draw_bone(canvas, bone, fractures.get(bone.name, []))


def spine_centre(anat: Anatomy, s: np.ndarray, base: tuple[float, float]) -> np.ndarray:
    """(Z, 2) spine centre in image mm: lordosis bows the neck forward, a slight lateral tilt."""
    top, t1 = anat.levels["C1"][0], anat.levels["T1"][0]
    u = np.clip((s - top) / (t1 - top), 0.0, 1.0)
    y = base[1] - anat.lordosis_mm * np.sin(np.pi * u) + 0.12 * np.maximum(s - t1, 0.0)
    x = base[0] + anat.lateral_tilt_mm * (s - top) / (anat.s_bottom - top)
    return np.stack([x, y], axis=1)
