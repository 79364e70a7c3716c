"""timm backbones: any timm name, random init by default, pretrained weights from a local file."""

from __future__ import annotations

from pathlib import Path

import timm
import torch.nn as nn


def create_backbone(
    name: str,
    in_chans: int,
    *,
    pretrained: bool = False,
    weights_path: str | None = None,
    drop_path_rate: float | None = None,
) -> nn.Module:
    """A timm feature extractor (``num_classes=0``; ``.num_features`` gives its width).

    ``weights_path`` loads pretrained weights from a local file (timm adapts the stem to ``in_chans``);
    ``pretrained=True`` without a path asks timm to download them, which needs internet access.
    """
    kwargs = {"in_chans": in_chans, "num_classes": 0}
    if drop_path_rate is not None:
        kwargs["drop_path_rate"] = drop_path_rate
    if weights_path:
        path = Path(weights_path).expanduser()
        if not path.is_file():
            raise FileNotFoundError(f"pretrained weights file not found: {path}")
        return timm.create_model(name, pretrained=True, pretrained_cfg_overlay={"file": str(path)}, **kwargs)
    return timm.create_model(name, pretrained=pretrained, **kwargs)
