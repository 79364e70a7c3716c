"""DICOM results of a scored study (``predict study=DIR run_dir=R dicom_out=OUT``): a TID 1500 SR whose
groups point at image regions, a SEG of the levels and key images in the source study, valid for dciodvfy,
read back with highdicom to the study record's numbers and words."""

from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pydicom
import pytest

from cervspine import TARGETS, VERTEBRAE
from tests.helpers import answer_with_true_levels, hydra_config

DCIODVFY = shutil.which("dciodvfy")
PREMOVE = Path(__file__).parent / "data" / "premove"
COMPREHENSIVE_3D_SR = "1.2.840.10008.5.1.4.1.1.88.34"
SECONDARY_CAPTURE = "1.2.840.10008.5.1.4.1.1.7"
SEGMENTATION = "1.2.840.10008.5.1.4.1.1.66.4"


def dciodvfy_errors(path: Path) -> list[str]:
    """The lines dciodvfy reports as errors (warnings are listed by dciodvfy too, and allowed)."""
    done = subprocess.run([DCIODVFY, str(path)], capture_output=True, text=True, timeout=60)
    return [line for line in (done.stdout + done.stderr).splitlines() if line.startswith("Error")]


@pytest.fixture(scope="module")
def predicted(shared_run, tiny_root, tmp_path_factory) -> dict:
    """One synthetic test study predicted with the shared run's models and its operating point."""
    from cervspine.jobs.predict import predict_study_folder

    out = tmp_path_factory.mktemp("dicom_out")
    study = next((tiny_root / "test_images").iterdir())
    overrides = [f"study={study}", f"run_dir={shared_run.dir}", f"dicom_out={out / 'dicom'}"]
    with hydra_config("predict", overrides, out / "run") as cfg:
        pred = predict_study_folder(cfg)
    folder = out / "dicom" / pred.uid
    return {
        "pred": pred,
        "study": study,
        "folder": folder,
        "record": json.loads((out / "run" / "studies" / f"{pred.uid}.json").read_text()),
        "source": [pydicom.dcmread(f, stop_before_pixels=True) for f in sorted(study.glob("*.dcm"))],
        "run": shared_run.dir,
    }


def test_the_sr_reads_back_to_the_study_record(predicted):
    from cervspine.dicom.sr import read_sr

    folder, record, source = predicted["folder"], predicted["record"], predicted["source"]
    found = any(e["present"] for e in record["vertebra_extents"])  # a SEG only of levels stage 1 found
    keys = ["key_1_reformats.dcm", "key_2_probabilities.dcm", "key_3_key_slices.dcm"]
    assert sorted(p.name for p in folder.iterdir()) == [*keys, *(["seg.dcm"] if found else []), "sr.dcm"]
    sr = read_sr(folder / "sr.dcm")
    # stored in percent (what viewers print well): the same numbers to 12 significant digits
    np.testing.assert_allclose(sr.probabilities, [record[t] for t in TARGETS], rtol=1e-12, atol=0)
    assert sr.suspected == record["operating_point"]["fracture_suspected"]
    levels = {level["target"]: level for level in record["levels"]}
    assert sr.labels == {t: levels[t]["statement"] for t in TARGETS}  # the same words as the JSON
    assert sr.localised == {t: levels[t]["localised"] for t in TARGETS}
    assert sr.thresholds["patient_overall"] == pytest.approx(record["operating_point"]["patient"], rel=1e-12)
    assert sr.algorithm_name == "cervspine" and sr.not_for_diagnosis
    assert any("SYNTHETIC" in p for p in sr.algorithm_parameters)  # the study sits in a generated folder
    assert f"p > {record['operating_point']['patient']:.4f} (patient)" in " ".join(sr.algorithm_parameters)
    assert any("NOT FOR DIAGNOSTIC USE" in c for c in sr.comments) and any(
        "SYNTHETIC" in c for c in sr.comments
    )
    # the source instances are the evidence; every group's region is a closed box on a source slice
    sops = {str(d.SOPInstanceUID) for d in source}
    assert {e[2] for e in sr.evidence} == sops and {e[0] for e in sr.evidence} == {sr.study_uid}
    rows, cols = int(source[0].Rows), int(source[0].Columns)
    for target, (sop, line) in sr.regions.items():
        assert sop in sops, target
        assert line.shape == (5, 2) and np.array_equal(line[0], line[-1])
        assert (line >= 0).all() and (line[:, 0] <= cols).all() and (line[:, 1] <= rows).all()
        assert np.ptp(line[:, 0]) > 0 and np.ptp(line[:, 1]) > 0


