"""The defects the house restructuring fixed, each checked where it was: the learning-rate schedule and the
backbone described by config (``_target_``) and still read from older checkpoints' plain dicts, the cache
following the checkpoints' image size, evaluate and predict composing one predictor node, the pipeline's
evaluate/predict steps being the real composed configs, and imports flowing one way. (k-fold CV with the
sequence model: test_framework.py::test_kfold_out_of_fold_predictions_gather_into_a_cv_score.)
"""

from __future__ import annotations

import ast
import functools
import logging
from collections.abc import Mapping
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf
from timm.scheduler import CosineLRScheduler

from cervspine.models.optim import OptimizedModule, scheduler_factory, warmup_cosine
from cervspine.models.safe_load import load_checkpoint
from tests.helpers import REPO, hydra_config, train_overrides

PREMOVE = Path(__file__).parent / "data" / "premove"
OLD_SCHEDULE = {
    "warmup_epochs": 0.5,
    "cycles": 1,
    "cycle_decay": 0.5,
    "min_lr_ratio": 0.01,
    "warmup_lr_ratio": 0.01,
}


# ------------------------------------------------------------------------------- learning-rate schedule


def _old_schedule(opt: torch.optim.Optimizer, total: int, max_epochs: int, cfg: dict) -> CosineLRScheduler:
    """The schedule ``OptimizedModule.configure_optimizers`` hard-coded before the house (commit 31883b1)."""
    epochs = max(int(max_epochs or 1), 1)
    total = max(int(total), 1)
    per_epoch = max(total // epochs, 1)
    cycles = max(int(cfg.get("cycles", 1)), 1)
    base_lr = opt.param_groups[0]["lr"]
    return CosineLRScheduler(
        opt,
        t_initial=max(total // cycles, 1),
        lr_min=base_lr * float(cfg.get("min_lr_ratio", 0.01)),
        warmup_t=int(float(cfg.get("warmup_epochs", 0)) * per_epoch),
        warmup_lr_init=base_lr * float(cfg.get("warmup_lr_ratio", 0.01)),
        cycle_limit=cycles,
        cycle_decay=float(cfg.get("cycle_decay", 1.0)),
        t_in_epochs=False,
    )


class _FakeTrainer:
    def __init__(self, estimated_stepping_batches: int, max_epochs: int) -> None:
        self.estimated_stepping_batches, self.max_epochs = estimated_stepping_batches, max_epochs


class _Module(OptimizedModule):
    def __init__(self, scheduler) -> None:
        super().__init__()
        self.w = torch.nn.Parameter(torch.zeros(3))
        self.optimizer_factory = functools.partial(torch.optim.AdamW, lr=2e-3)
        self.scheduler_cfg = scheduler


def _lrs(sched, opt: torch.optim.Optimizer, total: int) -> list[float]:
    out = [opt.param_groups[0]["lr"]]
    for step in range(1, total + 1):  # lr_scheduler_step: step_update(global_step) after each update
        sched.step_update(num_updates=step)
        out.append(opt.param_groups[0]["lr"])
    return out


SETTINGS = [  # (estimated_stepping_batches, max_epochs, scheduler options beyond the config's defaults)
    (40, 4, {}),
    (40, 4, {"cycles": 2}),
    (35, 5, {"cycles": 2, "warmup_epochs": 1.0}),  # 7 updates per epoch, 17-update cycles
    (21, 3, {"cycles": 3, "cycle_decay": 0.7, "warmup_epochs": 0.3}),
    (1, 1, {}),
    pytest.param(7, 2, {}, id="7-2-max_steps"),  # max_steps below max_epochs x batches: the exact count
    pytest.param(10, 3, {"cycles": 2}, id="10-3-max_steps-cycles2"),
]


@pytest.mark.parametrize("spec", ["config", "plain_dict"])
@pytest.mark.parametrize(("total", "epochs", "options"), SETTINGS)
def test_default_schedule_reproduces_the_old_hard_coded_one(spec, total, epochs, options, tmp_path):
    """conf/scheduler/warmup_cosine.yaml (a partial of warmup_cosine) and an older checkpoint's plain dict
    give the learning rates the old hard-coded schedule gave, at every update."""
    from hydra.utils import instantiate

    if spec == "config":
        with hydra_config("train", ["experiment=fracture_demo"], tmp_path) as cfg:
            factory = instantiate(cfg.model.scheduler)
            old_cfg = {k: v for k, v in OmegaConf.to_container(cfg.model.scheduler).items() if k[0] != "_"}
        assert old_cfg == OLD_SCHEDULE  # the old config's values, now the default config's
        assert isinstance(factory, functools.partial) and factory.func is warmup_cosine
        factory = functools.partial(factory, **options)
    else:
        factory = {**OLD_SCHEDULE, **options}
    old_cfg = {**OLD_SCHEDULE, **options}
    module = _Module(factory)
    module.trainer = _FakeTrainer(total, epochs)
    new = module.configure_optimizers()
    new_opt, new_sched = new["optimizer"], new["lr_scheduler"]["scheduler"]
    assert new["lr_scheduler"]["interval"] == "step"
    old_opt = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(3))], lr=2e-3)
    old_sched = _old_schedule(old_opt, total, epochs, old_cfg)
    assert _lrs(new_sched, new_opt, total + 3) == pytest.approx(
        _lrs(old_sched, old_opt, total + 3), rel=1e-12
    )


