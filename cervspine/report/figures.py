"""The evaluation figures: ROC and precision–recall per target, calibration, confusion matrices.

Figures are built with matplotlib's object API (``Figure``, no pyplot), so nothing touches the global
backend or leaks figures. Every function takes ``synthetic``: True stamps "SYNTHETIC DATA" on the figure.
"""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import torch
from matplotlib.figure import Figure
from torchmetrics.functional.classification import binary_precision_recall_curve, binary_roc

from cervspine import TARGETS
from cervspine.report import SYNTHETIC_LABEL
from cervspine.scoring.metrics import binary_metrics

DPI = 110
CURVE = "#1f5fa8"
OPERATING = "#d62728"


def mark_synthetic(fig: Figure, synthetic: bool) -> Figure:
    """Stamp the SYNTHETIC DATA label in the figure's top-right corner (when ``synthetic``)."""
    if synthetic:
        fig.text(
            0.995,
            0.995,
            f"{SYNTHETIC_LABEL} — says nothing about real CT",
            ha="right",
            va="top",
            fontsize=9,
            fontweight="bold",
            color="white",
            bbox={"boxstyle": "round,pad=0.3", "facecolor": "#c0392b", "edgecolor": "none"},
        )
    return fig


def has_synthetic_mark(fig: Figure) -> bool:
    return any(SYNTHETIC_LABEL in t.get_text() for t in fig.texts)


def png_bytes(fig: Figure) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=DPI)
    return buf.getvalue()


