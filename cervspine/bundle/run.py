"""``python -m cervspine.bundle.run BUNDLE (--study DIR | --root DIR) [--out OUT] [--backend B]``: score one
DICOM study folder, or every study of an RSNA folder's test.csv, from a model bundle — without torch,
Lightning or Hydra (what a deployment image needs: numpy, the DICOM readers and onnxruntime/openvino).

``--out`` gets ``studies/<uid>.json`` per study and, for ``--root``, ``submission.csv`` with every row of
test.csv (a study that cannot be scored answered with the prior, listed in failures.csv; ``--strict``: exit
status 1 instead, listing the studies)."""

from __future__ import annotations

import argparse
import sys

from cervspine import TARGETS
from cervspine.bundle.backends import BACKENDS
from cervspine.bundle.predictor import BundlePredictor, predict_folder, predict_study
from cervspine.jobs.folder import FolderFailures, print_folder_result


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="python -m cervspine.bundle.run", description=__doc__.splitlines()[0])
    ap.add_argument("bundle", help="the bundle folder (python -m cervspine.export writes it)")
    where = ap.add_mutually_exclusive_group(required=True)
    where.add_argument("--study", help="one DICOM study folder")
    where.add_argument("--root", help="an RSNA folder: every study of its test.csv")
    ap.add_argument("--out", default=None, help="where studies/<uid>.json (and submission.csv) go")
    ap.add_argument("--backend", default="onnxruntime", choices=BACKENDS)
    ap.add_argument("--precision", default="fp32", help="fp32 (default); bf16 on openvino")
    ap.add_argument("--threads", default="auto", help="intra-op threads: auto (the free cores) or a number")
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--strict", action="store_true", help="a study that cannot be scored is an error")
    args = ap.parse_args(argv)
    if args.root and not args.out:
        ap.error("--root needs --out (where submission.csv goes)")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    predictor = BundlePredictor(
        args.bundle,
        backend=args.backend,
        precision=args.precision,
        num_threads=args.threads,
        batch_size=args.batch_size,
    )
    if args.root:
        try:
            print_folder_result(predict_folder(predictor, args.root, args.out, strict=args.strict))
        except FolderFailures as e:
            print(e, file=sys.stderr)
            return 1
        return 0
    pred = predict_study(predictor, args.study, args.out)
    limits = predictor.thresholds.per_target() if predictor.thresholds is not None else [None] * len(TARGETS)
    for t, p, limit in zip(TARGETS, pred.probabilities, limits):
        call = "" if limit is None else ("  fracture suspected" if p > limit else "  not suspected")
        print(f"{t:>16}: {p:.3f}{call}")
    print("timings (s): " + ", ".join(f"{k} {v:.2f}" for k, v in pred.timings.items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
