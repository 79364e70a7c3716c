"""The generator's cue-removing options and their presets: each must do what it says, honestly labelled."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd
import pydicom
import pytest
from scipy.ndimage import map_coordinates

from cervspine import VERTEBRAE
from cervspine.io import load_segmentation, load_study
from cervspine.synthetic import (
    VARIANTS,
    FolderSpec,
    PhantomParams,
    folder_spec,
    make_phantom,
    plan_folder,
    resolve_options,
    write_rsna_folder,
)
from cervspine.synthetic.anatomy import LEVELS
from cervspine.synthetic.coverage import MIN_FRACTURE_MM, scanned_mm
from cervspine.synthetic.phantom import study_anatomy

SUBAXIAL = ("C3", "C4", "C5", "C6", "C7")


def _manifest(out: Path) -> pd.DataFrame:
    return pd.read_csv(out / "synthetic_manifest.csv", keep_default_na=False)


def _read(out: Path, row) -> tuple:
    """(study, segmentation or None) of a manifest row, through the project's readers."""
    study = load_study(out / f"{row.split}_images" / row.StudyInstanceUID)
    nii = out / "segmentations" / f"{row.StudyInstanceUID}.nii"
    return study, (load_segmentation(nii, study) if nii.exists() else None)


# ---------------------------------------------------------------------------------------- C3–C7 shape


def _subaxial_areas(shape: str, seeds: range) -> np.ndarray:
    """(study, C3..C7) largest labelled cross-section of each level, mm² (64², 60 slices)."""
    rows = []
    for seed in seeds:
        st = make_phantom(seed, PhantomParams(size=64, n_slices=60, slice_spacing=1.0, subaxial_shape=shape))
        counts = np.stack([np.bincount(z.ravel(), minlength=8)[3:8] for z in st.labels])
        rows.append(counts.max(axis=0) * st.spacing[1] * st.spacing[2])
    return np.array(rows)


def test_uniform_subaxial_shape_hides_the_level() -> None:
    """uniform: per-level mean areas differ far less than studies do, with no trend; graded: the trend."""
    seeds = range(100, 112)
    for shape in ("graded", "uniform"):
        areas = _subaxial_areas(shape, seeds)
        level_means = areas.mean(axis=0)
        across_studies = areas.mean(axis=1).std(ddof=1)
        slope = np.polyfit(np.arange(5), level_means, 1)[0] / level_means.mean()  # per level
        if shape == "graded":
            assert np.all(np.diff(level_means) > 0) and slope > 0.02, (level_means, slope)
        else:
            assert np.ptp(level_means) < 0.5 * across_studies, (level_means, across_studies)
            assert abs(slope) < 0.01 and not np.all(np.diff(level_means) > 0), (level_means, slope)
    graded = study_anatomy(100, PhantomParams(subaxial_shape="graded"))
    uniform = study_anatomy(100, PhantomParams(subaxial_shape="uniform"))
    assert graded.bones[:2] == uniform.bones[:2]  # C1 (ring) and C2 (dens) as they were
    t1 = [
        next(b for b in a.bones if b.name == "T1").components["body"].parts[0].shape
        for a in (graded, uniform)
    ]
    assert t1[0] == t1[1] and graded.hu == uniform.hu  # T1+ and everything else unchanged
    assert graded.levels["C7"] != uniform.levels["C7"]


# ------------------------------------------------------------------------------------- neck outline


def test_random_neck_outline_is_no_level_ruler() -> None:
    """levels: the shoulders start at a fixed place of C6; random: anywhere, whatever the column.
    Bones, levels and labels stay as they were: only the soft tissue around them moves."""
    offsets = {"levels": [], "random": []}
    for seed in range(200, 216):
        for neck in offsets:
            anat = study_anatomy(seed, PhantomParams(neck_outline=neck))
            c6 = 0.5 * sum(anat.levels["C6"])
            offsets[neck].append(anat.knots["outline_s"][4] - c6)  # where the neck starts to widen
            assert np.all(np.diff(anat.knots["outline_s"]) > 0) and np.all(
                np.diff(anat.knots["airway_s"]) > 0
            )
    assert np.ptp(offsets["levels"]) < 1e-9  # always 10 mm above the middle of C6
    assert np.std(offsets["random"]) > 8.0, offsets["random"]  # some levels away, either side
    params = dict(size=48, n_slices=50, slice_spacing=2.0, fractured=("C5",))
    ruler = make_phantom(7, PhantomParams(**params))
    free = make_phantom(7, PhantomParams(**params, neck_outline="random"))
    assert np.array_equal(ruler.labels, free.labels)  # the same spine, the same segmentation
    soft = (ruler.labels == 0) & (np.abs(ruler.volume.astype(int) - free.volume.astype(int)) > 100)
    assert soft.mean() > 0.01  # the neck around it differs
    with pytest.raises(ValueError, match="neck_outline"):
        folder_spec("default", neck_outline="flat")


