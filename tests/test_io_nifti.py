"""load_segmentation: geometry vs RSNA recipe alignment on NIfTIs written with nibabel."""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
import pytest

from cervspine.io import SegmentationError, Study, load_segmentation, load_study
from tests.helpers import labels_like, nifti_from_volume, write_series


def make_study(folder: Path, **kwargs) -> Study:
    write_series(folder, n=7, shape=(6, 5), dz=2.0, spacing=(0.5, 0.6), **kwargs)
    return load_study(folder)


def rsna_nifti(seg: np.ndarray, study: Study) -> tuple[np.ndarray, np.ndarray]:
    """The RSNA layout, written as the synthetic generator does (axial studies).

    data[x, y, k] = seg_in_file_number_order[Z-1-k, H-1-y, x]; axis0 → RAS (-dx, 0, 0), axis1 → RAS
    (0, +dy, 0), axis2 → RAS (0, 0, ±dz) (k increasing ⇒ file number decreasing); voxel (0, 0, 0) on
    the last file's last row, first column.
    """
    order = np.argsort(study.instance_numbers)  # file-number order → volume index
    by_file = seg[order]
    z, h, _ = seg.shape
    data = np.ascontiguousarray(by_file[::-1, ::-1, :].transpose(2, 1, 0))
    dz, dy, dx = study.spacing
    last = study.positions[order[-1]]
    k_dir = study.positions[order[0]][2] - study.positions[order[1]][2]  # +dz if file 1 is superior
    affine = np.diag([-dx, dy, np.sign(k_dir) * dz, 1.0])
    corner_lps = last + np.array([0.0, (h - 1) * dy, 0.0])
    affine[:3, 3] = corner_lps * np.array([-1.0, -1.0, 1.0])
    return data, affine


def save(path: Path, data: np.ndarray, affine: np.ndarray | None) -> Path:
    nib.save(nib.Nifti1Image(data, affine), str(path))
    return path


@pytest.mark.parametrize("reversed_storage", [False, True])
def test_rsna_layout_geometry_and_recipe_agree(tmp_path, reversed_storage):
    study = make_study(tmp_path / "s", reversed_storage=reversed_storage)
    assert study.stored_reversed == reversed_storage
    seg = labels_like(study)
    data, affine = rsna_nifti(seg, study)
    perm_flips = ((2, 1, 0), (False, True, not reversed_storage))
    np.testing.assert_allclose(affine, nifti_from_volume(seg, study, *perm_flips)[1])  # same geometry
    path = save(tmp_path / "seg.nii", data, affine)
    for method in ("auto", "geometry", "recipe"):
        out = load_segmentation(path, study, method=method)
        assert out.dtype == np.uint8 and out.flags.c_contiguous
        np.testing.assert_array_equal(out, seg, err_msg=method)


@pytest.mark.parametrize(
    "perm, flips",
    [((0, 1, 2), (False, False, False)), ((1, 0, 2), (True, False, True)), ((2, 0, 1), (False, True, True))],
)
def test_other_axis_orders_by_geometry(tmp_path, perm, flips):
    study = make_study(tmp_path / "s", reversed_storage=True)
    seg = labels_like(study, seed=1)
    path = save(tmp_path / "seg.nii.gz", *nifti_from_volume(seg, study, perm, flips))
    np.testing.assert_array_equal(load_segmentation(path, study), seg)
    np.testing.assert_array_equal(load_segmentation(path, study, method="geometry"), seg)
    with pytest.raises(SegmentationError, match="does not fit"):
        load_segmentation(path, study, method="recipe")


def test_oblique_study_by_geometry(tmp_path):
    c, s = np.cos(0.3), np.sin(0.3)
    study = make_study(tmp_path / "s", orientation=(c, s, 0.0, -s * 0.8, c * 0.8, -0.6))
    seg = labels_like(study, seed=2)
    path = save(tmp_path / "seg.nii", *nifti_from_volume(seg, study, (2, 1, 0), (False, True, True)))
    np.testing.assert_array_equal(load_segmentation(path, study), seg)


def test_wrong_shape_names_both_files_and_shapes(tmp_path):
    study = make_study(tmp_path / "s")
    data, affine = rsna_nifti(labels_like(study), study)
    path = save(tmp_path / "short.nii", data[:, :, 1:], affine)
    for method in ("auto", "recipe"):
        with pytest.raises(SegmentationError) as err:
            load_segmentation(path, study, method=method)
        msg = str(err.value)
        assert str(path) in msg and str(study.folder) in msg and "(5, 6, 6)" in msg and "(7, 6, 5)" in msg


