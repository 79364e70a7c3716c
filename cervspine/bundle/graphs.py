"""The ONNX graphs of a bundle: each trained stage's forward pass as a small ``nn.Module`` around the
LightningModule, exported with torch.onnx (a dynamic batch; the column reader also a dynamic length).

What each graph computes is the module's own code: the slice detector's and slice classifier's
``forward`` (+ sigmoid), the column model's ``encode`` and ``read_column`` (its export seam: the encoder
runs on any batch of slices, the reader on the study's sequence), the sequence model's ``forward`` and
``_probs`` (the logit shift of oversampled training). The numpy around them (windowing, crops,
aggregation, calibration, the prior) is :mod:`cervspine.data` and :mod:`cervspine.scoring`, shared with the
torch strategies.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn as nn

OPSET = 17


class SliceDetectorGraph(nn.Module):
    """image (N, C, S, S) → visibility (N, 7) in [0, 1], box (N, 4)."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, image: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        logits, box = self.model(image)
        return torch.sigmoid(logits), box


class ColumnEncoderGraph(nn.Module):
    """slices (N, C, S, S) → features (N, F): :meth:`VertebraeColumnDetector.encode`."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, slices: torch.Tensor) -> torch.Tensor:
        return self.model.encode(slices)


class ColumnReaderGraph(nn.Module):
    """features (B, L, F), lengths (B,), step_mm (B,) → visibility (B, L, 7), box (B, L, 4):
    :meth:`VertebraeColumnDetector.read_column` + sigmoid."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(
        self, features: torch.Tensor, lengths: torch.Tensor, step_mm: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        logits, box = self.model.read_column(features, lengths, step_mm)
        return torch.sigmoid(logits), box


class SliceClassifierGraph(nn.Module):
    """image (N, C, S, S), meta (N, M) → fracture (N, 7) per-slice probabilities."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, image: torch.Tensor, meta: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(self.model(image, meta)["fracture"])


class SequenceGraph(nn.Module):
    """image (B, 7, N, C, S, S), present (B, 7) → vertebra (B, 7) probabilities (+ overall (B,) with a study
    head), the training's logit shift removed."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, image: torch.Tensor, present: torch.Tensor) -> tuple[torch.Tensor, ...]:
        b, v = image.shape[:2]
        vertebra = torch.arange(v, device=image.device).unsqueeze(0).expand(b, v)
        p, o = self.model._probs(self.model(image, vertebra, present))
        return (p,) if o is None else (p, o)


@dataclass
class GraphSpec:
    """One graph to export: the module, example inputs, names, and which axes are dynamic."""

    module: nn.Module
    inputs: dict[str, torch.Tensor]
    outputs: list[str]
    dynamic: dict[str, dict[int, str]] = field(default_factory=dict)

    def record(self, file: str) -> dict:
        """The manifest's entry: file, input and output names with their shapes (names: dynamic axes)."""

        def shape(name: str, t: torch.Tensor) -> list:
            axes = self.dynamic.get(name, {})
            return [axes.get(i, int(n)) for i, n in enumerate(t.shape)]

        return {
            "file": file,
            "inputs": {
                n: {"shape": shape(n, t), "dtype": str(t.dtype).replace("torch.", "")}
                for n, t in self.inputs.items()
            },  # fmt: skip
            "outputs": self.outputs,
        }


def plain(model: nn.Module) -> nn.Module:
    """``model`` in eval mode, NCHW weights and no memory-format conversion in its forward (the graph
    then holds the plain convolutions; the backend picks its own layout)."""
    model = model.eval().to(memory_format=torch.contiguous_format)
    if hasattr(model, "channels_last"):
        model.channels_last = False
    return model


def export_graph(spec: GraphSpec, path: Path) -> None:
    """``spec`` as an ONNX file (TorchScript-based exporter: it turns the GRUs, packed sequences included,
    into ONNX's GRU op; every weight is in the one file)."""
    names = list(spec.inputs)
    dynamic = {**{o: {0: "batch"} for o in spec.outputs}, **spec.dynamic}
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            spec.module.eval(),
            tuple(spec.inputs.values()),
            str(path),
            input_names=names,
            output_names=spec.outputs,
            dynamic_axes=dynamic,
            opset_version=OPSET,
            dynamo=False,
            do_constant_folding=True,
        )