# --------------------------------------------------------------------------------------- z coverage


def test_random_coverage_plans_cut_c7_and_keep_labels_honest() -> None:
    spec = folder_spec("coverage", n_train=200, n_test=0, size=64, spacing=(0.5, 3.0))
    plans = plan_folder(spec)
    default = plan_folder(folder_spec("default", n_train=200, n_test=0, size=64, spacing=(0.5, 3.0)))
    assert sum(bool(p.params.fractured) for p in plans) == sum(bool(p.params.fractured) for p in default)
    c7, tops, bottoms = [], [], []
    for p in plans:
        anat = study_anatomy(p.seed, p.params)
        top, bottom = p.params.scan_s
        assert p.params.n_slices == round((bottom - top) / p.params.slice_spacing)  # coverage / spacing
        seen = scanned_mm(anat, p.params.scan_s)
        assert all(seen[v] >= MIN_FRACTURE_MM for v in p.params.fractured)  # fractures only where scanned
        c7.append(seen["C7"] / (anat.levels["C7"][1] - anat.levels["C7"][0]))
        tops.append(top - anat.levels["C2"][0])
        bottoms.append(bottom)
    c7 = np.array(c7)
    assert 0.03 < np.mean(c7 == 0) < 0.2 and 0.05 < np.mean((c7 > 0) & (c7 < 1)) < 0.25
    assert min(tops) < -30 and max(tops) > -3  # from the skull base down to the C1/C2 junction
    assert np.ptp(bottoms) > 60  # from mid-C6 down to T4


@pytest.fixture(scope="module")
def coverage_folder(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, FolderSpec]:
    out = tmp_path_factory.mktemp("coverage")
    kw = dict(n_train=10, n_test=0, size=48, seed=21, spacing=(3.0, 3.0), seg_fraction=1.0)
    kw.update(positive_fraction=1.0, box_fraction=1.0)
    write_rsna_folder(out, variant="coverage", **kw)
    return out, folder_spec("coverage", **kw)


def test_random_coverage_folder_shows_what_is_scanned(coverage_folder: tuple[Path, FolderSpec]) -> None:
    out, spec = coverage_folder
    manifest = _manifest(out).set_index("StudyInstanceUID")
    train = pd.read_csv(out / "train.csv").set_index("StudyInstanceUID")
    plans = {p.uid: p for p in plan_folder(spec)}
    first, last, c7_missing = set(), set(), 0
    for row in manifest.reset_index().itertuples():
        study, seg = _read(out, row)
        assert study.shape[0] == row.n_slices and abs(study.spacing[0] - 3.0) < 1e-3
        assert abs(row.n_slices * 3.0 - (row.scan_bottom_mm - row.scan_top_mm)) < 1e-2
        shown = [LEVELS[k - 1] for k in np.unique(seg) if k]
        assert " ".join(shown) == row.levels_shown  # the manifest says what the segmentation shows
        assert set(row.levels_cut.split()) <= set(shown)
        first.add(next(v for v in shown if v not in row.levels_cut.split()))  # first whole vertebra
        last.add(shown[-1])
        c7_missing += "C7" not in shown or "C7" in row.levels_cut.split()
        # no label outside the scan, and every vertebra wholly inside it is labelled
        anat = study_anatomy(plans[row.StudyInstanceUID].seed, plans[row.StudyInstanceUID].params)
        for bone in (b for b in anat.bones if b.label):
            lo, hi = bone.s_bounds()
            if bone.name in shown:
                assert hi > row.scan_top_mm and lo < row.scan_bottom_mm, bone.name
            elif row.scan_top_mm + 3 < lo and hi < row.scan_bottom_mm - 3:
                pytest.fail(f"{bone.name} lies inside the scan but is not labelled")
        fractured = [v for v in VERTEBRAE if train.loc[row.StudyInstanceUID, v]]
        assert fractured and set(fractured) <= set(shown)
        slices = dict(item.split(":") for item in row.fracture_slices.split())
        assert set(slices) == set(fractured) and all(int(n) > 0 for n in slices.values())  # gaps in the scan
    assert len(first) > 1 and len(last) > 1 and c7_missing > 0
    boxes = pd.read_csv(out / "train_bounding_boxes.csv")
    assert len(boxes) > 0 and set(boxes["StudyInstanceUID"]) <= set(train.index)


