"""Fracture sites: planes that cut a gap through one component of a vertebra and shift one fragment.

``sample_fractures`` draws sites for every cervical vertebra of an anatomy; the caller keeps those of
the fractured ones (so a study's geometry is the same whichever set is fractured). ``within_scan``
redraws the sites of a partly scanned vertebra inside the scanned s-range, and ``make_subtle`` narrows a
share of fractures to a 1–2 pixel gap and a one-pixel step-off at a given (cache) pixel size.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import numpy as np

from cervspine.synthetic.anatomy import Anatomy
from cervspine.synthetic.shapes import EPS, Bone


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
    subtle: bool = False  # drawn by make_subtle: 1–2 cache pixels wide, one-pixel step-off


def _unit(v: np.ndarray) -> tuple[float, float, float]:
    v = np.asarray(v, dtype=np.float64)
    return tuple(float(x) for x in v / np.linalg.norm(v))


def _in_plane_shift(rng: np.random.Generator, normal: tuple[float, ...], mag: float) -> tuple[float, float]:
    """A shift mostly across the fracture plane (away from it), partly along it."""
    n2 = np.array(normal[:2])
    n2 = n2 / (np.linalg.norm(n2) + EPS) if np.linalg.norm(n2) > 0.2 else np.array([0.0, 1.0])
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


def within_scan(
    rng: np.random.Generator,
    anat: Anatomy,
    fractures: dict[str, list[Fracture]],
    window: tuple[float, float],
    gap: tuple[float, float],
    shift: tuple[float, float],
    margin: float = 1.0,
    tries: int = 40,
) -> dict[str, list[Fracture]]:
    """Sites whose centre lies outside ``window`` (s, mm, shrunk by margin) redrawn inside it.

    A vertebra with little of it scanned falls back to a body (C1: ring) break whose centre is moved into
    the scanned part of that body; the plan only fractures vertebrae with enough of it in the scan.
    """
    lo, hi = window[0] + margin, window[1] - margin
    bones = {b.name: b for b in anat.bones[:7]}
    out: dict[str, list[Fracture]] = {}
    for name, sites in fractures.items():
        out[name] = []
        for site in sites:
            for _ in range(tries):
                if lo <= site.point[2] <= hi:
                    break
                site = _sample_site(rng, bones[name], anat, gap, shift)
            if not lo <= site.point[2] <= hi:
                site = _clamped_site(rng, bones[name], anat, site, lo, hi)
            out[name].append(site)
    return out


def _clamped_site(
    rng: np.random.Generator, bone: Bone, anat: Anatomy, site: Fracture, lo: float, hi: float
) -> Fracture:
    """A body (C1: ring) site with its centre moved into the scanned part of that body."""
    gap, mag = (site.gap_mm,) * 2, (math.hypot(*site.shift),) * 2
    for _ in range(100):
        if site.kind == ("arch" if bone.name == "C1" else "body"):
            break
        site = _sample_site(rng, bone, anat, gap, mag)
    part = bone.components["post" if bone.name == "C1" else "body"].parts[0]
    a, b = max(lo, part.s0), min(hi, part.s1)
    s = 0.5 * (a + b) if a <= b else float(np.clip(site.point[2], part.s0, part.s1))
    return replace(site, point=(site.point[0], site.point[1], float(s)))


def make_subtle(
    rng: np.random.Generator, fractures: dict[str, list[Fracture]], fraction: float, px_mm: float
) -> dict[str, list[Fracture]]:
    """A share ``fraction`` of fractured vertebrae get a gap of U(1, 2)·px_mm and a px_mm step-off.

    One draw per cervical vertebra in a fixed order, so which vertebrae turn subtle does not depend on
    the fractured set.
    """
    picks = {name: rng.random() < fraction for name in ("C1", "C2", "C3", "C4", "C5", "C6", "C7")}
    out = {}
    for name, sites in fractures.items():
        if not picks[name]:
            out[name] = sites
            continue
        out[name] = []
        for site in sites:
            sx, sy = site.shift
            norm = math.hypot(sx, sy) or 1.0
            gap = float(rng.uniform(1.0, 2.0) * px_mm)
            step = (sx / norm * px_mm, sy / norm * px_mm)
            out[name].append(replace(site, gap_mm=gap, shift=step, subtle=True))
    return out
