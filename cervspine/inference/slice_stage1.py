"""The per-slice vertebrae detector as a stage-1 strategy: each slice's 2.5D stack on its own."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch

from cervspine.cache import CachedStudy
from cervspine.data.windows import StackSpec, stack_slices, windowed_volume
from cervspine.inference.checkpoints import TrainedStage, load_module
from cervspine.inference.runtime import Runtime
from cervspine.inference.stage1 import Stage1Output, register_stage1
from cervspine.models.vertebrae import VertebraeDetector


@register_stage1("VertebraeDetector")
class SliceStage1(TrainedStage):
    """:class:`~cervspine.models.vertebrae.VertebraeDetector` on every slice, in batches."""

    kind = "slice"

    def __init__(self, model: VertebraeDetector, data_hp: dict, runtime: Runtime, checkpoint: Path):
        super().__init__(model, data_hp, runtime, checkpoint)
        self.stack = StackSpec.from_hparams(data_hp)

    @classmethod
    def from_checkpoint(
        cls, path: str | Path, runtime: Runtime, *, ckpt: dict[str, Any] | None = None
    ) -> SliceStage1:
        model, data_hp = load_module(path, VertebraeDetector, runtime, ckpt)
        return cls(model, data_hp, runtime, Path(path))

    def run(self, study: CachedStudy) -> Stage1Output:
        with self.runtime.threads():
            return self._run(study)

    @torch.inference_mode()
    def _run(self, study: CachedStudy) -> Stage1Output:
        win = windowed_volume(study.volume, self.stack)  # (Z, nW, S, S), once per study
        vis, boxes = [], []
        for start in range(0, study.num_slices, self.runtime.batch_size):
            z = np.arange(start, min(start + self.runtime.batch_size, study.num_slices))
            x = torch.from_numpy(stack_slices(win, z, self.stack.offsets)).to(self.runtime.device)
            with self.runtime.autocast():
                logits, box = self.model(x)
            vis.append(torch.sigmoid(logits.float()).cpu().numpy())
            boxes.append(box.float().cpu().numpy())
        return Stage1Output(np.concatenate(vis), np.concatenate(boxes)).masked()