# ------------------------------------------------------------------------------------------- FOV


def _spine_geometry(out: Path) -> tuple[np.ndarray, np.ndarray]:
    """Per study: normalised (row, col) centroid of C1..C7 and the written pixel spacing; checks the
    NIfTI affine against the DICOM geometry."""
    centres, spacings = [], []
    for row in _manifest(out).itertuples():
        study, seg = _read(out, row)
        files = sorted((out / "train_images" / row.StudyInstanceUID).glob("*.dcm"))
        dy, dx = (float(v) for v in pydicom.dcmread(files[0]).PixelSpacing)
        np.testing.assert_allclose(study.spacing[1:], (dy, dx), rtol=1e-6)
        affine = nib.load(out / "segmentations" / f"{row.StudyInstanceUID}.nii").affine
        np.testing.assert_allclose(np.abs(np.diag(affine)[:3]), (dx, dy, study.spacing[0]), rtol=1e-5)
        by_affine = load_segmentation(
            out / "segmentations" / f"{row.StudyInstanceUID}.nii", study, method="geometry"
        )
        spine = np.isin(by_affine, range(1, 8))
        assert not (spine[:, [0, -1], :].any() or spine[:, :, [0, -1]].any())  # the column stays in view
        centres.append(np.argwhere(spine)[:, 1:].mean(axis=0) / row.size)
        spacings.append(dx)
    return np.array(centres), np.array(spacings)


def test_fov_variant_moves_the_spine_and_varies_pixel_spacing(tmp_path: Path) -> None:
    kw = dict(n_train=8, n_test=0, size=48, slices=(14, 16), seed=5, seg_fraction=1.0)
    write_rsna_folder(tmp_path / "default", **kw)
    write_rsna_folder(tmp_path / "fov", variant="fov", **kw)
    c_default, px_default = _spine_geometry(tmp_path / "default")
    c_fov, px_fov = _spine_geometry(tmp_path / "fov")
    assert np.all(c_fov.std(axis=0) > 1.5 * c_default.std(axis=0)), (c_fov.std(0), c_default.std(0))
    fov = px_fov * 48
    assert fov.min() < 175 and fov.max() > 215 and np.ptp(px_fov) > np.ptp(px_default)
    manifest = _manifest(tmp_path / "fov")
    np.testing.assert_allclose(manifest["pixel_spacing"], px_fov, rtol=1e-6)
    assert (
        manifest["fov_range_mm"].eq("130-250").all()
        and (manifest[["shift_x_mm", "shift_y_mm"]].abs() > 0).all().all()
    )


# ------------------------------------------------------------------------------------- thickness


def test_three_mm_slices_end_to_end(tmp_path: Path) -> None:
    out = tmp_path / "thick"
    write_rsna_folder(
        out, variant="thickness", spacing=(3.0, 3.0), n_train=3, n_test=1, size=32, seg_fraction=1
    )
    for row in _manifest(out).itertuples():
        study, seg = _read(out, row)
        assert abs(study.spacing[0] - 3.0) < 1e-3 and study.shape[0] == row.n_slices < 100
        folder = out / f"{row.split}_images" / row.StudyInstanceUID
        assert {float(pydicom.dcmread(p).SliceThickness) for p in folder.glob("*.dcm")} == {3.0}
        assert row.z_coverage == "full" and row.levels_shown.startswith("C1 C2 C3 C4 C5 C6 C7")
        if seg is not None:
            assert set(range(1, 8)) <= set(np.unique(seg).tolist())
    plans = plan_folder(folder_spec("thickness", n_train=200, n_test=0, size=32))
    spacings = {p.params.slice_spacing for p in plans}
    assert min(spacings) == 0.5 and max(spacings) == 3.0 and {1.5, 2.0, 2.5} <= spacings
    thin, thick = (
        np.median([p.params.n_slices for p in plans if p.params.slice_spacing == s]) for s in (0.5, 3.0)
    )
    assert 4 < thin / thick < 8  # to scale: the slice count follows coverage / spacing


# ---------------------------------------------------------------------------------------- subtle


