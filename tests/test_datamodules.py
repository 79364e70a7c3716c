"""DataModules: folds, 2.5D samples, slice targets from labels × presence refined by boxes."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from cervspine.data.datamodules import FractureDataModule, VertebraeDataModule
from cervspine.data.folds import assign_folds
from tests.helpers import writable_copy


def _dm(cls, root, tmp_path, **kw):
    base = dict(
        root=str(root),
        cache_dir=str(tmp_path / "cache"),
        image_size=64,
        n_folds=3,
        input_size=32,
        num_workers=0,
        preprocess_workers=1,
        batch_size=8,
    )
    dm = cls(**{**base, **kw})
    dm.prepare_data()
    dm.setup()
    return dm


def test_folds_are_deterministic_grouped_and_stratified():
    labels = pd.DataFrame({"patient_overall": [0, 1] * 20}, index=[f"1.2.{i}" for i in range(40)])
    a, b = assign_folds(labels, 4, seed=1), assign_folds(labels, 4, seed=1)
    assert a.equals(b) and not a.equals(assign_folds(labels, 4, seed=2))
    for _, g in labels.groupby(a):
        assert g["patient_overall"].sum() == 5 and len(g) == 10  # balanced classes in every fold
    assert assign_folds(labels.iloc[::-1], 4, seed=1).sort_index().equals(a.sort_index())  # order-free


def test_vertebrae_samples_are_2p5d_stacks_with_presence_targets(tiny_root, tmp_path):
    dm = _dm(VertebraeDataModule, tiny_root, tmp_path, context=1, stride=2, windows=["bone", "soft"])
    assert not set(dm.train_uids) & set(dm.val_uids)
    ds = dm.dataset(dm.val_uids)
    sample = ds[len(ds) // 2]
    assert sample["image"].shape == (dm.in_chans, 32, 32) == (6, 32, 32)
    assert float(sample["image"].min()) >= 0.0 and float(sample["image"].max()) <= 1.0
    s, z = ds.items[len(ds) // 2]
    expected = ds.studies[s].vertebra_presence(0.1)[z]
    np.testing.assert_array_equal(sample["target"].numpy(), expected)


def test_fracture_targets_follow_labels_presence_and_boxes(tiny_root, tmp_path):
    dm = _dm(
        FractureDataModule,
        tiny_root,
        tmp_path,
        far_from_box_weight=0.0,
        unboxed_positive_weight=0.3,
        box_radius=1,
    )
    labels = dm.index.labels
    boxes = dm.index.boxes
    boxed = sorted(set(boxes["StudyInstanceUID"]) & set(dm.index.uids_with_segmentation))
    unboxed_pos = [
        u
        for u in dm.index.uids_with_segmentation
        if labels.loc[u, "patient_overall"] == 1 and u not in set(boxes["StudyInstanceUID"])
    ]
    negative = [u for u in dm.index.uids_with_segmentation if labels.loc[u, "patient_overall"] == 0]
    if not boxed or not negative:
        pytest.skip("tiny folder drew no boxed+segmented or no negative segmented study")
    for uid in negative:
        vis, _ = dm.visibility_and_boxes(uid)
        t, w = dm.slice_targets(uid, vis)
        assert t.sum() == 0 and (w == 1).all()
    uid = boxed[0]
    vis, _ = dm.visibility_and_boxes(uid)
    t, w = dm.slice_targets(uid, vis)
    numbers = np.asarray(dm.study(uid).meta["instance_numbers"])
    boxed_z = [
        int(np.flatnonzero(numbers == n)[0]) for n in boxes.loc[boxes.StudyInstanceUID == uid, "slice_number"]
    ]
    fractured = labels.loc[uid, [f"C{i}" for i in range(1, 8)]].to_numpy() > 0
    for z in boxed_z:
        assert t[z, fractured].max() == 1 and w[z][t[z] > 0].min() == 1  # boxed slices: confident positives
    assert t[:, ~fractured].sum() == 0  # never positive for an unfractured level
    far = np.ones(len(t), bool)
    for z in boxed_z:
        far[max(0, z - 1) : z + 2] = False
    assert (w[far][t[far] > 0] == 0).all()  # positives far from every box are ignored
    for uid in unboxed_pos[:1]:
        vis, _ = dm.visibility_and_boxes(uid)
        t, w = dm.slice_targets(uid, vis)
        assert t.sum() > 0 and np.allclose(w[t > 0], 0.3)


def test_fracture_samples_carry_metadata_and_balanced_sampling(tiny_root, tmp_path):
    dm = _dm(FractureDataModule, tiny_root, tmp_path, pos_fraction=0.5, epoch_size=400)
    loader = dm.train_dataloader()
    batch = next(iter(loader))
    assert batch["image"].shape[1:] == (3, 32, 32)
    assert batch["meta"].shape[1] == dm.num_meta and np.isfinite(batch["meta"].numpy()).all()
    ds = loader.dataset
    pos = np.array([(ds.targets[s][z] * ds.weights[s][z]).max() > 0 for s, z in ds.items])
    drawn = np.array(list(iter(loader.sampler)))
    if 0 < pos.mean() < 0.3:
        assert 0.35 < pos[drawn].mean() < 0.65  # positives drawn at about pos_fraction, not their share


def test_visibility_normalization_gives_every_found_level_its_best_slices():
    from cervspine.data.visibility import normalize_visibility

    vis = np.zeros((6, 7), np.float32)
    vis[1:3, 0] = [0.9, 0.6]  # confidently found
    vis[3:5, 4] = [0.3, 0.15]  # found, but under-scored
    vis[5, 6] = 0.01  # noise: below the floor, left alone
    out = normalize_visibility(vis, "per_study_max")
    np.testing.assert_allclose(out[1:3, 0], [1.0, 0.6 / 0.9], rtol=1e-6)
    np.testing.assert_allclose(out[3:5, 4], [1.0, 0.5], rtol=1e-6)
    assert out[5, 6] == np.float32(0.01)
    np.testing.assert_array_equal(normalize_visibility(vis, "none"), vis)
    with pytest.raises(ValueError, match="visibility normalization"):
        normalize_visibility(vis, "softmax")


def test_a_folder_without_what_a_stage_learns_from_is_refused(tiny_root, tmp_path):
    bare = writable_copy(tiny_root, tmp_path / "no_segmentations", ".cervspine_cache", "segmentations")
    with pytest.raises(RuntimeError, match=r"no training study has a segmentation"):
        _dm(VertebraeDataModule, bare, tmp_path)
    with pytest.raises(RuntimeError, match=r"no training study has stage-1 predictions or a segmentation"):
        _dm(FractureDataModule, bare, tmp_path)
