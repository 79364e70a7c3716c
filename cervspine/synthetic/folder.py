"""Writing a complete synthetic RSNA 2022 folder: DICOM studies, NIfTI segmentations and the CSVs.

``write_rsna_folder`` plans the folder (:mod:`cervspine.synthetic.plan`), writes every study (in
parallel with ``workers``) and the competition CSVs (``train.csv``, ``train_bounding_boxes.csv``,
``test.csv``, ``sample_submission.csv``), plus the synthetic-only ``test_labels.csv`` (hidden labels
of the test studies, for held-out scoring) and ``synthetic_manifest.csv`` (how each study was stored).
``write_study`` draws and writes one study's DICOM folder.

With a generator variant or any cue-removing option on (:mod:`.variants`), the manifest also records the
options and, per study, its in-plane geometry, the scanned range, the vertebrae it shows (and which are
cut) and each fracture's size; with none on, every file is exactly what the generator always wrote.
"""

from __future__ import annotations

import shutil
import time
from collections import Counter
from collections.abc import Iterable, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np

from cervspine import VERTEBRAE
from cervspine.synthetic.dicom_writer import file_numbers, transfer_syntax_uid, write_study_dicom
from cervspine.synthetic.nifti_writer import write_segmentation_nifti
from cervspine.synthetic.phantom import UID_ROOT, PhantomParams, SyntheticStudy, make_phantom
from cervspine.synthetic.plan import FolderSpec, Quirks, StudyPlan, as_quirks, plan_folder, uses_variants
from cervspine.synthetic.variants import DEFAULTS as OPTION_DEFAULTS
from cervspine.synthetic.variants import folder_spec


def write_study(
    folder: str | Path,
    *,
    seed: int = 0,
    size: int = 512,
    n_slices: int = 350,
    slice_spacing: float = 0.625,
    fractured: Sequence[str] = ("C2",),
    uid: str | None = None,
    fov_mask: bool = False,
    transfer_syntax: str = "explicit",
    reversed: bool = False,
    first_number: int = 1,
    signed: bool = True,
    intercept: int | None = None,
    bits_stored: int = 16,
    overwrite: bool = False,
) -> SyntheticStudy:
    """Draw one study and write its DICOM folder (for benchmarks and ad-hoc checks)."""
    uid = uid or f"{UID_ROOT}.{seed + 1}"
    params = PhantomParams(size, n_slices, slice_spacing, tuple(fractured), uid, fov_mask=fov_mask)
    study = make_phantom(seed, params)
    write_study_dicom(
        study,
        folder,
        transfer_syntax=transfer_syntax,
        reversed=reversed,
        first_number=first_number,
        signed=signed,
        intercept=intercept,
        bits_stored=bits_stored,
        overwrite=overwrite,
    )
    return study


def write_planned_study(plan: StudyPlan, out: str | Path) -> dict[str, Any]:
    """Render and write one planned study; returns its label row, box rows and counts."""
    out = Path(out)
    study = make_phantom(plan.seed, plan.params)
    images = out / f"{plan.split}_images" / plan.uid
    paths = write_study_dicom(study, images, **asdict(plan.options))
    if plan.segmentation:
        rng = np.random.default_rng(plan.seed)
        write_segmentation_nifti(
            study,
            out / "segmentations" / f"{plan.uid}.nii",
            reversed=plan.options.reversed,
            noise=plan.seg_noise,
            rng=rng,
        )
    numbers = file_numbers(len(paths), reversed=plan.options.reversed, first_number=plan.options.first_number)
    boxes = []
    if plan.boxes:
        for b in study.boxes:
            boxes.append(
                {
                    "StudyInstanceUID": plan.uid,
                    "x": float(b.x),
                    "y": float(b.y),
                    "width": float(b.width),
                    "height": float(b.height),
                    "slice_number": int(numbers[b.slice_index]),
                }
            )
    return {
        "labels": {"StudyInstanceUID": plan.uid, **_reorder(study.targets())},
        "boxes": boxes,
        "files": len(paths),
        "facts": _facts(study),
    }


def _facts(study: SyntheticStudy) -> dict[str, Any]:
    """What the rendered study shows: geometry, scanned range and levels, fracture sizes (manifest)."""
    shown = study.levels_shown()
    by_level = {v: [f for f in study.fractures if f.vertebra == v] for v in study.fractured}
    slices = Counter(v for v, _ in {(b.vertebra, b.slice_index) for b in study.boxes})
    return {
        "pixel_spacing": study.spacing[1],
        "fov_mm": round(study.spacing[1] * study.volume.shape[-1], 3),
        "slice_thickness": study.metadata["SliceThickness"],
        "scan_top_mm": round(study.scan_s[0], 2),
        "scan_bottom_mm": round(study.scan_s[1], 2),
        "levels_shown": " ".join(shown),
        "levels_cut": " ".join(study.levels_cut),
        "first_level": shown[0] if shown else "",
        "last_level": shown[-1] if shown else "",
        "fracture_gap_mm": " ".join(f"{v}:{min(f.gap_mm for f in fs):.2f}" for v, fs in by_level.items()),
        "fracture_shift_mm": " ".join(
            f"{v}:{min(float(np.hypot(*f.shift)) for f in fs):.2f}" for v, fs in by_level.items()
        ),
        "subtle_levels": " ".join(v for v, fs in by_level.items() if any(f.subtle for f in fs)),
        "fracture_slices": " ".join(f"{v}:{slices[v]}" for v in by_level),
    }


