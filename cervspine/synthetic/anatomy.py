"""One study's analytic cervical-spine anatomy: level layout, bones, discs and soft-tissue knots.

``build_anatomy`` draws sizes, level heights, HU values and curvature, and builds C1 (atlas), C2 (axis,
with the dens), C3..T3 (optionally T4), the skull base and jaw, and the first ribs from the shapes of
:mod:`cervspine.synthetic.shapes`; ``spine_centre`` places the spine in the image, slice by slice.

C3–C7 are ``graded`` (sizes growing C3 → C7, as the generator always drew them) or ``uniform``: one shape
family with a per-study scale (sd ≈ 12 %) far wider than the few-per-cent, trendless level-to-level jitter,
so that a level cannot be told from its cross-section. The neck outline and airway change at fixed places
of the column (``levels``) or at places and widths drawn per study (``random``), so that the soft tissue
around a slice does not tell its level either. The extra draws of ``uniform``, ``random`` and T4 come from
a separate stream, so the default anatomy is unchanged.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from cervspine.synthetic.shapes import Bone, Capsule, Component, Ellipse, Part, Peg, Ring, Shape

THORACIC = ("T1", "T2", "T3", "T4")  # T4 is built only on request (n_thoracic=4)
SUBAXIAL = ("C3", "C4", "C5", "C6", "C7")
LEVELS = ("C1", "C2", *SUBAXIAL, *THORACIC)
LABELS = {name: i + 1 for i, name in enumerate(LEVELS)}  # 1..7 = C1..C7, 8.. = T1..
SUBAXIAL_SHAPES = ("graded", "uniform")
# levels: the neck outline and airway change at fixed places of the column (head above C2, narrowest at
# C3–C5, shoulders from C6 to T1), a ruler a slice-level model can read; random: those places and widths
# drawn per study, independent of where the levels are
NECK_OUTLINES = ("levels", "random")
_SPINOUS = {"C3": 14, "C4": 14, "C5": 15, "C6": 19, "C7": 27}  # graded spinous process length, mm
# uniform C3–C7: one template (the graded means), mm: body w, d, canal w, d; spinous; body height
_UNIFORM = {"dims": (18.5, 16.0, 24.5, 15.0), "spinous": 18.0, "height": 14.3}
_UNIFORM_SCALE_SD = 0.11  # log-sd of the per-study scale (× the shared f: sd ≈ 12 % in all)
_UNIFORM_JITTER = 0.04  # per level and quantity: × U(1 - j, 1 + j), independent, no trend


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


Sizes = dict[str, tuple[float, float]]  # level → (gap above its body, body height), mm


def _level_sizes(rng: np.random.Generator, fz: float) -> Sizes:
    """Disc above and body (or C1 ring) height of C1..T3, drawn in the generator's historic order."""
    heights = {"C3": 14.0, "C4": 14.0, "C5": 14.0, "C6": 14.5, "C7": 15.0, "T1": 17.0, "T2": 18.0, "T3": 19.0}
    jitter = lambda: fz * rng.uniform(0.95, 1.05)
    sizes = {"C1": (0.0, 11.0 * jitter()), "C2": (3.0 * fz, 17.0 * jitter())}
    for name, h in heights.items():
        disc = (4.5 if name in THORACIC else 5.0) * jitter()
        sizes[name] = (disc, h * jitter())
    return sizes


def _layout(sizes: Sizes) -> dict[str, tuple[float, float]]:
    """Body s-ranges: C1 ring at 0, then each level below the gap above it."""
    levels = {"C1": (0.0, sizes["C1"][1])}
    s = levels["C1"][1]
    for name, (gap, height) in list(sizes.items())[1:]:
        s += gap
        levels[name] = (s, s + height)
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


