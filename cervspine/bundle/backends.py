"""The runtimes that execute a bundle's ONNX graphs on the CPU, behind one small interface: a
:class:`Graph` is called with numpy arrays by input name and returns its outputs as numpy arrays.

- ``onnxruntime`` (default): fp32.
- ``openvino``: fp32 (``INFERENCE_PRECISION_HINT=f32``: OpenVINO's CPU default is bf16 where the CPU has
  bf16 instructions, ~4e-4 off on the column reader), or ``precision=bf16`` (opt-in, outputs within 1e-2
  of fp32 on the bench's production recipes; ``make bench`` measures it).

Neither imports torch. ``threads``: intra-op threads (None: the runtime's default, one per core).
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Protocol

import numpy as np

from cervspine.bundle.manifest import BundleError

BACKENDS = ("onnxruntime", "openvino")
PRECISIONS = {"onnxruntime": ("fp32",), "openvino": ("fp32", "bf16")}


class Graph(Protocol):
    inputs: list[str]  # the graph's input names (an input the graph never uses may have been dropped)

    def __call__(self, feeds: Mapping[str, np.ndarray]) -> list[np.ndarray]: ...


class OrtGraph:
    """One ONNX Runtime session (CPU execution provider)."""

    def __init__(self, path: Path, threads: int | None):
        import onnxruntime as ort

        opts = ort.SessionOptions()
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        opts.inter_op_num_threads = 1
        if threads:
            opts.intra_op_num_threads = int(threads)
        # no busy-waiting between ops: on a shared CPU the spinning threads take the cores others need
        opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
        opts.log_severity_level = 3
        self.session = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
        self.inputs = [i.name for i in self.session.get_inputs()]

    def __call__(self, feeds: Mapping[str, np.ndarray]) -> list[np.ndarray]:
        return self.session.run(None, {n: feeds[n] for n in self.inputs})


class OpenVinoGraph:
    """One OpenVINO model compiled for the CPU (latency hint)."""

    def __init__(self, path: Path, threads: int | None, precision: str):
        import openvino as ov

        config = {
            "INFERENCE_PRECISION_HINT": "bf16" if precision == "bf16" else "f32",
            "PERFORMANCE_HINT": "LATENCY",
        }
        if threads:
            config["INFERENCE_NUM_THREADS"] = int(threads)
        try:
            self.model = ov.Core().compile_model(str(path), "CPU", config)
        except RuntimeError as e:
            first = str(e).strip().splitlines()[-1] if str(e).strip() else type(e).__name__
            raise BundleError(f"{path}: OpenVINO cannot compile this graph ({first})") from e
        self._ports = []
        self.inputs = []
        for port in self.model.inputs:  # OpenVINO names a port by any of its tensor names: find ours
            names = port.get_names()
            self.inputs.append(next((n for n in names if "/" not in n), port.get_any_name()))
            self._ports.append(port)
        self._request = self.model.create_infer_request()

    def __call__(self, feeds: Mapping[str, np.ndarray]) -> list[np.ndarray]:
        out = self._request.infer({p: feeds[n] for p, n in zip(self._ports, self.inputs)})
        return [np.array(out[o], copy=True) for o in self.model.outputs]


def open_graph(path: str | Path, backend: str, precision: str = "fp32", threads: int | None = None) -> Graph:
    """A :class:`Graph` of the ONNX file ``path`` on ``backend`` at ``precision``."""
    if backend not in BACKENDS:
        raise ValueError(
            f"unknown bundle backend {backend!r}; choose one of {', '.join(BACKENDS)} (or torch)"
        )
    if precision not in PRECISIONS[backend]:
        raise ValueError(
            f"backend {backend} runs precision {', '.join(PRECISIONS[backend])}, not {precision!r}"
        )
    try:
        __import__(backend)
    except ImportError as e:
        raise ImportError(
            f"backend={backend} needs the {backend} package: pip install 'cervspine[deploy]'"
        ) from e
    if backend == "onnxruntime":
        return OrtGraph(Path(path), threads)
    return OpenVinoGraph(Path(path), threads, precision)
