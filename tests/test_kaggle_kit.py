"""The Kaggle offline kit (``make kaggle-kit RUN=… OUT=…``): its layout and models, its script scoring a test
folder as the pipeline did, a study it cannot read answered by the prior; and (slow) a fresh venv that has
torch and nothing else installing the kit with ``pip --no-index`` and predicting a synthetic test.csv."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from importlib import metadata
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from cervspine.models.safe_load import load_checkpoint
from tests.helpers import writable_copy

KIT_SCRIPT = Path(__file__).resolve().parents[1] / "cervspine" / "kaggle" / "kaggle_predict.py"


@pytest.fixture(scope="module")
def kit(shared_run, tmp_path_factory):
    """The shared run's kit without wheels (models, script, manifest)."""
    from cervspine.kaggle.kit import build_kit

    return build_kit(shared_run.dir, tmp_path_factory.mktemp("kit") / "kit", wheels=False)


def _script():
    import importlib.util

    spec = importlib.util.spec_from_file_location("kaggle_predict", KIT_SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_kit_holds_the_runs_evaluated_models_without_training_state(kit, shared_run):
    import torch

    folder, manifest = kit.folder, kit.manifest
    assert (folder / "kaggle_predict.py").read_text() == KIT_SCRIPT.read_text()
    assert json.loads((folder / "kit.json").read_text()) == manifest
    metrics = json.loads((shared_run.dir / "metrics.json").read_text())
    assert manifest["source_checkpoints"] == {
        "stage1": metrics["stage1_ckpt"],
        "stage2": metrics["stage2_ckpt"],
    }
    assert manifest["models"] == {"stage1": "models/stage1.ckpt",
                                  "stage2": ["models/stage2.ckpt", "models/stage2_seq.ckpt"]}  # fmt: skip
    for name in ("operating_point.json", "metrics.json", "MODEL_CARD.md"):
        assert (folder / "models" / name).is_file()
    for rel, source in [
        ("models/stage1.ckpt", shared_run.stage1),
        ("models/stage2.ckpt", shared_run.slice_stage2),
    ]:
        packed = load_checkpoint(folder / rel)
        assert "optimizer_states" not in packed and "loops" not in packed
        original = load_checkpoint(source)
        assert all(torch.equal(packed["state_dict"][k], v) for k, v in original["state_dict"].items())
        assert (folder / rel).stat().st_size < source.stat().st_size
    assert set(manifest["sha256"]) >= {"models/stage1.ckpt", "models/stage2.ckpt", "models/stage2_seq.ckpt"}
    assert "!python /kaggle/input/" in (folder / "README.md").read_text()


def test_the_kits_script_writes_the_submission_the_pipeline_wrote(kit, shared_run, tiny_root, tmp_path):
    """From DICOM in memory (no cache), the kit's models: the pipeline's submission.csv, to rounding."""
    out = tmp_path / "working" / "submission.csv"
    args = ["--data", str(tiny_root), "--out", str(out), "--kit", str(kit.folder), "--device", "cpu"]
    assert _script().main([*args, "--no-install", "--workers", "0"]) == 0
    got, want = pd.read_csv(out), pd.read_csv(shared_run.dir / "submission.csv")
    assert (
        got["row_id"].tolist()
        == want["row_id"].tolist()
        == pd.read_csv(tiny_root / "test.csv")["row_id"].tolist()
    )
    np.testing.assert_allclose(got["fractured"], want["fractured"], rtol=1e-4, atol=1e-5)
    assert not list(tiny_root.glob("**/.tmp-*"))  # nothing written next to the data


def test_a_study_that_cannot_be_read_is_answered_by_the_prior(kit, tiny_root, tmp_path):
    from cervspine.jobs.folder import FolderFailures
    from cervspine.kaggle.predict import predict_test_folder

    data = writable_copy(tiny_root, tmp_path / "data", ".cervspine_cache", "train_images", "segmentations")
    broken = sorted((data / "test_images").iterdir())[0]
    for f in broken.iterdir():
        f.write_bytes(b"DICM not really")
    out = tmp_path / "submission.csv"
    result = predict_test_folder(data, out, kit=kit.folder, device="cpu", workers=0)
    assert list(result.failed) == [broken.name] and len(result.predictions) == 2
    sub = pd.read_csv(out)
    assert sub["row_id"].tolist() == pd.read_csv(data / "test.csv")["row_id"].tolist()
    rows = sub[sub["row_id"].str.startswith(broken.name)]["fractured"].to_numpy()
    np.testing.assert_allclose(rows, result.predictions[broken.name], rtol=1e-6)
    assert ((rows > 0) & (rows < 1)).all()
    with pytest.raises(FolderFailures, match=broken.name):  # strict: an error, once the others are scored
        predict_test_folder(
            data, tmp_path / "strict" / "strict.csv", kit=kit.folder, device="cpu", workers=0, strict=True
        )
    assert not (tmp_path / "strict" / "strict.csv").exists()
    failures = pd.read_csv(tmp_path / "strict" / "failures.csv", dtype=str)
    assert failures["StudyInstanceUID"].tolist() == [broken.name]


def test_the_kit_pins_every_dependency_but_torch():
    from cervspine.kaggle.kit import requirements

    pins = dict(p.split("==") for p in requirements())
    assert {"timm", "lightning", "pydicom", "hydra-core", "omegaconf", "antlr4-python3-runtime"} <= set(pins)
    assert "aiohttp" in pins  # lightning asks for fsspec[http]: an extra's requirements are packed too
    assert not {"torch", "torchvision", "triton"} & set(pins) and not any(
        n.startswith("nvidia") for n in pins
    )
    assert pins["timm"] == metadata.version("timm")
    assert {"sympy", "setuptools"} <= set(pins)  # torch's own needs, in case the image's are too old
    assert "sympy" not in {p.split("==")[0] for p in requirements(companions=False)}


def test_the_kit_will_not_overwrite_a_folder_that_is_not_a_kit(shared_run, tmp_path):
    from cervspine.kaggle.kit import build_kit

    (tmp_path / "mine.txt").write_text("keep")
    with pytest.raises(FileExistsError, match="not a kit"):
        build_kit(shared_run.dir, tmp_path, wheels=False)
    assert (tmp_path / "mine.txt").read_text() == "keep"


# ----------------------------------------------------------------------------------- the offline install


def torch_only_site(dest: Path) -> Path:
    """A folder of links to torch, torchvision and what they need, as installed here (Kaggle's image has
    them): a fresh venv given it by a .pth sees those and nothing else."""
    from cervspine.kaggle.kit import requirements

    names = {"torch", "torchvision"}
    for dist in ("torch", "torchvision"):
        names |= {p.split("==")[0] for p in requirements(dist, exclude=())}
    dest.mkdir(parents=True)
    for name in sorted(names):
        found = metadata.distribution(name)
        for top in sorted({Path(f).parts[0] for f in found.files or [] if Path(f).parts[0] != ".."}):
            link, target = dest / top, Path(found.locate_file(top))
            if target.exists() and not link.exists():
                link.symlink_to(target)
    return dest


@pytest.mark.slow
def test_a_fresh_venv_with_torch_installs_the_kit_offline_and_predicts(shared_run, tiny_root, tmp_path):
    from cervspine.kaggle.kit import build_kit

    kit = build_kit(shared_run.dir, tmp_path / "kit")  # wheels: needs the package index (or a mirror) here
    assert list((kit.folder / "wheels").glob("cervspine-*.whl"))
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    python = venv / "bin" / "python"
    purelib = "import sysconfig; print(sysconfig.get_paths()['purelib'])"
    site = Path(subprocess.run([str(python), "-c", purelib], capture_output=True, text=True,
                               check=True).stdout.strip())  # fmt: skip
    (site / "kaggle_image.pth").write_text(str(torch_only_site(tmp_path / "image")) + "\n")
    probe = "import importlib.util as u; print([m for m in ('torch', 'timm', 'cervspine') if u.find_spec(m)])"
    assert subprocess.run([str(python), "-c", probe], capture_output=True, text=True, cwd=tmp_path,
                          check=True).stdout.strip() == "['torch']"  # fmt: skip

    env = {k: v for k, v in os.environ.items() if not k.startswith("PIP_")}
    env.update(PIP_CONFIG_FILE=os.devnull, PIP_NO_INDEX="1")  # no index, mirror or find-links but the kit's
    out = tmp_path / "working" / "submission.csv"
    run = [str(python), str(kit.folder / "kaggle_predict.py"), "--data", str(tiny_root), "--out", str(out),
           "--device", "cpu"]  # fmt: skip
    done = subprocess.run(run, env=env, cwd=tmp_path, capture_output=True, text=True, timeout=1200)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "installing:" in done.stdout and "--no-index" in done.stdout
    got, want = pd.read_csv(out), pd.read_csv(shared_run.dir / "submission.csv")
    assert got["row_id"].tolist() == want["row_id"].tolist()
    np.testing.assert_allclose(got["fractured"], want["fractured"], rtol=1e-4, atol=1e-5)
    shutil.rmtree(venv)