@pytest.mark.parametrize("defect", ["flipped_z", "shifted", "spacing"])
def test_affine_contradicting_study_is_an_error(tmp_path, defect):
    study = make_study(tmp_path / "s")
    data, affine = rsna_nifti(labels_like(study), study)
    if defect == "flipped_z":
        affine[2, 2] *= -1
    elif defect == "shifted":
        affine[2, 3] += 3 * study.spacing[0]
    else:
        affine[2, 2] *= 1.5
    path = save(tmp_path / "seg.nii", data, affine)
    with pytest.raises(SegmentationError, match="contradicts") as err:
        load_segmentation(path, study)
    assert str(path) in str(err.value) and str(study.folder) in str(err.value)
    np.testing.assert_array_equal(load_segmentation(path, study, method="recipe").shape, study.shape)


def test_geometry_and_recipe_disagreeing_is_an_error(tmp_path):
    study = make_study(tmp_path / "s")
    seg = labels_like(study, seed=3)
    # a geometrically correct NIfTI whose k axis runs with the file number (not the RSNA layout)
    path = save(tmp_path / "seg.nii", *nifti_from_volume(seg, study, (2, 1, 0), (False, True, False)))
    np.testing.assert_array_equal(load_segmentation(path, study, method="geometry"), seg)
    with pytest.raises(SegmentationError, match="disagree") as err:
        load_segmentation(path, study)
    assert str(path) in str(err.value) and str(study.folder) in str(err.value)


def test_uninformative_affine_falls_back_to_recipe(tmp_path):
    study = make_study(tmp_path / "s", reversed_storage=True)
    seg = labels_like(study, seed=4)
    data, _ = rsna_nifti(seg, study)
    for name, affine in (("none.nii", None), ("eye.nii", np.eye(4))):
        path = save(tmp_path / name, data, affine)
        with pytest.warns(UserWarning, match="uninformative"):
            np.testing.assert_array_equal(load_segmentation(path, study), seg)
        with pytest.raises(SegmentationError, match="no geometry"):
            load_segmentation(path, study, method="geometry")


def test_recipe_uses_instance_numbers_not_just_stored_reversed(tmp_path):
    files, _ = write_series(tmp_path / "s", n=5, shape=(6, 5))
    for f, inst in zip(files, [3, 1, 5, 2, 4]):  # instance numbers not monotonic in space
        ds = pydicom.dcmread(f)
        ds.InstanceNumber = inst
        ds.save_as(f)
    study = load_study(tmp_path / "s")
    seg = labels_like(study, seed=5)
    data, _ = rsna_nifti(seg, study)
    path = save(tmp_path / "seg.nii", data, None)
    np.testing.assert_array_equal(load_segmentation(path, study, method="recipe"), seg)


def test_label_validation(tmp_path):
    study = make_study(tmp_path / "s")
    seg = labels_like(study)
    data, affine = rsna_nifti(seg, study)
    good = save(tmp_path / "float.nii", data.astype(np.float32), affine)
    np.testing.assert_array_equal(load_segmentation(good, study), seg)
    bad = data.astype(np.float32)
    bad[0, 0, 0] = 2.5
    with pytest.raises(SegmentationError, match="non-integer"):
        load_segmentation(save(tmp_path / "frac.nii", bad, affine), study)
    big = data.astype(np.int16)
    big[1, 2, 3] = 20
    with pytest.raises(SegmentationError, match=r"0\.\.19.*20"):
        load_segmentation(save(tmp_path / "big.nii", big, affine), study)
    with pytest.raises(SegmentationError, match="cannot read"):
        load_segmentation(tmp_path / "missing.nii", study)
    with pytest.raises(ValueError, match="method"):
        load_segmentation(good, study, method="magic")


def test_slice_positions_must_match_irregular_study(tmp_path):
    files, _ = write_series(tmp_path / "s", n=7, shape=(6, 5), dz=2.0)
    # steps 2.9, 2.9 mm: uneven, yet no gap (< 1.5 × the 2 mm median)
    for k, shift in ((4, 0.9), (5, 1.8), (6, 1.8)):
        ds = pydicom.dcmread(files[k])
        ds.ImagePositionPatient = [*ds.ImagePositionPatient[:2], float(ds.ImagePositionPatient[2]) - shift]
        ds.save_as(files[k])
    study = load_study(tmp_path / "s")
    assert study.metadata["missing_slices"] == 0
    path = save(tmp_path / "seg.nii", *rsna_nifti(labels_like(study), study))  # a uniform 2 mm grid
    with pytest.raises(SegmentationError, match=r"slice 0 lies 1\.80 mm"):
        load_segmentation(path, study)
