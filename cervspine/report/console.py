"""What the entry points print: the metrics table of an evaluation (rich), labelled with the data kind."""

from __future__ import annotations

from typing import Any


def print_metrics(metrics: dict[str, Any]) -> None:
    from rich.console import Console
    from rich.table import Table

    kind = metrics["data"].upper()
    table = Table(title=f"Validation metrics — {kind} DATA ({metrics['n_studies']} studies)")
    for col in ("target", "AUROC", "F1", "accuracy", "precision", "recall"):
        table.add_column(col)
    for t, r in metrics["per_target"].items():
        table.add_row(t, *(f"{r[k]:.3f}" for k in ("auroc", "f1", "accuracy", "precision", "recall")))
    lo, hi = metrics["rsna_score_ci95"]
    console = Console()
    console.print(table)
    console.print(
        f"rsna_score {metrics['rsna_score']:.4f} (95% CI {lo:.3f}–{hi:.3f}); prior baseline "
        f"{metrics['prior_baseline_rsna_score']:.4f}; ratio {metrics['score_ratio_to_prior']:.2f} "
        f"[{kind} data]"
    )
