"""The whole-column model as a stage-1 strategy: the study's slices sampled about ``z_step_mm`` apart,
encoded in batches, read as one sequence, and the per-position answers interpolated to every slice (and
averaged over the sampler's start offsets, :func:`~cervspine.data.column_sampler.read_column`)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch

from cervspine.cache import CachedStudy
from cervspine.data.column_sampler import ColumnSampler, read_column, spacing_mm
from cervspine.inference.checkpoints import TrainedStage, load_module
from cervspine.inference.runtime import Runtime
from cervspine.inference.stage1 import Stage1Output, register_stage1
from cervspine.models.column import VertebraeColumnDetector


@register_stage1("VertebraeColumnDetector")
class ColumnStage1(TrainedStage):
    """:class:`~cervspine.models.column.VertebraeColumnDetector` over the whole study."""

    kind = "column"

    def __init__(self, model: VertebraeColumnDetector, data_hp: dict, runtime: Runtime, checkpoint: Path):
        super().__init__(model, data_hp, runtime, checkpoint)
        self.sampler = ColumnSampler.from_hparams(data_hp)

    @classmethod
    def from_checkpoint(
        cls, path: str | Path, runtime: Runtime, *, ckpt: dict[str, Any] | None = None
    ) -> ColumnStage1:
        model, data_hp = load_module(path, VertebraeColumnDetector, runtime, ckpt)
        return cls(model, data_hp, runtime, Path(path))

    def run(self, study: CachedStudy) -> Stage1Output:
        with self.runtime.threads():
            return self._run(study)

    @torch.inference_mode()
    def _run(self, study: CachedStudy) -> Stage1Output:
        dz = spacing_mm(study)
        step = torch.tensor([self.sampler.stride(dz) * dz], device=self.runtime.device)

        def read(idx: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
            feats = []
            for start in range(0, len(idx), self.runtime.batch_size):
                chunk = idx[start : start + self.runtime.batch_size]
                x = torch.from_numpy(self.sampler.inputs(study.volume, chunk, dz)).to(self.runtime.device)
                with self.runtime.autocast():
                    feats.append(self.model.encode(x).float())
            with self.runtime.autocast():
                logits, box = self.model.read_column(torch.cat(feats)[None], torch.tensor([len(idx)]), step)
            return torch.sigmoid(logits[0].float()).cpu().numpy(), box[0].float().cpu().numpy()

        return Stage1Output(*read_column(self.sampler, study.num_slices, dz, read)).masked()
