"""Stage 1 at inference: which of C1–C7 each slice of a study shows, and the spine's in-plane box."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from cervspine.cache import CachedStudy
from cervspine.data.stage1_table import BOX_COLS, COLUMNS, VIS_COLS
from cervspine.data.transforms import StackSpec, apply_windows, resize_hwc
from cervspine.inference.checkpoints import TrainedStage, load_module
from cervspine.inference.runtime import Runtime
from cervspine.models.vertebrae import VertebraeDetector


@dataclass(frozen=True)
class Stage1Output:
    """Raw stage-1 outputs of one study: visibility (Z, 7) in [0, 1] and spine boxes (Z, 4), normalised
    (y0, x0, y1, x1), NaN on slices where no cervical level reaches 0.5."""

    visibility: np.ndarray
    boxes: np.ndarray

    def frame(self, study: CachedStudy) -> pd.DataFrame:
        """The study's rows of the stage-1 table (``stage1_predictions.parquet``'s schema)."""
        df = pd.DataFrame(self.visibility, columns=VIS_COLS)
        df[BOX_COLS] = self.boxes
        df.insert(0, "instance_number", np.asarray(study.meta["instance_numbers"], dtype=np.int64))
        df.insert(0, "slice_index", np.arange(study.num_slices))
        df.insert(0, "StudyInstanceUID", study.uid)
        return df[COLUMNS]

    @classmethod
    def from_frame(cls, table: pd.DataFrame) -> Stage1Output:
        return cls(table[VIS_COLS].to_numpy(np.float32), table[BOX_COLS].to_numpy(np.float32))


def stack_channels(win: torch.Tensor, z: np.ndarray, offsets: np.ndarray) -> torch.Tensor:
    """(Z, nW, S, S) windowed volume → (B, nW·K, S, S) 2.5D stacks of slices ``z``, window-major."""
    idx = np.clip(z[:, None] + offsets[None, :], 0, win.shape[0] - 1)
    x = win[torch.as_tensor(idx)]  # (B, K, nW, S, S)
    return x.transpose(1, 2).reshape(len(z), -1, *win.shape[2:])


class Stage1(TrainedStage):
    """The trained vertebrae detector with the input settings of its checkpoint."""

    def __init__(self, model: VertebraeDetector, data_hp: dict, runtime: Runtime, checkpoint: Path):
        super().__init__(model, data_hp, runtime, checkpoint)
        self.stack = StackSpec.from_hparams(data_hp)

    @classmethod
    def from_checkpoint(cls, path: str | Path, runtime: Runtime) -> Stage1:
        model, data_hp = load_module(path, VertebraeDetector, runtime)
        return cls(model, data_hp, runtime, Path(path))

    def run(self, study: CachedStudy) -> Stage1Output:
        with self.runtime.threads():
            return self._run(study)

    @torch.inference_mode()
    def _run(self, study: CachedStudy) -> Stage1Output:
        size, offsets = self.stack.input_size, self.stack.offsets
        win = apply_windows(study.volume, self.stack.hu_windows, axis=1)  # (Z, nW, H, W), once per study
        if win.shape[2:] != (size, size):
            win = np.stack([resize_hwc(w.transpose(1, 2, 0), size).transpose(2, 0, 1) for w in win])
        win_t = torch.from_numpy(win)
        vis, boxes = [], []
        for start in range(0, study.num_slices, self.runtime.batch_size):
            z = np.arange(start, min(start + self.runtime.batch_size, study.num_slices))
            x = stack_channels(win_t, z, offsets).to(self.runtime.device)
            with self.runtime.autocast():
                logits, box = self.model(x)
            vis.append(torch.sigmoid(logits.float()).cpu().numpy())
            boxes.append(box.float().cpu().numpy())
        vis_a, box_a = np.concatenate(vis), np.concatenate(boxes)
        box_a[vis_a.max(axis=1) < 0.5] = np.nan
        return Stage1Output(vis_a, box_a)
