"""timm backbones: any timm name, random init by default, pretrained weights from a local file.

``model.backbone`` in the configs is a partial of :func:`create_backbone` (``_target_``), called by the
LightningModule with ``in_chans``; another factory with that call works too. Checkpoints written before
the configs had a ``_target_`` hold a plain dict of :func:`create_backbone`'s options, also accepted.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import timm
import torch
import torch.nn as nn

BackboneSpec = Callable[..., nn.Module] | dict[str, Any]


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


def build_backbone(spec: BackboneSpec, in_chans: int) -> nn.Module:
    """The backbone a config (a factory) or an older checkpoint (a dict) describes, for ``in_chans``."""
    if isinstance(spec, Mapping):
        return create_backbone(in_chans=in_chans, **spec)
    return spec(in_chans=in_chans)


def without_pretrained_weights(spec: BackboneSpec) -> BackboneSpec:
    """``spec`` building the same architecture without fetching or reading pretrained weights (a
    checkpoint's own weights replace them)."""
    off = {"pretrained": False, "weights_path": None}
    if isinstance(spec, Mapping):
        return {**spec, **off}
    if isinstance(spec, functools.partial):
        return functools.partial(spec.func, *spec.args, **{**spec.keywords, **off})
    return spec


def backbone_name(spec: BackboneSpec | None) -> str:
    """The timm name in ``spec`` (for model cards and reports), else the factory's name."""
    if isinstance(spec, Mapping):
        return str(spec.get("name", "?"))
    if isinstance(spec, functools.partial):
        return str(spec.keywords.get("name", getattr(spec.func, "__name__", "?")))
    return getattr(spec, "__name__", "?") if spec is not None else "?"


def fast_backbone(backbone: nn.Module, *, channels_last: bool, compile: bool) -> nn.Module:
    """``backbone`` with NHWC weights (oneDNN/cuDNN then run NHWC kernels end to end) and/or compiled."""
    if channels_last:
        backbone.to(memory_format=torch.channels_last)
    return torch.compile(backbone) if compile else backbone
