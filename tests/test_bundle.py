"""Model bundles (issue 18): ``python -m cervspine.export`` writes ONNX graphs + a versioned, checksummed
manifest + the model card; every backend (ONNX Runtime, OpenVINO, torch from the bundle) gives the torch
checkpoints' answers to ≤ 1e-4 on a held-out synthetic folder; a bundle that was changed, or is of
another version, is refused naming the file or the version; ``python -m cervspine.predict bundle=B
backend=…`` predicts a folder and a study. The import-blocked run is in test_bundle_torchfree.py."""

from __future__ import annotations

import functools
import importlib.util
import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from tests.helpers import hydra_config

PREMOVE = Path(__file__).parent / "data" / "premove"
TOL = 1e-4


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    """A held-out synthetic RSNA folder at the premove models' cache size (32²): 3 test studies."""
    from cervspine.synthetic import write_rsna_folder

    root = tmp_path_factory.mktemp("bundle") / "folder"
    write_rsna_folder(root, n_train=1, n_test=3, size=32, slices=(30, 36), seed=5)
    return root


def _operating_point() -> dict:
    from cervspine.scoring.thresholds import choose_operating_point

    rng = np.random.default_rng(0)
    y = rng.random((40, 8)) < 0.3
    return choose_operating_point(y, np.clip(y * 0.3 + rng.random((40, 8)) * 0.7, 0, 1), n_boot=10).as_dict()


def random_checkpoints(out: Path, slice_root: str = "/nonexistent") -> dict[str, Path]:
    """Randomly initialised column stage 1 (2 windows), slice classifier (gated metadata, a calibration that
    is not the identity) and sequence model (box-mask channel, study head, logit shift) at 32²: equality
    with torch needs no training. (Not the premove 16² stage-2 models: their last convolution sees a 2×2
    map, where torch 2.14's CPU convolution returns NaN for a batch of one, and OpenVINO refuses the
    pooling.) ``slice_root``: the data folder the slice classifier's checkpoint names."""
    import torch

    from cervspine.bundle.export import save_checkpoint
    from cervspine.data.metadata import NUM_FEATURES
    from cervspine.models.column import VertebraeColumnDetector
    from cervspine.models.fracture import FractureClassifier
    from cervspine.models.sequence import VertebraSequenceClassifier

    torch.manual_seed(0)
    opt = functools.partial(torch.optim.AdamW, lr=1e-3)
    bb = {"name": "test_resnet", "pretrained": False}
    base = {"image_size": 32, "input_size": 32, "context": 1, "root": "/nonexistent"}
    column = VertebraeColumnDetector(bb, 6, opt, rnn_hidden=16, feature_dim=8)
    slice_model = FractureClassifier(bb, 3, NUM_FEATURES, opt, fusion="gate")
    slice_model.study_calibration.copy_(torch.tensor([1.2, -0.1, 0.9, 0.2]))
    slice_model.calibration_shrink.copy_(torch.tensor([0.3, 0.1]))
    sequence = VertebraSequenceClassifier(bb, 4, opt, rnn_hidden=16, study_head=True)
    sequence.logit_shift.copy_(torch.tensor([0.3, -0.2]))
    return {
        "column": save_checkpoint(column, {**base, "windows": ["bone", "soft"]}, out / "column.ckpt"),
        "slice": save_checkpoint(
            slice_model, {**base, "root": slice_root, "stride": 2, "windows": ["bone"]}, out / "slice.ckpt"
        ),
        "sequence": save_checkpoint(sequence, {**base, "n_slices": 4, "mask": "box"}, out / "sequence.ckpt"),
        "stage1": PREMOVE / "stage1.ckpt",  # trained: it finds the levels, so stage 2 has work to do
    }


@pytest.fixture(scope="module")
def random_ckpts(folder, tmp_path_factory) -> dict[str, Path]:
    return random_checkpoints(tmp_path_factory.mktemp("ckpts"), slice_root=str(folder))


@pytest.fixture(scope="module")
def trained_bundle(random_ckpts, tmp_path_factory) -> Path:
    """The trained premove stage 1 with the 32² stage-2 ensemble, its checkpoints included."""
    from cervspine.bundle.export import export_bundle

    out = tmp_path_factory.mktemp("bundle") / "trained"
    stage2 = [random_ckpts["slice"], random_ckpts["sequence"]]
    export_bundle(
        out, random_ckpts["stage1"], stage2, operating_point=_operating_point(), include_checkpoints=True
    )
    return out


