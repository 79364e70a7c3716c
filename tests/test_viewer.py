"""What a radiologist sees of a scored study in a real viewer: the results of ``predict study=… dicom_out=…``
stored with the CT in a private Orthanc (DICOMweb on) and opened in the OHIF Viewer (the npm package's
prebuilt ``dist/``) in headless Chromium. The SR shows every level's answer on its CT slice, the SEG loads
with one segment per detected level, each key image displays on its own; no error anywhere.

Screenshots go to ``$CERVSPINE_TEST_ARTEFACTS/viewer/`` (default ``outputs/test-artefacts/viewer/``)."""

from __future__ import annotations

import importlib.util
import os
import shutil
from pathlib import Path

import pydicom
import pytest

from cervspine.dicom import orthanc
from tests.helpers import answer_with_true_levels
from tests.ohif_page import CHROMIUM, ohif_page

ROOT = Path(__file__).resolve().parents[1]
ARTEFACTS = Path(os.environ.get("CERVSPINE_TEST_ARTEFACTS", ROOT / "outputs" / "test-artefacts")) / "viewer"
OHIF_CACHE = Path(os.environ.get("CERVSPINE_CACHE", Path.home() / ".cache" / "cervspine"))


def _missing() -> str | None:
    if not orthanc.available(dicomweb=True):
        return "no Orthanc with its DICOMweb plugin (Debian 'orthanc', 'orthanc-dicomweb'; make dicom-tools)"
    if not Path(CHROMIUM).is_file():
        return "no chromium (Debian package 'chromium'; make browser)"
    if importlib.util.find_spec("playwright") is None:
        return "no playwright (pip install playwright; the test extras have it)"
    if shutil.which("npm") is None and not (OHIF_CACHE / "ohif-3.13.2" / "dist").is_dir():
        return "no npm to fetch the OHIF Viewer (Debian package 'npm')"
    return None


pytestmark = [pytest.mark.viewer, pytest.mark.skipif(_missing() is not None, reason=str(_missing()))]


@pytest.fixture(scope="module")
def answered(tmp_path_factory) -> dict:
    """A synthetic study and its results, every level localised (``helpers.answer_with_true_levels``)."""
    answer = answer_with_true_levels(tmp_path_factory.mktemp("viewer"))
    return {**answer, "results": answer["results"].folder}


@pytest.fixture(scope="module")
def ohif_dist():
    from cervspine.dicom.ohif import fetch_ohif

    return fetch_ohif(OHIF_CACHE)


def test_ohif_shows_every_level_on_the_ct_the_seg_and_each_key_image(answered, ohif_dist, tmp_path):
    from cervspine.dicom.ohif import OhifServer
    from cervspine.viewer import upload_study

    results = sorted(answered["results"].glob("*.dcm"))
    names = sorted(p.name for p in results)
    assert names == ["key_1_reformats.dcm", "key_2_probabilities.dcm", "key_3_key_slices.dcm", "seg.dcm",
                     "sr.dcm"]  # fmt: skip
    descriptions = {str(pydicom.dcmread(p, stop_before_pixels=True).SeriesDescription) for p in results}
    statements = [level["statement"] for level in answered["record"]["levels"]]
    seg = pydicom.dcmread(answered["results"] / "seg.dcm", stop_before_pixels=True)
    segment_labels = [str(s.SegmentLabel) for s in seg.SegmentSequence]
    shutil.rmtree(ARTEFACTS, ignore_errors=True)
    with (
        orthanc.LocalOrthanc(tmp_path / "pacs", dicomweb=True) as pacs,
        OhifServer(ohif_dist, pacs.url) as server,
        ohif_page(ARTEFACTS) as viewer,
    ):
        assert upload_study(pacs, answered["ct"], answered["results"]) == answered["uid"]
        viewer.open(server.study_url(answered["uid"]))
        browser = viewer.page.inner_text("body")
        assert all(d in browser for d in descriptions), descriptions  # every result series is listed

        # the SR: each group's box on its CT slice, its answer in words and the use notice beside it
        viewer.open_series("SR")
        seen: list[str] = []
        for step in range(len(statements)):
            text = viewer.viewport_text()
            assert "NOT FOR DIAGNOSTIC USE" in text and "Probability:" in text
            seen += [s for s in statements if s in text and s not in seen]
            viewer.screenshot(f"sr_group_{step + 1}")
            viewer.next_measurement()
        assert sorted(seen) == sorted(statements)
        assert not viewer.visible_errors()

        # the SEG: loaded over the CT, one segment per detected level, labelled with its answer
        viewer.open_series("SEG")
        viewer.answer("Do you want to open this Segmentation?", "Yes")
        viewer.page.wait_for_timeout(5000)
        panel = viewer.open_panel("panelSegmentation-btn")
        assert all(label in panel for label in segment_labels), (segment_labels, panel)
        viewer.screenshot("seg_overlay")
        assert not viewer.visible_errors()

        # the key images: each the one image of its series, displayed (not a loop of several)
        for i in range(3):
            viewer.open_series("OT", i)
            text = viewer.viewport_text()
            assert "NOT FOR DIAGNOSTIC USE" in text and "1/1" in text, text
            viewer.screenshot(f"key_image_{i + 1}")
        assert not viewer.visible_errors()


def test_an_ohif_package_that_is_not_the_pinned_one_is_refused_and_not_unpacked(tmp_path):
    from cervspine.dicom.ohif import OHIF_VERSION, fetch_ohif, npm_integrity

    with pytest.raises(RuntimeError, match="is not the pinned sha512-AAAA"):
        fetch_ohif(tmp_path, integrity="sha512-AAAA")
    assert list(tmp_path.iterdir()) == []  # no half-unpacked folder left to be used later
    (tmp_path / "f").write_bytes(b"cervspine")
    assert npm_integrity(tmp_path / "f").startswith("sha512-") and OHIF_VERSION == "3.13.2"
