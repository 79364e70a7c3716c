"""The memory of a CPU training run, estimated before its first step: the loader sized to the machine, or
the run refused naming the estimate and the settings that fit.

On a CPU the activations autograd keeps for the backward pass live in RAM: bytes per 2-D image the
backbone sees × the images of a training step (a whole column of slices, a sequence of 15 crops, × the
batch), beside the loader workers, each building samples and holding ``prefetch_factor`` batches (a
training and a validation pool: both persist). :class:`MemoryGuard` measures each part at ``setup`` —
after preprocessing, before any loader starts: the resident memory of the process now, the bytes autograd
saves for one image at the input size (a forward pass of a random-init copy of the backbone under
saved-tensor hooks), the memory building one sample takes (tracemalloc) — and compares the sum with the
budget (the memory available now × ``headroom``, or ``budget_gb``). Over it, ``data.num_workers`` is
lowered to the most that fit (a warning names both); when not even the main process fits, the run stops
(:class:`MemoryBudgetExceeded`) with the estimate part by part, the batch size that would fit and the
estimate with ``model.backbone.grad_checkpointing=true``.

``accelerators``: the runs it checks (``[cpu]``: a GPU's activations are in its own memory, measured by
``make gpu-check``).
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import math
import tracemalloc
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
import torch.nn as nn

from cervspine.io.atomic import write_json_atomic
from cervspine.io.errors import CervspineInputError

log = logging.getLogger(__name__)
GIB = 2**30
# Calibrated on the four real recipes (experiments/benchmarks/recipe_memory.py): the training process's
# peak was 1.03-1.10 × (its resident memory + the optimizer state + the bytes saved in the forward pass):
# the backward pass's own buffers. 1.15 keeps the estimate above every measured peak.
BACKWARD_OVERHEAD = 1.15
# A forked loader worker's own share of memory (PSS) before it holds a sample: measured 0.03 GiB; its
# sample building and prefetched batches are added to it (an upper bound: they rarely peak together)
WORKER_BASE_GIB = 0.05
PREFETCH_FACTOR = 2  # torch's DataLoader default: batches each worker holds ready


class MemoryBudgetExceeded(CervspineInputError):
    """A CPU training run that would not fit in this machine's memory at its settings."""


@dataclasses.dataclass
class MemoryEstimate:
    """Bytes of one CPU training run, part by part (see the module docstring)."""

    process: int  # resident now: interpreter, libraries, model weights, dataset tables
    optimizer: int  # gradients + two AdamW moments per parameter
    activations: int  # saved for the backward pass, with its overhead
    inputs: int  # a training batch (+ its channels-last copy) and a validation batch
    per_worker: int  # one worker of each pool: private memory, building a sample, prefetched batches
    workers: int
    step_images: int
    bytes_per_image: int

    def total(self, workers: int | None = None) -> int:
        w = self.workers if workers is None else workers
        return self.process + self.optimizer + self.activations + self.inputs + w * self.per_worker

    def main(self) -> int:
        return self.total(0)

    def describe(self, workers: int | None = None) -> str:
        w = self.workers if workers is None else workers
        return (
            f"{self.total(w) / GIB:.1f} GiB = process {self.process / GIB:.1f} + optimizer state "
            f"{self.optimizer / GIB:.1f} + activations {self.activations / GIB:.1f} ({self.step_images} "
            f"images a step × {self.bytes_per_image / 2**20:.0f} MiB × {BACKWARD_OVERHEAD}) + batches "
            f"{self.inputs / GIB:.1f} + {w} loader workers × {self.per_worker / GIB:.2f}"
        )


def _backbone_copy(pl_module: L.LightningModule) -> tuple[nn.Module, int]:
    """A random-init copy of the module's backbone (its hyper-parameters) and its input channels."""
    from cervspine.models.backbones import build_backbone, without_pretrained_weights

    hp = pl_module.hparams
    return build_backbone(without_pretrained_weights(hp["backbone"]), int(hp["in_chans"])), int(
        hp["in_chans"]
    )


def saved_bytes(
    backbone: nn.Module,
    in_chans: int,
    size: int,
    *,
    channels_last: bool = False,
    autocast: str | None = None,
    segments: Sequence[nn.Module] = (),
) -> tuple[int, int]:
    """(bytes autograd keeps for the backward pass of one ``size``² image through ``backbone`` in training
    mode, the most of them kept inside one of ``segments``): every saved tensor's storage once, the
    parameters excluded."""
    params = {p.untyped_storage().data_ptr() for p in backbone.parameters()}
    seen: dict[int, int] = {}
    inside: dict[int, int] = {}
    current: list[int] = []

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        ptr = storage.data_ptr()
        if ptr not in params and ptr not in seen:
            seen[ptr] = storage.nbytes()
            if current:
                inside[current[-1]] = inside.get(current[-1], 0) + storage.nbytes()
        return t

    def leave(*_: Any) -> None:  # returns None: the block's output stays as it is
        current.pop()

    hooks = []
    for i, seg in enumerate(segments):
        hooks.append(seg.register_forward_pre_hook(lambda *_, i=i: current.append(i)))
        hooks.append(seg.register_forward_hook(leave))
    batch = 1 if size >= 64 else 2  # BatchNorm in training needs two values where the map ends at 1 × 1
    x = torch.rand(batch, in_chans, size, size)
    if channels_last:
        backbone = backbone.to(memory_format=torch.channels_last)
        x = x.contiguous(memory_format=torch.channels_last)
    cast = torch.autocast("cpu", dtype=torch.bfloat16) if autocast == "bf16" else contextlib.nullcontext()
    backbone.train()
    try:
        with torch.enable_grad(), torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), cast:
            backbone(x)
    finally:
        for h in hooks:
            h.remove()
    return sum(seen.values()) // batch, max(inside.values(), default=0) // batch


