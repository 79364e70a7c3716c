"""Generator variants: presets of the options that remove cues a slice-level model could cheat on.

Each named variant switches on one cue-removing option; ``hard`` switches on all of them:

========== ==========================================================================================
default    the historic generator (graded C3–C7, fitted z coverage, FOV 180–240 mm, obvious breaks)
uniform    ``subaxial_shape=uniform``: C3–C7 of one shape family, per-study scale ≫ level jitter
coverage   ``z_coverage=random``: to scale, scans from skull base..C1/C2 to mid-C6..T4
fov        ``fov_mm=[130, 250]``, ``centre_shift_mm=20``: pixel spacing 0.25–0.5 mm at 512², spine moved
thickness  ``spacing=[0.5, 3.0]``, ``z_coverage=full``: 0.5–3 mm slices, to scale (count = coverage/spacing)
subtle     ``subtle_fraction=0.5``: half the fractured vertebrae 1–2 px gaps, 1 px step-off at the cache size
neck       ``neck_outline=random``: neck outline and airway change at places drawn per study, not at levels
hard       all of the above (z coverage random)
mixed      each study one of the above, drawn with equal odds (its variant is in the manifest)
========== ==========================================================================================

An option given explicitly (not None) wins over the preset. ``fov_mm`` given as ``off`` (or False)
switches a preset's FOV range off (the default 180–240 mm draw, no re-centring).
"""

from __future__ import annotations

from typing import Any

from cervspine.synthetic.plan import FolderSpec

DEFAULTS: dict[str, Any] = {
    "spacing": (0.5, 1.25),
    "subaxial_shape": "graded",
    "neck_outline": "levels",
    "z_coverage": "fitted",
    "fov_mm": None,
    "centre_shift_mm": 0.0,
    "subtle_fraction": 0.0,
}
VARIANTS: dict[str, dict[str, Any]] = {
    "default": {},
    "uniform": {"subaxial_shape": "uniform"},
    "coverage": {"z_coverage": "random"},
    "fov": {"fov_mm": (130.0, 250.0), "centre_shift_mm": 20.0},
    "thickness": {"spacing": (0.5, 3.0), "z_coverage": "full"},
    "subtle": {"subtle_fraction": 0.5},
    "neck": {"neck_outline": "random"},
}
VARIANTS["hard"] = {
    **VARIANTS["uniform"],
    **VARIANTS["fov"],
    **VARIANTS["thickness"],
    **VARIANTS["subtle"],
    **VARIANTS["neck"],
    **VARIANTS["coverage"],
}
_OFF = ("off", "none", "false", "default")


def resolve_options(variant: str = "default", **given: Any) -> dict[str, Any]:
    """The variant's options: historic defaults, then the preset, then every option given (not None).
    ``mixed`` resolves to the defaults here; each study's own variant is drawn when the folder is planned."""
    if variant == "mixed":
        variant = "default"
    if variant not in VARIANTS:
        raise ValueError(f"unknown variant {variant!r}; use one of {sorted(VARIANTS)} or mixed")
    unknown = set(given) - set(DEFAULTS)
    if unknown:
        raise TypeError(f"not variant options: {sorted(unknown)}")
    out = {**DEFAULTS, **VARIANTS[variant], **{k: v for k, v in given.items() if v is not None}}
    fov = out["fov_mm"]
    if fov is False or isinstance(fov, str) and fov.lower() in _OFF:
        fov = None
    out["fov_mm"] = None if fov is None else _pair(fov, float)
    out["spacing"] = _pair(out["spacing"], float)
    out["centre_shift_mm"] = float(out["centre_shift_mm"])
    out["subtle_fraction"] = float(out["subtle_fraction"])
    return out


def _pair(values: Any, kind: type) -> tuple[Any, Any]:
    lo, hi = (kind(v) for v in values)
    return lo, hi


def folder_spec(variant: str = "default", **fields: Any) -> FolderSpec:
    """A FolderSpec with ``variant`` resolved: fields named in DEFAULTS may be None (= the preset's)."""
    options = {k: fields.pop(k) for k in list(fields) if k in DEFAULTS}
    return FolderSpec(**fields, variant=variant, **resolve_options(variant, **options))
