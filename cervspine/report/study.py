"""The per-study report (``python -m cervspine.predict ... report=true``): PNGs + one HTML page.

Writes into ``out_dir``: ``reformats.png`` (sagittal and coronal reformats with the detected levels),
``probabilities.png`` (per-vertebra fracture probability), ``key_slices.png`` (the slices with the highest
stage-2 probabilities, with a Grad-CAM overlay) and ``report.html`` (self-contained).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib import colormaps
from matplotlib.cm import ScalarMappable
from matplotlib.colors import Normalize
from matplotlib.figure import Figure
from matplotlib.patches import Rectangle

from cervspine import TARGETS, VERTEBRAE
from cervspine.cache import CachedStudy
from cervspine.data.stage1_table import BOX_COLS, vertebra_extents
from cervspine.inference import Explanation, Predictor, Stage1Output, StudyPrediction
from cervspine.report import figures, html, saliency
from cervspine.scoring.levels import LevelAnswer, format_probability, level_answers
from cervspine.scoring.thresholds import OperatingThreshold, choose_thresholds

DISPLAY_WINDOW = (-500.0, 1300.0)  # bone window, L=400 W=1800
SLAB_MM = 5.0  # thickness of the maximum-intensity slab of the reformats
PROB_CMAP = colormaps["RdYlGn_r"]
NORM = Normalize(0.0, 1.0)


@dataclass
class KeySlice:
    rank: int
    slice_index: int
    instance_number: int
    vertebra: int  # index into VERTEBRAE: the level with the highest probability on this slice
    probability: float
    crop: tuple[int, int, int, int] = (0, 0, 0, 0)  # (y0, x0, y1, x1) in the cached slice

    def title(self, answer: LevelAnswer | None = None) -> str:
        """Its figure title: the slice's own score, labelled as per-slice evidence, and (``answer``) the
        study-level answer for that level, the number every other output gives."""
        head = (
            f"#{self.rank} slice {self.slice_index} (instance {self.instance_number}): per-slice score for "
            f"{VERTEBRAE[self.vertebra]} {self.probability:.2f}"
        )
        return head if answer is None else f"{head}\nstudy answer {answer.short()}"


@dataclass
class StudyReport:
    html: Path
    pngs: dict[str, Path]
    key_slices: list[KeySlice]
    cams: np.ndarray  # (n, S, S) Grad-CAM maps in [0, 1] (n = 0 without saliency)
    target_layer: str | None
    figures: dict[str, Figure] = field(default_factory=dict, repr=False)


def pick_key_slices(
    z: np.ndarray, probs: np.ndarray, instance_numbers: np.ndarray, k: int = 3, min_gap: int = 2
) -> list[KeySlice]:
    """The ``k`` stage-2 slices with the highest fracture probability (any level), ``min_gap`` apart."""
    if not len(z):
        return []
    best = probs.max(axis=1)
    chosen: list[KeySlice] = []
    for i in np.argsort(-best, kind="stable"):
        if all(abs(int(z[i]) - c.slice_index) >= min_gap for c in chosen):
            zi = int(z[i])
            chosen.append(
                KeySlice(
                    len(chosen) + 1, zi, int(instance_numbers[zi]), int(probs[i].argmax()), float(best[i])
                )
            )
        if len(chosen) == k:
            break
    return chosen


def _window(img: np.ndarray) -> np.ndarray:
    lo, hi = DISPLAY_WINDOW
    return np.clip((np.asarray(img, dtype=np.float32) - lo) / (hi - lo), 0, 1)


def _spine_span(boxes: np.ndarray) -> tuple[tuple[float, float], tuple[float, float], tuple[float, float]]:
    """From the detected spine boxes (normalised): median centre (y, x) and the in-plane (lo, hi) ranges,
    along y and x, that the reformats show: the boxes' union widened by its size on each side, at least
    40% of the field of view (the whole field of view when nothing was detected)."""
    ok = ~np.isnan(boxes).any(axis=1)
    if not ok.any():
        return (0.5, 0.5), (0.0, 1.0), (0.0, 1.0)
    b = boxes[ok]
    centre = (float(np.median((b[:, 0] + b[:, 2]) / 2)), float(np.median((b[:, 1] + b[:, 3]) / 2)))
    spans = []
    for lo, hi, c in ((b[:, 0].min(), b[:, 2].max(), centre[0]), (b[:, 1].min(), b[:, 3].max(), centre[1])):
        half = max(1.5 * (hi - lo), 0.4) / 2
        spans.append((float(np.clip(c - half, 0, 1)), float(np.clip(c + half, 0, 1))))
    return centre, spans[0], spans[1]


def reformats(volume: np.ndarray, spacing: tuple[float, float, float], boxes: np.ndarray) -> dict[str, Any]:
    """Sagittal and coronal maximum-intensity slabs (``SLAB_MM`` thick) through the spine's centre.

    Returns the (Z, ·) HU images limited in-plane to the spine's neighbourhood (rows: slice order, superior
    at the top), their ``imshow`` extents in mm from the volume's corner, and the plane positions (pixels).
    """
    dz, dy, dx = (float(s) for s in spacing)
    n_z, h, w = volume.shape
    (cy, cx), (ylo, yhi), (xlo, xhi) = _spine_span(boxes)
    xc, yc = int(np.clip(round(cx * w), 0, w - 1)), int(np.clip(round(cy * h), 0, h - 1))
    hx, hy = max(int(round(SLAB_MM / 2 / dx)), 0), max(int(round(SLAB_MM / 2 / dy)), 0)
    y0, y1 = int(ylo * h), max(int(np.ceil(yhi * h)), int(ylo * h) + 1)
    x0, x1 = int(xlo * w), max(int(np.ceil(xhi * w)), int(xlo * w) + 1)
    sag = np.asarray(volume[:, y0:y1, max(xc - hx, 0) : xc + hx + 1]).max(axis=2)  # (Z, y): anterior left
    cor = np.asarray(volume[:, max(yc - hy, 0) : yc + hy + 1, x0:x1]).max(axis=1)  # (Z, x)
    return {
        "sagittal": sag,
        "coronal": cor,
        "sagittal_extent": (y0 * dy, y1 * dy, n_z * dz, 0.0),
        "coronal_extent": (x0 * dx, x1 * dx, n_z * dz, 0.0),
        "x": xc,
        "y": yc,
    }


def reformat_figure(
    volume: np.ndarray,
    spacing: tuple[float, float, float],
    slice_table: Any,
    probabilities: np.ndarray,
    key: list[KeySlice],
    synthetic: bool,
) -> Figure:
    """Sagittal + coronal reformats in true proportions (mm axes), the detected levels as coloured bars
    (colour = that level's fracture probability) and the key slices as dashed lines."""
    boxes = slice_table[BOX_COLS].to_numpy(np.float64)
    r = reformats(volume, spacing, boxes)
    dz = float(spacing[0])
    ext = vertebra_extents(slice_table)
    height_mm = volume.shape[0] * dz
    widths = [
        r["sagittal_extent"][1] - r["sagittal_extent"][0],
        r["coronal_extent"][1] - r["coronal_extent"][0],
    ]
    panel_in = 4.3  # inches of each panel's data width (image + level bars)
    image_in = min(max(panel_in * height_mm / (1.3 * max(widths)), 1.2), 8.0)
    fig = Figure(figsize=(2 * panel_in + 2.4, image_in + 1.5), layout="constrained")
    fig.suptitle(
        "Reformats with the detected vertebra levels", fontsize=12, fontweight="bold", x=0.01, ha="left"
    )
    figures.mark_synthetic(fig, synthetic)
    axes = fig.subplots(1, 2, width_ratios=widths)
    for ax, plane, label in zip(axes, ("sagittal", "coronal"), ("anterior ← → posterior", "right ← → left")):
        left, right, bottom, _ = extent = r[f"{plane}_extent"]
        width = right - left
        ax.imshow(_window(r[plane]), cmap="gray", extent=extent, aspect="equal", interpolation="bilinear")
        pos = f"x={r['x']}" if plane == "sagittal" else f"y={r['y']}"
        ax.set_title(f"{plane} ({SLAB_MM:g} mm MIP slab at {pos})", fontsize=10)
        ax.set_xlabel(f"mm   ({label})", fontsize=8)
        ax.set_ylabel("mm (superior at top)", fontsize=8)
        ax.tick_params(labelsize=7)
        for i, row in enumerate(ext.itertuples()):
            if not row.present:
                continue
            top, low = row.first_slice * dz, (row.last_slice + 1) * dz
            x0 = right + width * (0.02 + 0.08 * (i % 2))
            colour = PROB_CMAP(NORM(probabilities[i]))
            ax.add_patch(Rectangle((x0, top), width * 0.05, low - top, color=colour, ec="k", lw=0.5))
            label = f"{row.vertebra} {format_probability(probabilities[i])}"
            ax.text(x0 + width * 0.055, (top + low) / 2, label, va="center", fontsize=7)
        for ks in key:
            zmm = (ks.slice_index + 0.5) * dz
            ax.plot([left, right], [zmm, zmm], color="#00e5ff", ls="--", lw=1)
            ax.text(left + width * 0.01, zmm, f"#{ks.rank}", color="#00e5ff", fontsize=8, va="bottom")
        ax.set_xlim(left, right + width * 0.3)
        ax.set_ylim(bottom, 0)
        for side in ("top", "right"):
            ax.spines[side].set_visible(False)
    bar = fig.colorbar(
        ScalarMappable(NORM, PROB_CMAP), ax=axes, shrink=0.8, label="level's fracture probability"
    )
    bar.ax.tick_params(labelsize=7)
    return fig


def probability_figure(
    probabilities: np.ndarray,
    thresholds: OperatingThreshold | None,
    synthetic: bool,
    not_localised: list[str] = (),
) -> Figure:
    """Horizontal bars of the 8 study-level probabilities, each with its call at the operating point;
    operating thresholds drawn when known."""
    answers = level_answers(probabilities, thresholds, not_localised)
    fig = Figure(figsize=(7.5, 3.8), layout="constrained")
    fig.suptitle("Fracture probability per vertebra", fontsize=12, fontweight="bold", x=0.01, ha="left")
    figures.mark_synthetic(fig, synthetic)
    ax = fig.subplots()
    names = [*VERTEBRAE, "patient"]
    ypos = np.arange(len(names))[::-1].astype(float)
    ypos[-1] -= 0.4  # a gap before the patient-level bar
    ax.barh(ypos, probabilities, color=[PROB_CMAP(NORM(p)) for p in probabilities], height=0.7)
    for yy, p, a in zip(ypos, probabilities, answers):
        inside = p > 0.6
        note = "" if a.suspected is None else f"  {a.call}"
        note += "" if a.localised else " (not localised: prior)"
        ax.text(
            p - 0.01 if inside else p + 0.01,
            yy,
            f"{format_probability(p)}{note}",
            va="center",
            ha="right" if inside else "left",
            fontsize=9,
            color="white" if inside else "black",
            fontweight="bold" if inside else "normal",
        )
    if thresholds is not None:
        top, gap = ypos[0] + 0.5, ypos[-2] - 0.5
        ax.plot([thresholds.vertebra] * 2, [gap, top], "k--", lw=1)
        ax.plot([thresholds.patient] * 2, [ypos[-1] - 0.5, ypos[-1] + 0.5], "k--", lw=1)
        ax.text(thresholds.vertebra, top, " operating threshold", fontsize=7, va="bottom")
    ax.set_yticks(ypos, names, fontsize=9)
    ax.set_xlim(0, 1)
    ax.set_xlabel("predicted probability of a fracture", fontsize=9)
    for side in ("top", "right"):
        ax.spines[side].set_visible(False)
    return fig


def key_slice_figure(
    study: CachedStudy,
    key: list[KeySlice],
    explanation: Explanation | None,
    synthetic: bool,
    answers: list[LevelAnswer] | None = None,
) -> Figure:
    """Per key slice: the axial slice with the model's crop, the crop as the model saw it, Grad-CAM
    (only the axial slice when the stage-2 model gives no saliency)."""
    layer = explanation.layer if explanation is not None else None
    n, ncols = max(len(key), 1), 3 if layer else 1
    fig = Figure(figsize=(10 if layer else 5.5, 3.5 * n + 0.6), layout="constrained")
    how = f"Grad-CAM at backbone.{layer}" if layer else "no saliency for this stage-2 model"
    fig.suptitle(f"Slices that drove the decision ({how})", fontsize=11, fontweight="bold", x=0.01, ha="left")
    figures.mark_synthetic(fig, synthetic)
    axes = np.asarray(fig.subplots(n, ncols, squeeze=False))
    for row, ks in zip(axes, key):
        ax_full = row[0]
        ax_full.imshow(_window(study.slices([ks.slice_index])[0]), cmap="gray", interpolation="bilinear")
        answer = answers[ks.vertebra] if answers is not None else None
        ax_full.set_title(ks.title(answer), fontsize=8, loc="left")
        if layer:
            y0, x0, y1, x1 = ks.crop
            box = Rectangle((x0 - 0.5, y0 - 0.5), x1 - x0, y1 - y0, fill=False, ec="#00e5ff", lw=1.5)
            ax_full.add_patch(box)
            crop = explanation.images[ks.rank - 1, explanation.display_channel]
            row[1].imshow(crop, cmap="gray", vmin=0, vmax=1, interpolation="bilinear")
            row[1].set_title("model input (crop)", fontsize=9)
            row[2].imshow(saliency.overlay(crop, explanation.cams[ks.rank - 1]), interpolation="bilinear")
            row[2].set_title(f"Grad-CAM for {VERTEBRAE[ks.vertebra]}", fontsize=9)
    for ax in axes.ravel():
        ax.set_xticks([])
        ax.set_yticks([])
    if not key:
        axes[0, 0].text(
            0.5, 0.5, "no slice was scored by stage 2", ha="center", transform=axes[0, 0].transAxes
        )
    return fig


def write_study_report(
    out_dir: str | Path,
    study: CachedStudy,
    pred: StudyPrediction,
    predictor: Predictor,
    *,
    synthetic: bool,
    threshold: Any = None,
    n_key: int = 3,
) -> StudyReport:
    """Figures and page for one scored study. ``threshold`` (float or ``{"vertebra", "patient"}``, e.g.
    from an evaluation report's report.json) draws the operating thresholds; None leaves them out. The
    key slices are explained by the (first) stage-2 model where it can (Grad-CAM of the slice model)."""
    out = Path(out_dir)
    table = pred.slice_table
    instance = table["instance_number"].to_numpy()
    key = pick_key_slices(
        pred.fracture_slices, pred.fracture_probs, instance, n_key, max(2, study.num_slices // 40)
    )
    model = predictor.stage2[0]
    explanation = None
    if key:
        stage1 = pred.stage1 or Stage1Output.from_frame(table)
        slices = np.array([k.slice_index for k in key])
        explanation = model.explain(study, stage1, slices, [k.vertebra for k in key])
    if explanation is not None:
        for ks, c in zip(key, explanation.crops):
            ks.crop = c
    thresholds = choose_thresholds(None, None, threshold) if threshold is not None else None
    answers = level_answers(pred.probabilities, thresholds, pred.not_localised)
    synthetic_flag = bool(synthetic)
    figs = {
        "reformats": reformat_figure(
            study.volume, tuple(study.meta["spacing_cached"]), table, pred.probabilities, key, synthetic_flag
        ),
        "probabilities": probability_figure(
            pred.probabilities, thresholds, synthetic_flag, pred.not_localised
        ),
        "key_slices": key_slice_figure(study, key, explanation, synthetic_flag, answers),
    }
    pngs = {name: figures.save_png(fig, out / f"{name}.png") for name, fig in figs.items()}
    doc = html.page(
        f"Study {pred.uid}",
        _sections(pred, key, explanation, thresholds, model.backbone, pngs),
        synthetic=synthetic_flag,
        subtitle=f"source: {study.meta.get('source', '')}",
    )
    page = html.write_page(out / "report.html", doc)
    cams = explanation.cams if explanation is not None else np.zeros((0, 1, 1), dtype=np.float32)
    return StudyReport(page, pngs, key, cams, explanation.layer if explanation else None, figs)


def _sections(
    pred: StudyPrediction,
    key: list[KeySlice],
    explanation: Explanation | None,
    thresholds: OperatingThreshold | None,
    backbone: str,
    pngs: dict[str, Path],
) -> list[str]:
    layer = explanation.layer if explanation is not None else None
    rows = [
        [a.target, format_probability(a.probability), "" if a.suspected is None else a.call]
        for a in level_answers(pred.probabilities, thresholds, pred.not_localised)
    ]
    t_note = (
        f"Operating point: a fracture is suspected when p &gt; {thresholds.vertebra:.3f} (vertebrae) or "
        f"p &gt; {thresholds.patient:.3f} (patient); rule: {html.esc(thresholds.rule)}."
        if thresholds is not None
        else "No operating point: the run has no operating_point.json (evaluate writes it) and none was "
        "given (operating_point=PATH or report_threshold=)."
    )
    saliency_note = (
        f"Saliency: Grad-CAM (pytorch-grad-cam) of the named level's logit at layer "
        f"<code>{html.esc(layer)}</code> of the {html.esc(backbone)} backbone."
        if layer
        else "No saliency map: Grad-CAM is drawn for the slice classifier (FractureClassifier) only."
    )
    timing = ", ".join(f"{k} {v:.2f} s" for k, v in pred.timings.items())
    missing = html.esc(", ".join(pred.not_localised))
    localisation = (
        f'<p class="warning">Level not localised: stage 1 found no slice of {missing}'
        "; their probabilities are the training prior (what is known without looking), and the patient-level "
        "probability includes their risk.</p>"
        if pred.not_localised
        else ""
    )
    return [
        "<h2>Prediction</h2>"
        + localisation
        + html.table(["target", "probability", "at the operating point"], rows)
        + f'<p class="note">{t_note}</p>',
        "<h2>Probabilities</h2>" + html.img_tag(pngs["probabilities"], "fracture probability per vertebra"),
        "<h2>Reformats</h2>"
        + '<p class="note">Levels: slices where stage 1 gives the level a visibility ≥ 0.5; bar colour = the '
        "level's fracture probability; dashed lines: the key slices below.</p>"
        + html.img_tag(pngs["reformats"], "sagittal and coronal reformats"),
        "<h2>Key slices</h2>"
        + f'<p class="note">The {len(key)} stage-2 slices with the highest per-slice fracture score: '
        "per-slice evidence, not the study-level answer above (each title gives both). "
        f"{saliency_note}</p>" + html.img_tag(pngs["key_slices"], "key slices"),
        f'<p class="meta">timings: {html.esc(timing)}</p>',
    ]


def write_index(
    out_dir: str | Path, reports: dict[str, Path], probabilities: dict[str, Any], synthetic: bool
) -> Path:
    """``index.html`` linking each study's report, with its patient-level probability (a folder run)."""
    out = Path(out_dir)
    rows = []
    for uid in sorted(reports, key=lambda u: -float(probabilities[u][-1])):
        link = html.Raw(
            f'<a href="{html.esc(Path(reports[uid]).relative_to(out).as_posix())}">{html.esc(uid)}</a>'
        )
        rows.append([link, *(f"{float(v):.3f}" for v in probabilities[uid])])
    body = "<h2>Studies (highest patient-level probability first)</h2>" + html.table(
        ["study", *TARGETS], rows
    )
    return html.write_page(out / "index.html", html.page("Study reports", [body], synthetic=synthetic))