def checkpointed_bytes(
    backbone: nn.Module, in_chans: int, size: int, largest_block: int, **kw: Any
) -> int | None:
    """Bytes a ``size``² image keeps with timm's gradient checkpointing on: what the checkpointed pass
    saves plus ``largest_block`` (a block's own activations, recomputed one block at a time in the
    backward pass); None where the backbone has no checkpointing."""
    try:
        backbone.set_grad_checkpointing(True)
    except (AttributeError, NotImplementedError, AssertionError):
        return None
    try:
        return saved_bytes(backbone, in_chans, size, **kw)[0] + largest_block
    finally:
        backbone.set_grad_checkpointing(False)


def checkpoint_segments(backbone: nn.Module) -> list[nn.Module]:
    """The modules timm's ``checkpoint_seq`` wraps one by one (``blocks``, flattened), else the children."""
    blocks = getattr(backbone, "blocks", None)
    if isinstance(blocks, nn.Sequential):
        return [b for stage in blocks for b in (stage if isinstance(stage, nn.Sequential) else [stage])]
    return list(backbone.children())


def sample_build_bytes(dataset: Any, index: int = 0) -> tuple[int, int]:
    """(peak bytes numpy/OpenCV allocate while building ``dataset[index]``, its 2-D images); (0, 1) for an
    empty dataset. The random generators are left as they were (a seeded run repeats itself)."""
    if len(dataset) <= index:
        return 0, 1
    tracemalloc.start()
    try:
        with torch.random.fork_rng(devices=[]):
            state = np.random.get_state()
            sample = dataset[index]
            np.random.set_state(state)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    shape = tuple(sample["image"].shape)
    return int(peak), int(math.prod(shape[:-3])) if len(shape) > 3 else 1


def available_bytes() -> int:
    import psutil

    return int(psutil.virtual_memory().available)


def resident_bytes() -> int:
    import psutil

    return int(psutil.Process().memory_info().rss)


def estimate(
    pl_module: L.LightningModule, datamodule: Any, precision: str = "32-true"
) -> tuple[MemoryEstimate, dict[str, Any]]:
    """The estimate of a training run of ``pl_module`` on ``datamodule`` (set up), and what it measured."""
    backbone, chans = _backbone_copy(pl_module)
    size = int(datamodule.input_size)
    kw = {"channels_last": bool(pl_module.hparams.get("channels_last", False)),
          "autocast": "bf16" if str(precision).startswith("bf16") else None}  # fmt: skip
    per_image, largest_block = saved_bytes(
        backbone, chans, size, **kw, segments=checkpoint_segments(backbone)
    )
    n_params = sum(p.numel() for p in pl_module.parameters() if p.requires_grad)
    train_images = int(datamodule.images_per_sample(datamodule.train_uids, train=True))
    val_images = int(datamodule.images_per_sample(datamodule.val_uids, train=False))
    batch, val_batch = (
        int(datamodule.batch_size),
        int(getattr(datamodule, "val_batch_size", datamodule.batch_size)),
    )
    step_images = batch * train_images
    image_bytes = chans * size * size * 4
    train_batch, val_batch_bytes = step_images * image_bytes, val_batch * val_images * image_bytes
    work, built_images = sample_build_bytes(datamodule.dataset(datamodule.train_uids[:1]))
    work = work * max(train_images, val_images) // max(built_images, 1)
    pools = 2 if getattr(datamodule, "val_dataloader", None) is not None else 1
    per_worker = pools * (int(WORKER_BASE_GIB * GIB) + work) + PREFETCH_FACTOR * (
        train_batch + val_batch_bytes
    )
    est = MemoryEstimate(
        process=resident_bytes(),
        optimizer=3 * 4 * n_params,
        activations=int(BACKWARD_OVERHEAD * step_images * per_image),
        inputs=2 * train_batch + val_batch_bytes,
        per_worker=per_worker,
        workers=int(datamodule.num_workers),
        step_images=step_images,
        bytes_per_image=per_image,
    )
    facts = {"backbone": backbone, "chans": chans, "size": size, "kw": kw, "train_images": train_images,
             "batch": batch, "image_bytes": image_bytes, "largest_block": largest_block}  # fmt: skip
    return est, facts


