"""Stage 2 per-vertebra sequences: crop geometry, augmentation, the model, training and the pipeline."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import albumentations as A
import cv2
import numpy as np
import pandas as pd
import pytest
import torch

from cervspine import TARGETS, VERTEBRAE
from cervspine.cache import CachedStudy
from cervspine.data.sequence import StudyGeometry, VertebraSequenceDataset
from cervspine.data.spine import crop_pixels
from cervspine.data.vertebra_crops import VertebraCropper, VertebraExtent, study_sequences
from cervspine.models.safe_load import load_checkpoint
from cervspine.models.sequence import VertebraSequenceClassifier
from cervspine.scoring.aggregation import vertebra_rows
from cervspine.scoring.metrics import prior_baseline
from tests.helpers import SEQ, TINY_DATA, TINY_STAGE2, hydra_config, tiny_pipeline_overrides


@pytest.fixture(scope="module")
def cache(tiny_cache) -> Path:
    """The tiny folder's cache at 64² (the one the training tests use; built by the tiny_root fixture)."""
    return tiny_cache


def _studies(cache: Path, *, seg: bool) -> list[CachedStudy]:
    out = [CachedStudy(p) for p in sorted(cache.iterdir()) if (p / "meta.json").is_file()]
    return [s for s in out if (s.seg is not None) == seg]


def _inside(seg: np.ndarray, extent: VertebraExtent, z: slice | np.ndarray) -> float:
    """Share of the vertebra's labelled pixels on slices ``z`` that fall inside its crop."""
    y0, x0, y1, x1 = crop_pixels(np.asarray(extent.box), *seg.shape[1:])
    m = np.asarray(seg[z]) == extent.vertebra + 1
    return m[:, y0:y1, x0:x1].sum() / max(m.sum(), 1)


def _truncated(study: CachedStudy, start: int, stop: int) -> SimpleNamespace:
    """The study as a scan that only covered slices [start, stop)."""
    return SimpleNamespace(
        volume=np.asarray(study.volume[start:stop]),
        seg=np.asarray(study.seg[start:stop]),
        presence=study.vertebra_presence(0.1)[start:stop],
        boxes=study.spine_box[start:stop],
    )