@pytest.fixture(scope="module")
def localised(tmp_path_factory) -> dict:
    """A study whose every level stage 1 localised (``helpers.answer_with_true_levels``)."""
    from cervspine.io import load_study

    answer = answer_with_true_levels(tmp_path_factory.mktemp("localised"))
    files = load_study(answer["ct"]).files  # slice order: index z is slice z of the volume
    return {**answer, "source": [pydicom.dcmread(f, stop_before_pixels=True) for f in files]}


def test_the_seg_has_one_segment_per_detected_level_on_frames_aligned_to_every_source_slice(localised):
    """One segment per level, SNOMED-coded and labelled with the level's answer; a frame per source slice
    and segment (empty ones too), each naming its source instance; each slice painted with its level,
    stage 1's box, only inside that level's extent."""
    import highdicom as hd

    from cervspine.dicom.codes import SITES
    from cervspine.dicom.regions import slice_levels

    record, source, results = localised["record"], localised["source"], localised["results"]
    seg = hd.seg.segread(results.seg)
    assert seg.SOPClassUID == SEGMENTATION and seg.SegmentationType == "BINARY"
    assert seg.StudyInstanceUID == source[0].StudyInstanceUID
    assert "NOT FOR DIAGNOSTIC USE" in seg.SeriesDescription
    extents = {e["vertebra"]: e for e in record["vertebra_extents"]}
    levels = {level["target"]: level for level in record["levels"]}
    segments = list(seg.SegmentSequence)
    assert [str(s.SegmentedPropertyTypeCodeSequence[0].CodeValue) for s in segments] == [
        SITES[v].value for v in VERTEBRAE
    ]  # every level of this study, C1 first
    assert [str(s.SegmentLabel) for s in segments] == [
        f"{v}: {'fracture suspected' if levels[v]['fracture_suspected'] else 'not suspected'}, "
        f"{100 * levels[v]['probability']:.1f}%"
        for v in VERTEBRAE
    ]
    assert int(seg.NumberOfFrames) == len(source) * len(segments)
    order = [str(d.SOPInstanceUID) for d in source]
    per_frame = [
        str(f.DerivationImageSequence[0].SourceImageSequence[0].ReferencedSOPInstanceUID)
        for f in seg.PerFrameFunctionalGroupsSequence
    ]
    assert sorted(set(per_frame)) == sorted(order) and all(per_frame.count(u) == len(segments) for u in order)
    masks = seg.get_pixels_by_source_instance(source_sop_instance_uids=order, combine_segments=False)
    painted = masks.reshape(len(order), -1, len(segments)).any(axis=1)  # (Z, 7): slice z shows segment s
    expected = slice_levels(localised["pred"].slice_table)
    labels = localised["truth"].labels  # the generator's truth, at the source's resolution
    for s, v in enumerate(VERTEBRAE):
        on = np.flatnonzero(painted[:, s])
        assert np.array_equal(on, np.flatnonzero(expected == s + 1)), v
        assert extents[v]["first_slice"] <= on.min() and on.max() <= extents[v]["last_slice"]
        for z in on:  # the segment is the spine's box on that slice, and the level is really there
            assert (labels[z] == s + 1).any(), (v, z)
            painted_px = np.argwhere(masks[z, ..., s])
            spine_px = np.argwhere((labels[z] >= 1) & (labels[z] <= 7))
            assert np.array_equal(painted_px.min(axis=0), spine_px.min(axis=0))
            assert np.array_equal(painted_px.max(axis=0), spine_px.max(axis=0))


