"""Where and how the models run: device, batch size, precision, CPU threads, memory format."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass

import torch

from cervspine.cpu import resolve_threads


def pick_device(device: str = "auto") -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


@contextlib.contextmanager
def torch_threads(n: int | None) -> Iterator[None]:
    """torch's intra-op CPU threads set to ``n`` for the block (None: left as they are)."""
    if n is None or int(n) == torch.get_num_threads():
        yield
        return
    before = torch.get_num_threads()
    torch.set_num_threads(max(1, int(n)))
    try:
        yield
    finally:
        torch.set_num_threads(before)


@dataclass(frozen=True)
class Runtime:
    """``num_threads``: torch CPU threads while scoring (None: torch's setting; ``"auto"`` in :meth:`create`,
    the configs' default: one per core free at start-up, :func:`cervspine.cpu.auto_threads` — on a CPU
    shared with other busy processes 1 can be several times faster than one per core). ``channels_last``:
    NHWC convolutions (faster on CPU; the same outputs up to float rounding). ``precision="bf16"`` on CPU is
    faster still where the CPU has bf16 instructions, with probabilities ~1e-4 off (opt-in: "auto" means
    bf16 on CUDA only). experiments/benchmarks/inference.py measures each."""

    device: torch.device = torch.device("cpu")
    batch_size: int = 64
    precision: str = "auto"
    num_threads: int | None = None
    channels_last: bool = False

    @classmethod
    def create(
        cls,
        device: str = "auto",
        batch_size: int = 64,
        precision: str = "auto",
        num_threads: int | str | None = None,
        channels_last: bool = False,
    ) -> Runtime:
        threads = resolve_threads(num_threads)
        return cls(pick_device(device), int(batch_size), str(precision), threads, bool(channels_last))

    def autocast(self) -> torch.autocast:
        use_bf16 = self.precision == "bf16" or (
            self.precision == "auto" and self.device.type == "cuda" and torch.cuda.is_bf16_supported()
        )
        return torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=use_bf16)

    def threads(self) -> contextlib.AbstractContextManager[None]:
        return torch_threads(self.num_threads)

    def prepare(self, model: torch.nn.Module) -> torch.nn.Module:
        """``model`` in eval mode on the device, NHWC when ``channels_last``."""
        model = model.eval().to(self.device)
        if self.channels_last:
            model.to(memory_format=torch.channels_last)
            model.channels_last = True  # the modules' forward converts their input
        return model
