"""Reports people can look at: evaluation and per-study figures, self-contained HTML, W&B images, model card.

- :mod:`.figures`     matplotlib figures (object API, no pyplot state), each can carry the SYNTHETIC DATA mark
- :mod:`.html`        self-contained HTML pages (PNG images embedded as base64)
- :mod:`.stats`       operating threshold (Youden's J) and vectorised bootstrap intervals
- :mod:`.evaluation`  ``python -m cervspine.evaluate ... report=true``
- :mod:`.saliency`    Grad-CAM (pytorch-grad-cam) on the stage-2 model
- :mod:`.study`       ``python -m cervspine.predict ... report=true``
- :mod:`.wandb`       log figures to any WandbLogger
- :mod:`.model_card`  MODEL_CARD.md next to a trained pipeline run
"""

SYNTHETIC_LABEL = "SYNTHETIC DATA"
"""The label every synthetic-data figure and page carries."""
