"""Reports people can look at: evaluation and per-study figures, self-contained HTML, W&B images, model card.

- :mod:`.figures`       matplotlib figures (object API, no pyplot state), each may carry the SYNTHETIC mark
- :mod:`.html`          self-contained HTML pages (PNG images embedded as base64)
- :mod:`.evaluation`    ``python -m cervspine.evaluate ... report=true``
- :mod:`.study`         ``python -m cervspine.predict ... report=true`` (Grad-CAM: cervspine.inference)
- :mod:`.saliency`      saliency maps drawn over the slice the model saw
- :mod:`.wandb_images`  log figures to any WandbLogger
- :mod:`.model_card`    MODEL_CARD.md next to a trained pipeline run
- :mod:`.console`       the metrics table the entry points print
"""

SYNTHETIC_LABEL = "SYNTHETIC DATA"
"""The label every synthetic-data figure and page carries."""
