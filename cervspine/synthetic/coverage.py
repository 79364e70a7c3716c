"""What a scan covers: the z window along the spine and where the spine sits in the field of view.

Heights ``s`` are anatomical mm (0 at the top of C1, increasing inferiorly; see :mod:`.shapes`).

- ``fitted`` (the historic behaviour): the stack always spans skull base → T1–T3, the anatomy stretched or
  squeezed along z to fit ``slices × spacing`` (not to scale; slice position ≈ level).
- ``full``: the same skull base → T1–T3 window, to scale: the slice count follows from coverage / spacing.
- ``random``: to scale; the scan starts anywhere from the skull base to the C1/C2 junction and ends
  anywhere from mid-C6 to the bottom of T4, so C1 and C6/C7 are sometimes cut, C7 sometimes absent.

``place_spine`` moves the spine in-plane by a drawn shift and keeps the vertebral column inside the image.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from cervspine.synthetic.anatomy import LEVELS, Anatomy, spine_centre

Z_COVERAGES = ("fitted", "full", "random")
SKULL_BASE_S = -25.0  # highest scan start, mm above the top of C1 (the fitted window starts 8–25 mm up)
MIN_FRACTURE_MM = 4.0  # a vertebra needs this much of its body (C1: ring) scanned to be fractured
_MARGIN_MM = 2.0  # the column's bounding box keeps this far from the image edge


@dataclass(frozen=True)
class Placement:
    """In-plane geometry drawn by the plan: field of view (None: the phantom's own draw) and spine shift."""

    fov_mm: float | None = None
    shift_mm: tuple[float, float] = (0.0, 0.0)


def scan_window(anat: Anatomy, mode: str, rng: np.random.Generator) -> tuple[float, float]:
    """(top, bottom) s of the scanned range, mm: the fitted window or a random one (see module doc)."""
    if mode not in Z_COVERAGES:
        raise ValueError(f"z_coverage must be one of {Z_COVERAGES}, got {mode!r}")
    if mode != "random":
        return float(anat.s_top), float(anat.s_bottom)
    junction = 0.5 * (anat.levels["C1"][1] + anat.levels["C2"][0])
    c6, last = anat.levels["C6"], anat.levels[[n for n in LEVELS if n in anat.levels][-1]]
    top = rng.uniform(SKULL_BASE_S, junction)
    return float(top), float(rng.uniform(0.5 * (c6[0] + c6[1]), last[1]))


def scanned_mm(anat: Anatomy, window: tuple[float, float]) -> dict[str, float]:
    """How many mm of each cervical body (C1: ring) lie inside the window."""
    return {
        name: max(0.0, min(window[1], b) - max(window[0], a))
        for name, (a, b) in anat.levels.items()
        if name in LEVELS[:7]
    }


def cut_levels(anat: Anatomy, s_lo: float, s_hi: float) -> tuple[str, ...]:
    """Vertebrae that reach into [s_lo, s_hi] but extend beyond it (partly scanned)."""
    out = []
    for bone in anat.bones:
        if bone.label:
            lo, hi = bone.s_bounds()
            if hi > s_lo and lo < s_hi and (lo < s_lo or hi > s_hi):
                out.append(bone.name)
    return tuple(out)


def _column_box(anat: Anatomy) -> tuple[float, float, float, float]:
    """Local-mm box (x0, x1, y0, y1) around every labelled bone (the vertebral column)."""
    boxes = [p.shape.bbox() for b in anat.bones if b.label for c in b.components.values() for p in c.parts]
    return (
        min(b[0] for b in boxes),
        max(b[1] for b in boxes),
        min(b[2] for b in boxes),
        max(b[3] for b in boxes),
    )


def place_spine(
    anat: Anatomy, s: np.ndarray, base: tuple[float, float], shift: tuple[float, float], fov: float
) -> tuple[float, float]:
    """The spine's base position moved by ``shift`` (mm), then clipped so the column stays in view."""
    x0, x1, y0, y1 = _column_box(anat)
    path = spine_centre(anat, s, (0.0, 0.0))
    lo = np.array([x0 + path[:, 0].min(), y0 + path[:, 1].min()]) - _MARGIN_MM
    hi = np.array([x1 + path[:, 0].max(), y1 + path[:, 1].max()]) + _MARGIN_MM
    want = np.asarray(base, dtype=np.float64) + np.asarray(shift, dtype=np.float64)
    low, high = -lo, fov - hi
    centred = 0.5 * (low + high)
    out = np.where(low <= high, np.clip(want, np.minimum(low, high), np.maximum(low, high)), centred)
    return float(out[0]), float(out[1])
