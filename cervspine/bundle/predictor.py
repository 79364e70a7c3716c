"""Scoring studies from a bundle, torch-free: :class:`BundlePredictor` (the bundle's stages on an ONNX
backend, the same interface as :class:`cervspine.inference.Predictor`), :func:`predict_study` (one DICOM
folder, in memory) and :func:`predict_folder` (an RSNA folder's test.csv → studies/<uid>.json and
submission.csv)."""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

import numpy as np

from cervspine.bundle.backends import open_graph
from cervspine.bundle.manifest import BundleError, read_manifest
from cervspine.bundle.manifest import member as bundle_file
from cervspine.bundle.stages import STAGES
from cervspine.cache.params import CacheParams
from cervspine.cache.study import CachedStudy, InMemoryStudy
from cervspine.cpu import resolve_threads
from cervspine.io import load_study
from cervspine.io.atomic import write_json_atomic
from cervspine.jobs.folder import FolderResult, missing_folders, score_folder
from cervspine.jobs.records import study_record
from cervspine.scoring.answer import StudyPrediction, combine_members, ensemble_prior
from cervspine.scoring.thresholds import OperatingPoint, OperatingThreshold

log = logging.getLogger(__name__)


class BundlePredictor:
    """A bundle's stage 1 and stage-2 members on ``backend`` ("onnxruntime" | "openvino") at ``precision``
    ("fp32"; "bf16" on OpenVINO), ``num_threads`` intra-op threads ("auto": the free cores at start-up),
    ``batch_size`` slices per call. The manifest's version and every file's checksum are checked first."""

    def __init__(
        self,
        bundle: str | Path,
        *,
        backend: str = "onnxruntime",
        precision: str = "fp32",
        num_threads: int | str | None = "auto",
        batch_size: int = 64,
        verify: bool = True,
    ):
        t0 = time.perf_counter()
        self.bundle = Path(bundle)
        self.manifest = read_manifest(self.bundle, verify=verify)
        self.backend, self.precision = backend, precision
        self.num_threads = resolve_threads(num_threads)
        size = int(self.manifest["image_size"])

        def stage(role: str, record: dict[str, Any]) -> Any:
            key = (role, record["kind"])
            if key not in STAGES:
                raise BundleError(f"{self.bundle}: unknown {role} kind {record['kind']!r} in the manifest")
            graphs = {
                name: open_graph(
                    bundle_file(self.bundle, self.manifest, g["file"]), backend, precision, self.num_threads
                )
                for name, g in record["graphs"].items()
            }
            return STAGES[key](self.bundle, record, graphs, batch_size, size)

        self.stage1 = stage("stage1", self.manifest["stage1"])
        self.stage2 = [stage("stage2", r) for r in self.manifest["stage2"]]
        if not self.stage2:
            raise BundleError(f"{self.bundle}: the manifest names no stage-2 model")
        self.load_s = time.perf_counter() - t0

    @property
    def image_size(self) -> int:
        """The cache image size the stages were trained on (studies are read at this size)."""
        return int(self.manifest["image_size"])

    @property
    def checkpoints(self) -> list[Path]:
        return [m.checkpoint for m in self.stage2]

    @property
    def operating_point(self) -> OperatingPoint | None:
        op = self.manifest.get("operating_point")
        return OperatingPoint.from_dict(op) if op else None

    @property
    def thresholds(self) -> OperatingThreshold | None:
        op = self.operating_point
        return op.thresholds() if op is not None else None

    @property
    def synthetic(self) -> bool:
        return bool(self.manifest.get("synthetic"))

    @property
    def prior(self) -> np.ndarray:
        """(8,) the answer known without looking (the members' training priors, combined)."""
        return ensemble_prior([m.prior for m in self.stage2])

    def predict(self, study: CachedStudy) -> StudyPrediction:
        """The study's answer; ``timings``: stage1, crops (stage-2 inputs), stage2, aggregate (s)."""
        t0 = time.perf_counter()
        s1 = self.stage1.run(study)
        timings = {"stage1": time.perf_counter() - t0, "crops": 0.0, "stage2": 0.0, "aggregate": 0.0}
        results = []
        for member in self.stage2:
            t0 = time.perf_counter()
            inputs = member.inputs(study, s1)
            t1 = time.perf_counter()
            results.append(member.score(inputs))
            timings["crops"] += t1 - t0
            timings["stage2"] += time.perf_counter() - t1 - results[-1].aggregate_s
            timings["aggregate"] += results[-1].aggregate_s
        return combine_members(study, s1, results, [m.checkpoint for m in self.stage2], timings)


