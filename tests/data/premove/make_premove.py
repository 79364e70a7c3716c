"""One-off script that made these files with the code before the house restructuring (commit 31883b1): tiny
checkpoints of the three model kinds (test_resnet backbones), a cached study and their outputs on it.
Kept to show how they were made; it runs only against that commit (ruff skips tests/data)."""
import json, shutil, sys
from pathlib import Path
import numpy as np, torch
from cervspine.config import composed
from cervspine.data.synthetic import write_rsna_folder

out = Path(sys.argv[1]); out.mkdir(parents=True, exist_ok=True)
root = out / "folder"
if not (root / "synthetic_manifest.csv").is_file():
    write_rsna_folder(root, n_train=9, n_test=1, size=32, slices=(30, 36), seed=11, seg_fraction=1.0, box_fraction=0.5)
def q(items): return "[" + ",".join(f'"{x}"' for x in items) + "]"
short = ["trainer.max_epochs=1", "+trainer.limit_train_batches=2", "+trainer.limit_val_batches=2",
         "data.num_workers=0", "data.preprocess_workers=1", "model.backbone.name=test_resnet"]
ov = [f"data.root={root}", "experiment=demo_ensemble", "data.image_size=32", "data.n_folds=3", "n_bootstrap=10", "progress=false",
      f"stage1.overrides={q(short + ['data.input_size=32', 'data.batch_size=8'])}",
      f"stage2.overrides={q(short + ['data.input_size=16', 'data.batch_size=8', 'data.epoch_size=16'])}",
      f"stage2_ensemble.seq.overrides={q(short + ['data.input_size=16', 'data.batch_size=4', 'data.epoch_size=8', 'data.n_slices=4'])}"]
run_dir = out / "run"
from cervspine.pipeline import run
with composed("pipeline", ov, run_dir) as cfg:
    run(cfg)
from cervspine.runs import best_checkpoint
from cervspine.models.safe_load import load_checkpoint
ck = out / "checkpoints"; ck.mkdir(exist_ok=True)
for name, d in [("stage1", "stage1"), ("slice", "stage2"), ("sequence", "stage2_seq")]:
    c = load_checkpoint(best_checkpoint(run_dir / d))
    keep = {k: c[k] for k in ("state_dict", "hyper_parameters", "datamodule_hyper_parameters", "pytorch-lightning_version", "epoch", "global_step", "hparams_name", "datamodule_hparams_name", "model_class") if k in c}
    torch.save(keep, ck / f"{name}.ckpt")
from cervspine.data.cache import CachedStudy
from cervspine.inference import Predictor, EnsemblePredictor
uid = sorted((root / ".cervspine_cache" / "s32").iterdir())[0].name
study_dir = out / "study"; shutil.rmtree(study_dir, ignore_errors=True)
shutil.copytree(root / ".cervspine_cache" / "s32" / uid, study_dir)
study = CachedStudy(study_dir)
res = {"uid": uid}
p = Predictor(ck / "stage1.ckpt", ck / "slice.ckpt")
vis, boxes = p.run_stage1(study)
res["stage1_vis"] = vis.tolist(); res["stage1_boxes"] = np.nan_to_num(boxes, nan=-1).tolist()
res["slice"] = p.predict(study).probabilities.tolist()
res["sequence"] = Predictor(ck / "stage1.ckpt", ck / "sequence.ckpt").predict(study).probabilities.tolist()
res["ensemble"] = EnsemblePredictor(ck / "stage1.ckpt", [ck / "slice.ckpt", ck / "sequence.ckpt"]).predict(study).probabilities.tolist()
(out / "expected.json").write_text(json.dumps(res))
print({k: v for k, v in res.items() if k in ("slice", "sequence", "ensemble")})