@pytest.fixture(scope="module")
def random_bundle(random_ckpts, tmp_path_factory) -> Path:
    from cervspine.bundle.export import export_bundle

    out = tmp_path_factory.mktemp("bundle") / "random"
    export_bundle(out, random_ckpts["column"], [random_ckpts["slice"], random_ckpts["sequence"]])
    return out


def _studies(folder: Path, size: int) -> list:
    from cervspine.cache import CacheParams, InMemoryStudy
    from cervspine.io import load_study

    return [
        InMemoryStudy(load_study(d), CacheParams(image_size=size))
        for d in sorted((folder / "test_images").iterdir())
    ]


def test_a_bundle_holds_the_graphs_the_manifest_and_the_model_card(folder, trained_bundle, random_bundle):
    from cervspine.bundle import VERSION, read_manifest
    from cervspine.bundle.manifest import sha256

    m = read_manifest(trained_bundle)
    assert m["version"] == VERSION and m["format"] == "cervspine-bundle" and m["image_size"] == 32
    assert {"stage1.onnx", "stage2_0.onnx", "stage2_1.onnx", "MODEL_CARD.md"} <= set(m["files"])
    for name, entry in m["files"].items():
        assert sha256(trained_bundle / name) == entry["sha256"]
    s1, (slice_rec, seq_rec) = m["stage1"], m["stage2"]
    assert s1["kind"] == "slice" and s1["inputs"]["stack"]["offsets"] == [-2, 0, 2]
    assert s1["inputs"]["stack"]["hu_windows"] == [[-500.0, 1300.0]]
    # synthetic: told by the folder a checkpoint names (the premove one's is not on every machine)
    assert slice_rec["training"]["synthetic"] and slice_rec["training"]["data_root"] == str(folder)
    assert seq_rec["training"]["synthetic"] is False and m["synthetic"]
    assert (
        slice_rec["inputs"]["stack"]["offsets"] == [-2, 0, 2]
        and slice_rec["inputs"]["crop"]["min_crop"] == 0.15
    )
    assert slice_rec["aggregation"]["method"] == "topk_mean" and slice_rec["calibration"]["applies"]
    assert (
        np.allclose(slice_rec["calibration"]["params"], [1.2, -0.1, 0.9, 0.2])
        and len(slice_rec["prior"]) == 8
    )
    assert seq_rec["inputs"]["cropper"]["n_slices"] == 4 and seq_rec["inputs"]["cropper"]["channels"] == 4
    assert seq_rec["graphs"]["model"]["outputs"] == ["vertebra", "overall"]
    assert m["ensemble"]["members"] == 2 and m["operating_point"]["rule"] == "sensitivity"
    assert m["exported_with"]["opset"] >= 17 and m["cervspine"]["version"]
    assert max(m["export_check"]["max_abs_diff"].values()) <= TOL
    assert m["checkpoints"]["stage2"] == ["checkpoints/stage2_0.ckpt", "checkpoints/stage2_1.ckpt"]
    card = (trained_bundle / "MODEL_CARD.md").read_text()
    assert "## This bundle" in card and "NOT FOR DIAGNOSTIC USE" in card and "SYNTHETIC" in card
    col = read_manifest(random_bundle)["stage1"]
    assert col["kind"] == "column" and set(col["graphs"]) == {"encoder", "reader"}
    assert col["graphs"]["reader"]["inputs"]["features"]["shape"][:2] == ["batch", "length"]
    assert col["inputs"]["sampler"]["z_step_mm"] == 2.0 and col["inputs"]["sampler"]["channels"] == 6


@pytest.mark.parametrize(
    ("which", "backends"),
    [("trained", ["onnxruntime", "openvino", "torch"]), ("column", ["onnxruntime", "openvino"])],
)
def test_every_backend_gives_the_torch_checkpoints_answers(
    which, backends, folder, trained_bundle, random_bundle, random_ckpts
):
    from cervspine.bundle.predictor import load_bundle_predictor
    from cervspine.inference import Predictor

    bundle = trained_bundle if which == "trained" else random_bundle
    s1 = random_ckpts["stage1" if which == "trained" else "column"]
    torch_predictor = Predictor.from_checkpoints(
        s1, [random_ckpts["slice"], random_ckpts["sequence"]], device="cpu", num_threads=1
    )
    studies = _studies(folder, 32)
    refs = [torch_predictor.predict(s) for s in studies]
    assert any(len(r.fracture_slices) for r in refs), "stage 1 found nothing: the comparison would be trivial"
    for backend in backends:
        if backend == "openvino" and importlib.util.find_spec("openvino") is None:
            continue
        predictor = load_bundle_predictor(bundle, backend, num_threads=1, batch_size=16)
        for study, ref in zip(studies, refs):
            got = predictor.predict(study)
            assert np.abs(got.probabilities - ref.probabilities).max() <= TOL, backend
            assert np.abs(got.stage1.visibility - ref.stage1.visibility).max() <= TOL, backend
            assert np.array_equal(got.fracture_slices, ref.fracture_slices), backend
            assert got.not_localised == ref.not_localised, backend


