"""Training callbacks beyond Lightning's own."""

from __future__ import annotations

from lightning.pytorch.callbacks import WeightAveraging
from torch.optim.swa_utils import get_ema_multi_avg_fn


class EMAWeightAveraging(WeightAveraging):
    """Exponential moving average of the weights; validation and the saved model use the average."""

    def __init__(self, decay: float = 0.999, **kwargs):
        if not 0.0 < decay < 1.0:
            raise ValueError(f"EMA decay must be in (0, 1), got {decay}")
        super().__init__(multi_avg_fn=get_ema_multi_avg_fn(decay), **kwargs)
