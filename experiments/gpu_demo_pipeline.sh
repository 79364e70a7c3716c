#!/bin/bash
# The demo pipeline end to end on one GPU (stages with accelerator=gpu, bf16-mixed), then the held-out
# score; then stage 2 alone retrained 120 epochs. SYNTHETIC data. From the repo root:
#   OUT=/tmp/gpu_out LIMIT_S=520 bash experiments/gpu_demo_pipeline.sh
# (logs, held-out JSON and stage-2 curves land in OUT; the runs are cut so that the script ends within
# LIMIT_S seconds of the synthesis start: one device call here allowed ~10 minutes).
# On a bare GPU image that has torch/lightning/timm but not this project's other dependencies, put their
# wheels in .whl/ (hydra-core, omegaconf, antlr4-python3-runtime, albumentations, albucore, pydantic,
# pydantic_core, annotated-types, typing-inspection, simsimd, stringzilla, pydicom, pylibjpeg,
# pylibjpeg-libjpeg, pylibjpeg-openjpeg, pylibjpeg-rle, nibabel): they are installed to /tmp/site.
# Run on an H100 on 2026-11-26 with stage 1 at 15 epochs (experiments/demo_quality.md); the 120-epoch
# run was cut by the limit there.
set -x
OUT=${OUT:-outputs/gpu_demo}; LIMIT_S=${LIMIT_S:-520}; mkdir -p "$OUT"
if compgen -G ".whl/*.whl" > /dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 3
  export PYTHONPATH=/tmp/site:$PWD
fi
export WANDB_MODE=disabled PYTHONUNBUFFERED=1
nvidia-smi -L; python3 -c "import torch,lightning,timm;print(torch.__version__,lightning.__version__,timm.__version__)"
SYN="size=128 seg_fraction=0.3 fracture_gap_mm=[6,10] fracture_shift_mm=[6,10] workers=16"
T0=$(date +%s)
test -f data/g/synthetic_manifest.csv || python3 -m cervspine.synthesize out=data/g n_train=150 n_test=10 seed=0 $SYN > /tmp/synth.log 2>&1 || { tail -30 /tmp/synth.log; exit 4; }
test -f data/g_holdout/synthetic_manifest.csv || python3 -m cervspine.synthesize out=data/g_holdout n_train=60 n_test=0 seed=1 $SYN >> /tmp/synth.log 2>&1
T1=$(date +%s); echo "synth_s $((T1-T0))"
G='"trainer.accelerator=gpu","trainer.precision=bf16-mixed","model.channels_last=true","data.num_workers=8"'
S1="[$G]"  # the demo's stage 1 (now 25 epochs, pos_weight 1)
run() {  # $1 label, $2 stage-2 epochs (one run dir: stage 1 is reused by the second call)
  s=$(date +%s)
  timeout $(( LIMIT_S - ($(date +%s) - T0) )) python3 -m cervspine.pipeline data.root=data/g experiment=demo workers=16 progress=false hydra.run.dir=outputs/gpu \
    "stage1.overrides=$S1" "stage2.overrides=[$G,\"trainer.max_epochs=$2\"]" > $OUT/$1.log 2>&1 || { tail -25 $OUT/$1.log; cp outputs/gpu/stage2/csv/metrics.csv $OUT/$1_stage2_curve.csv; return 1; }
  echo "$1 pipeline_s $(( $(date +%s)-s ))"
  python3 -m experiments.demo_quality --run outputs/gpu --train data/g --holdout data/g_holdout --out $OUT/$1_quality.json 2>&1 | tail -2
  cp outputs/gpu/stage2/csv/metrics.csv $OUT/$1_stage2_curve.csv
  rm -rf outputs/gpu/stage2 outputs/gpu/holdout_evaluation
}
run gpu40 40
run gpu120 120
echo total_s $(( $(date +%s)-T0 ))
