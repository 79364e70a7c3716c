"""Reading a trained stage back: the LightningModule with its weights, and the data hyper-parameters its
DataModule recorded (how its inputs were made), with the checks that make a wrong file a clear error."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import lightning as L

from cervspine.inference.runtime import Runtime
from cervspine.models.backbones import backbone_name, without_pretrained_weights
from cervspine.models.safe_load import load_checkpoint


def read_checkpoint(path: str | Path) -> dict[str, Any]:
    """The checkpoint dict (``weights_only``: :mod:`cervspine.models.safe_load`); a missing file, one not
    written by ``torch.save`` or one that could run code is a named error."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    try:
        return load_checkpoint(path)
    except ValueError:
        raise
    except Exception as e:
        raise ValueError(f"{path}: not a readable checkpoint ({type(e).__name__}: {e})") from e


def model_class_name(ckpt: dict[str, Any], default: str) -> str:
    """The LightningModule class a checkpoint records (``model_class``; older ones: ``default``)."""
    return str(ckpt.get("model_class", default))


def load_module(
    path: str | Path, cls: type[L.LightningModule], runtime: Runtime, ckpt: dict[str, Any] | None = None
) -> tuple[L.LightningModule, dict[str, Any]]:
    """(module ready on ``runtime``'s device, its data hyper-parameters). The backbone is built without
    pretrained weights: the checkpoint's own replace them."""
    ckpt = read_checkpoint(path) if ckpt is None else ckpt
    hp = dict(ckpt.get("hyper_parameters") or {})
    if "backbone" not in hp:
        raise ValueError(f"{path}: no model hyper-parameters (not a cervspine checkpoint)")
    data_hp = dict(ckpt.get("datamodule_hyper_parameters") or {})
    if not data_hp:
        raise ValueError(
            f"{path}: checkpoint has no datamodule hyper-parameters (not made by cervspine.train)"
        )
    model = cls.load_from_checkpoint(
        path,
        map_location="cpu",
        backbone=without_pretrained_weights(hp["backbone"]),
        compile=False,
        weights_only=True,
    )
    return runtime.prepare(model), data_hp


def image_size(data_hp: dict[str, Any]) -> int | None:
    """The cache image size a stage was trained on (studies must be cached at this size)."""
    size = data_hp.get("image_size")
    return None if size is None else int(size)


class TrainedStage:
    """What every trained stage at inference holds: the module, its data hyper-parameters, the runtime
    and the checkpoint it came from; the cache size and backbone it was trained with."""

    def __init__(self, model: L.LightningModule, data_hp: dict[str, Any], runtime: Runtime, checkpoint: Path):
        self.model, self.data_hp, self.runtime = model, data_hp, runtime
        self.checkpoint = Path(checkpoint)

    @property
    def image_size(self) -> int | None:
        return image_size(self.data_hp)

    @property
    def backbone(self) -> str:
        return backbone_name(self.model.hparams.get("backbone"))
