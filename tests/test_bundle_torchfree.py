"""Scoring from a bundle imports neither torch, nor Lightning, nor Hydra: a subprocess whose import system
refuses them (and omegaconf, albumentations, timm, torchvision, torchmetrics) predicts one synthetic study
with ``python -m cervspine.bundle.run`` on each backend and writes its record."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
BLOCKED = ("torch", "lightning", "pytorch_lightning", "hydra", "omegaconf", "albumentations", "timm",
           "torchvision", "torchmetrics")  # fmt: skip

RUNNER = textwrap.dedent(
    """
    import sys

    BLOCKED = set(sys.argv[1].split(","))

    class Refuse:
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] in BLOCKED:
                raise ImportError(f"{name} is blocked in this test")
            return None

    sys.meta_path.insert(0, Refuse())
    from cervspine.bundle.run import main

    code = main(sys.argv[2:])
    leaked = sorted(m for m in sys.modules if m.split(".")[0] in BLOCKED)
    print("LEAKED", leaked)
    sys.exit(code or (3 if leaked else 0))
    """
)


@pytest.fixture(scope="module")
def bundle_and_study(tmp_path_factory) -> tuple[Path, Path]:
    from cervspine.bundle.export import export_bundle
    from cervspine.synthetic import write_rsna_folder
    from tests.test_bundle import random_checkpoints

    tmp = tmp_path_factory.mktemp("torchfree")
    root = tmp / "folder"
    write_rsna_folder(root, n_train=1, n_test=1, size=32, slices=(30, 34), seed=8)
    c = random_checkpoints(tmp)
    bundle = tmp / "bundle"
    export_bundle(
        bundle, c["column"], [c["slice"], c["sequence"]]
    )  # column stage 1: every stage kind but one
    return bundle, next((root / "test_images").iterdir())


@pytest.mark.parametrize("backend", ["onnxruntime", "openvino"])
def test_a_study_is_scored_from_a_bundle_with_torch_lightning_and_hydra_blocked(
    backend, bundle_and_study, tmp_path
):
    pytest.importorskip(backend)
    bundle, study = bundle_and_study
    out = tmp_path / "out"
    args = [",".join(BLOCKED), str(bundle), "--study", str(study), "--out", str(out), "--backend", backend]
    proc = subprocess.run(
        [sys.executable, "-c", RUNNER, *args], cwd=REPO, capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "LEAKED []" in proc.stdout
    (record,) = (out / "studies").glob("*.json")
    got = json.loads(record.read_text())
    assert 0 < got["patient_overall"] < 1 and "vertebra_extents" in got and "timings_s" in got
