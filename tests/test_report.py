"""Reports: evaluation and per-study figures + HTML (checked in headless Chromium), W&B images, model card."""

from __future__ import annotations

import base64
import io
import re
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from cervspine import TARGETS
from tests.helpers import hydra_config

CHROMIUM = Path("/usr/bin/chromium")
DATA_URI = re.compile(r'<img [^>]*src="data:image/png;base64,([A-Za-z0-9+/=]+)"')


@pytest.fixture(scope="module")
def report_run(shared_run) -> Path:
    """The shared tiny pipeline run, made with ``report=true`` for its evaluate and predict steps:
    evaluation report, study reports, model card."""
    return shared_run.dir


def _fake(n: int = 120, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Labels (n, 8) with patient_overall = any vertebra, and informative noisy predictions."""
    rng = np.random.default_rng(seed)
    y = (rng.random((n, 8)) < 0.25).astype(np.float64)
    y[:, 7] = y[:, :7].max(axis=1)
    return y, np.clip(0.3 * y + 0.7 * rng.random((n, 8)), 0, 1)


def _png_ok(path_or_bytes: Path | bytes) -> Image.Image:
    data = path_or_bytes if isinstance(path_or_bytes, bytes) else Path(path_or_bytes).read_bytes()
    assert data.startswith(b"\x89PNG") and len(data) > 5_000
    img = Image.open(io.BytesIO(data))
    img.load()
    assert min(img.size) > 200 and np.asarray(img.convert("L")).std() > 5  # not blank
    return img


# ----------------------------------------------------------------------------- statistics


def test_youden_threshold_maximises_j_and_sits_between_scores():
    from cervspine.scoring.thresholds import youden_j, youden_threshold

    y, p = _fake(300, seed=1)
    t = youden_threshold(y[:, 2], p[:, 2])
    grid = np.unique(np.concatenate([p[:, 2], np.linspace(0, 1, 1001)]))
    best = max(youden_j(y[:, 2], p[:, 2], g) for g in grid)
    assert youden_j(y[:, 2], p[:, 2], t) == pytest.approx(best)
    assert not np.isclose(p[:, 2], t).any()  # halfway between scores: > and >= agree
    assert youden_threshold(np.zeros(5), np.linspace(0, 1, 5)) == 0.5  # one class: no rule, 0.5


def test_operating_threshold_is_youden_unless_given():
    from cervspine.scoring.thresholds import YOUDEN_RULE, choose_thresholds, youden_threshold

    y, p = _fake()
    chosen = choose_thresholds(y, p)
    assert chosen.rule == YOUDEN_RULE and "Youden" in chosen.rule
    assert chosen.vertebra == youden_threshold(y[:, :7], p[:, :7])
    assert chosen.patient == youden_threshold(y[:, 7], p[:, 7])
    given = choose_thresholds(y, p, 0.3)
    assert (given.vertebra, given.patient) == (0.3, 0.3) and "given" in given.rule
    both = choose_thresholds(y, p, {"vertebra": 0.2, "patient": 0.6})
    assert both.per_target().tolist() == [0.2] * 7 + [0.6]


def test_bootstrap_intervals_bracket_the_point_estimates_and_match_torchmetrics():
    from cervspine.scoring.metrics import METRICS, bootstrap_table, classification_report
    from cervspine.scoring.thresholds import OperatingThreshold

    y, p = _fake(150, seed=2)
    table = bootstrap_table(y, p, OperatingThreshold(0.45, 0.45, "test"), n_boot=400)
    reference = classification_report(y, p, threshold=0.45)
    for name in TARGETS:
        for m in METRICS:
            lo, hi = table[name][f"{m}_ci95"]
            assert lo <= table[name][m] <= hi, (name, m, lo, table[name][m], hi)
            assert lo < hi
            assert table[name][m] == pytest.approx(reference[name][m], abs=1e-6)


# ----------------------------------------------------------------------------- figures


def test_figures_carry_the_synthetic_label_only_when_synthetic():
    from cervspine.report import figures

    y, p = _fake()
    t = np.full(8, 0.5)
    for synthetic in (True, False):
        figs = [
            figures.roc_figure(y, p, t, synthetic),
            figures.pr_figure(y, p, t, synthetic),
            figures.calibration_figure(y, p, synthetic),
            figures.confusion_figure(y, p, t, synthetic),
        ]
        assert all(figures.has_synthetic_mark(f) is synthetic for f in figs)


def test_evaluation_report_given_threshold_and_real_data(tmp_path):
    import json

    from cervspine.report.evaluation import write_evaluation_report

    y, p = _fake()
    rep = write_evaluation_report(tmp_path, y, p, synthetic=False, threshold=0.35, n_boot=50)
    saved = json.loads((tmp_path / "report.json").read_text())
    assert saved["thresholds"]["vertebra"] == 0.35 and "given" in saved["thresholds"]["rule"]
    assert saved["rsna_score_ci95"][0] <= saved["rsna_score"] <= saved["rsna_score_ci95"][1]
    page = rep.html.read_text()
    assert "SYNTHETIC DATA" not in page and 'data-synthetic="false"' in page
    assert len(DATA_URI.findall(page)) == 4


# ----------------------------------------------------------------------------- evaluation report


def test_evaluation_report_writes_figures_and_a_self_contained_page(report_run):
    import json

    rep = report_run / "report"
    for name in ("roc", "pr", "calibration", "confusion"):
        _png_ok(rep / f"{name}.png")
    page = (rep / "report.html").read_text()
    embedded = DATA_URI.findall(page)
    assert len(embedded) == 4 and page.count("<img ") == 4
    for b64 in embedded:
        _png_ok(base64.b64decode(b64))
    assert "SYNTHETIC DATA" in page and 'id="synthetic-banner"' in page
    assert 'src="http' not in page and 'href="http' not in page  # nothing external
    saved = json.loads((rep / "report.json").read_text())
    from cervspine.jobs.operating_point import load_operating_point

    rule = load_operating_point(report_run).thresholds().rule  # the run's operating point (evaluate.yaml)
    assert saved["thresholds"]["rule"] == rule and rule in page
    for name in TARGETS:
        assert name in page and set(saved["per_target"][name]) >= {"f1_ci95", "auroc_ci95", "recall_ci95"}


# ----------------------------------------------------------------------------- study report


def test_study_reports_for_the_test_folder(report_run, tiny_root):
    uids = sorted(p.name for p in (tiny_root / "test_images").iterdir())
    for uid in uids:
        folder = report_run / "study_reports" / uid
        for name in ("reformats", "probabilities", "key_slices"):
            _png_ok(folder / f"{name}.png")
        page = (folder / "report.html").read_text()
        assert uid in page and "SYNTHETIC DATA" in page and len(DATA_URI.findall(page)) == 3
    index = (report_run / "study_reports" / "index.html").read_text()
    assert all(f'href="{uid}/report.html"' in index for uid in uids)


PREMOVE = Path(__file__).parent / "data" / "premove"


@pytest.mark.parametrize("models", ["premove", "shared_run"])
def test_gradcam_overlay_on_the_stage2_model(models, request, tmp_path):
    """Grad-CAM on the slice classifier, for the fixed pre-move models (tests/data/premove) and for the
    shared run's. A model trained for two steps may have no positive evidence on a key slice (ReLU of a
    negative map: a flat 0 map, about one slice in four here), so maps are required to vary only for the
    fixed models, whose maps do."""
    from cervspine.cache import CachedStudy
    from cervspine.inference import Predictor
    from cervspine.report import saliency
    from cervspine.report.study import write_study_report
    from cervspine.runs.layout import stage_checkpoints

    if models == "premove":
        s1, s2, entry = PREMOVE / "stage1.ckpt", PREMOVE / "slice.ckpt", PREMOVE / "study"
    else:
        run, cache = request.getfixturevalue("report_run"), request.getfixturevalue("tiny_cache")
        s1, members = stage_checkpoints(run)
        s2 = members[0]  # the slice classifier first, then the sequence model
        assert s2 == request.getfixturevalue("shared_run").slice_stage2
        entry = next(p for p in sorted(cache.iterdir()) if p.name[0] != ".")
    predictor = Predictor.from_checkpoints(s1, s2, device="cpu")
    study = CachedStudy(entry)
    pred = predictor.predict(study)
    rep = write_study_report(tmp_path, study, pred, predictor, synthetic=True, threshold=0.5, n_key=2)
    model = predictor.stage2[0]
    size = model.stack.input_size
    assert rep.cams.shape == (len(rep.key_slices), size, size) and len(rep.key_slices) == 2
    assert rep.target_layer and ((rep.cams >= 0) & (rep.cams <= 1)).all()
    if models == "premove":
        assert all(c.std() > 1e-3 for c in rep.cams)  # a map, not a constant
    ov = saliency.overlay(np.linspace(0, 1, size * size).reshape(size, size), rep.cams[0])
    assert ov.shape == (size, size, 3) and ov.dtype == np.uint8 and ov.std() > 1
    # the Grad-CAM inputs are exactly the ones stage 2 scored
    zs = np.array([k.slice_index for k in rep.key_slices])
    inputs = model.inputs(study, pred.stage1)
    inputs.slices = zs
    ((_, scored_images, _, _),) = model.batches(inputs)
    explained = model.explain(study, pred.stage1, zs, [k.vertebra for k in rep.key_slices])
    np.testing.assert_array_equal(explained.images, scored_images.numpy())
    probs = model.slice_probabilities(inputs)
    rows = [int(np.flatnonzero(pred.fracture_slices == z)[0]) for z in zs]
    np.testing.assert_allclose(probs, pred.fracture_probs[rows], atol=1e-5)


def test_target_layer_is_the_deepest_stage_that_still_localises():
    import timm

    from cervspine.inference.saliency import find_target_layer

    net = timm.create_model("resnet18", num_classes=0, in_chans=3)
    assert find_target_layer(net, torch.zeros(1, 3, 224, 224))[0] == "layer4"  # 7×7
    assert find_target_layer(net, torch.zeros(1, 3, 64, 64))[0] == "layer3"  # layer4 would be 2×2


def test_predict_single_study_report(report_run, tiny_root, tmp_path):
    from cervspine.predict import predict_study_folder

    folder = next((tiny_root / "test_images").iterdir())
    overrides = [f"study={folder}", f"run_dir={report_run}", "report=true", "report_threshold=0.5"]
    with hydra_config("predict", overrides, tmp_path) as cfg:
        predict_study_folder(cfg)
    page = (tmp_path / "study_reports" / folder.name / "report.html").read_text()
    assert folder.name in page and "SYNTHETIC DATA" in page and "0.500" in page


# ----------------------------------------------------------------------------- model card


def test_model_card_next_to_the_models(report_run, tiny_root):
    card = (report_run / "MODEL_CARD.md").read_text()
    for needed in (
        "SYNTHETIC DATA",
        str(tiny_root),
        "fingerprint",
        "labelled studies: 12",
        "rsna_score",
        "Intended use",
        "Limits",
        "git checkout",
        "python -m cervspine.pipeline",
        "not a medical",
    ):
        assert needed.lower() in card.lower(), needed
    assert (report_run / "stage1" / "MODEL_CARD.md").read_text() == card
    assert (report_run / "stage2" / "MODEL_CARD.md").read_text() == card


# ----------------------------------------------------------------------------- headless browser


def _dump_dom(html_path: Path, tmp_path: Path) -> str:
    profile = tmp_path / f"chromium-profile-{html_path.parent.name}"
    cmd = [
        str(CHROMIUM),
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--disable-dev-shm-usage",
        f"--user-data-dir={profile}",
        "--dump-dom",
        html_path.resolve().as_uri(),
    ]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    return done.stdout


@pytest.mark.skipif(
    not CHROMIUM.is_file(), reason="no /usr/bin/chromium (Debian package 'chromium'; make browser)"
)
def test_reports_render_in_headless_chromium(report_run, tiny_root, tmp_path):
    uid = next((tiny_root / "test_images").iterdir()).name
    pages = {
        report_run / "report" / "report.html": "Evaluation report",
        report_run / "study_reports" / uid / "report.html": uid,
    }
    for page, must_show in pages.items():
        dom = _dump_dom(page, tmp_path)
        body = re.search(r"<body[^>]*>", dom).group(0)
        assert 'data-images-ok="true"' in body, body
        n_img = int(re.search(r'data-images-count="(\d+)"', body).group(1))
        assert n_img == dom.count("<img ") >= 3
        assert must_show in dom and "SYNTHETIC DATA" in dom
    # the check can fail: a page with a broken image is reported as such
    from cervspine.report import html

    broken = tmp_path / "broken" / "page.html"
    doc = html.page("broken", ['<img alt="x" src="data:image/png;base64,AAAA">'], synthetic=False)
    html.write_page(broken, doc)
    assert 'data-images-ok="false"' in _dump_dom(broken, tmp_path)


# ----------------------------------------------------------------------------- W&B


def test_wandb_offline_run_gets_the_roc_image(wandb_run):
    """callbacks=wandb_images with logger=wandb (the session's W&B run): the ROC image is in the run."""
    runs = list((wandb_run / "wandb").glob("offline-run-*"))
    assert len(runs) == 1
    images = list((runs[0] / "files" / "media" / "images").rglob("*.png"))
    assert images, f"no image under {runs[0] / 'files' / 'media'}"
    _png_ok(images[0])


def test_log_figures_ignores_other_loggers(tmp_path):
    from lightning.pytorch.loggers import CSVLogger

    from cervspine.report.figures import roc_figure
    from cervspine.report.wandb_images import log_figures

    y, p = _fake()
    assert log_figures([CSVLogger(tmp_path)], {"roc": roc_figure(y, p)}) == 0
    assert log_figures(None, {"roc": roc_figure(y, p)}) == 0