def _gap_widths(seeds: range, size: int, cache: int) -> list[tuple[float, float, bool]]:
    """(measured in-plane gap width × |n_xy|, drawn gap) in cache pixels, for single body breaks.

    Noise-free renders; the HU profile across each gap through its centre, on the nearest slice; the
    width is the area of the dip below cancellous bone, in units of the bone-to-gap contrast (exact for
    the renderer's linear anti-aliasing, whatever the sub-pixel position).
    """
    out = []
    for seed in seeds:
        params = PhantomParams(
            size=size, n_slices=40, slice_spacing=1.0, fractured=SUBAXIAL, noise_sd=0.0,
            subtle_fraction=1.0, subtle_cache_size=cache,
        )  # fmt: skip
        st = make_phantom(seed, params)
        hu = study_anatomy(seed, params).hu
        px, pxc = st.spacing[1], st.spacing[1] * size / cache
        for v in SUBAXIAL:
            sites = [f for f in st.fractures if f.vertebra == v]
            if len(sites) != 1 or sites[0].kind != "body":
                continue
            f = sites[0]
            assert f.subtle and abs(np.hypot(*f.shift) - pxc) < 1e-9  # a one-pixel step-off
            (x0, y0, s0), (nx, ny, ns) = f.point, f.normal
            i = int(np.argmin(np.abs(st.slice_s - s0)))
            nxy = np.hypot(nx, ny)
            n2 = np.array([nx, ny]) / nxy
            p = st.centres[i] + (x0, y0) - ns * (st.slice_s[i] - s0) / nxy * n2
            t = np.arange(-4, 4.0001, 0.02) * pxc
            pts = p[None] + t[:, None] * n2[None]
            prof = map_coordinates(st.volume[i].astype(np.float64), [pts[:, 1] / px, pts[:, 0] / px], order=1)
            dip = np.clip((hu["cancellous"] - prof) / (hu["cancellous"] - hu["gap"]), 0, None)
            lo = hi = int(np.argmax(dip))
            while lo > 0 and dip[lo - 1] > 0.02:
                lo -= 1
            while hi < len(dip) - 1 and dip[hi + 1] > 0.02:
                hi += 1
            out.append((float(dip[lo : hi + 1].sum() * 0.02 * nxy), f.gap_mm / pxc))
    return out


@pytest.mark.parametrize("size", [128, 256])
def test_subtle_gaps_are_one_to_two_cache_pixels(size: int) -> None:
    widths = _gap_widths(range(8), size, cache=128)
    assert len(widths) >= 5
    for measured, drawn in widths:
        assert 1.0 <= drawn <= 2.0 and abs(measured - drawn) < 0.2, (measured, drawn)


def test_subtle_fraction_in_a_folder(tmp_path: Path) -> None:
    kw = dict(n_train=8, n_test=0, size=32, slices=(12, 14), seed=2, positive_fraction=1.0)
    write_rsna_folder(tmp_path / "s", variant="subtle", subtle_cache_size=64, **kw)
    manifest = _manifest(tmp_path / "s")
    n_subtle = n_obvious = 0
    for row in manifest.itertuples():
        gaps = {k: float(g) for k, g in (item.split(":") for item in row.fracture_gap_mm.split())}
        px_cache = row.fov_mm / 64
        for level, gap in gaps.items():
            if level in row.subtle_levels.split():
                n_subtle += 1
                assert px_cache * 0.995 <= gap <= 2 * px_cache * 1.005
            else:
                n_obvious += 1
                assert 1.5 <= gap <= 4.5
    assert n_subtle > 0 and n_obvious > 0


# --------------------------------------------------------------------------------------- presets


def test_presets_and_explicit_options() -> None:
    hard = resolve_options("hard")
    assert hard == {
        "spacing": (0.5, 3.0),
        "subaxial_shape": "uniform",
        "neck_outline": "random",
        "z_coverage": "random",
        "fov_mm": (130.0, 250.0),
        "centre_shift_mm": 20.0,
        "subtle_fraction": 0.5,
    }
    default = resolve_options("default")
    for name in ("uniform", "coverage", "fov", "thickness", "subtle", "neck"):  # each one part of hard
        changed = {k: v for k, v in resolve_options(name).items() if v != default[k]}
        assert changed and all(
            hard[k] == v for k, v in changed.items() if (name, k) != ("thickness", "z_coverage")
        )
    assert resolve_options("thickness")["z_coverage"] == "full"  # to scale, so slice counts follow spacing
    given = resolve_options("hard", subaxial_shape="graded", spacing=[1, 1], fov_mm="off", centre_shift_mm=0)
    assert given == {
        **hard,
        "subaxial_shape": "graded",
        "spacing": (1.0, 1.0),
        "fov_mm": None,
        "centre_shift_mm": 0.0,
    }
    spec = folder_spec("hard", n_train=2, n_test=0, size=32, z_coverage="full", spacing=None)
    assert (spec.variant, spec.z_coverage, spec.spacing, spec.subtle_fraction) == (
        "hard",
        "full",
        (0.5, 3.0),
        0.5,
    )
    assert set(VARIANTS) == {"default", "uniform", "coverage", "fov", "thickness", "subtle", "neck", "hard"}
    with pytest.raises(ValueError, match="unknown variant"):
        resolve_options("harder")
    with pytest.raises(ValueError, match="z_coverage"):
        folder_spec("default", z_coverage="partial")


