"""Loading models never runs code from them (issue 29): checkpoints are read with
``torch.load(weights_only=True)`` and refused, naming what they wanted, when they refer to anything our
checkpoints never hold; every checkpoint cervspine writes still loads; a bundle refuses a file its manifest
does not list with a checksum and any name that leads outside it; a Kaggle kit checks each model against
kit.json's SHA-256 before loading it and installs its wheels by hash."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import pytest
import torch

from cervspine.bundle.manifest import FORMAT, VERSION, BundleError, read_manifest, write_manifest

PREMOVE = Path(__file__).parent / "data" / "premove"


class _RunsCode:
    """Unpickling this calls os.system: what a planted checkpoint would do."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


@pytest.fixture
def planted(tmp_path) -> tuple[Path, Path]:
    marker = tmp_path / "code_ran"
    path = tmp_path / "planted.ckpt"
    from cervspine.models.safe_load import load_checkpoint

    ckpt = load_checkpoint(PREMOVE / "slice.ckpt")
    torch.save({**ckpt, "hyper_parameters": {**ckpt["hyper_parameters"], "x": _RunsCode(marker)}}, path)
    return path, marker


def test_a_checkpoint_that_would_run_code_is_refused_by_every_reader(planted, tmp_path):
    from cervspine.inference import Predictor
    from cervspine.inference.checkpoints import read_checkpoint
    from cervspine.kaggle.kit import strip_checkpoint
    from cervspine.models.sequence import load_encoder

    path, marker = planted
    for load in (
        lambda: read_checkpoint(path),
        lambda: Predictor.from_checkpoints(PREMOVE / "stage1.ckpt", [path], device="cpu"),
        lambda: load_encoder(torch.nn.Linear(1, 1), str(path)),
        lambda: strip_checkpoint(path, tmp_path / "stripped.ckpt"),
    ):
        with pytest.raises(ValueError, match=r"refused .*posix\.system|refused .*os\.system"):
            load()
    assert not marker.exists()  # nothing of it ran


def test_every_checkpoint_cervspine_writes_loads_weights_only(shared_run):
    """The premove checkpoints, and every checkpoint of a trained pipeline run (best and last, with
    their optimizer, scheduler, loop and callback states) load without weights_only=False."""
    from cervspine.inference import Predictor
    from cervspine.models.safe_load import load_checkpoint

    written = sorted(shared_run.dir.rglob("*.ckpt"))
    assert any(p.name == "last.ckpt" for p in written) and len(written) >= 4
    for path in [*sorted(PREMOVE.glob("*.ckpt")), *written]:
        ckpt = load_checkpoint(path)
        assert "state_dict" in ckpt, path
    last = load_checkpoint(next(p for p in written if p.name == "last.ckpt"))
    assert last["optimizer_states"] and last["loops"]  # the training state too
    predictor = Predictor.from_checkpoints(shared_run.stage1, [shared_run.seq_stage2], device="cpu")
    assert predictor.image_size


# ----------------------------------------------------------------------------- bundles


def _bundle(folder: Path, graph: str = "stage1.onnx") -> Path:
    folder.mkdir(parents=True)
    (folder / "stage1.onnx").write_bytes(b"graph")
    (folder / "MODEL_CARD.md").write_text("card")
    manifest = {"format": FORMAT, "version": VERSION, "stage1": {"graphs": {"g": {"file": graph}}},
                "stage2": [], "model_card": "MODEL_CARD.md"}  # fmt: skip
    write_manifest(folder, manifest)
    return folder


def _rewrite(bundle: Path, **changes) -> None:
    m = json.loads((bundle / "manifest.json").read_text())
    m.update(changes)
    (bundle / "manifest.json").write_text(json.dumps(m))


def test_a_bundle_refuses_unlisted_files_and_names_outside_it(tmp_path):
    ok = _bundle(tmp_path / "ok")
    assert read_manifest(ok)["files"].keys() == {"stage1.onnx", "MODEL_CARD.md"}

    added = _bundle(tmp_path / "added")
    (added / "sitecustomize.py").write_text("import os")
    with pytest.raises(BundleError, match="sitecustomize.py, not listed in the manifest"):
        read_manifest(added)

    outside = tmp_path / "elsewhere.onnx"
    outside.write_bytes(b"graph")
    for name in ("../elsewhere.onnx", str(outside), "sub/../../elsewhere.onnx"):
        bad = _bundle(tmp_path / f"b{abs(hash(name))}")
        _rewrite(bad, stage1={"graphs": {"g": {"file": name}}})
        with pytest.raises(BundleError, match="outside the bundle"):
            read_manifest(bad)

    unlisted = _bundle(tmp_path / "unlisted")
    _rewrite(unlisted, model_card="README.md")
    with pytest.raises(BundleError, match="README.md: named by the manifest but not listed"):
        read_manifest(unlisted)

    link = _bundle(tmp_path / "link")
    (link / "stage1.onnx").unlink()
    (link / "stage1.onnx").symlink_to(outside)  # same bytes, but out of the bundle
    with pytest.raises(BundleError, match="leads outside the bundle"):
        read_manifest(link)


# ----------------------------------------------------------------------------- Kaggle kit


def test_a_kit_checks_its_models_against_kit_json_before_loading(tmp_path):
    from cervspine.kaggle.predict import kit_models

    kit = tmp_path / "kit"
    (kit / "models").mkdir(parents=True)
    for name in ("stage1", "stage2"):
        (kit / "models" / f"{name}.ckpt").write_bytes(name.encode())
    sha = {f"models/{n}.ckpt": hashlib.sha256(n.encode()).hexdigest() for n in ("stage1", "stage2")}
    record = {"models": {"stage1": "models/stage1.ckpt", "stage2": ["models/stage2.ckpt"]}, "sha256": sha}
    (kit / "kit.json").write_text(json.dumps(record))
    assert kit_models(kit) == (kit / "models" / "stage1.ckpt", [kit / "models" / "stage2.ckpt"])
    (kit / "models" / "stage2.ckpt").write_bytes(b"planted")
    with pytest.raises(ValueError, match="stage2.ckpt: SHA-256 .* refused before loading it"):
        kit_models(kit)
    outside = {**record, "models": {**record["models"], "stage1": "../x.ckpt"}}
    (kit / "kit.json").write_text(json.dumps(outside))
    with pytest.raises(ValueError, match="outside the kit"):
        kit_models(kit)


def test_the_kit_installs_its_wheels_by_hash(tmp_path):
    from cervspine.kaggle.kit import write_hashed_requirements

    wheels = tmp_path / "wheels"
    wheels.mkdir()
    for name in ("cervspine-0.3.0-py3-none-any.whl", "typing_extensions-4.12.2-py3-none-any.whl",
                 "setuptools-80.0.0-py3-none-any.whl"):  # fmt: skip
        (wheels / name).write_bytes(name.encode())
    lines = write_hashed_requirements(wheels, {"cervspine", "typing-extensions"}).read_text().splitlines()
    digest = hashlib.sha256(b"typing_extensions-4.12.2-py3-none-any.whl").hexdigest()
    assert lines == [
        f"cervspine==0.3.0 --hash=sha256:{hashlib.sha256(b'cervspine-0.3.0-py3-none-any.whl').hexdigest()}",
        f"typing-extensions==4.12.2 --hash=sha256:{digest}",
    ]  # only the names asked for (the kit asks for every wheel it packs)
    script = (Path(__file__).resolve().parents[1] / "cervspine" / "kaggle" / "kaggle_predict.py").read_text()
    assert '"--require-hashes", "-r"' in script