def _reorder(targets: dict[str, int]) -> dict[str, int]:
    return {"patient_overall": targets["patient_overall"], **{v: targets[v] for v in VERTEBRAE}}


def _run_plans(plans: list[StudyPlan], out: Path, workers: int) -> list[dict[str, Any]]:
    if workers <= 1 or len(plans) < 2:
        return [write_planned_study(p, out) for p in plans]
    with ProcessPoolExecutor(max_workers=workers) as pool:
        return list(pool.map(write_planned_study, plans, [out] * len(plans)))


def _write_csvs(out: Path, spec: FolderSpec, plans: list[StudyPlan], results: list[dict[str, Any]]) -> None:
    import pandas as pd

    label_cols = ["StudyInstanceUID", "patient_overall", *VERTEBRAE]
    train = [r["labels"] for p, r in zip(plans, results) if p.split == "train"]
    test = [r["labels"] for p, r in zip(plans, results) if p.split == "test"]
    pd.DataFrame(train, columns=label_cols).to_csv(out / "train.csv", index=False)
    pd.DataFrame(test, columns=label_cols).to_csv(out / "test_labels.csv", index=False)
    boxes = [b for r in results for b in r["boxes"]]
    box_cols = ["StudyInstanceUID", "x", "y", "width", "height", "slice_number"]
    pd.DataFrame(boxes, columns=box_cols).to_csv(out / "train_bounding_boxes.csv", index=False)
    rows = [
        {"row_id": f"{p.uid}_{t}", "StudyInstanceUID": p.uid, "prediction_type": t}
        for p in plans
        if p.split == "test"
        for t in (*VERTEBRAE, "patient_overall")
    ]
    test_df = pd.DataFrame(rows, columns=["row_id", "StudyInstanceUID", "prediction_type"])
    test_df.to_csv(out / "test.csv", index=False)
    pd.DataFrame({"row_id": test_df["row_id"], "fractured": 0.5}).to_csv(
        out / "sample_submission.csv", index=False
    )
    rows = [_manifest_row(p) for p in plans]
    if uses_variants(spec):
        rows = [{**row, **_variant_row(spec, p), **r["facts"]} for row, p, r in zip(rows, plans, results)]
    pd.DataFrame(rows).to_csv(out / "synthetic_manifest.csv", index=False)


def _variant_row(spec: FolderSpec, p: StudyPlan) -> dict[str, Any]:
    spec = p.variant_spec or spec  # variant=mixed: the study's own variant
    place = p.params.placement
    return {
        "variant": spec.variant,
        "subaxial_shape": spec.subaxial_shape,
        "neck_outline": spec.neck_outline,
        "z_coverage": spec.z_coverage,
        "spacing_range_mm": f"{spec.spacing[0]:g}-{spec.spacing[1]:g}",
        "fov_range_mm": "" if spec.fov_mm is None else f"{spec.fov_mm[0]:g}-{spec.fov_mm[1]:g}",
        "centre_shift_mm": spec.centre_shift_mm,
        "subtle_fraction": spec.subtle_fraction,
        "subtle_cache_size": spec.subtle_cache_size,
        "shift_x_mm": round(place.shift_mm[0], 2) if place else 0.0,
        "shift_y_mm": round(place.shift_mm[1], 2) if place else 0.0,
    }


def _manifest_row(p: StudyPlan) -> dict[str, Any]:
    o = p.options
    return {
        "StudyInstanceUID": p.uid,
        "split": p.split,
        "seed": p.seed,
        "size": p.params.size,
        "n_slices": p.params.n_slices,
        "slice_spacing": p.params.slice_spacing,
        "fractured": " ".join(p.params.fractured),
        "transfer_syntax": o.transfer_syntax,
        "transfer_syntax_uid": transfer_syntax_uid(o.transfer_syntax),
        "reversed": o.reversed,
        "first_number": o.first_number,
        "signed": o.signed,
        "intercept": -1024 if o.intercept is None else o.intercept,
        "bits_stored": o.bits_stored,
        "fov_mask": p.params.fov_mask,
        "segmentation": p.segmentation,
        "boxes": p.boxes,
    }


_OUTPUTS = ("train_images", "test_images", "segmentations")