def test_cli_variant_with_an_override(tmp_path: Path) -> None:
    out = tmp_path / "cli"
    cmd = [sys.executable, "-m", "cervspine.synthesize", f"out={out}", "n_train=2", "n_test=1", "size=32"]
    cmd += ["variant=hard", "subaxial_shape=graded", "spacing=[3,3]", "seed=3"]
    subprocess.run(cmd, check=True, capture_output=True, timeout=120)
    manifest = _manifest(out)
    assert manifest["variant"].eq("hard").all() and manifest["subaxial_shape"].eq("graded").all()
    assert manifest["z_coverage"].eq("random").all() and manifest["fov_range_mm"].eq("130-250").all()
    assert manifest["subtle_fraction"].eq(0.5).all() and manifest["slice_spacing"].eq(3.0).all()
    assert manifest["spacing_range_mm"].eq("3-3").all()


@pytest.fixture(scope="module")
def hard_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("hard")
    write_rsna_folder(
        out, variant="hard", n_train=4, n_test=1, size=32, seed=6, spacing=(2.0, 3.0), seg_fraction=1
    )
    return out


def test_hard_variant_is_deterministic_and_differs_from_default(hard_folder: Path, tmp_path: Path) -> None:
    write_rsna_folder(
        tmp_path, variant="hard", n_train=4, n_test=1, size=32, seed=6, spacing=(2.0, 3.0), seg_fraction=1
    )
    files = sorted(p.relative_to(hard_folder) for p in hard_folder.rglob("*") if p.is_file())
    assert files == sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*") if p.is_file())
    for rel in files:
        assert (hard_folder / rel).read_bytes() == (tmp_path / rel).read_bytes(), rel
    manifest = _manifest(hard_folder)
    assert manifest["variant"].eq("hard").all() and manifest["subaxial_shape"].eq("uniform").all()
    assert manifest["n_slices"].nunique() > 1 and manifest["pixel_spacing"].nunique() == len(manifest)


def test_hard_folder_goes_through_the_cache_builder(hard_folder: Path, tmp_path: Path) -> None:
    from cervspine.cache.builder import preprocess
    from cervspine.cache.params import CacheParams
    from cervspine.io.rsna import RsnaIndex

    report = preprocess(
        RsnaIndex.from_root(hard_folder),
        tmp_path / "cache",
        CacheParams(image_size=24),
        workers=1,
        progress=False,
    )
    assert report.ok, report.failed
    assert len(report.built) == 5
    manifest = _manifest(hard_folder).set_index("StudyInstanceUID")
    for uid in report.built:
        entry = tmp_path / "cache" / uid
        volume = np.load(entry / "volume.npy", mmap_mode="r")
        assert volume.shape == (manifest.loc[uid, "n_slices"], 24, 24)
        if manifest.loc[uid, "segmentation"]:
            seg = np.load(entry / "seg.npy")
            assert (
                seg.shape == volume.shape and seg.max() >= 7 or "C7" not in manifest.loc[uid, "levels_shown"]
            )


def test_mixed_folder_draws_each_studys_variant_and_applies_it(tmp_path: Path) -> None:
    from cervspine.synthetic import plan_folder
    from cervspine.synthetic.variants import VARIANTS, folder_spec

    spec = folder_spec("mixed", n_train=60, n_test=0, size=32, seed=4)
    plans = plan_folder(spec)
    drawn = [p.variant_spec.variant for p in plans]
    assert set(drawn) == set(VARIANTS)  # every variant drawn in 60 studies (each p = 1/8)
    for p in plans:
        v = p.variant_spec
        assert v.z_coverage == {"coverage": "random", "hard": "random", "thickness": "full"}.get(
            v.variant, "fitted"
        )
        assert v.subaxial_shape == ("uniform" if v.variant in ("uniform", "hard") else "graded")
        assert p.params.subtle_fraction == (0.5 if v.variant in ("subtle", "hard") else 0.0)
    again = [
        p.variant_spec.variant
        for p in plan_folder(folder_spec("mixed", n_train=60, n_test=0, size=32, seed=4))
    ]
    assert again == drawn  # seeded