def test_openvino_bf16_stays_within_1e_2_of_fp32(folder, random_bundle):
    pytest.importorskip("openvino")
    from cervspine.bundle import BundlePredictor

    study = _studies(folder, 32)[0]
    fp32 = BundlePredictor(random_bundle, backend="openvino", num_threads=1).predict(study)
    bf16 = BundlePredictor(random_bundle, backend="openvino", precision="bf16", num_threads=1).predict(study)
    assert np.abs(fp32.probabilities - bf16.probabilities).max() <= 1e-2
    with pytest.raises(ValueError, match="onnxruntime runs precision fp32"):
        BundlePredictor(random_bundle, precision="bf16")


def test_predict_with_bundle_and_backend_scores_a_folder_and_a_study(
    folder, trained_bundle, random_ckpts, tmp_path
):
    """``python -m cervspine.predict bundle=B backend=…``: the submission equals the checkpoints' (torch)
    one; one study's record carries the bundle's operating point."""
    import pandas as pd

    from cervspine.bundle import predict_folder as bundle_folder
    from cervspine.jobs.predict import predict_folder, predict_study_folder

    common = [f"data.root={folder}", "workers=1", "num_threads=1"]
    c = random_ckpts
    ckpts = [f"ckpt.stage1={c['stage1']}", f"ckpt.stage2=[{c['slice']},{c['sequence']}]"]
    subs = {}
    for name, extra in [("torch", ckpts), ("ort", [f"bundle={trained_bundle}", "backend=onnxruntime"])]:
        with hydra_config("predict", common + extra, tmp_path / name) as cfg:
            result = predict_folder(cfg)
        assert not result.failed
        subs[name] = pd.read_csv(result.submission)
    plain = bundle_folder(trained_bundle, folder, tmp_path / "plain", num_threads=1)
    subs["plain"] = pd.read_csv(plain.submission)
    for name in ("ort", "plain"):
        assert (subs[name]["row_id"] == subs["torch"]["row_id"]).all()
        assert np.abs(subs[name]["fractured"] - subs["torch"]["fractured"]).max() <= TOL
    study = sorted((folder / "test_images").iterdir())[0]
    overrides = [f"study={study}", f"bundle={trained_bundle}", "backend=torch", "num_threads=1"]
    with hydra_config("predict", overrides, tmp_path / "one") as cfg:
        pred = predict_study_folder(cfg)
    record = json.loads((tmp_path / "one" / "studies" / f"{pred.uid}.json").read_text())
    assert record["operating_point"]["rule"].startswith("sensitivity")
    assert set(record["operating_point"]["fracture_suspected"]) >= {"C1", "patient_overall"}


