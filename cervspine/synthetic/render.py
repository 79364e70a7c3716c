"""Drawing one CT slice of an anatomy: soft tissue, discs, bones (cortex and cancellous), fractures.

A cortical shell is where -t < d <= 0, cancellous bone where d <= -t; edges are anti-aliased over one
pixel. ``draw_slice`` paints a :class:`SliceCanvas` (HU image, labels) and records a :class:`SliceBox`
wherever a fracture gap cuts bone.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

from cervspine.synthetic.anatomy import Anatomy
from cervspine.synthetic.fractures import Fracture
from cervspine.synthetic.shapes import BIG, Bone, Component, Ellipse, active


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
        if active(p, s, frame.px):
            rs, cs = _sub(frame, x, y, p.shape.bbox(), m)
            if rs.stop > rs.start and cs.stop > cs.start:
                np.minimum(d[rs, cs], p.sdf(x[:, cs], y[rs, :], s), out=d[rs, cs])
    for p in comp.holes:
        if active(p, s, 0.0):
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
        if active(disc, s, px):
            frame = _frame(disc.shape.bbox(), canvas.centre, px, canvas.img.shape[0])
            if frame is not None:
                canvas.blend(frame, disc.sdf(frame.x, frame.y, s), canvas.hu["disc"])
    for bone in anat.bones:
        lo, hi = bone.s_bounds()
        if lo - px <= s <= hi + px:
            draw_bone(canvas, bone, fractures.get(bone.name, []))