def fitting_workers(est: MemoryEstimate, budget: int) -> int | None:
    """The most workers (≤ the configured count) that fit ``budget``; None when the main process alone
    does not."""
    if est.main() > budget:
        return None
    spare = budget - est.main()
    return min(est.workers, spare // est.per_worker if est.per_worker else est.workers)


def fitting_batch(est: MemoryEstimate, facts: dict[str, Any], budget: int) -> int:
    """The largest batch size whose main process (no workers) fits ``budget`` (0: not even one)."""
    per_sample = facts["train_images"] * (BACKWARD_OVERHEAD * est.bytes_per_image + 2 * facts["image_bytes"])
    fixed = est.process + est.optimizer + (est.inputs - 2 * est.step_images * facts["image_bytes"])
    return max(0, int((budget - fixed) // per_sample))


class MemoryGuard(L.Callback):
    """Sizes the loader workers of a CPU run to this machine, or refuses the run before its first step
    (see the module docstring). ``budget_gb``: null = the memory available at setup × ``headroom``."""

    def __init__(
        self,
        budget_gb: float | None = None,
        headroom: float = 0.85,
        accelerators: Sequence[str] = ("cpu",),
        enabled: bool = True,
    ):
        self.budget_gb, self.headroom = budget_gb, float(headroom)
        self.accelerators = tuple(a.lower() for a in accelerators)
        self.enabled = bool(enabled)
        self.report: dict[str, Any] | None = None

    def budget(self) -> int:
        if self.budget_gb is not None:
            return int(float(self.budget_gb) * GIB)
        return resident_bytes() + int(self.headroom * available_bytes())

    def _budget_source(self) -> str:
        if self.budget_gb is not None:
            return "callbacks.memory_guard.budget_gb"
        return f"the memory this machine has free × {self.headroom} headroom"

    def applies(self, trainer: L.Trainer) -> bool:
        kind = type(trainer.accelerator).__name__.lower().removesuffix("accelerator")
        return self.enabled and kind in self.accelerators

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        dm = trainer.datamodule
        if stage != "fit" or not self.applies(trainer) or dm is None or not hasattr(dm, "images_per_sample"):
            return
        try:  # the processes of this node share its memory (DDP on the CPU: one per device)
            self.size(pl_module, dm, str(trainer.precision), share=max(1, int(trainer.num_devices)))
        finally:
            if self.report is not None and trainer.is_global_zero:  # beside the run's records
                with contextlib.suppress(OSError):
                    out = Path(trainer.default_root_dir) / "memory_estimate.json"
                    out.parent.mkdir(parents=True, exist_ok=True)
                    write_json_atomic(out, self.report)

    def size(
        self, pl_module: L.LightningModule, datamodule: Any, precision: str = "32-true", share: int = 1
    ) -> int:
        """The loader workers this run gets (``datamodule.num_workers`` lowered where fewer fit); raises
        :class:`MemoryBudgetExceeded` when not even the main process fits. ``share``: processes splitting
        the budget."""
        est, facts = estimate(pl_module, datamodule, precision)
        budget = self.budget() // share
        workers = fitting_workers(est, budget)
        self.report = {"estimate_gib": est.total() / GIB, "budget_gib": budget / GIB, "workers": workers,
                       "configured_workers": est.workers, "parts": dataclasses.asdict(est)}  # fmt: skip
        log.info("[memory] %s; budget %.1f GiB", est.describe(), budget / GIB)
        if workers is None:
            self.report["refusal"] = self._refusal(est, facts, budget)
            raise MemoryBudgetExceeded(self.report["refusal"])
        if workers < est.workers:
            log.warning(
                "[memory] data.num_workers=%d would need %s, over this machine's %.1f GiB: %d workers (%s)",
                est.workers, est.describe(), budget / GIB, workers, est.describe(workers),
            )  # fmt: skip
            datamodule.num_workers = workers
        return workers

    def _refusal(self, est: MemoryEstimate, facts: dict[str, Any], budget: int) -> str:
        batch = fitting_batch(est, facts, budget)
        ways = []
        if 0 < batch < facts["batch"]:
            ways.append(f"data.batch_size={batch}")
        ckpt = checkpointed_bytes(
            facts["backbone"], facts["chans"], facts["size"], facts["largest_block"], **facts["kw"]
        )
        if ckpt is not None:
            with_ckpt = est.main() - est.activations + int(BACKWARD_OVERHEAD * est.step_images * ckpt)
            fits = "fits" if with_ckpt <= budget else "does not fit either"
            ways.append(f"model.backbone.grad_checkpointing=true (estimated {with_ckpt / GIB:.1f} GiB with "
                        f"no workers: {fits}; slower steps, each block run twice, BatchNorm statistics "
                        "updated twice a step)")  # fmt: skip
        ways.append("fewer images a sample (data.n_slices= for a sequence, data.max_positions= for a column)")
        ways.append("a GPU (trainer=gpu), or callbacks.memory_guard.budget_gb= to set the budget yourself")
        return (
            f"this CPU run needs about {est.describe(0)} with no loader workers, over its budget of "
            f"{budget / GIB:.1f} GiB ({self._budget_source()}). Change one of: " + "; ".join(ways)
        )
