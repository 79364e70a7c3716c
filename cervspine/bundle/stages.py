"""A bundle's stages on an ONNX backend, torch-free: the same strategies as :mod:`cervspine.inference`
(stage 1 per slice or over the whole column; the slice classifier or the sequence model as stage 2), with
the same input builders (:mod:`cervspine.data.windows`, ``slice_inputs``, ``vertebra_crops``,
``column_sampler``) and the same numpy post-processing (:mod:`cervspine.scoring.answer`); only the
forward passes are the bundle's graphs (:mod:`cervspine.bundle.backends`).

Each stage answers like its torch counterpart: ``kind``, ``checkpoint`` (its graph file: what DICOM
results and records name and hash), ``data_hp`` (where the models were trained), ``image_size``,
``backbone``, ``calibrated``, ``explain`` (None: no saliency without torch).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from cervspine import VERTEBRAE
from cervspine.bundle.manifest import spec_from
from cervspine.cache.study import CachedStudy
from cervspine.data.column_sampler import ColumnSampler, read_column, spacing_mm
from cervspine.data.slice_crops import SliceCropSpec
from cervspine.data.slice_inputs import SliceInputs, slice_batch, slice_inputs
from cervspine.data.stage1_table import Stage1Output
from cervspine.data.vertebra_crops import VertebraCropper, VertebraExtent, study_sequences
from cervspine.data.windows import StackSpec, stack_slices, windowed_volume
from cervspine.scoring.aggregation import sequence_study
from cervspine.scoring.answer import (
    Stage2Result,
    localised_levels,
    prior_result,
    sequence_result,
    slice_study,
)
from cervspine.scoring.calibration import calibrate_study


class BundleStage:
    """What every bundle stage holds: its manifest entry, graphs, batch size and image size."""

    def __init__(
        self, bundle: Path, record: dict[str, Any], graphs: dict[str, Any], batch_size: int, size: int
    ):
        self.record, self.graphs, self.batch_size = record, graphs, int(batch_size)
        roles = record["graphs"]
        self.checkpoint = Path(bundle) / roles[next(iter(roles))]["file"]
        training = record.get("training") or {}
        self.data_hp = {
            "root": training.get("data_root"),
            "synthetic": training.get("synthetic"),
            "image_size": size,
        }
        self._image_size = int(size)

    @property
    def image_size(self) -> int:
        return self._image_size

    @property
    def backbone(self) -> str:
        return str(self.record.get("backbone", "?"))

    def explain(self, *_: Any) -> None:
        """No saliency from a bundle (Grad-CAM needs the torch model)."""
        return None


class SliceStage1Graph(BundleStage):
    """The per-slice detector's graph on every slice, in batches."""

    kind = "slice"

    def __init__(self, *args: Any):
        super().__init__(*args)
        self.stack = spec_from(StackSpec, self.record["inputs"]["stack"])

    def run(self, study: CachedStudy) -> Stage1Output:
        win = windowed_volume(study.volume, self.stack)  # (Z, nW, S, S), once per study
        vis, boxes = [], []
        for start in range(0, study.num_slices, self.batch_size):
            z = np.arange(start, min(start + self.batch_size, study.num_slices))
            v, b = self.graphs["model"]({"image": stack_slices(win, z, self.stack.offsets)})
            vis.append(v)
            boxes.append(b)
        return Stage1Output(np.concatenate(vis), np.concatenate(boxes)).masked()


