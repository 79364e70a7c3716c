"""2-D shapes with signed distance functions, extruded along the spine: the synthetic anatomy's parts.

Every bone is a union of extruded 2-D shapes (ellipses, capsules, rings) described by approximate
signed distance functions (SDFs, mm, negative inside) in a *local* frame: x lateral (+ = patient left),
y posterior (+), origin at the vertebral-body centre line; ``s`` is the height along the spine in
anatomical mm, 0 at the top of C1, increasing inferiorly.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import numpy as np

BIG = 1.0e4
EPS = 1.0e-6


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
        grad = 2.0 * np.sqrt((u / self.a) ** 2 + (v / self.b) ** 2) + EPS
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
        h = np.clip((px * bx + py * by) / (bx * bx + by * by + EPS), 0.0, 1.0)
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
        boxes = [p.shape.bbox() for p in self.parts if active(p, s, margin)]
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


def active(part: Part | Peg, s: float, margin: float) -> bool:
    """Whether the part reaches height s (its s-range widened by margin)."""
    s0, s1 = part.s_bounds()
    return s0 - margin <= s <= s1 + margin
