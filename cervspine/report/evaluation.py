"""The evaluation report (``python -m cervspine.evaluate ... report=true``): PNGs + one HTML page.

Writes into ``out_dir`` (``<run>/report/`` from evaluate): ``roc.png``, ``pr.png``, ``calibration.png``,
``confusion.png``, ``report.html`` (self-contained) and ``report.json`` (thresholds and the table with
its intervals; pass its thresholds as ``report_threshold=`` when evaluating a held-out folder).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.figure import Figure

from cervspine import TARGETS
from cervspine.io.atomic import write_json_atomic
from cervspine.report import figures, html
from cervspine.scoring.metrics import METRICS, bootstrap_ci, bootstrap_table, rsna_score
from cervspine.scoring.thresholds import OperatingThreshold, choose_thresholds

FIGURES = {
    "roc": "ROC curves",
    "pr": "Precision–recall curves",
    "calibration": "Calibration",
    "confusion": "Confusion matrices",
}


@dataclass
class EvaluationReport:
    html: Path
    pngs: dict[str, Path]
    thresholds: OperatingThreshold
    table: dict[str, dict[str, Any]]
    rsna_score: float
    rsna_score_ci95: tuple[float, float]
    figures: dict[str, Figure] = field(default_factory=dict, repr=False)


def evaluation_figures(
    y: np.ndarray, p: np.ndarray, thresholds: OperatingThreshold, synthetic: bool
) -> dict[str, Figure]:
    t = thresholds.per_target()
    return {
        "roc": figures.roc_figure(y, p, t, synthetic),
        "pr": figures.pr_figure(y, p, t, synthetic),
        "calibration": figures.calibration_figure(y, p, synthetic),
        "confusion": figures.confusion_figure(y, p, t, synthetic),
    }


def _fmt(value: float, ci: list[float]) -> html.Raw:
    if not np.isfinite(value):
        return html.Raw("n/a")
    lo, hi = ci
    return html.Raw(f'{value:.3f} <span class="ci">[{lo:.3f}–{hi:.3f}]</span>')


def write_evaluation_report(
    out_dir: str | Path,
    y: np.ndarray,
    p: np.ndarray,
    *,
    synthetic: bool,
    threshold: Any = None,
    n_boot: int = 1000,
    metrics: dict[str, Any] | None = None,
    subtitle: str = "",
    seed: int = 0,
) -> EvaluationReport:
    """Figures, table and page for study-level labels ``y`` and predictions ``p`` (n, 8).

    ``threshold`` (float or ``{"vertebra": .., "patient": ..}``) fixes the operating thresholds; None
    chooses them by Youden's J on (y, p). ``metrics`` (evaluate's metrics.json body) supplies the
    competition score's interval and the prior baseline when given.
    """
    out = Path(out_dir)
    y, p = np.asarray(y, dtype=np.float64), np.asarray(p, dtype=np.float64)
    thresholds = choose_thresholds(y, p, threshold)
    table = bootstrap_table(y, p, thresholds, n_boot=n_boot, seed=seed)
    score = rsna_score(y, p)
    if metrics and "rsna_score_ci95" in metrics:
        ci = tuple(float(v) for v in metrics["rsna_score_ci95"])
    else:
        ci = bootstrap_ci(y, p, rsna_score, n=n_boot, seed=seed) if len(y) > 1 else (np.nan, np.nan)
    figs = evaluation_figures(y, p, thresholds, synthetic)
    pngs = {name: figures.save_png(fig, out / f"{name}.png") for name, fig in figs.items()}

    kind = "SYNTHETIC" if synthetic else "real"
    prior = (metrics or {}).get("prior_baseline_rsna_score")
    summary = (
        f"<p><b>rsna_score {score:.4f}</b> (95% bootstrap CI {ci[0]:.3f}–{ci[1]:.3f}; lower is better) "
        f"on {len(y)} studies of {kind} data"
        + (f"; prior-only baseline {prior:.4f}" if prior is not None else "")
        + ".</p>"
        f'<p class="note">Operating thresholds: vertebrae (C1–C7) <b>{thresholds.vertebra:.3f}</b>, '
        f"patient_overall <b>{thresholds.patient:.3f}</b>; rule: {html.esc(thresholds.rule)}. A "
        "prediction is positive when p &gt; threshold. Intervals: percentile bootstrap over studies, "
        f"{n_boot} resamples.</p>"
    )
    rows = [
        [name, f"{table[name]['n_positive']}/{table[name]['n']}", f"{table[name]['threshold']:.3f}"]
        + [_fmt(table[name][m], table[name][f"{m}_ci95"]) for m in METRICS]
        for name in TARGETS
    ]
    sections = [
        "<h2>Summary</h2>" + summary,
        "<h2>Per-vertebra metrics (95% CI)</h2>"
        + html.table(
            ["target", "positives", "threshold", "accuracy", "precision", "recall", "F1", "AUROC"], rows
        ),
    ]
    sections += [f"<h2>{title}</h2>" + html.img_tag(pngs[name], title) for name, title in FIGURES.items()]
    doc = html.page("Evaluation report", sections, synthetic=synthetic, subtitle=subtitle)
    page = html.write_page(out / "report.html", doc)
    write_json_atomic(
        out / "report.json",
        {
            "data": "synthetic" if synthetic else "real",
            "n_studies": len(y),
            "thresholds": thresholds.as_dict(),
            "rsna_score": score,
            "rsna_score_ci95": list(ci),
            "per_target": table,
            "figures": {k: str(v) for k, v in pngs.items()},
        },
    )
    return EvaluationReport(page, pngs, thresholds, table, score, ci, figs)