def test_scheduler_factory_reads_a_plain_dict_as_warmup_cosine():
    assert scheduler_factory(None) is None
    factory = scheduler_factory(dict(OLD_SCHEDULE))
    assert factory.func is warmup_cosine and factory.keywords == OLD_SCHEDULE
    assert scheduler_factory(factory) is factory


def test_timm_scheduler_through_config_trains_and_changes_the_lr(tiny_root, tmp_path):
    """``scheduler@model.scheduler=timm``: timm's create_scheduler_v2 builds the schedule; the lr moves."""
    import timm.scheduler

    from cervspine.train import train

    ov = train_overrides(tiny_root, "fracture_demo", "scheduler@model.scheduler=timm", "trainer.max_epochs=2",
                         "model.backbone.name=test_resnet", "+trainer.limit_train_batches=3",
                         "+trainer.limit_val_batches=1", "+trainer.enable_progress_bar=false",
                         "+callbacks.lr_probe._target_=tests.helpers.LrProbe")  # fmt: skip
    with hydra_config("train", ov, tmp_path) as cfg:
        assert cfg.model.scheduler._target_ == "timm.scheduler.create_scheduler_v2"
        _, objects = train(cfg)
    model, trainer = objects["model"], objects["trainer"]
    assert model.scheduler_cfg.func is timm.scheduler.create_scheduler_v2
    sched = trainer.lr_scheduler_configs[0].scheduler
    assert isinstance(sched, timm.scheduler.CosineLRScheduler) and trainer.global_step == 6
    probe = next(cb for cb in trainer.callbacks if type(cb).__name__ == "LrProbe")
    lrs = probe.lrs
    assert len(lrs) == 6 and len(set(lrs)) >= 5  # a new lr (almost) every update
    assert lrs[0] == pytest.approx(cfg.model.optimizer.lr) and lrs[-1] < lrs[0]  # cosine decay, no warmup