def test_a_changed_file_another_version_or_missing_checkpoints_are_refused(
    trained_bundle, random_bundle, tmp_path
):
    from cervspine.bundle import BundleError, BundlePredictor
    from cervspine.bundle.predictor import load_bundle_predictor

    bad = shutil.copytree(trained_bundle, tmp_path / "bad")
    graph = bad / "stage2_0.onnx"
    data = bytearray(graph.read_bytes())
    data[len(data) // 2] ^= 0xFF
    graph.write_bytes(bytes(data))
    with pytest.raises(BundleError, match=r"stage2_0\.onnx: sha256 .* does not match"):
        BundlePredictor(bad)
    (bad / "stage2_0.onnx").unlink()
    with pytest.raises(BundleError, match=r"stage2_0\.onnx: listed in the bundle's manifest but missing"):
        BundlePredictor(bad)
    old = shutil.copytree(trained_bundle, tmp_path / "old")
    manifest = json.loads((old / "manifest.json").read_text())
    (old / "manifest.json").write_text(json.dumps({**manifest, "version": 99}))
    with pytest.raises(BundleError, match="manifest version 99, but this cervspine .* reads version 1"):
        BundlePredictor(old)
    with pytest.raises(BundleError, match="not a model bundle"):
        BundlePredictor(tmp_path)
    with pytest.raises(BundleError, match="exported without them"):
        load_bundle_predictor(random_bundle, "torch")


def test_export_entry_point_takes_a_run_folder(random_ckpts, tmp_path):
    """``python -m cervspine.export run_dir=R out=B``: the run's best checkpoints (ensemble members found
    in stage2_*/), its operating point and model card."""
    from cervspine.export import export

    run = tmp_path / "run"
    for stage, ckpt in [("stage1", "column"), ("stage2", "slice"), ("stage2_seq", "sequence")]:
        (run / stage).mkdir(parents=True)
        (run / stage / "train_summary.json").write_text(
            json.dumps({"best_model_path": str(random_ckpts[ckpt])})
        )
    (run / "operating_point.json").write_text(json.dumps(_operating_point()))
    (run / "MODEL_CARD.md").write_text("# Model card\n\nThe run's own card.\n")
    with hydra_config("export", [f"run_dir={run}", f"out={tmp_path / 'b'}"], tmp_path / "logs") as cfg:
        manifest = export(cfg)
    assert [s["kind"] for s in manifest["stage2"]] == ["slice", "sequence"]
    assert manifest["operating_point"]["rule"] == "sensitivity" and manifest["checkpoints"] is None
    assert "The run's own card." in (tmp_path / "b" / "MODEL_CARD.md").read_text()
    again = hydra_config("export", [f"run_dir={run}", f"out={tmp_path / 'b'}"], tmp_path / "logs")
    with pytest.raises(FileExistsError, match="overwrite=true"), again as cfg:
        export(cfg)


def test_training_inference_and_the_bundle_share_one_column_sampler():
    """One torch-free definition of the column sampling (cervspine.data.column_sampler) serves training,
    torch inference and the bundle's runtime."""
    from cervspine.bundle import stages
    from cervspine.data import column, column_sampler
    from cervspine.inference import column_stage1

    assert column.ColumnSampler is column_sampler.ColumnSampler is column_stage1.ColumnSampler
    assert stages.ColumnSampler is column_sampler.ColumnSampler
    assert column_stage1.read_column is stages.read_column is column_sampler.read_column


def test_auto_threads_leave_the_busy_cores_to_others():
    from cervspine.cpu import auto_threads, resolve_threads
    from cervspine.inference import Runtime

    assert auto_threads(cores=2, busy=0.0) == 2
    assert auto_threads(cores=2, busy=0.6) == 1 and auto_threads(cores=2, busy=5.5) == 1
    assert auto_threads(cores=8, busy=2.4) == 6 and auto_threads(cores=1, busy=0.0) == 1
    assert resolve_threads(None) is None and resolve_threads("3") == 3 and resolve_threads(0) == 1
    assert 1 <= resolve_threads("auto") <= (len(__import__("os").sched_getaffinity(0)))
    assert Runtime.create("cpu", num_threads="auto").num_threads >= 1


def test_the_export_check_allows_for_rounding_an_ill_conditioned_module_amplifies(tmp_path):
    """On noise inputs a network fitted to CT can amplify float32 rounding far past 1e-4: the export check
    then allows 10× the module's own sensitivity to 2-ulp input changes, and still refuses a wrong graph."""
    import torch

    from cervspine.bundle.export import check_graph, sensitivity
    from cervspine.bundle.graphs import GraphSpec, export_graph

    torch.manual_seed(0)
    calm = torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.Tanh(), torch.nn.Linear(64, 4))
    wild = torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.Linear(64, 4))
    with torch.no_grad():
        wild[0].weight.mul_(1e4)
        wild[1].weight.mul_(1e4)
    x = {"x": torch.rand(8, 64)}
    assert sensitivity(GraphSpec(calm, x, ["y"])) < 1e-5 < 1e-1 < sensitivity(GraphSpec(wild, x, ["y"]))
    spec = GraphSpec(calm, x, ["y"], {"x": {0: "batch"}})
    export_graph(spec, tmp_path / "calm.onnx")
    assert check_graph(spec, tmp_path / "calm.onnx") <= TOL
    other = GraphSpec(torch.nn.Sequential(torch.nn.Linear(64, 4)), x, ["y"])  # the graph of another module
    assert check_graph(other, tmp_path / "calm.onnx") > 10 * sensitivity(other)