def _uniform_subaxial(
    rng: np.random.Generator, f: float, fz: float, sizes: Sizes, dims: dict, spinous: dict[str, float]
) -> None:
    """Redraw C3–C7 (in place) from one shape family: per-study scale and proportions, per-level jitter."""
    g = float(np.clip(np.exp(rng.normal(0.0, _UNIFORM_SCALE_SD)), 0.75, 1.3))
    aspect, canal, spine = rng.uniform(0.92, 1.08), rng.uniform(0.92, 1.08), rng.uniform(0.8, 1.25)
    bw, bd, cw, cd = _UNIFORM["dims"]
    shape = (bw * aspect, bd / aspect, cw * canal, cd * canal)
    jit = lambda: rng.uniform(1.0 - _UNIFORM_JITTER, 1.0 + _UNIFORM_JITTER)
    for name in SUBAXIAL:
        dims[name] = tuple(f * g * v * jit() for v in shape)
        spinous[name] = f * g * spine * _UNIFORM["spinous"] * jit()
        sizes[name] = (sizes[name][0], fz * g * _UNIFORM["height"] * jit())


def _add_t4(rng: np.random.Generator, f: float, fz: float, sizes: Sizes, dims: dict) -> None:
    """T4 below T3 (in place), for scans that may reach it."""
    jitter = lambda: rng.uniform(0.95, 1.05)
    sizes["T4"] = (4.5 * fz * jitter(), 20.0 * fz * jitter())
    dims["T4"] = tuple(f * v * jitter() for v in (27, 22, 16, 14))


def _subaxial(
    name: str, f: float, s0: float, s1: float, dims: tuple[float, ...], spinous: float | None = None
) -> Bone:
    """C3..T4: body plus posterior elements (graded: longer, steeper spinous processes lower down)."""
    bw, bd, cw, cd = dims
    h = s1 - s0
    thoracic = name in THORACIC
    spinous = _SPINOUS.get(name, 30) * f if spinous is None else spinous
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


def _increasing(s: np.ndarray) -> np.ndarray:
    """Knot positions made strictly increasing (np.interp needs it)."""
    s = np.maximum.accumulate(np.asarray(s, dtype=float))
    return s + 1e-3 * np.arange(len(s))


def _knots(
    f: float,
    fn: float,
    dims: dict[str, tuple[float, ...]],
    levels: dict,
    neck: np.random.Generator | None = None,
) -> dict[str, np.ndarray]:
    """Knots in s for the body outline, airway and canal (interpolated per slice). With ``neck`` (the
    ``random`` neck outline) the head's knots move by one per-study shift, the shoulders start at a place
    drawn independently of C6/T1 and every outline width gets its own factor."""
    mid = {k: 0.5 * (a + b) for k, (a, b) in levels.items()}
    c6, t1 = mid["C6"], mid["T1"]
    head, wa, wb = 0.0, np.ones(8), np.ones(8)
    if neck is not None:
        head = float(neck.uniform(-20.0, 20.0))
        c6 = float(neck.uniform(80.0, 130.0))  # anywhere from about C5 to C7 of a typical column
        t1 = c6 + float(neck.uniform(25.0, 60.0))
        wa, wb = neck.uniform(0.88, 1.12, size=8), neck.uniform(0.88, 1.12, size=8)
    out = {
        "outline_s": np.array([-90 + head, -10 + head, 25 + head, 45 + head, c6 - 10, t1, t1 + 30, t1 + 90]),
        "outline_a": fn * wa * np.array([75, 72, 68, 58, 58, 78, 98, 118]),
        "outline_b": fn * wb * np.array([88, 86, 80, 60, 58, 64, 72, 82]),
        "outline_cy": np.array([-10, -15, -18, 0, 2, 5, 10, 15]) * fn,
        "airway_s": np.array([-40 + head, 20 + head, 45 + head, c6 - 20, t1, t1 + 90]),
        "airway_a": f * np.array([14, 15, 12, 9, 8, 8]),
        "airway_b": f * np.array([9, 7, 7, 8, 8, 8]),
        "airway_cy": f * np.array([-24, -20, -22, -28, -32, -36]),
    }
    if neck is not None:  # the drawn places may cross: keep the knots in order
        out["outline_s"], out["airway_s"] = _increasing(out["outline_s"]), _increasing(out["airway_s"])
    names = [n for n in LEVELS[1:] if n in levels]
    canal_s = [mid["C1"]] + [mid[n] for n in names]
    canal = [(14 * f, 11 * f, 9.5 * f)] + [
        (dims[n][1] / 2 + dims[n][3] / 2 + 0.5, dims[n][2] / 2, dims[n][3] / 2) for n in names
    ]
    out["canal_s"] = np.array(canal_s)
    out["canal_cy"], out["canal_a"], out["canal_b"] = (np.array(v) for v in zip(*canal))
    return out


