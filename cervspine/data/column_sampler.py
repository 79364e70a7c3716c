"""The whole-column stage 1's sampling of a study, torch-free: which slices form the column sequence and
their 2.5D inputs (:class:`ColumnSampler`), and the per-position answers spread back to every slice
(:func:`to_every_slice`, :func:`read_column`). What the column model's inference needs of
:mod:`cervspine.data.column` without its Dataset/DataModule (torch, albumentations), so a model bundle's
runtime can use it.

:mod:`cervspine.data.column` (training) and :mod:`cervspine.inference.column_stage1` import them from here.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from cervspine.cache.study import CachedStudy
from cervspine.data.windows import WINDOWS, StackSpec, windowed_resized


@dataclass(frozen=True)
class ColumnSampler:
    """Slices → positions of the column sequence, and their model inputs.

    ``read_offsets``: inference reads the column from this many start offsets spread evenly over the
    stride and averages the answers (0: every offset, so each slice is once a position; 1: offset 0 only).
    On the demo's held-out folders every offset lifted slice F1 at the level boundaries by up to 0.07
    against offset 0 alone (SYNTHETIC; experiments/stage1_comparison.md)."""

    input_size: int = 64
    context: int = 1
    windows: tuple[tuple[float, float], ...] = (WINDOWS["bone"],)
    z_step_mm: float = 2.0
    max_positions: int = 320
    read_offsets: int = 0

    @classmethod
    def from_hparams(cls, hp: Mapping[str, Any]) -> ColumnSampler:
        stack, d = StackSpec.from_hparams(hp), cls
        return cls(
            stack.input_size,
            stack.context,
            tuple(stack.hu_windows),
            float(hp.get("z_step_mm", d.z_step_mm)),
            int(hp.get("max_positions", d.max_positions)),
            int(hp.get("read_offsets", d.read_offsets)),
        )

    @property
    def channels(self) -> int:
        return (2 * self.context + 1) * len(self.windows)

    def stride(self, dz_mm: float) -> int:
        """Slices between positions for slices ``dz_mm`` apart."""
        return max(1, int(round(self.z_step_mm / max(float(dz_mm), 1e-3))))

    def positions(self, num_slices: int, dz_mm: float, offset: int = 0) -> np.ndarray:
        """Slice indices of the positions (every ``stride``-th slice from ``offset``)."""
        return np.arange(min(offset, num_slices - 1), num_slices, self.stride(dz_mm))

    def read_positions(self, num_slices: int, dz_mm: float) -> list[np.ndarray]:
        """The position sets inference reads, one per start offset (see ``read_offsets``)."""
        k = self.stride(dz_mm)
        count = k if self.read_offsets <= 0 else min(k, self.read_offsets)
        starts = np.unique(np.linspace(0, k, count, endpoint=False).astype(int))
        return [self.positions(num_slices, dz_mm, int(o)) for o in starts]

    def inputs(self, volume: np.ndarray, idx: np.ndarray, dz_mm: float) -> np.ndarray:
        """(L, C, S, S) float32 of the positions ``idx``: each a window-major 2.5D stack of the slices
        ``idx ± j·stride`` (clamped at the scan's ends); only the slices needed are read and windowed."""
        k, z = self.stride(dz_mm), volume.shape[0]
        offsets = np.arange(-self.context, self.context + 1) * k
        need = np.clip(np.asarray(idx)[:, None] + offsets[None, :], 0, z - 1)  # (L, K)
        uniq, inv = np.unique(need, return_inverse=True)
        win = windowed_resized(np.asarray(volume[uniq]), self.windows, self.input_size)  # (U, nW, S, S)
        stacks = win[inv.reshape(need.shape)]  # (L, K, nW, S, S)
        return np.ascontiguousarray(stacks.transpose(0, 2, 1, 3, 4).reshape(len(idx), -1, *win.shape[2:]))


def spacing_mm(study: CachedStudy) -> float:
    """A cached study's slice spacing along z (mm)."""
    return float(study.meta["spacing"][0])


def to_every_slice(values: np.ndarray, positions: np.ndarray, num_slices: int) -> np.ndarray:
    """(L, K) values at slice ``positions`` → (Z, K), linear between positions, held beyond the ends."""
    z = np.arange(num_slices)
    cols = [np.interp(z, positions, values[:, k]) for k in range(values.shape[1])]
    return np.stack(cols, axis=1).astype(np.float32)


ColumnReader = Callable[[np.ndarray], tuple[np.ndarray, np.ndarray]]
"""Positions (L,) → the model's (L, 7) presence probabilities and (L, 4) boxes there."""


def read_column(
    sampler: ColumnSampler, num_slices: int, dz_mm: float, read: ColumnReader
) -> tuple[np.ndarray, np.ndarray]:
    """(Z, 7) presence probabilities and (Z, 4) boxes of every slice: ``read`` on each of the sampler's
    position sets (:meth:`ColumnSampler.read_positions`), spread to every slice and averaged."""
    vis, boxes = [], []
    for idx in sampler.read_positions(num_slices, dz_mm):
        v, b = read(idx)
        vis.append(to_every_slice(v, idx, num_slices))
        boxes.append(to_every_slice(b, idx, num_slices))
    return np.mean(vis, axis=0).astype(np.float32), np.mean(boxes, axis=0).astype(np.float32)