# ---- crop geometry -------------------------------------------------------------------------------
def test_segmentation_crops_contain_their_vertebra(cache):
    cropper = VertebraCropper(n_slices=6, input_size=32, mask="auto")
    for study in _studies(cache, seg=True):
        presence = study.vertebra_presence(0.1)
        extents = cropper.extents_from_segmentation(study.seg, presence)
        for e in extents:
            assert e.present and e.source == "segmentation"
            hit = np.flatnonzero(presence[:, e.vertebra])
            assert e.z0 <= hit[0] and hit[-1] <= e.z1  # the range covers every slice showing it
            assert _inside(study.seg, e, hit) == 1.0  # the box holds all of its mask there
            y0, x0, y1, x1 = e.box
            assert 0 <= y0 < y1 <= 1 and 0 <= x0 < x1 <= 1 and np.isclose(y1 - y0, x1 - x0)
        images, slices, present = study_sequences(
            cropper, study.volume, extents, presence, study.spine_box, study.seg
        )
        assert images.shape == (7, 6, cropper.channels, 32, 32) and present.all()
        assert (np.diff(slices, axis=1) >= 0).all()
        centre = slices[:, slices.shape[1] // 2]
        assert (np.diff(centre) > 0).all()  # C1 above C2 above … C7: superior first
        assert (images[:, :, -1].reshape(7, -1).max(axis=1) > 0.5).all()  # the seg mask channel


def test_stage1_crops_hold_nearly_all_of_their_vertebra(cache):
    cropper = VertebraCropper(n_slices=6, input_size=32)
    for study in _studies(cache, seg=True):
        presence = study.vertebra_presence(0.1)
        for e in cropper.extents_from_stage1(presence, study.spine_box):
            assert e.present and e.source == "stage1"
            assert _inside(study.seg, e, np.flatnonzero(presence[:, e.vertebra])) > 0.97


def test_sequence_reads_the_cache_slices_it_names(cache):
    study = _studies(cache, seg=True)[0]
    cropper = VertebraCropper(n_slices=5, input_size=16, offsets=(-2, 0, 2))
    e = cropper.extents_from_segmentation(study.seg, study.vertebra_presence(0.1))[3]
    x, zs = cropper.sequence(study.volume, e)
    h, w = study.volume.shape[1:]
    y0, x0, y1, x1 = crop_pixels(np.asarray(e.box), h, w)
    lo, hi = cropper.windows[0]
    for i, z in enumerate(zs):
        expect = np.clip((np.asarray(study.volume[z, y0:y1, x0:x1], np.float32) - lo) / (hi - lo), 0, 1)
        expect = cv2.resize(expect, (16, 16), interpolation=cv2.INTER_AREA)
        np.testing.assert_allclose(x[i, 1], expect, atol=1e-5)  # the centre channel is slice z


def test_reversed_studies_are_superior_first(cache):
    """File number 1 = most inferior slice in these studies; crops still run C1 → C7, mask-aligned."""
    reversed_ = [s for s in _studies(cache, seg=True) if s.meta["stored_reversed"]]
    assert reversed_, "the tiny folder should hold a reversed segmented study"
    cropper = VertebraCropper(n_slices=6, input_size=32, mask="auto")
    for study in reversed_:
        numbers = np.asarray(study.meta["instance_numbers"])
        assert (np.diff(numbers) < 0).all()  # index 0 (most superior) has the highest file number
        presence = study.vertebra_presence(0.1)
        for make in (cropper.extents_from_segmentation, None):
            extents = (
                make(study.seg, presence) if make else cropper.extents_from_stage1(presence, study.spine_box)
            )
            starts = [e.z0 for e in extents]
            assert starts == sorted(starts) and starts[0] < starts[-1]
            for e in extents:
                assert _inside(study.seg, e, np.flatnonzero(presence[:, e.vertebra])) > 0.97


def test_vertebrae_cut_by_the_scan_edge(cache):
    study = _studies(cache, seg=True)[0]
    cropper = VertebraCropper(n_slices=6, input_size=32, mask="box")
    presence = study.vertebra_presence(0.1)
    c1 = np.flatnonzero(presence[:, 0])
    c7 = np.flatnonzero(presence[:, 6])
    # the scan starts inside C1 and stops inside C7: both kept, ranges clipped, flagged truncated
    cut = _truncated(study, int(c1[len(c1) // 2]), int(c7[len(c7) // 2]) + 1)
    for extents in (
        cropper.extents_from_segmentation(cut.seg, cut.presence),
        cropper.extents_from_stage1(cut.presence, cut.boxes),
    ):
        assert all(e.present for e in extents)
        assert extents[0].z0 == 0 and extents[0].truncated
        assert extents[6].z1 == len(cut.volume) - 1 and extents[6].truncated
        assert not any(e.truncated for e in extents[1:6])
        _, slices, _ = study_sequences(cropper, cut.volume, extents, cut.presence, cut.boxes)
        assert slices.min() >= 0 and slices.max() < len(cut.volume)
    # the scan starts below C1: C1 is absent → zeros, -1 slices, present False; the others are fine
    cut = _truncated(study, int(c1[-1]) + 1, study.num_slices)
    for extents in (
        cropper.extents_from_segmentation(cut.seg, cut.presence),
        cropper.extents_from_stage1(cut.presence, cut.boxes),
    ):
        assert not extents[0].present and all(e.present for e in extents[1:])
        images, slices, present = study_sequences(cropper, cut.volume, extents, cut.presence, cut.boxes)
        assert not present[0] and present[1:].all()
        assert not images[0].any() and (slices[0] == -1).all() and images[1:, :, :-1].any()


def test_stage1_ranges_are_robust_to_strays_and_an_under_confident_stage1():
    vis = np.zeros((60, 7), dtype=np.float32)
    vis[10:20, 2] = 0.9
    vis[45, 2] = 0.6  # one spurious slice far away
    vis[20:30, 3] = 0.35  # under-confident but clearly there
    vis[[24, 25], 3] = 0.4
    vis[30:40, 4] = 0.15  # too weak to count
    boxes = np.tile(np.float32([0.4, 0.4, 0.6, 0.6]), (60, 1))
    boxes[20:30] = np.nan  # no box where C4 shows: the study's other boxes place it
    extents = VertebraCropper(z_margin=0.0, margin=0.0).extents_from_stage1(vis, boxes)
    assert (extents[2].z0, extents[2].z1) == (10, 19)
    assert extents[3].present and (extents[3].z0, extents[3].z1) == (20, 29)
    np.testing.assert_allclose(extents[3].box, [0.4, 0.4, 0.6, 0.6], atol=1e-6)
    assert [e.present for e in extents] == [False, False, True, True, False, False, False]


def test_box_mask_is_the_visibility_weighted_spine_box():
    vol = np.zeros((20, 64, 64), dtype=np.int16)
    vis = np.zeros((20, 7), dtype=np.float32)
    vis[5:15, 0] = 0.8
    boxes = np.full((20, 4), np.nan, dtype=np.float32)
    boxes[5:14] = [0.25, 0.25, 0.75, 0.75]  # slice 14 has no box
    cropper = VertebraCropper(n_slices=10, input_size=32, margin=0.5, z_margin=0.0, mask="box")
    e = cropper.extents_from_stage1(vis, boxes)[0]
    x, zs = cropper.sequence(vol, e, vis, boxes)
    mask = x[:, -1]
    assert x.shape == (10, 4, 32, 32)
    np.testing.assert_allclose(mask[zs < 14].max(axis=(1, 2)), 0.8)
    assert not mask[zs == 14].any()
    assert mask[0, 16, 16] == pytest.approx(0.8) and mask[0, 0, 0] == 0  # box in the middle of the crop


# ---- dataset augmentation ------------------------------------------------------------------------
def _dataset(cache: Path, augment: A.Compose | None, mask: str = "box") -> VertebraSequenceDataset:
    study = _studies(cache, seg=True)[0]
    cropper = VertebraCropper(n_slices=5, input_size=32, mask=mask)
    presence = study.vertebra_presence(0.1)
    geo = StudyGeometry(presence, study.spine_box, cropper.extents_from_stage1(presence, study.spine_box))
    return VertebraSequenceDataset([study], [geo], [(0, tuple(range(7)))], cropper, np.ones((1, 8)), augment)


def test_augmentation_is_one_draw_for_all_slices_of_a_sequence(cache):
    plain = _dataset(cache, None)[0]["image"].numpy()
    flipped = _dataset(cache, A.Compose([A.HorizontalFlip(p=1.0)]))[0]["image"].numpy()
    np.testing.assert_allclose(flipped, plain[..., ::-1], atol=1e-6)  # image and mask channels alike
    ds = _dataset(cache, A.Compose([A.Affine(rotate=(-30, 30), translate_percent=(-0.1, 0.1), p=1.0)]))
    geo = ds.geometry[0]
    x, _ = ds.cropper.sequence(ds.studies[0].volume, geo.extents[3], geo.vis, geo.boxes)
    same = np.repeat(x[2:3], 5, axis=0)  # a sequence of one slice repeated: every slice must move alike
    out = ds._augment(same)
    for i in range(1, 5):
        np.testing.assert_allclose(out[i], out[0], atol=1e-6)
    assert not np.allclose(out[0], same[0], atol=1e-3)


# ---- model ---------------------------------------------------------------------------------------
def _model(**kw) -> VertebraSequenceClassifier:
    opt = lambda params: torch.optim.AdamW(params, lr=1e-3)
    return VertebraSequenceClassifier({"name": "resnet18"}, in_chans=3, optimizer=opt, rnn_hidden=16, **kw)


def test_study_head_starts_as_the_noisy_or_and_absent_vertebrae_take_the_prior():
    model = _model().eval()
    x = torch.rand(2, 7, 3, 3, 32, 32)
    present = torch.ones(2, 7)
    present[1, 0] = 0
    with torch.no_grad():
        out = model(x, torch.arange(7).expand(2, 7), present)
    p = torch.sigmoid(out["vertebra"])
    p[1, 0] = model.prior[0]
    np.testing.assert_allclose(torch.sigmoid(out["overall"]), 1 - torch.prod(1 - p, dim=1), rtol=1e-4)
    preds = model.predict_study(x[1], present[1])
    assert preds.shape == (8,) and preds[0] == pytest.approx(float(model.prior[0]))
    np.testing.assert_allclose(preds[1:7], p[1, 1:].numpy(), rtol=1e-4)


def test_vertebra_rows_without_head_use_noisy_or_and_prior():
    prior = np.array([0.1] * 7 + [0.5])
    probs = np.array([0.2, 0.3, 0.9, 0.0, 0.0, 0.0, 0.0])
    present = np.array([1, 1, 0, 1, 1, 1, 1])
    preds, seen = vertebra_rows(probs, present, np.arange(7), np.zeros(7), prior)
    expect = np.array([0.2, 0.3, 0.1, 1e-4, 1e-4, 1e-4, 1e-4])
    np.testing.assert_allclose(preds[0, :7], expect, atol=1e-9)
    assert preds[0, 7] == pytest.approx(1 - np.prod(1 - np.array([0.2, 0.3, 0.1])), abs=1e-6)
    none, _ = vertebra_rows(probs, np.zeros(7), np.arange(7), np.zeros(7), prior)
    np.testing.assert_allclose(none[0], prior)  # nothing visible: the prior throughout
    assert seen == [0]


def test_encoder_initialised_from_a_slice_classifier_checkpoint(tmp_path):
    from cervspine.models.sequence import load_encoder

    source = _model()
    torch.nn.init.normal_(source.encoder.conv1.weight)
    path = tmp_path / "slice.ckpt"
    torch.save({"state_dict": {f"backbone.{k}": v for k, v in source.encoder.state_dict().items()}}, path)
    model = _model(encoder_init=str(path))
    assert not torch.equal(model.encoder.conv1.weight, source.encoder.conv1.weight)
    model.setup("fit")  # a fresh fit loads it; inference (load_from_checkpoint) does not
    assert torch.equal(model.encoder.conv1.weight, source.encoder.conv1.weight)
    other = VertebraSequenceClassifier({"name": "resnet18"}, in_chans=4, optimizer=None, rnn_hidden=8)
    with pytest.raises(ValueError, match="does not fit"):
        load_encoder(other.encoder, str(path))


def test_lstm_and_pooling_variants_run():
    for kw in ({"rnn": "lstm", "pooling": "mean"}, {"rnn": "gru", "pooling": "max", "study_head": False}):
        out = _model(**kw)(torch.rand(3, 1, 4, 3, 32, 32), torch.tensor([[0], [3], [6]]))
        assert out["vertebra"].shape == (3, 1) and "overall" not in out


# ---- training through the real configs -----------------------------------------------------------
def _train_overrides(tiny_root: Path, *extra: str) -> list[str]:
    return [
        "experiment=fracture_seq_demo",
        f"data.root={tiny_root}",
        *TINY_DATA,
        *TINY_STAGE2,
        *SEQ,
        "print_config=false",
        *extra,
    ]


def test_study_sample_mode_with_box_mask_trains(tiny_root, tmp_path):
    """The other design: one study (7 sequences) per sample, patient_overall from the study head."""
    from cervspine.train import train

    ov = _train_overrides(
        tiny_root,
        "data.sample=study",
        "data.pos_fraction=null",
        "data.batch_size=2",
        "data.mask=box",
        "model.backbone.name=test_resnet",
        "model.study_head=true",
        "model.rnn=lstm",
        "trainer.max_epochs=1",
        "+trainer.limit_train_batches=2",
    )
    with hydra_config("train", ov, tmp_path) as cfg:
        assert cfg.model.in_chans == 4
        metrics, objects = train(cfg)
    assert objects["trainer"].global_step == 2
    assert 0 < metrics["val/rsna_score"] < 10 and "val/auroc_patient_overall" in metrics
    ckpt = load_checkpoint(objects["summary"]["best_model_path"])
    assert ckpt["model_class"] == "VertebraSequenceClassifier"
    assert ckpt["datamodule_hyper_parameters"]["n_slices"] == 4
    assert ckpt["datamodule_hyper_parameters"]["synthetic"] is True  # recorded at training time
    assert "study_head.weight" in ckpt["state_dict"]
    dm = objects["datamodule"]
    expect = prior_baseline(dm.labels(dm.train_uids))  # absent vertebrae fall back to the training prior
    np.testing.assert_allclose(ckpt["state_dict"]["prior"].numpy(), expect, rtol=1e-6)
    assert not ckpt["state_dict"]["logit_shift"].any()  # natural sampling: nothing to undo


# ---- the pipeline with the sequence model (the shared run's stage2_seq/) ---------------------------
@pytest.fixture(scope="module")
def seq_answers(shared_run, tiny_root, tmp_path_factory) -> Path:
    """The shared run's stage 1 + sequence model alone (a demo_seq run's models): its evaluate and predict
    steps' outputs, the pipeline's own task configs with those checkpoints."""
    from cervspine.jobs.evaluate import evaluate
    from cervspine.jobs.pipeline import task_config
    from cervspine.jobs.predict import predict_folder

    out = tmp_path_factory.mktemp("seq_answers")
    with hydra_config("pipeline", tiny_pipeline_overrides(tiny_root, "demo_seq", stage2=SEQ), out) as cfg:
        assert cfg.stage2.experiment == "fracture_seq_demo"
        for task in ("evaluate", "predict"):
            task_cfg = task_config(cfg, task, out, shared_run.stage1, [shared_run.seq_stage2])
            evaluate(task_cfg) if task == "evaluate" else predict_folder(task_cfg)
    return out


def test_pipeline_with_the_sequence_model(shared_run, seq_answers, tiny_root):
    ckpt = load_checkpoint(shared_run.seq_stage2)
    assert ckpt["model_class"] == "VertebraSequenceClassifier"
    assert ckpt["datamodule_hyper_parameters"]["sample"] == "vertebra"
    assert ckpt["state_dict"]["logit_shift"][0] > 0.5  # positives oversampled: evaluation undoes it
    out = seq_answers
    sub = pd.read_csv(out / "submission.csv")
    test = pd.read_csv(tiny_root / "test.csv")
    assert sub["row_id"].tolist() == test["row_id"].tolist()
    assert ((sub["fractured"] > 0) & (sub["fractured"] < 1)).all()
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["stage2_ckpt"] == str(shared_run.seq_stage2)
    assert np.isfinite(metrics["rsna_score"]) and "SYNTHETIC" in metrics["note"]
    for uid in test["StudyInstanceUID"].unique():
        record = json.loads((out / "studies" / f"{uid}.json").read_text())
        assert set(TARGETS) <= set(record) and len(record["vertebra_extents"]) == 7
        stage2 = record["stage2"]
        assert stage2["model"] == "VertebraSequenceClassifier"
        assert list(stage2["vertebrae"]) == list(VERTEBRAE)
        for v in VERTEBRAE:
            info = stage2["vertebrae"][v]
            assert len(info["slices"]) == 4 and info["probability"] == pytest.approx(record[v], abs=1e-4)


def test_predict_single_study_with_the_sequence_model(shared_run, seq_answers, tiny_root, tmp_path):
    from cervspine.predict import predict_study_folder

    folder = next((tiny_root / "test_images").iterdir())
    ckpts = [f"ckpt.stage1={shared_run.stage1}", f"ckpt.stage2={shared_run.seq_stage2}"]
    with hydra_config("predict", [f"study={folder}", *ckpts, f"data.root={tiny_root}"], tmp_path) as cfg:
        pred = predict_study_folder(cfg)
    assert pred.probabilities.shape == (8,)
    assert pred.fracture_probs.shape == (len(pred.fracture_slices), 7)
    cached = json.loads((seq_answers / "studies" / f"{folder.name}.json").read_text())
    np.testing.assert_allclose([cached[t] for t in TARGETS], pred.probabilities, rtol=1e-4, atol=1e-5)


def test_pipeline_with_a_stage2_ensemble(shared_run, tiny_root, tmp_path):
    """experiment=demo_ensemble: slice classifier + sequence model on one stage 1, answered as the mean
    of their study logits by the pipeline, and by evaluate/predict given only the run folder."""
    from cervspine.predict import predict_study_folder

    out = shared_run.dir
    steps = json.loads((out / "steps.json").read_text())
    assert {"train_stage2", "train_stage2_seq"} <= set(steps)
    metrics = json.loads((out / "metrics.json").read_text())
    assert [Path(p).parent.parent.name for p in metrics["stage2_ckpt"]] == ["stage2", "stage2_seq"]
    folder = next((tiny_root / "test_images").iterdir())
    record = json.loads((out / "studies" / f"{folder.name}.json").read_text())
    members = record["stage2"]["members"]
    assert len(members) == 2
    p = np.array([[m[t] for t in TARGETS] for m in members]).clip(1e-4, 1 - 1e-4)
    mean_logit = np.log(p / (1 - p)).mean(axis=0)
    np.testing.assert_allclose([record[t] for t in TARGETS], 1 / (1 + np.exp(-mean_logit)), rtol=1e-4)
    with hydra_config(
        "predict", [f"study={folder}", f"run_dir={out}", f"data.root={tiny_root}"], tmp_path
    ) as c:
        pred = predict_study_folder(c)  # the run folder alone: both members found
    np.testing.assert_allclose(pred.probabilities, [record[t] for t in TARGETS], rtol=1e-4, atol=1e-5)
    card = (out / "MODEL_CARD.md").read_text()
    assert "stage2_seq" in card and "mean of their study logits" in card
    # the fixture's second run of the same command: every step current, the ensemble members included
    assert shared_run.mtimes_after_rerun["metrics.json"] == shared_run.mtimes_after_run["metrics.json"]
    assert shared_run.mtimes_after_rerun == shared_run.mtimes_after_run
