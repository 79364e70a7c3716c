"""CT windows, 2.5D stacking and augmentation. The torch-free part (windows, stacks, resizing) lives in
:mod:`cervspine.data.windows` and is re-exported here."""

from __future__ import annotations

from collections.abc import Sequence

import albumentations as A
import torch

from cervspine.data.windows import (  # noqa: F401  (re-exported: the public names of this module)
    WINDOWS,
    StackSpec,
    apply_windows,
    context_offsets,
    resize_hwc,
    resolve_windows,
    stack_slices,
    window_stack,
    windowed_volume,
)


def build_augment(
    transforms: Sequence[A.BasicTransform] | None, *, with_boxes: bool = False
) -> A.Compose | None:
    """Compose already-instantiated albumentations transforms (from the data config).

    albumentations keeps its own random generator: it is seeded from torch's seed (set by the run's
    ``seed``), so a seeded run repeats its augmentations exactly.
    """
    if not transforms:
        return None
    bbox = (
        A.BboxParams(format="albumentations", label_fields=["box_labels"], clip=True) if with_boxes else None
    )
    return A.Compose(list(transforms), bbox_params=bbox, seed=int(torch.initial_seed() % 2**31))