def _prepare(out: Path, overwrite: bool) -> None:
    """Create the output folders; refuse (or, with overwrite, clear) earlier generator output."""
    old = [out / d for d in _OUTPUTS if (out / d).exists() and any((out / d).iterdir())]
    if old and not overwrite:
        raise FileExistsError(
            f"{out} already holds generated data ({', '.join(p.name for p in old)}); pass overwrite=True"
        )
    for path in old:
        shutil.rmtree(path)
    for d in _OUTPUTS:
        (out / d).mkdir(parents=True, exist_ok=True)


def write_rsna_folder(
    out: str | Path,
    *,
    n_train: int = 24,
    n_test: int = 4,
    size: int = 128,
    seed: int = 0,
    slices: Iterable[int] = (100, 140),
    spacing: Iterable[float] | None = None,
    positive_fraction: float = 0.48,
    seg_fraction: float = 0.5,
    box_fraction: float = 0.5,
    seg_noise: float = 0.0,
    quirks: Quirks | dict[str, Any] | None = None,
    fracture_gap_mm: Iterable[float] = (1.5, 4.5),
    fracture_shift_mm: Iterable[float] = (1.5, 4.5),
    workers: int = 1,
    overwrite: bool = False,
    variant: str = "default",
    subaxial_shape: str | None = None,
    neck_outline: str | None = None,
    z_coverage: str | None = None,
    fov_mm: Iterable[float] | str | bool | None = None,
    centre_shift_mm: float | None = None,
    subtle_fraction: float | None = None,
    subtle_cache_size: int = 128,
) -> dict[str, Any]:
    """Write a complete RSNA-layout folder; returns a summary (counts, storage quirks, options, seconds).

    ``variant`` picks a preset of the cue-removing options (:mod:`cervspine.synthetic.variants`); those
    options (``spacing`` among them) left None take the preset's value, given ones win over it. With
    ``z_coverage`` full or random the anatomy is to scale and each study's slice count is its coverage /
    spacing: ``slices`` then is not used.
    """
    t0 = time.perf_counter()
    spec = folder_spec(
        variant,
        n_train=n_train,
        n_test=n_test,
        size=size,
        seed=seed,
        slices=_pair(slices, int),
        spacing=spacing,
        positive_fraction=positive_fraction,
        seg_fraction=seg_fraction,
        box_fraction=box_fraction,
        seg_noise=seg_noise,
        quirks=as_quirks(quirks),
        fracture_gap_mm=_pair(fracture_gap_mm, float),
        fracture_shift_mm=_pair(fracture_shift_mm, float),
        subaxial_shape=subaxial_shape,
        neck_outline=neck_outline,
        z_coverage=z_coverage,
        fov_mm=fov_mm,
        centre_shift_mm=centre_shift_mm,
        subtle_fraction=subtle_fraction,
        subtle_cache_size=int(subtle_cache_size),
    )
    plans = plan_folder(spec)
    out = Path(out)
    _prepare(out, overwrite)
    results = _run_plans(plans, out, workers)
    _write_csvs(out, spec, plans, results)
    return _summary(out, spec, plans, results, time.perf_counter() - t0)


def _pair(values: Iterable[Any], kind: type) -> tuple[Any, Any]:
    lo, hi = (kind(v) for v in values)
    return lo, hi


_OPTIONS = tuple(OPTION_DEFAULTS)  # the cue-removing options (spacing, subaxial_shape, neck_outline, …)


def _summary(
    out: Path, spec: FolderSpec, plans: list[StudyPlan], results: list[dict[str, Any]], seconds: float
) -> dict[str, Any]:
    train = [p for p in plans if p.split == "train"]
    facts = [r["facts"] for r in results]
    return {
        "variant": spec.variant,
        "options": {k: getattr(spec, k) for k in (*_OPTIONS, "subtle_cache_size")},
        "out": str(out),
        "n_train": len(train),
        "n_test": len(plans) - len(train),
        "n_positive_train": sum(bool(p.params.fractured) for p in train),
        "n_segmentations": sum(p.segmentation for p in plans),
        "n_box_studies": sum(p.boxes for p in plans),
        "n_boxes": sum(len(r["boxes"]) for r in results),
        "n_files": sum(r["files"] for r in results),
        "n_reversed": sum(p.options.reversed for p in plans),
        "transfer_syntaxes": dict(Counter(p.options.transfer_syntax for p in plans)),
        "slices": _span([p.params.n_slices for p in plans]),
        "spacing_mm": _span([p.params.slice_spacing for p in plans]),
        "pixel_spacing_mm": _span([f["pixel_spacing"] for f in facts]),
        "n_c7_absent": sum("C7" not in f["levels_shown"].split() for f in facts),
        "n_c7_cut": sum("C7" in f["levels_cut"].split() for f in facts),
        "n_subtle_fractures": sum(len(f["subtle_levels"].split()) for f in facts),
        "seconds": round(seconds, 2),
    }


def _span(values: list[float]) -> list[float]:
    return [min(values), max(values)] if values else []
