"""The in-memory form of one CT study."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np


@dataclass
class Study:
    """One axial CT series as a Hounsfield-unit volume.

    ``volume`` is (Z, H, W), index 0 the most superior slice; all per-slice arrays and ``files`` follow
    that order. ``stored_reversed`` is True when ascending instance number runs inferior → superior
    (the "reversed" RSNA studies).
    """

    uid: str
    folder: Path
    volume: np.ndarray  # (Z, H, W) HU; int16 when the rescale is integral, else float32
    instance_numbers: np.ndarray  # (Z,) int64
    z_positions: np.ndarray  # (Z,) mm along the slice normal (strictly decreasing)
    spacing: tuple[float, float, float]  # (dz, dy, dx) mm
    positions: np.ndarray  # (Z, 3) ImagePositionPatient, LPS mm
    orientation: np.ndarray  # (6,) ImageOrientationPatient (row dir, column dir)
    stored_reversed: bool
    files: list[Path] = field(default_factory=list)
    metadata: dict[str, Any] = field(default_factory=dict)

    @property
    def shape(self) -> tuple[int, int, int]:
        return tuple(self.volume.shape)  # type: ignore[return-value]

    @property
    def normal(self) -> np.ndarray:
        """Unit slice normal (row dir × column dir), LPS."""
        o = np.asarray(self.orientation, dtype=np.float64)
        n = np.cross(o[:3], o[3:])
        return n / np.linalg.norm(n)
