"""Log report figures to Weights & Biases as images, through any ``WandbLogger`` that is present."""

from __future__ import annotations

import io
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from matplotlib.figure import Figure

from cervspine.report.figures import png_bytes


def wandb_loggers(loggers: Any) -> list[Any]:
    """The ``WandbLogger`` instances among ``loggers`` (one logger, a list, or None)."""
    if loggers is None:
        return []
    items = list(loggers) if isinstance(loggers, Iterable) else [loggers]
    return [lg for lg in items if type(lg).__name__ == "WandbLogger"]


def _image(value: Figure | str | Path | bytes) -> Any:
    from PIL import Image

    if isinstance(value, Figure):
        value = png_bytes(value)
    if isinstance(value, bytes):
        return Image.open(io.BytesIO(value)).convert("RGB")
    return Image.open(value).convert("RGB")


def log_figures(
    loggers: Any, images: Mapping[str, Figure | str | Path | bytes], step: int | None = None, prefix: str = ""
) -> int:
    """Log each figure (Figure, PNG path or PNG bytes) as ``wandb.Image`` under ``prefix + name`` to every
    WandbLogger in ``loggers``; returns how many loggers got them (0 when W&B is not the logger)."""
    targets = wandb_loggers(loggers)
    if not targets or not images:
        return 0
    pil = {name: _image(v) for name, v in images.items()}
    for lg in targets:
        for name, img in pil.items():
            lg.log_image(key=f"{prefix}{name}", images=[img], step=step, caption=[name])
    return len(targets)