def test_a_premove_checkpoint_with_plain_dict_backbone_and_scheduler_still_trains(tiny_root, tiny_cache):
    """tests/data/premove/slice.ckpt (made before the _target_ configs) holds plain dicts: it loads, and
    fitting it goes on with the warmup-cosine schedule those dicts describe."""
    import lightning as L

    from cervspine.data.datamodules import FractureDataModule
    from cervspine.models.fracture import FractureClassifier

    ckpt = load_checkpoint(PREMOVE / "slice.ckpt")
    hp = ckpt["hyper_parameters"]
    for key in ("backbone", "scheduler"):  # plain mappings of options, no _target_
        assert isinstance(hp[key], Mapping) and "_target_" not in hp[key], key
    model = FractureClassifier.load_from_checkpoint(
        PREMOVE / "slice.ckpt", map_location="cpu", weights_only=False
    )
    assert type(model.backbone).__name__ == "ResNet" and model.backbone.num_features > 0
    before = {k: v.clone() for k, v in model.state_dict().items()}
    dm_hp = ckpt["datamodule_hyper_parameters"]
    keep = ("input_size", "context", "stride", "windows", "batch_size", "epoch_size", "pos_fraction")
    dm = FractureDataModule(root=str(tiny_root), cache_dir=str(tiny_cache), image_size=64, n_folds=3,
                            num_workers=0, preprocess_workers=1, **{k: dm_hp[k] for k in keep})  # fmt: skip
    trainer = L.Trainer(accelerator="cpu", max_epochs=1, limit_train_batches=2, limit_val_batches=1,
                        logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False)  # fmt: skip
    trainer.fit(model, datamodule=dm)
    assert trainer.global_step == 2
    sched = trainer.lr_scheduler_configs[0].scheduler
    assert isinstance(sched, CosineLRScheduler)
    assert sched.t_initial == 2 and sched.warmup_t == int(0.5 * 2)  # the dict's schedule, sized to this fit
    weight = "fracture_head.weight"
    assert not torch.equal(before[weight], model.state_dict()[weight])  # it trained


# ------------------------------------------------------------------------------------------- backbone


def test_backbone_is_a_target_partial_that_name_still_overrides(tmp_path):
    from hydra.utils import instantiate

    from cervspine.models.backbones import backbone_name, build_backbone, create_backbone

    with hydra_config(
        "train", ["experiment=fracture_demo", "model.backbone.name=test_resnet"], tmp_path
    ) as cfg:
        node = cfg.model.backbone
        assert node._target_ == "cervspine.models.backbones.create_backbone" and node._partial_ is True
        assert node.name == "test_resnet"
        factory = instantiate(node)
    assert isinstance(factory, functools.partial) and factory.func is create_backbone
    assert backbone_name(factory) == "test_resnet"
    net = build_backbone(factory, in_chans=3)
    reference = create_backbone("test_resnet", in_chans=3)
    assert [p.shape for p in net.parameters()] == [p.shape for p in reference.parameters()]
    old = build_backbone(
        {"name": "test_resnet", "pretrained": False}, in_chans=3
    )  # an older checkpoint's dict
    assert [p.shape for p in old.parameters()] == [p.shape for p in reference.parameters()]
    with hydra_config("train", ["experiment=fracture_demo"], tmp_path) as cfg:
        assert cfg.model.backbone.name == "resnet10t"  # the recipe's own


# --------------------------------------------------------------------------------- cache image size


def _data(root: Path, image_size: int | None, cache_dir: Path | None = None):
    from cervspine.cache import default_cache_dir

    cache = cache_dir or default_cache_dir(root, image_size)
    return OmegaConf.create({"root": str(root), "image_size": image_size, "cache_dir": str(cache),
                             "segmentation_method": "auto"})  # fmt: skip


def test_cache_follows_the_checkpoints_image_size_and_says_so(tmp_path, caplog):
    from cervspine.jobs.cache import cache_for

    caplog.set_level(logging.INFO, logger="cervspine.jobs.cache")
    cache_dir, params = cache_for(_data(tmp_path, 256), 64)
    assert cache_dir == tmp_path / ".cervspine_cache" / "s64" and params.image_size == 64
    info = [r for r in caplog.records if r.name == "cervspine.jobs.cache"]
    assert len(info) == 1 and info[0].levelno == logging.INFO
    assert "256" in info[0].getMessage() and "64" in info[0].getMessage() and "s64" in info[0].getMessage()
    caplog.clear()
    assert cache_for(_data(tmp_path, 64), 64) == (tmp_path / ".cervspine_cache" / "s64", params)
    assert cache_for(_data(tmp_path, 128), None)[1].image_size == 128  # no size known: the config's
    assert not caplog.records  # nothing to say when they agree