def test_the_sr_sits_in_the_source_study_in_a_new_series(predicted):
    from cervspine.dicom.algorithm import file_sha256
    from cervspine.dicom.sr import read_sr
    from cervspine.runs.layout import stage_checkpoints

    sr = pydicom.dcmread(predicted["folder"] / "sr.dcm")
    src = predicted["source"][0]
    assert sr.SOPClassUID == COMPREHENSIVE_3D_SR and sr.Modality == "SR"
    assert sr.ContentTemplateSequence[0].TemplateIdentifier == "1500"
    assert sr.StudyInstanceUID == src.StudyInstanceUID and sr.PatientID == src.PatientID
    assert sr.SeriesInstanceUID != src.SeriesInstanceUID
    assert sr.SOPInstanceUID not in {d.SOPInstanceUID for d in predicted["source"]}
    # an anonymised source (RSNA-like: no birth date, study date/time, accession): type 2, present, empty
    for keyword in (
        "PatientBirthDate",
        "StudyDate",
        "StudyTime",
        "AccessionNumber",
        "ReferringPhysicianName",
    ):
        assert keyword not in src and keyword in sr and not str(sr.get(keyword) or "")
    assert sr.CompletionFlag == "COMPLETE" and sr.VerificationFlag == "UNVERIFIED"
    assert "NOT FOR DIAGNOSTIC USE" in sr.SeriesDescription
    s1, s2 = stage_checkpoints(predicted["run"])
    text = " ".join(read_sr(predicted["folder"] / "sr.dcm").algorithm_parameters)
    for ckpt in [s1, *(s2 if isinstance(s2, list) else [s2])]:
        assert (
            file_sha256(ckpt) == hashlib.sha256(Path(ckpt).read_bytes()).hexdigest()
            and file_sha256(ckpt) in text
        )


def test_key_images_carry_the_burned_in_notice_each_in_a_series_of_its_own(predicted):
    folder, src = predicted["folder"], predicted["source"][0]
    images = [pydicom.dcmread(p) for p in sorted(folder.glob("key_*.dcm"))]
    assert {d.SOPClassUID for d in images} == {SECONDARY_CAPTURE}
    assert {d.StudyInstanceUID for d in images} == {src.StudyInstanceUID}
    series = {d.SeriesInstanceUID for d in images}  # one image per series: nothing a viewer plays as a loop
    assert len(series) == len(images) == 3 and src.SeriesInstanceUID not in series
    assert len({d.SeriesNumber for d in images}) == 3 and {d.InstanceNumber for d in images} == {1}
    sops = {str(d.SOPInstanceUID) for d in predicted["source"]}
    for d in images:
        assert d.BurnedInAnnotation == "YES" and "NOT FOR DIAGNOSTIC USE" in d.ImageComments
        assert "NOT FOR DIAGNOSTIC USE" in d.SeriesDescription and d.SeriesDescription.startswith("SYNTHETIC")
        px = d.pixel_array
        assert px.ndim == 3 and px.shape[2] == 3 and px.shape[0] > 200
        red, purple = px[5].mean(axis=0), px[34 + 5].mean(axis=0)  # the banners: use notice, SYNTHETIC
        assert red[0] > 150 and red[1] < 120 and purple[2] > 100 and purple[1] < 100
        assert np.abs(px[-5].astype(int) - px[5].astype(int)).mean() < 40  # the notice below as well
    refs = {str(r.ReferencedSOPInstanceUID) for r in images[2].SourceImageSequence}  # the key slices
    assert refs and refs <= sops


@pytest.mark.skipif(DCIODVFY is None, reason="no dciodvfy (Debian package 'dicom3tools'; make dicom-tools)")
def test_dciodvfy_finds_no_error_in_any_result(predicted, localised):
    paths = [*sorted(predicted["folder"].glob("*.dcm")), *localised["results"].files]
    assert "seg.dcm" in {p.name for p in paths}
    for path in paths:
        assert dciodvfy_errors(path) == [], path.name


@pytest.fixture(scope="module")
def premove_predictor():
    from cervspine.inference import Predictor

    return Predictor.from_checkpoints(PREMOVE / "stage1.ckpt", [PREMOVE / "slice.ckpt"], device="cpu")


