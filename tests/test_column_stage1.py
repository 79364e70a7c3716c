"""Stage 1 with the whole column in view: sampling a study into a sequence, random parts in training,
augmentation of a whole column at once, padding-free answers, inference averaged over start offsets, and
the stage-1 table it writes."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import torch

from cervspine.data.column import ColumnSampler, VertebraeColumnDataset, collate_columns
from cervspine.data.transforms import WINDOWS, build_augment, resize_hwc, window_stack


def _study(num_slices: int, dz: float, size: int = 32, seed: int = 0) -> SimpleNamespace:
    """What the column dataset reads of a cached study: the HU volume, its slice count and spacing."""
    rng = np.random.default_rng(seed)
    volume = rng.integers(-1000, 2000, (num_slices, size, size)).astype(np.int16)
    return SimpleNamespace(volume=volume, num_slices=num_slices, meta={"spacing": [dz, 1.0, 1.0]})


def test_positions_are_about_the_step_apart_whatever_the_slice_thickness():
    sampler = ColumnSampler(input_size=16, z_step_mm=2.0)
    assert [sampler.stride(dz) for dz in (0.5, 0.8, 1.0, 2.0, 3.0)] == [4, 2, 2, 1, 1]
    np.testing.assert_array_equal(sampler.positions(10, 0.5), [0, 4, 8])
    np.testing.assert_array_equal(sampler.positions(10, 0.5, offset=3), [3, 7])


def test_inputs_are_the_window_major_stacks_one_step_apart():
    sampler = ColumnSampler(input_size=16, context=1, windows=(WINDOWS["bone"], WINDOWS["soft"]))
    study = _study(20, 1.0)
    idx = np.array([0, 6, 19])
    x = sampler.inputs(study.volume, idx, 1.0)
    assert x.shape == (3, 6, 16, 16)
    for row, z in zip(x, idx):  # neighbours 2 slices apart (2 mm / 1 mm), clamped at the ends
        hu = study.volume[np.clip(z + np.array([-2, 0, 2]), 0, 19)]
        want = resize_hwc(window_stack(hu, sampler.windows), 16).transpose(2, 0, 1)
        np.testing.assert_allclose(row, want, atol=1e-6)


def _dataset(train: bool, studies, augment=None, z_step_jitter: float = 1.0) -> VertebraeColumnDataset:
    presence = [np.zeros((s.num_slices, 7), np.float32) for s in studies]
    boxes = []
    for s in studies:
        b = np.tile(np.array([0.2, 0.3, 0.5, 0.6], np.float32), (s.num_slices, 1))
        b[: s.num_slices // 4] = np.nan  # slices without a spine box
        boxes.append(b)
    sampler = ColumnSampler(input_size=16, z_step_mm=2.0, max_positions=500)
    return VertebraeColumnDataset(
        studies,
        presence,
        boxes,
        sampler,
        train=train,
        min_fraction=0.5,
        augment=augment,
        z_step_jitter=z_step_jitter,
    )


def test_training_draws_random_parts_of_the_column_and_validation_reads_it_all():
    torch.manual_seed(0)
    study = _study(120, 0.5)  # 30 positions 2 mm apart
    train, val = _dataset(True, [study]), _dataset(False, [study])
    draws = [train[0]["slices"].numpy() for _ in range(40)]
    lengths = {len(d) for d in draws}
    assert min(lengths) >= 15 and max(lengths) <= 30 and len(lengths) > 5
    assert len({int(d[0]) for d in draws}) > 5  # starts vary (offsets and crops)
    assert all((np.diff(d) == 4).all() for d in draws)  # still every 4th slice: 2 mm apart
    np.testing.assert_array_equal(val[0]["slices"].numpy(), np.arange(0, 120, 4))
    assert val[0]["step_mm"] == pytest.approx(2.0)


def test_step_jitter_varies_the_training_step_and_leaves_validation_fixed():
    torch.manual_seed(0)
    study = _study(400, 0.25)  # strides of 8 slices at 2 mm: room for the jitter to show
    train = _dataset(True, [study], z_step_jitter=1.5)
    steps = []
    for _ in range(40):
        item = train[0]
        stride = set(np.diff(item["slices"].numpy()).tolist())
        assert len(stride) == 1  # one step per drawn column, positions evenly spaced
        assert item["step_mm"] == pytest.approx(stride.pop() * 0.25)
        steps.append(item["step_mm"])
    assert min(steps) >= 2.0 / 1.5 - 0.25 and max(steps) <= 2.0 * 1.5 + 0.25
    assert min(steps) < 1.75 and max(steps) > 2.25  # both shorter and longer steps are drawn
    val = _dataset(False, [study], z_step_jitter=1.5)
    assert {val[0]["step_mm"] for _ in range(5)} == {2.0}
    with pytest.raises(ValueError, match="z_step_jitter"):
        _dataset(True, [study], z_step_jitter=0.8)


def test_one_augmentation_moves_every_position_and_its_box_alike():
    import albumentations as A

    torch.manual_seed(0)
    study = _study(800, 1.0, size=32)  # 400 positions × 3 channels: beyond OpenCV's 512-channel limit
    augment = build_augment([A.HorizontalFlip(p=1.0)], with_boxes=True)
    plain, flipped = _dataset(False, [study])[0], _dataset(False, [study], augment)[0]
    np.testing.assert_allclose(flipped["image"].numpy(), plain["image"].numpy()[..., ::-1], atol=1e-6)
    keep = plain["box_mask"].numpy() > 0
    assert keep.sum() > 0 and (flipped["box_mask"].numpy() == plain["box_mask"].numpy()).all()
    y0, x0, y1, x1 = flipped["box"].numpy()[keep].T
    np.testing.assert_allclose(x0, 1 - 0.6, atol=1e-5)  # mirrored
    np.testing.assert_allclose(x1, 1 - 0.3, atol=1e-5)
    np.testing.assert_allclose(y0, 0.2, atol=1e-5)


def test_a_column_gets_the_same_answer_alone_and_padded_in_a_batch():
    from cervspine.models.column import VertebraeColumnDetector

    torch.manual_seed(0)
    model = VertebraeColumnDetector(
        {"name": "test_resnet"}, in_chans=3, optimizer=torch.optim.AdamW, rnn_hidden=16
    ).eval()
    studies = [_study(40, 1.0, seed=1), _study(90, 1.0, seed=2)]
    items = [_dataset(False, [s])[0] for s in studies]
    batch = collate_columns(items)
    assert batch["mask"].sum(dim=1).tolist() == [20, 45]
    with torch.no_grad():
        both = model(batch["image"], batch["mask"], batch["step_mm"])
        alone = collate_columns(items[:1])
        one = model(alone["image"], alone["mask"], alone["step_mm"])
    torch.testing.assert_close(both["presence"][0, :20], one["presence"][0], atol=1e-5, rtol=0)
    torch.testing.assert_close(both["box"][0, :20], one["box"][0], atol=1e-5, rtol=0)


def test_every_slice_gets_an_answer_between_the_positions():
    from cervspine.data.column_sampler import to_every_slice

    values = np.array([[0.0, 1.0], [1.0, 0.0]])
    out = to_every_slice(values, np.array([2, 6]), 9)
    np.testing.assert_allclose(out[:, 0], [0, 0, 0, 0.25, 0.5, 0.75, 1, 1, 1])
    np.testing.assert_allclose(out[:, 1], 1 - out[:, 0])


def test_inference_reads_the_column_from_start_offsets_spread_over_the_stride():
    z = 10
    every = ColumnSampler(z_step_mm=2.0).read_positions(z, 0.5)  # stride 4: every offset, each slice once
    assert [list(p) for p in every] == [[0, 4, 8], [1, 5, 9], [2, 6], [3, 7]]
    np.testing.assert_array_equal(np.sort(np.concatenate(every)), np.arange(z))
    assert [p[0] for p in ColumnSampler(z_step_mm=2.0, read_offsets=2).read_positions(z, 0.5)] == [0, 2]
    assert len(ColumnSampler(z_step_mm=2.0, read_offsets=9).read_positions(z, 0.5)) == 4  # at most the stride
    assert len(ColumnSampler(z_step_mm=2.0).read_positions(z, 3.0)) == 1  # stride 1: one read


def test_the_column_answers_are_averaged_over_the_offsets_read():
    from cervspine.data.column_sampler import read_column

    reads = []

    def read(idx: np.ndarray) -> tuple[np.ndarray, np.ndarray]:  # 1 on the offset-0 positions, else 0
        reads.append(idx)
        on = (idx % 4 == 0).astype(np.float64)
        return np.repeat(on[:, None], 7, axis=1), np.repeat(idx[:, None] / 10.0, 4, axis=1)

    vis, box = read_column(ColumnSampler(z_step_mm=2.0), 12, 0.5, read)
    assert len(reads) == 4 and vis.shape == (12, 7) and box.shape == (12, 4)
    np.testing.assert_allclose(vis, 0.25)  # one read of four says 1 at every slice
    np.testing.assert_allclose(box[3:9, 0], np.arange(3, 9) / 10.0, atol=1e-6)  # linear: exact inside
    vis, _ = read_column(ColumnSampler(z_step_mm=2.0, read_offsets=1), 12, 0.5, read)
    np.testing.assert_allclose(vis, 1.0)


def test_a_trained_column_model_writes_the_stage1_table_schema(tiny_root, tmp_path):
    from cervspine.cache import CachedStudy
    from cervspine.config import composed
    from cervspine.data.stage1_table import COLUMNS
    from cervspine.inference import Runtime, load_stage1
    from cervspine.train import train

    overrides = [
        "experiment=vertebrae_column_demo",
        f"data.root={tiny_root}",
        "data.image_size=64",
        "data.n_folds=3",
        "data.num_workers=0",
        "data.preprocess_workers=1",
        "data.input_size=32",
        "data.epoch_size=4",
        "trainer.max_epochs=1",
        "+trainer.limit_val_batches=1",
        "print_config=false",
    ]
    with composed("train", overrides, tmp_path) as cfg:
        _, objects = train(cfg)
    stage1 = load_stage1(objects["summary"]["best_model_path"], Runtime.create("cpu"))
    assert stage1.kind == "column" and stage1.image_size == 64
    entry = next(p for p in sorted((tiny_root / ".cervspine_cache" / "s64").iterdir()) if p.name[0] != ".")
    study = CachedStudy(entry)
    out = stage1.run(study)
    table = out.frame(study)
    assert list(table.columns) == COLUMNS and len(table) == study.num_slices
    assert ((out.visibility >= 0) & (out.visibility <= 1)).all()
    shown = out.visibility.max(axis=1) >= 0.5
    assert np.isnan(out.boxes[~shown]).all() and np.isfinite(out.boxes[shown]).all()


@pytest.mark.parametrize("recipe", ["vertebrae_column_demo", "fracture_demo"])
def test_the_demo_stage_inputs_do_not_show_the_neck_outline(recipe, tmp_path):
    """The demo's stages read bone only: a study drawn with the neck outline tied to the levels and the
    same study with it drawn at random (generator variant ``neck``) differ on ~10 % of the pixels through
    the bone window and, through the recipe's, only where bone meets the moved soft tissue (< 1 %): stage 1
    must count the level from the bones, stage 2 sees no soft tissue to learn from."""
    from cervspine.config import composed
    from cervspine.data.windows import apply_windows, resolve_windows
    from cervspine.synthetic import PhantomParams, make_phantom

    with composed("train", [f"experiment={recipe}", "print_config=false"], tmp_path) as cfg:
        windows = resolve_windows(list(cfg.data.windows))
    params = dict(size=48, n_slices=50, slice_spacing=2.0, fractured=("C5",))
    ruler = make_phantom(7, PhantomParams(**params)).volume
    free = make_phantom(7, PhantomParams(**params, neck_outline="random")).volume

    def differing(w: list[tuple[float, float]]) -> float:
        return float((np.abs(apply_windows(ruler, w) - apply_windows(free, w)) > 0.02).mean())

    assert differing([WINDOWS["bone"]]) > 0.05
    assert differing(windows) < 0.01