def test_an_explicit_cache_dir_is_kept_with_a_warning(tmp_path, caplog):
    from cervspine.jobs.cache import cache_for

    caplog.set_level(logging.INFO, logger="cervspine.jobs.cache")
    mine = tmp_path / "my_cache"
    cache_dir, params = cache_for(_data(tmp_path, 256, mine), 64)
    assert cache_dir == mine and params.image_size == 64
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and str(mine) in warnings[0].getMessage() and "64" in warnings[0].getMessage()


# ------------------------------------------------------------------ one predictor node, real task configs


def test_evaluate_and_predict_compose_the_same_predictor_node(tmp_path):
    common = [
        f"run_dir={tmp_path / 'run'}",
        "device=cpu",
        "batch_size=8",
        f"ckpt.stage1={tmp_path / 'a.ckpt'}",
    ]
    nodes = {}
    for task in ("evaluate", "predict"):
        with hydra_config(task, common, tmp_path / task) as cfg:
            assert cfg.predictor._target_ == "cervspine.inference.load_predictor"
            nodes[task] = OmegaConf.to_container(cfg.predictor, resolve=True)
    assert nodes["evaluate"] == nodes["predict"]
    assert nodes["predict"]["run_dir"] == str(tmp_path / "run") and nodes["predict"]["batch_size"] == 8


def _task_configs(tiny_root: Path, tmp_path: Path, *overrides: str) -> dict:
    """The pipeline's evaluate and predict step configs (``task_config``), and each entry point's own."""
    from cervspine.jobs.pipeline import task_config

    out = {}
    for task in ("evaluate", "predict"):
        with hydra_config(task, [], tmp_path) as alone:
            out[f"{task}_alone"] = OmegaConf.to_container(alone)
    s1, s2 = tmp_path / "s1.ckpt", [tmp_path / "s2.ckpt"]
    with hydra_config("pipeline", [f"data.root={tiny_root}", "experiment=demo", *overrides], tmp_path) as cfg:
        for task in ("evaluate", "predict"):
            out[task] = task_config(cfg, task, tmp_path / "run", s1, s2)
        out["pipeline"] = cfg
    return out


def test_the_pipelines_evaluate_and_predict_steps_are_the_composed_configs(tiny_root, tmp_path):
    from cervspine.jobs.pipeline import TASK_KEYS

    configs = _task_configs(tiny_root, tmp_path)
    pipeline = configs["pipeline"]
    forwarded = {"data", "run_dir", "ckpt", "paths", "fold", *TASK_KEYS}
    for task in ("evaluate", "predict"):
        task_cfg, alone = configs[task], configs[f"{task}_alone"]
        assert set(task_cfg) - set(TASK_KEYS) == set(alone) - set(TASK_KEYS)  # conf/<task>.yaml's keys
        mine = OmegaConf.to_container(task_cfg)
        for key in set(alone) - forwarded:  # report, report_threshold, predictor, num_threads, …
            assert mine[key] == alone[key], (task, key)
        assert task_cfg.data.root == str(tiny_root) and task_cfg.data.image_size == pipeline.data.image_size
        assert task_cfg.ckpt.stage1 == str(tmp_path / "s1.ckpt")
        predictor = OmegaConf.to_container(task_cfg.predictor, resolve=True)
        assert predictor["stage2"] == [str(tmp_path / "s2.ckpt")] and predictor["precision"] == "auto"
    nodes = [OmegaConf.to_container(configs[t].predictor, resolve=True) for t in ("evaluate", "predict")]
    assert nodes[0] == nodes[1]
    assert configs["evaluate"].fold == pipeline.data.fold


