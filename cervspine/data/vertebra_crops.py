"""Per-vertebra 2.5D crop sequences (stage 2 of the top RSNA 2022 solutions).

For each study and each of C1..C7: a slice range and a square in-plane box (:class:`VertebraExtent`),
from the segmentation where one exists (the exact mask of that vertebra) or from the stage-1 outputs
(per-slice visibility (Z, 7) and spine boxes (Z, 4), normalised (y0, x0, y1, x1)); then ``n_slices``
slices sampled evenly through the range, each a windowed 2.5D stack of the crop, resized to
``input_size`` (:meth:`VertebraCropper.sequence`).

Geometry is computed once per study; a sequence reads only its ``n_slices × len(offsets)`` crops from
the memory-mapped cache. Slice order is the cache's (superior first, whatever the file order).

Mask channel (``mask``), appended after the image channels:

- ``none``: no mask channel.
- ``box``: the spine box of each sampled slice drawn into the crop, valued at the slice's visibility of
  the vertebra (a soft mask; zeros on slices without a box). Available for every study, the same in
  training and inference.
- ``auto``: the vertebra's segmentation mask (area-resized, so soft at the edges) where the study has a
  segmentation and it is passed in, else ``box``. Inference never passes a segmentation (test studies
  have none), so ``auto`` trains partly on exact masks and predicts on box masks.

A vertebra never visible gets an all-zero sequence and ``present=False``: the model's output for it is
replaced by the prior. A vertebra touching the first/last slice is kept (its range clipped to the
scan) and flagged ``truncated``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from cervspine import VERTEBRAE
from cervspine.data.spine import crop_pixels
from cervspine.data.windows import WINDOWS, StackSpec, parallel_map, resize_hwc, windowed_resized

N_VERT = len(VERTEBRAE)
MASK_MODES = ("none", "box", "auto")


@dataclass(frozen=True)
class VertebraExtent:
    """Where one vertebra lies in one study (slice indices inclusive; box normalised, square)."""

    vertebra: int  # 0..6 for C1..C7
    present: bool
    z0: int = -1
    z1: int = -1
    box: tuple[float, float, float, float] = (0.0, 0.0, 1.0, 1.0)
    truncated: bool = False  # the range touches the scan's first or last slice
    source: str = "none"  # "segmentation" | "stage1" | "none"

    def sample(self, n: int) -> np.ndarray:
        """``n`` slice indices evenly through [z0, z1] (repeats when the range is shorter); -1 if absent."""
        if not self.present:
            return np.full(n, -1, dtype=np.int64)
        return np.rint(np.linspace(self.z0, self.z1, n)).astype(np.int64)

    def as_dict(self) -> dict[str, Any]:
        return {
            "present": self.present,
            "z0": self.z0,
            "z1": self.z1,
            "box": [round(float(b), 4) for b in self.box],
            "truncated": self.truncated,
            "source": self.source,
        }


def _main_run(idx: np.ndarray, weight: np.ndarray, max_gap: int) -> tuple[int, int]:
    """The run of ``idx`` (sorted slice indices, gaps ≤ ``max_gap`` joined) with the most ``weight``."""
    breaks = np.flatnonzero(np.diff(idx) > max_gap + 1)
    starts = np.r_[0, breaks + 1]
    ends = np.r_[breaks, len(idx) - 1]
    best = int(np.argmax([weight[s : e + 1].sum() for s, e in zip(starts, ends)]))
    return int(idx[starts[best]]), int(idx[ends[best]])


def _square(cy: float, cx: float, side: float) -> tuple[float, float, float, float]:
    """A square box of ``side`` centred near (cy, cx), shifted to lie inside [0, 1]²."""
    side = float(min(side, 1.0))
    half = side / 2
    cy, cx = float(np.clip(cy, half, 1 - half)), float(np.clip(cx, half, 1 - half))
    return (cy - half, cx - half, cy + half, cx + half)


@dataclass(frozen=True)
class VertebraCropper:
    """How sequences are cut: geometry options and the stack/resize settings of the model's input."""

    n_slices: int = 12
    input_size: int = 64
    offsets: tuple[int, ...] = (-1, 0, 1)
    windows: tuple[tuple[float, float], ...] = (WINDOWS["bone"],)
    visible_threshold: float = 0.3  # a vertebra is present when its peak visibility reaches this
    relative_threshold: float = 0.5  # its range: slices at ≥ this fraction of its peak visibility
    margin: float = 0.2  # in-plane margin each side, as a fraction of the box side
    z_margin: float = 0.1  # slices added each side, as a fraction of the vertebra's slice count
    min_size: float = 0.08  # smallest crop side, fraction of the image
    max_gap: int = 3  # stage-1 detections this many slices apart still form one run
    mask: str = "none"

    def __post_init__(self) -> None:
        if self.mask not in MASK_MODES:
            raise ValueError(f"mask must be one of {MASK_MODES}, got {self.mask!r}")
        if self.n_slices < 1 or self.input_size < 1:
            raise ValueError("n_slices and input_size must be positive")

    @classmethod
    def from_hparams(cls, hp: dict[str, Any]) -> VertebraCropper:
        """From a VertebraSequenceDataModule's hyper-parameters (also those saved in a checkpoint)."""
        stack, d = StackSpec.from_hparams(hp), cls
        return cls(
            n_slices=int(hp.get("n_slices", d.n_slices)),
            input_size=int(hp["input_size"]),
            offsets=tuple(int(o) for o in stack.offsets),
            windows=tuple(stack.hu_windows),
            visible_threshold=float(hp.get("visible_threshold", d.visible_threshold)),
            relative_threshold=float(hp.get("relative_threshold", d.relative_threshold)),
            margin=float(hp.get("crop_margin", d.margin)),
            z_margin=float(hp.get("z_margin", d.z_margin)),
            min_size=float(hp.get("min_crop", d.min_size)),
            max_gap=int(hp.get("max_gap", d.max_gap)),
            mask=str(hp.get("mask", d.mask)),
        )

    @property
    def image_channels(self) -> int:
        return len(self.offsets) * len(self.windows)

    @property
    def channels(self) -> int:
        return self.image_channels + (self.mask != "none")

    # ---- geometry ---------------------------------------------------------------------------------
    def _z_range(self, z0: int, z1: int, num_slices: int) -> tuple[int, int, bool]:
        truncated = z0 == 0 or z1 == num_slices - 1
        pad = int(round(self.z_margin * (z1 - z0 + 1)))
        return max(z0 - pad, 0), min(z1 + pad, num_slices - 1), truncated

    def extents_from_stage1(self, vis: np.ndarray, boxes: np.ndarray) -> list[VertebraExtent]:
        """Present: peak visibility ≥ ``visible_threshold``. Range: the main run (most visibility) of
        slices at ≥ ``relative_threshold`` × peak, robust to an under-confident stage 1. Box: the spine
        boxes of the range (median centre, 90th-percentile side), else of the whole study."""
        vis, boxes = np.asarray(vis, dtype=np.float32), np.asarray(boxes, dtype=np.float32)
        finite = np.isfinite(boxes).all(axis=1)
        out = []
        for v in range(N_VERT):
            peak = float(vis[:, v].max()) if len(vis) else 0.0
            if peak < self.visible_threshold:
                out.append(VertebraExtent(v, False))
                continue
            hit = np.flatnonzero(vis[:, v] >= self.relative_threshold * peak)
            z0, z1 = _main_run(hit, vis[hit, v], self.max_gap)
            b = boxes[z0 : z1 + 1][finite[z0 : z1 + 1]]
            if not len(b):
                b = boxes[finite]
            if len(b):
                cy, cx = np.median((b[:, 0] + b[:, 2]) / 2), np.median((b[:, 1] + b[:, 3]) / 2)
                side = max(np.quantile(b[:, 2] - b[:, 0], 0.9), np.quantile(b[:, 3] - b[:, 1], 0.9))
            else:  # no box anywhere: a centred half-image crop
                cy, cx, side = 0.5, 0.5, 0.5 / (1 + 2 * self.margin)
            side = max(float(side) * (1 + 2 * self.margin), self.min_size)
            za, zb, trunc = self._z_range(z0, z1, len(vis))
            out.append(VertebraExtent(v, True, za, zb, _square(cy, cx, side), trunc, "stage1"))
        return out

    def extents_from_segmentation(self, seg: np.ndarray, presence: np.ndarray) -> list[VertebraExtent]:
        """Slice range from ``presence`` (Z, 7); box: the bounding box of the vertebra's label there."""
        h, w = seg.shape[1:]
        out = []
        for v in range(N_VERT):
            hit = np.flatnonzero(np.asarray(presence)[:, v] > 0)
            if not len(hit):
                out.append(VertebraExtent(v, False))
                continue
            z0, z1 = int(hit[0]), int(hit[-1])
            m = (np.asarray(seg[z0 : z1 + 1]) == v + 1).any(axis=0)
            if not m.any():
                out.append(VertebraExtent(v, False))
                continue
            ys, xs = np.flatnonzero(m.any(axis=1)), np.flatnonzero(m.any(axis=0))
            y0, y1, x0, x1 = ys[0] / h, (ys[-1] + 1) / h, xs[0] / w, (xs[-1] + 1) / w
            side = max(max(y1 - y0, x1 - x0) * (1 + 2 * self.margin), self.min_size)
            za, zb, trunc = self._z_range(z0, z1, seg.shape[0])
            box = _square((y0 + y1) / 2, (x0 + x1) / 2, side)
            out.append(VertebraExtent(v, True, za, zb, box, trunc, "segmentation"))
        return out

    # ---- sequences --------------------------------------------------------------------------------
    def sequence(
        self,
        volume: np.ndarray,
        extent: VertebraExtent,
        vis: np.ndarray | None = None,
        boxes: np.ndarray | None = None,
        seg: np.ndarray | None = None,
    ) -> tuple[np.ndarray, np.ndarray]:
        """((n_slices, C, S, S) float32, (n_slices,) slice indices) for one vertebra of one study.

        ``volume`` is the (memory-mapped) HU volume; ``vis``/``boxes`` (stage-1 or segmentation-derived)
        feed the ``box`` mask, ``seg`` the ``auto`` mask. Absent vertebra → zeros and indices -1.
        """
        n, s = self.n_slices, self.input_size
        zs = extent.sample(n)
        if not extent.present:
            return np.zeros((n, self.channels, s, s), dtype=np.float32), zs
        num, height, width = volume.shape
        y0, x0, y1, x1 = crop_pixels(np.asarray(extent.box), height, width)
        idx = np.clip(zs[:, None] + np.asarray(self.offsets)[None, :], 0, num - 1)  # (n, K)
        uniq, inv = np.unique(idx, return_inverse=True)
        hu = np.asarray(volume[uniq, y0:y1, x0:x1])  # only the needed crops, each slice once
        win = windowed_resized(hu, self.windows, s)  # (K', nW, S, S): each slice resized once
        stacks = win[inv.reshape(idx.shape)]  # (n, K, nW, S, S)
        img = stacks.transpose(0, 2, 1, 3, 4).reshape(n, self.image_channels, s, s)  # window-major
        if self.mask == "none":
            return np.ascontiguousarray(img, dtype=np.float32), zs
        mask = self._mask(extent, zs, (y0, x0, y1, x1), (height, width), vis, boxes, seg)
        return np.ascontiguousarray(np.concatenate([img, mask[:, None]], axis=1), dtype=np.float32), zs

    def _mask(
        self,
        extent: VertebraExtent,
        zs: np.ndarray,
        crop: tuple[int, int, int, int],
        shape: tuple[int, int],
        vis: np.ndarray | None,
        boxes: np.ndarray | None,
        seg: np.ndarray | None,
    ) -> np.ndarray:
        """(n_slices, S, S) mask channel (see the module docstring)."""
        n, s = len(zs), self.input_size
        y0, x0, y1, x1 = crop
        if self.mask == "auto" and seg is not None:
            m = (np.asarray(seg[zs, y0:y1, x0:x1]) == extent.vertebra + 1).astype(np.float32)
            return resize_hwc(np.ascontiguousarray(m.transpose(1, 2, 0)), s).transpose(2, 0, 1)
        out = np.zeros((n, s, s), dtype=np.float32)
        if vis is None or boxes is None:
            return out
        height, width = shape
        sy, sx = s / (y1 - y0), s / (x1 - x0)
        for i, z in enumerate(zs):
            b = boxes[z]
            if not np.isfinite(b).all():
                continue
            by0, bx0, by1, bx1 = crop_pixels(b, height, width)
            r0, r1 = (
                int(np.clip(np.floor((by0 - y0) * sy), 0, s)),
                int(np.clip(np.ceil((by1 - y0) * sy), 0, s)),
            )
            c0, c1 = (
                int(np.clip(np.floor((bx0 - x0) * sx), 0, s)),
                int(np.clip(np.ceil((bx1 - x0) * sx), 0, s)),
            )
            out[i, r0:r1, c0:c1] = float(vis[z, extent.vertebra])
        return out


def study_sequences(
    cropper: VertebraCropper,
    volume: np.ndarray,
    extents: Sequence[VertebraExtent],
    vis: np.ndarray | None = None,
    boxes: np.ndarray | None = None,
    seg: np.ndarray | None = None,
    threads: int | None = None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """All 7 of a study: images (7, n, C, S, S), slice indices (7, n), present (7,) bool. The vertebrae
    are cut side by side on ``threads`` threads (None: the usable cores, :func:`input_threads`)."""
    seqs = parallel_map(lambda e: cropper.sequence(volume, e, vis, boxes, seg), extents, threads)
    images = np.stack([x for x, _ in seqs])
    slices = np.stack([z for _, z in seqs])
    return images, slices, np.array([e.present for e in extents])