def test_names_of_a_non_anonymised_source_are_copied_into_the_dicom_results_only(premove_predictor, tmp_path):
    """A source with names, birth date, study date in another character set: the SR and key images copy
    them (UTF-8), valid for dciodvfy; the study record and the file names hold none of it."""
    from cervspine.cache import CacheParams, InMemoryStudy
    from cervspine.dicom.results import results_for_study
    from cervspine.dicom.sr import read_sr
    from cervspine.dicom.worker import study_record
    from cervspine.io import load_study
    from cervspine.report.study import write_study_report
    from cervspine.scoring.thresholds import OperatingThreshold
    from cervspine.synthetic import write_study

    folder = tmp_path / "named"
    write_study(folder, seed=5, size=32, n_slices=24)
    names = {
        "PatientName": "Müller^Jürgen",
        "PatientID": "MRN-0042",
        "PatientBirthDate": "19700101",
        "StudyDate": "20240102",
        "StudyTime": "101500",
        "AccessionNumber": "ACC123",
    }
    for f in folder.glob("*.dcm"):
        ds = pydicom.dcmread(f)
        for k, v in names.items():
            setattr(ds, k, v)
        ds.save_as(f, enforce_file_format=True)
    study = load_study(folder)
    cached = InMemoryStudy(study, CacheParams(image_size=premove_predictor.image_size))
    pred = premove_predictor.predict(cached)
    thresholds = OperatingThreshold(0.05, 0.01, "test rule")
    report = write_study_report(
        tmp_path / "rep", cached, pred, premove_predictor, synthetic=True, threshold=thresholds
    )
    res = results_for_study(
        tmp_path / "out", study, pred, report, premove_predictor, thresholds, synthetic=True
    )
    for path in res.files:
        ds = pydicom.dcmread(path)
        assert ds.SpecificCharacterSet == "ISO_IR 192"
        assert {k: str(ds.get(k)) for k in names} == names
        if DCIODVFY:
            assert dciodvfy_errors(path) == [], path.name
    sr = read_sr(res.sr)
    assert sr.suspected == {t: bool(c) for t, c in zip(TARGETS, thresholds.calls(pred.probabilities))}
    text = json.dumps(study_record(pred, thresholds, "1.2.3")) + " ".join(str(p) for p in tmp_path.rglob("*"))
    assert not any(v in text for v in ("Müller", "Jürgen", "MRN-0042", "ACC123"))


def test_an_sr_without_an_operating_point_has_probabilities_and_no_calls(premove_predictor, tmp_path):
    from cervspine.dicom.algorithm import Algorithm
    from cervspine.dicom.files import write_dataset_atomic
    from cervspine.dicom.regions import Region
    from cervspine.dicom.source import SourceSeries
    from cervspine.dicom.sr import build_sr, read_sr
    from cervspine.synthetic import write_study

    write_study(tmp_path / "s", seed=6, size=32, n_slices=12)
    source = SourceSeries.from_files(sorted((tmp_path / "s").glob("*.dcm")))
    probs = np.linspace(0.1, 0.8, 8)
    regions = {t: Region(3 + i % 2, (1.0, 2.0, 10.0, 12.0), True) for i, t in enumerate(TARGETS)}
    algorithm = Algorithm.of(premove_predictor)
    sr = build_sr(source, probs, None, algorithm, regions, not_localised=["C2"])
    read = read_sr(write_dataset_atomic(sr, tmp_path / "sr.dcm"))
    np.testing.assert_allclose(read.probabilities, probs, rtol=1e-12, atol=0)
    assert set(read.suspected.values()) == {None} and set(read.thresholds.values()) == {None}
    assert read.source_images["C1"] == [source.instance(3)[1]] and read.source_images["C2"] == [
        source.instance(4)[1]
    ]
    assert read.labels["C1"] == "C1: no operating point - probability 10.0%"
    assert read.localised == {t: t != "C2" for t in TARGETS} and "level not localised" in read.labels["C2"]
    assert not any("SYNTHETIC" in p for p in read.algorithm_parameters + read.comments)
    with pytest.raises(ValueError, match="expected 8 probabilities"):
        build_sr(source, probs[:7], None, algorithm, regions)
    with pytest.raises(ValueError, match="no image region for"):
        build_sr(source, probs, None, algorithm, {"C1": regions["C1"]})


def test_a_source_without_patient_attributes_gives_empty_type2_values_not_a_crash(
    premove_predictor, tmp_path
):
    """No PatientName, PatientID, PatientSex (nor dates): the SR and a key image are still valid, with those
    type-2 attributes present and empty; the source's UIDs are kept."""
    from cervspine.dicom.algorithm import Algorithm
    from cervspine.dicom.files import write_dataset_atomic
    from cervspine.dicom.key_images import key_image
    from cervspine.dicom.regions import Region
    from cervspine.dicom.source import TYPE2_PATIENT_STUDY, SourceSeries
    from cervspine.dicom.sr import build_sr
    from cervspine.synthetic import write_study

    write_study(tmp_path / "s", seed=7, size=32, n_slices=10)
    files = sorted((tmp_path / "s").glob("*.dcm"))
    for f in files:
        ds = pydicom.dcmread(f)
        for keyword in ("PatientName", "PatientID", "PatientSex", "PatientAge"):
            delattr(ds, keyword)
        ds.save_as(f, enforce_file_format=True)
    source = SourceSeries.from_files(files)
    algorithm = Algorithm.of(premove_predictor, synthetic=True)
    regions = {t: Region(0, (0.0, 0.0, 32.0, 32.0), False) for t in TARGETS}
    sr = write_dataset_atomic(
        build_sr(source, np.full(8, 0.2), None, algorithm, regions), tmp_path / "sr.dcm"
    )
    rgb = np.zeros((120, 200, 3), np.uint8)
    sc = key_image(source, rgb, "a test figure", algorithm, series_uid="1.2.3.4.5", instance_number=1)
    sc = write_dataset_atomic(sc, tmp_path / "sc.dcm")
    for path in (sr, sc):
        ds = pydicom.dcmread(path)
        assert all(k in ds and not str(ds.get(k) or "") for k in TYPE2_PATIENT_STUDY), path.name
        assert ds.StudyInstanceUID == source.study_uid
        if DCIODVFY:
            assert dciodvfy_errors(path) == [], path.name
    assert pydicom.dcmread(sc).pixel_array.shape == (120 + 3 * 34, 200, 3)  # use, SYNTHETIC, use banners