def bundle_thresholds(bundle: str | Path) -> OperatingThreshold | None:
    """The thresholds of the operating point a bundle carries (None: it has none)."""
    op = read_manifest(bundle, verify=False).get("operating_point")
    return OperatingPoint.from_dict(op).thresholds() if op else None


def load_bundle_predictor(
    bundle: str | Path, backend: str = "onnxruntime", precision: str = "fp32", **runtime: Any
) -> Any:
    """The predictor of ``bundle`` on ``backend``: a :class:`BundlePredictor` for onnxruntime/openvino
    (``precision`` "auto" means fp32), or for ``torch`` the :class:`cervspine.inference.Predictor` of the
    checkpoints the bundle holds (exported with ``checkpoints=true``; refused otherwise). ``runtime``:
    num_threads, batch_size (and device, precision for torch)."""
    if backend != "torch":
        precision = "fp32" if precision in (None, "auto") else str(precision)
        options = {k: runtime[k] for k in ("num_threads", "batch_size") if runtime.get(k) is not None}
        return BundlePredictor(bundle, backend=backend, precision=precision, **options)
    manifest = read_manifest(bundle)
    ckpts = manifest.get("checkpoints")
    if not ckpts:
        raise BundleError(
            f"{bundle}: backend=torch needs the checkpoints, and this bundle was exported without them "
            "(python -m cervspine.export ... checkpoints=true): use backend=onnxruntime or openvino, or "
            "run_dir=/ckpt.* with backend=torch"
        )
    from cervspine.inference import Predictor  # torch: only for this backend

    stage1, stage2 = (
        bundle_file(bundle, manifest, ckpts["stage1"]),
        [bundle_file(bundle, manifest, c) for c in ckpts["stage2"]],
    )
    return Predictor.from_checkpoints(stage1, stage2, precision=precision, **runtime)


def _predictor(bundle: str | Path | BundlePredictor, options: dict[str, Any]) -> BundlePredictor:
    return bundle if isinstance(bundle, BundlePredictor) else BundlePredictor(bundle, **options)


def predict_study(
    bundle: str | Path | BundlePredictor, study_dir: str | Path, out_dir: str | Path | None = None, **options
) -> StudyPrediction:
    """One DICOM study folder read and scored in memory; with ``out_dir``, its record in
    ``out_dir/studies/<uid>.json`` (the call at the bundle's operating point). ``options``:
    :class:`BundlePredictor`'s."""
    predictor = _predictor(bundle, options)
    study = InMemoryStudy(load_study(study_dir), CacheParams(image_size=predictor.image_size))
    pred = predictor.predict(study)
    if out_dir is not None:
        record = study_record(pred, predictor.thresholds)
        write_json_atomic(Path(out_dir) / "studies" / f"{pred.uid}.json", record)
    return pred


def predict_folder(
    bundle: str | Path | BundlePredictor,
    root: str | Path,
    out_dir: str | Path,
    *,
    strict: bool = False,
    **options,
) -> FolderResult:
    """Every study of ``root``'s test.csv, each read in memory (nothing is written into ``root``), into
    ``out_dir`` by the one folder loop (:func:`cervspine.jobs.folder.score_folder`: every row in
    submission.csv, a study that cannot be scored answered with the prior and listed in failures.csv)."""
    from cervspine.io.rsna import RsnaIndex

    predictor = _predictor(bundle, options)
    index = RsnaIndex.from_root(root, require_images=False)
    if index.test is None or not len(index.test):
        raise FileNotFoundError(f"{root}: no test.csv rows to predict")
    params = CacheParams(image_size=predictor.image_size)

    def read(uid: str) -> InMemoryStudy:
        return InMemoryStudy(load_study(index.study_dir(uid), uid=uid), params)

    return score_folder(
        index.test, read, predictor.predict, predictor.prior, out_dir, thresholds=predictor.thresholds,
        failed=missing_folders(index), strict=strict,
    )  # fmt: skip
