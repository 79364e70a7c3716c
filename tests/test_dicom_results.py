"""DICOM results of a scored study (``predict study=DIR run_dir=R dicom_out=OUT``): a TID 1500 SR and key
images in the source study, valid for dciodvfy, read back with highdicom to the study record's numbers."""

from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pydicom
import pytest

from cervspine import TARGETS
from tests.helpers import hydra_config

DCIODVFY = shutil.which("dciodvfy")
PREMOVE = Path(__file__).parent / "data" / "premove"
COMPREHENSIVE_3D_SR = "1.2.840.10008.5.1.4.1.1.88.34"
SECONDARY_CAPTURE = "1.2.840.10008.5.1.4.1.1.7"


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
    assert sorted(p.name for p in folder.iterdir()) == [
        "key_1_reformats.dcm",
        "key_2_probabilities.dcm",
        "key_3_key_slices.dcm",
        "sr.dcm",
    ]
    sr = read_sr(folder / "sr.dcm")
    np.testing.assert_array_equal(sr.probabilities, [record[t] for t in TARGETS])  # exact: FD values
    assert sr.suspected == record["operating_point"]["fracture_suspected"]
    assert sr.algorithm_name == "cervspine" and sr.not_for_diagnosis
    assert any("SYNTHETIC" in p for p in sr.algorithm_parameters)  # the study sits in a generated folder
    assert f"p > {record['operating_point']['patient']:.4f} (patient)" in " ".join(sr.algorithm_parameters)
    # the source instances are the evidence, and the key slices are source instances
    sops = {str(d.SOPInstanceUID) for d in source}
    assert {e[2] for e in sr.evidence} == sops and {e[0] for e in sr.evidence} == {sr.study_uid}
    assert all(set(refs) <= sops and refs for refs in sr.source_images.values())
    assert len(sr.source_images["patient_overall"]) == 3  # the report's key slices


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


def test_key_images_carry_the_burned_in_notice(predicted):
    folder, src = predicted["folder"], predicted["source"][0]
    images = [pydicom.dcmread(p) for p in sorted(folder.glob("key_*.dcm"))]
    assert {d.SOPClassUID for d in images} == {SECONDARY_CAPTURE}
    assert {d.StudyInstanceUID for d in images} == {src.StudyInstanceUID}
    assert (
        len({d.SeriesInstanceUID for d in images}) == 1
        and images[0].SeriesInstanceUID != src.SeriesInstanceUID
    )
    sops = {str(d.SOPInstanceUID) for d in predicted["source"]}
    for d in images:
        assert d.BurnedInAnnotation == "YES" and "NOT FOR DIAGNOSTIC USE" in d.ImageComments
        px = d.pixel_array
        assert px.ndim == 3 and px.shape[2] == 3 and px.shape[0] > 200
        red, purple = px[5].mean(axis=0), px[34 + 5].mean(axis=0)  # the banners: use notice, SYNTHETIC
        assert red[0] > 150 and red[1] < 120 and purple[2] > 100 and purple[1] < 100
        assert np.abs(px[-5].astype(int) - px[5].astype(int)).mean() < 40  # the notice below as well
    refs = {str(r.ReferencedSOPInstanceUID) for r in images[2].SourceImageSequence}  # the key slices
    assert refs and refs <= sops


@pytest.mark.skipif(DCIODVFY is None, reason="no dciodvfy (Debian package 'dicom3tools'; make dicom-tools)")
def test_dciodvfy_finds_no_error_in_any_result(predicted):
    for path in sorted(predicted["folder"].glob("*.dcm")):
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
    from cervspine.dicom.source import SourceSeries
    from cervspine.dicom.sr import build_sr, read_sr
    from cervspine.synthetic import write_study

    write_study(tmp_path / "s", seed=6, size=32, n_slices=12)
    source = SourceSeries.from_files(sorted((tmp_path / "s").glob("*.dcm")))
    probs = np.linspace(0.1, 0.8, 8)
    sr = build_sr(source, probs, None, Algorithm.of(premove_predictor), {"C1": [3]})
    read = read_sr(write_dataset_atomic(sr, tmp_path / "sr.dcm"))
    np.testing.assert_array_equal(read.probabilities, probs)
    assert set(read.suspected.values()) == {None} and read.source_images["C1"] == [source.instance(3)[1]]
    assert not any("SYNTHETIC" in p for p in read.algorithm_parameters)
    with pytest.raises(ValueError, match="expected 8 probabilities"):
        build_sr(source, probs[:7], None, Algorithm.of(premove_predictor), {})


def test_a_source_without_patient_attributes_gives_empty_type2_values_not_a_crash(
    premove_predictor, tmp_path
):
    """No PatientName, PatientID, PatientSex (nor dates): the SR and a key image are still valid, with those
    type-2 attributes present and empty; the source's UIDs are kept."""
    from cervspine.dicom.algorithm import Algorithm
    from cervspine.dicom.files import write_dataset_atomic
    from cervspine.dicom.key_images import key_image
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
    sr = write_dataset_atomic(build_sr(source, np.full(8, 0.2), None, algorithm, {}), tmp_path / "sr.dcm")
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