def test_each_level_points_at_its_most_suspicious_slice_and_a_level_not_found_at_the_whole_slice():
    """The region of a level: stage 1's box (ordered, in source pixels) on the slice of its extent that
    stage 2 scored highest for it — never a slice of another level; a level not localised: the whole
    middle slice; the patient level: the report's first key slice. Where two levels meet, the SEG paints
    the more visible one."""
    import pandas as pd

    from cervspine.data.stage1_table import BOX_COLS, VIS_COLS
    from cervspine.dicom.regions import MIN_BOX_PX, Region, level_regions, slice_levels, source_box

    vis = np.zeros((10, 7))
    vis[0:4, 0] = 0.9  # C1 on slices 0-3
    vis[3:8, 1] = [0.6, 0.9, 0.9, 0.9, 0.7]  # C2 on slices 3-7 (slice 3: C1 is the more visible)
    boxes = np.full((10, 4), np.nan)
    boxes[:8] = [0.25, 0.5, 0.5, 0.75]  # normalised (y0, x0, y1, x1)
    boxes[5] = [0.5, 0.75, 0.25, 0.5]  # the same box given corner-swapped (as an untrained model may)
    table = pd.DataFrame(vis, columns=VIS_COLS)
    table[BOX_COLS] = boxes
    scored = np.array([1, 2, 5, 6])
    probs = np.zeros((4, 7))
    probs[:, 0] = [0.2, 0.7, 0.9, 0.1]  # C1's highest score on slice 5 is outside C1: not its region
    probs[:, 1] = [0.95, 0.0, 0.3, 0.6]
    regions = level_regions(table, scored, probs, 100, 200, not_localised=["C3"], key_slice=5)
    assert regions["C1"] == Region(2, (100.0, 25.0, 150.0, 50.0), True)
    assert regions["C2"] == Region(6, (100.0, 25.0, 150.0, 50.0), True)
    assert regions["C3"] == Region(5, (0.0, 0.0, 200.0, 100.0), False)
    assert regions["patient_overall"] == Region(5, (100.0, 25.0, 150.0, 50.0), True)
    assert slice_levels(table).tolist() == [1, 1, 1, 1, 2, 2, 2, 2, 0, 0]
    c0, r0, c1, r1 = source_box(np.array([0.5, 0.5, 0.5, 0.5]), 100, 200)
    assert c1 - c0 == r1 - r0 == MIN_BOX_PX and (c0 + c1) / 2 == 100.0


def test_dicom_objects_leave_out_what_is_not_asked_and_unknown_ones_are_named(
    shared_run, tiny_root, tmp_path
):
    from cervspine.jobs.predict import predict_study_folder

    study = next((tiny_root / "test_images").iterdir())
    base = [f"study={study}", f"run_dir={shared_run.dir}", f"dicom_out={tmp_path / 'dicom'}"]
    with hydra_config("predict", [*base, "dicom_objects=[sr]"], tmp_path / "run") as cfg:
        pred = predict_study_folder(cfg)
    assert sorted(p.name for p in (tmp_path / "dicom" / pred.uid).iterdir()) == ["sr.dcm"]
    with (
        hydra_config("predict", [*base, "dicom_objects=[sr,pdf]"], tmp_path / "run2") as cfg,
        pytest.raises(ValueError, match=r"unknown \['pdf'\]; choose from \['sr', 'seg', 'key_images'\]"),
    ):
        predict_study_folder(cfg)