def save_png(fig: Figure, path: str | Path) -> Path:
    """Write the figure as PNG (atomically) and return the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_bytes(png_bytes(fig))
    tmp.replace(path)
    return path


def _grid(title: str, synthetic: bool, ncols: int = 4, size: float = 2.9) -> tuple[Figure, np.ndarray]:
    nrows = int(np.ceil(len(TARGETS) / ncols))
    fig = Figure(figsize=(ncols * size, nrows * size + 0.6), layout="constrained")
    axes = np.atleast_1d(fig.subplots(nrows, ncols)).ravel()
    fig.suptitle(title, fontsize=12, fontweight="bold", x=0.01, ha="left")
    mark_synthetic(fig, synthetic)
    return fig, axes


def _one_class(ax, name: str, y: np.ndarray) -> None:
    ax.set_title(name, fontsize=10)
    kind = "positive" if y.min() > 0 else "negative"
    msg = f"all {len(y)} studies {kind}:\ncurve undefined"
    ax.text(0.5, 0.5, msg, ha="center", va="center", transform=ax.transAxes, fontsize=9, color="#555")
    ax.set_xticks([])
    ax.set_yticks([])


def _tensors(y: np.ndarray, p: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.as_tensor(p, dtype=torch.float64), torch.as_tensor(y).long()


def _rates(y: np.ndarray, p: np.ndarray, threshold: float) -> tuple[float, float, float]:
    """(FPR, TPR, precision) of ``p > threshold``."""
    y, pred = np.asarray(y, dtype=bool), np.asarray(p) > threshold
    tp = float((pred & y).sum())
    return float(pred[~y].mean()), tp / max(y.sum(), 1), tp / max(pred.sum(), 1)


def roc_figure(
    y: np.ndarray, p: np.ndarray, thresholds: np.ndarray | None = None, synthetic: bool = False
) -> Figure:
    """One ROC panel per target (C1…C7, patient_overall), AUROC in the title, operating point marked."""
    fig, axes = _grid("ROC curves per vertebra and at patient level", synthetic)
    for j, (ax, name) in enumerate(zip(axes, TARGETS)):
        yj, pj = y[:, j], p[:, j]
        if yj.min() == yj.max():
            _one_class(ax, name, yj)
            continue
        fpr, tpr, _ = binary_roc(*_tensors(yj, pj))
        auc = float(binary_metrics(yj, pj, 0.5)["auroc"])
        ax.plot([0, 1], [0, 1], ls=":", color="grey", lw=1)
        ax.plot(fpr.numpy(), tpr.numpy(), color=CURVE, lw=2)
        if thresholds is not None:
            fx, ty, _ = _rates(yj, pj, thresholds[j])
            ax.plot(
                [fx], [ty], "o", color=OPERATING, ms=6, label=f"operating point\n(t = {thresholds[j]:.3g})"
            )
            ax.legend(loc="lower right", fontsize=7)
        ax.set_title(f"{name}   AUROC {auc:.2f}\n{int(yj.sum())}/{len(yj)} positive", fontsize=9)
        ax.set(xlim=(-0.02, 1.02), ylim=(-0.02, 1.02), aspect="equal")
        ax.set_xlabel("false positive rate", fontsize=8)
        ax.set_ylabel("true positive rate", fontsize=8)
        ax.tick_params(labelsize=7)
    return fig


def pr_figure(
    y: np.ndarray, p: np.ndarray, thresholds: np.ndarray | None = None, synthetic: bool = False
) -> Figure:
    """One precision–recall panel per target; the dotted line is the prevalence (a random classifier)."""
    fig, axes = _grid("Precision–recall curves per vertebra and at patient level", synthetic)
    for j, (ax, name) in enumerate(zip(axes, TARGETS)):
        yj, pj = y[:, j], p[:, j]
        if yj.min() == yj.max():
            _one_class(ax, name, yj)
            continue
        precision, recall, _ = binary_precision_recall_curve(*_tensors(yj, pj))
        prevalence = float(yj.mean())
        ax.axhline(prevalence, ls=":", color="grey", lw=1)
        ax.plot(recall.numpy(), precision.numpy(), color=CURVE, lw=2, drawstyle="steps-post")
        if thresholds is not None:
            _, rec, prec = _rates(yj, pj, thresholds[j])
            ax.plot(
                [rec], [prec], "o", color=OPERATING, ms=6, label=f"operating point\n(t = {thresholds[j]:.3g})"
            )
            ax.legend(loc="lower left", fontsize=7)
        ax.set_title(f"{name}\nprevalence {prevalence:.2f} (dotted)", fontsize=9)
        ax.set(xlim=(-0.02, 1.02), ylim=(-0.02, 1.05), aspect="equal")
        ax.set_xlabel("recall", fontsize=8)
        ax.set_ylabel("precision", fontsize=8)
        ax.tick_params(labelsize=7)
    return fig


def reliability(y: np.ndarray, p: np.ndarray, n_bins: int = 10) -> dict[str, np.ndarray]:
    """Uniform-bin reliability table: per non-empty bin, mean prediction, observed frequency, count."""
    y, p = np.asarray(y, dtype=np.float64).ravel(), np.asarray(p, dtype=np.float64).ravel()
    b = np.clip((p * n_bins).astype(int), 0, n_bins - 1)
    count = np.bincount(b, minlength=n_bins)
    keep = count > 0
    mean_p = np.bincount(b, weights=p, minlength=n_bins)[keep] / count[keep]
    freq = np.bincount(b, weights=y, minlength=n_bins)[keep] / count[keep]
    return {"mean_predicted": mean_p, "observed": freq, "count": count[keep]}


def calibration_figure(y: np.ndarray, p: np.ndarray, synthetic: bool = False, n_bins: int = 10) -> Figure:
    """Reliability diagrams (C1–C7 pooled; patient_overall) with the prediction histograms below."""
    fig = Figure(figsize=(9, 5.6), layout="constrained")
    fig.suptitle("Calibration (reliability diagram)", fontsize=12, fontweight="bold", x=0.01, ha="left")
    mark_synthetic(fig, synthetic)
    axes = fig.subplots(2, 2, height_ratios=[3, 1], sharex="col")
    groups = [("C1–C7 pooled", y[:, :7], p[:, :7]), ("patient_overall", y[:, 7], p[:, 7])]
    for col, (name, yy, pp) in enumerate(groups):
        r = reliability(yy, pp, n_bins)
        ece = float(np.sum(r["count"] * np.abs(r["mean_predicted"] - r["observed"])) / r["count"].sum())
        ax = axes[0, col]
        ax.plot([0, 1], [0, 1], ls=":", color="grey", lw=1, label="perfectly calibrated")
        ax.plot(r["mean_predicted"], r["observed"], "-", color=CURVE, lw=1.5)
        ax.scatter(
            r["mean_predicted"],
            r["observed"],
            s=20 + 180 * r["count"] / r["count"].max(),
            color=CURVE,
            zorder=3,
            label="bins (area ∝ count)",
        )
        ax.set(xlim=(-0.02, 1.02), ylim=(-0.02, 1.02), aspect="equal")
        ax.set_title(f"{name}  (ECE {ece:.3f}, n={np.size(yy)})", fontsize=10)
        ax.set_ylabel("observed fracture frequency", fontsize=9)
        ax.legend(loc="upper left", fontsize=8, frameon=False)
        h = axes[1, col]
        edges = np.linspace(0, 1, n_bins + 1)
        yb = np.asarray(yy, dtype=bool).ravel()
        h.hist(
            [np.ravel(pp)[~yb], np.ravel(pp)[yb]],
            bins=edges,
            stacked=True,
            color=["#9ab", OPERATING],
            label=["negative", "positive"],
        )
        h.set_xlabel("predicted probability", fontsize=9)
        h.set_ylabel("count", fontsize=9)
        h.legend(fontsize=7, frameon=False)
    return fig


def confusion_figure(y: np.ndarray, p: np.ndarray, thresholds: np.ndarray, synthetic: bool = False) -> Figure:
    """2×2 confusion matrix per target at its operating threshold (rows truth, columns prediction)."""
    fig, axes = _grid("Confusion matrices at the operating threshold", synthetic, size=2.5)
    for j, (ax, name) in enumerate(zip(axes, TARGETS)):
        yj, pred = y[:, j].astype(bool), p[:, j] > thresholds[j]
        m = np.array([[(~yj & ~pred).sum(), (~yj & pred).sum()], [(yj & ~pred).sum(), (yj & pred).sum()]])
        ax.imshow(m, cmap="Blues", vmin=0, vmax=max(int(m.max()), 1))
        for (r, c), v in np.ndenumerate(m):
            ax.text(
                c,
                r,
                str(v),
                ha="center",
                va="center",
                fontsize=13,
                color="white" if v > m.max() / 2 else "black",
            )
        ax.set_xticks([0, 1], ["pred 0", "pred 1"], fontsize=8)
        ax.set_yticks([0, 1], ["true 0", "true 1"], fontsize=8)
        ax.set_title(f"{name}  (t = {thresholds[j]:.3g})", fontsize=9)
    return fig