def test_the_pipelines_evaluate_overrides_reach_the_evaluate_step(tiny_root, tmp_path):
    over = [
        'evaluate.overrides=["report=true","report_threshold=0.3"]',
        'predict.overrides=["num_threads=1"]',
    ]
    configs = _task_configs(tiny_root, tmp_path, *over)
    assert configs["evaluate"].report is True and configs["evaluate"].report_threshold == 0.3
    assert configs["predict"].num_threads == 1 and configs["predict"].report is False
    assert OmegaConf.to_container(configs["predict"].predictor, resolve=True)["num_threads"] == 1


def test_a_shared_setting_in_evaluate_overrides_reaches_the_evaluate_step(tiny_root, tmp_path):
    configs = _task_configs(tiny_root, tmp_path, 'evaluate.overrides=["n_bootstrap=7"]', "n_bootstrap=20")
    assert configs["evaluate"].n_bootstrap == 7


# -------------------------------------------------------------------------------------- import arrows

ENTRY_POINTS = {"train", "evaluate", "predict", "preprocess", "pipeline", "synthesize", "cv", "serve"}


def _imports(path: Path, module: str) -> set[str]:
    """Every cervspine module ``path`` imports (lazily inside functions too), relative imports resolved."""
    package = module.split(".") if path.name == "__init__.py" else module.split(".")[:-1]
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out |= {n.name for n in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = ".".join(package[: len(package) - node.level + 1]) if node.level else ""
            name = ".".join(p for p in (base, node.module or "") if p)
            out |= {name, *(f"{name}.{n.name}" for n in node.names)}
    return {m for m in out if m == "cervspine" or m.startswith("cervspine.")}


def _modules() -> dict[str, Path]:
    root = REPO / "cervspine"
    out = {}
    for path in sorted(root.rglob("*.py")):
        parts = list(path.relative_to(REPO).with_suffix("").parts)
        out[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return out


def _layer(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else ""


def _entry_point(module: str) -> str | None:
    """``cervspine.<name>`` for an entry point module ``module`` is in (or is), else None."""
    parts = module.split(".")
    if len(parts) >= 2 and parts[1] in ENTRY_POINTS and (REPO / "cervspine" / f"{parts[1]}.py").is_file():
        return ".".join(parts[:2])
    return None


def test_library_modules_never_import_entry_points_and_io_imports_only_io():
    modules = _modules()
    assert {"cervspine.io.dicom", "cervspine.jobs.pipeline", "cervspine.train"} <= set(modules)
    problems = set()
    for module, path in modules.items():
        for imp in _imports(path, module):
            target = _entry_point(imp)
            if target and _entry_point(module) is None:
                problems.add(f"{module} imports the entry point {target}")
            other = _layer(imp)
            if _layer(module) == "io" and other not in ("io", "") and not other.isupper():
                problems.add(f"{module} (io) imports {imp}")
    assert not problems, "\n".join(sorted(problems))


def test_data_and_models_import_only_downward():
    """data never imports models, inference or report; models never import the DataModules, inference or
    report (the other one-way arrows of ../shared/tools/house.py)."""
    problems = set()
    for module, path in _modules().items():
        for imp in _imports(path, module):
            other = _layer(imp)
            if _layer(module) == "data" and other in ("models", "inference", "report"):
                problems.add(f"{module} (data) imports {imp}")
            if _layer(module) == "models" and (
                other in ("inference", "report") or imp.startswith("cervspine.data.datamodules")
            ):
                problems.add(f"{module} (models) imports {imp}")
    assert not problems, "\n".join(sorted(problems))


def test_the_import_check_sees_lazy_and_relative_imports(tmp_path):
    src = tmp_path / "x.py"
    src.write_text(
        "from . import rsna\ndef f():\n    from cervspine.train import train\n    import cervspine.io.dicom\n"
    )
    assert _imports(src, "cervspine.io.x") >= {"cervspine.io.rsna", "cervspine.train", "cervspine.io.dicom"}
    assert _entry_point("cervspine.train.train") == "cervspine.train" and _entry_point("cervspine.io") is None