class ColumnStage1Graph(BundleStage):
    """The whole-column model: the encoder graph on the sampled slices in batches, the reader graph on
    the study's sequence, the answers interpolated to every slice and averaged over the start offsets."""

    kind = "column"

    def __init__(self, *args: Any):
        super().__init__(*args)
        self.sampler = spec_from(ColumnSampler, self.record["inputs"]["sampler"])

    def run(self, study: CachedStudy) -> Stage1Output:
        dz = spacing_mm(study)
        step = np.array([self.sampler.stride(dz) * dz], dtype=np.float32)

        def read(idx: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
            feats = []
            for start in range(0, len(idx), self.batch_size):
                chunk = idx[start : start + self.batch_size]
                slices = self.sampler.inputs(study.volume, chunk, dz)
                feats.append(self.graphs["encoder"]({"slices": slices})[0])
            feeds = {
                "features": np.concatenate(feats)[None].astype(np.float32),
                "lengths": np.array([len(idx)], dtype=np.int64),
                "step_mm": step,
            }
            vis, box = self.graphs["reader"](feeds)
            return vis[0], box[0]

        return Stage1Output(*read_column(self.sampler, study.num_slices, dz, read)).masked()


class SliceStage2Graph(BundleStage):
    """The slice classifier's graph on the spine crops of every slice that shows a level; aggregation and
    the study calibration as the checkpoint's."""

    kind = "slice"

    def __init__(self, *args: Any):
        super().__init__(*args)
        self.stack = spec_from(StackSpec, self.record["inputs"]["stack"])
        self.spec = spec_from(SliceCropSpec, self.record["inputs"]["crop"])
        self.aggregation = dict(self.record["aggregation"])
        self.prior = np.asarray(self.record["prior"], dtype=np.float64)
        cal = self.record["calibration"]
        self._calibrate = (
            functools.partial(calibrate_study, params=cal["params"], weights=cal["shrink"], prior=self.prior)
            if cal["applies"]
            else None
        )

    @property
    def calibrated(self) -> bool:
        return self._calibrate is not None

    def inputs(self, study: CachedStudy, stage1: Stage1Output) -> SliceInputs:
        return slice_inputs(study, stage1, self.spec, self.stack)

    def slice_probabilities(self, inputs: SliceInputs) -> np.ndarray:
        probs = [np.zeros((0, len(VERTEBRAE)), dtype=np.float32)]
        for start in range(0, len(inputs.slices), self.batch_size):
            imgs, metas, _ = slice_batch(inputs, inputs.slices[start : start + self.batch_size], self.stack)
            probs.append(self.graphs["model"]({"image": imgs, "meta": metas})[0])
        return np.concatenate(probs)

    def score(self, inputs: SliceInputs) -> Stage2Result:
        z = inputs.slices
        localised, missing = localised_levels(inputs.visibility, z, self.spec.visible_threshold)
        if not localised.any():
            return prior_result(self.prior, missing)
        probs = self.slice_probabilities(inputs)
        final, agg_s = slice_study(
            probs, inputs.visibility, z, localised, self.prior, self.aggregation, self._calibrate
        )
        return Stage2Result(final, z, probs, aggregate_s=agg_s, not_localised=missing)


@dataclass
class Sequences:
    """A study's 7 crop sequences (the sequence model's inputs)."""

    extents: list[VertebraExtent]
    images: np.ndarray  # (7, N, C, S, S)
    slices: np.ndarray  # (7, N), -1 absent
    present: np.ndarray  # (7,) bool


class SequenceStage2Graph(BundleStage):
    """The sequence model's graph on the 7 stage-1-placed crop sequences of a study."""

    kind = "sequence"
    calibrated = False

    def __init__(self, *args: Any):
        super().__init__(*args)
        self.cropper = spec_from(VertebraCropper, self.record["inputs"]["cropper"])
        self.prior = np.asarray(self.record["prior"], dtype=np.float64)

    def inputs(self, study: CachedStudy, stage1: Stage1Output) -> Sequences:
        vis, boxes = stage1.visibility, stage1.boxes
        extents = self.cropper.extents_from_stage1(vis, boxes)
        images, slices, present = study_sequences(self.cropper, study.volume, extents, vis, boxes)
        return Sequences(extents, images, slices, present)

    def score(self, inputs: Sequences) -> Stage2Result:
        if not inputs.present.any():
            return prior_result(self.prior, [str(v) for v in VERTEBRAE])
        feeds = {"image": inputs.images[None], "present": inputs.present[None].astype(np.float32)}
        out = self.graphs["model"](feeds)
        overall = out[1] if len(out) > 1 else None
        probs = sequence_study(out[0][0], inputs.present, self.prior.astype(np.float32), overall)
        extents = [e.as_dict() for e in inputs.extents]
        return sequence_result(probs, inputs.slices, extents, inputs.present)


STAGES = {
    ("stage1", "slice"): SliceStage1Graph,
    ("stage1", "column"): ColumnStage1Graph,
    ("stage2", "slice"): SliceStage2Graph,
    ("stage2", "sequence"): SequenceStage2Graph,
}
