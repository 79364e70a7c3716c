"""Grad-CAM (pytorch-grad-cam) on the stage-2 fracture classifier, for a few chosen slices.

The classifier takes image + metadata; :class:`MetaBound` closes over the metadata so Grad-CAM sees a
plain image → logits model. The target layer is the backbone's deepest feature stage (timm's
``feature_info``, else every module) whose map is at least ``min_side`` pixels a side: a 1×1 or 2×2 map
(the last stage of a small input) cannot localise anything.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn as nn
from pytorch_grad_cam import GradCAM
from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget


class MetaBound(nn.Module):
    """``model(image, meta)["fracture"]`` as a one-input module (metadata fixed)."""

    def __init__(self, model: nn.Module, meta: torch.Tensor):
        super().__init__()
        self.model, self.meta = model, meta

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        return self.model(image, self.meta)["fracture"]


def find_target_layer(backbone: nn.Module, example: torch.Tensor, min_side: int = 4) -> tuple[str, nn.Module]:
    """(name, module): the last module, in execution order, with a 4D output at least ``min_side`` a side
    (the last 4D output when none is that large). Candidates: timm's ``feature_info`` stages, else all."""
    info = getattr(backbone, "feature_info", None) or []
    names = [i["module"] for i in info if isinstance(i, dict) and i.get("module")]
    named = dict(backbone.named_modules())
    candidates = [(n, named[n]) for n in names if n in named] or [(n, m) for n, m in named.items() if n]
    order: list[tuple[str, tuple[int, ...]]] = []

    def hook(name: str):
        def fn(_m: nn.Module, _i: object, out: object) -> None:
            if isinstance(out, torch.Tensor) and out.ndim == 4:
                order.append((name, tuple(out.shape)))

        return fn

    handles = [m.register_forward_hook(hook(n)) for n, m in candidates]
    try:
        with torch.no_grad():
            backbone(example)
    finally:
        for h in handles:
            h.remove()
    if not order:
        raise ValueError(f"{type(backbone).__name__}: no module with a 4D output (not a CNN?)")
    big = [n for n, s in order if min(s[2:]) >= min_side]
    name = big[-1] if big else order[-1][0]
    return name, named[name]


def gradcam(
    model: nn.Module,
    image: torch.Tensor,
    meta: torch.Tensor,
    classes: list[int],
    min_side: int = 4,
) -> tuple[np.ndarray, str]:
    """Grad-CAM maps (n, S, S) in [0, 1] of ``classes[i]``'s logit for each image, and the layer used."""
    name, layer = find_target_layer(model.backbone, image[:1], min_side)
    wrapped = MetaBound(model, meta)
    with torch.enable_grad(), GradCAM(model=wrapped, target_layers=[layer]) as cam:
        maps = cam(input_tensor=image, targets=[ClassifierOutputTarget(int(c)) for c in classes])
    return np.asarray(maps, dtype=np.float32), name
