"""The competition metric at its documented import path (``cervspine.metrics.rsna_score``); the
scoring code lives in :mod:`cervspine.scoring`."""

from cervspine.scoring.metrics import classification_report, prior_baseline, rsna_score

__all__ = ["classification_report", "prior_baseline", "rsna_score"]
