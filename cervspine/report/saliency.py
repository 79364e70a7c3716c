"""Saliency maps drawn over the slice a model saw (the maps come from :mod:`cervspine.inference.saliency`)."""

from __future__ import annotations

import numpy as np
from pytorch_grad_cam.utils.image import show_cam_on_image


def overlay(gray: np.ndarray, cam: np.ndarray, image_weight: float = 0.6) -> np.ndarray:
    """(H, W) image in [0, 1] + (H, W) map in [0, 1] → (H, W, 3) uint8 RGB (pytorch-grad-cam's colouring)."""
    rgb = np.repeat(np.clip(gray, 0, 1)[..., None], 3, axis=2).astype(np.float32)
    return show_cam_on_image(rgb, cam.astype(np.float32), use_rgb=True, image_weight=image_weight)