def _discs(levels: dict, dims: dict) -> list[Part]:
    names = [n for n in LEVELS[1:] if n in levels]
    discs = []
    for up, lo in zip(names[:-1], names[1:]):
        a = 0.5 * (dims[up][0] + dims[lo][0]) / 2
        b = 0.5 * (dims[up][1] + dims[lo][1]) / 2
        discs.append(Part(Ellipse(0, 0, a * 0.97, b * 0.97), levels[up][1] - 0.5, levels[lo][0] + 0.5))
    return discs


def build_anatomy(
    rng: np.random.Generator,
    *,
    subaxial_shape: str = "graded",
    n_thoracic: int = 3,
    rng_extra: np.random.Generator | None = None,
    neck_outline: str = "levels",
) -> Anatomy:
    """Draw one study's anatomy: sizes, level heights, HU values and curvature.

    ``subaxial_shape="uniform"`` redraws C3–C7 from one shape family and ``n_thoracic=4`` adds T4, both
    from ``rng_extra`` (``rng`` is consumed exactly as for the default anatomy).
    """
    if subaxial_shape not in SUBAXIAL_SHAPES or n_thoracic not in (3, 4):
        raise ValueError(f"subaxial_shape must be one of {SUBAXIAL_SHAPES}, n_thoracic 3 or 4")
    if neck_outline not in NECK_OUTLINES:
        raise ValueError(f"neck_outline must be one of {NECK_OUTLINES}, got {neck_outline!r}")
    f, fz, fn = rng.uniform(0.9, 1.12), rng.uniform(0.9, 1.1), rng.uniform(0.88, 1.12)
    sizes = _level_sizes(rng, fz)
    dims = _dims(rng, f)
    spinous = {n: _SPINOUS[n] * f for n in SUBAXIAL}
    extra = rng_extra if rng_extra is not None else np.random.default_rng(0)
    if subaxial_shape == "uniform":
        _uniform_subaxial(extra, f, fz, sizes, dims, spinous)
    if n_thoracic == 4:
        _add_t4(extra, f, fz, sizes, dims)
    neck = extra if neck_outline == "random" else None  # drawn after the other extra draws
    levels = _layout(sizes)
    bones = [_atlas(f, *levels["C1"]), _axis(f, *levels["C2"], dims["C2"], levels["C1"][0])]
    bones += [
        _subaxial(n, f, *levels[n], dims[n], spinous.get(n)) for n in (*SUBAXIAL, *THORACIC) if n in levels
    ]
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
        knots=_knots(f, fn, dims, levels, neck),
        levels=levels,
        hu=hu,
        fat_mm=rng.uniform(4, 12) * fn,
        s_top=-rng.uniform(8, 25),
        s_bottom=rng.uniform(0.5 * sum(levels["T1"]), levels["T3"][1]),
        lordosis_mm=rng.uniform(0, 10),
        lateral_tilt_mm=rng.uniform(-5, 5),
        extra={"scale_xy": f, "scale_z": fz, "scale_neck": fn},
    )


def spine_centre(anat: Anatomy, s: np.ndarray, base: tuple[float, float]) -> np.ndarray:
    """(Z, 2) spine centre in image mm: lordosis bows the neck forward, a slight lateral tilt."""
    top, t1 = anat.levels["C1"][0], anat.levels["T1"][0]
    u = np.clip((s - top) / (t1 - top), 0.0, 1.0)
    y = base[1] - anat.lordosis_mm * np.sin(np.pi * u) + 0.12 * np.maximum(s - t1, 0.0)
    x = base[0] + anat.lateral_tilt_mm * (s - top) / (anat.s_bottom - top)
    return np.stack([x, y], axis=1)
