"""Write /kaggle/working/submission.csv from the competition's test folder, offline, with this kit's models.

The kit (``make kaggle-kit RUN=<run dir> OUT=<dir>``, uploaded as a Kaggle dataset) holds this script,
``wheels/`` (cervspine and every dependency but torch/torchvision, which Kaggle's image has), ``models/``
(the run's checkpoints) and ``kit.json``. In a notebook with internet off, one cell:

    !python /kaggle/input/<kit dataset>/kaggle_predict.py

It installs cervspine from ``wheels/`` (``pip install --no-index --find-links wheels --require-hashes -r
wheels/requirements.txt``: every wheel checked against the SHA-256 the kit recorded) unless it is
installed, then scores every study of test.csv (each model checked against kit.json's SHA-256 first).
Paths and settings: ``--help``. This file is copied into the kit as is; it imports cervspine only after
installing it.
"""

from __future__ import annotations

import argparse
import importlib
import json
import logging
import subprocess
import sys
from pathlib import Path

KIT = Path(__file__).resolve().parent
COMPETITION = Path("/kaggle/input/rsna-2022-cervical-spine-fracture-detection")
SUBMISSION = Path("/kaggle/working/submission.csv")


def install(kit: Path = KIT) -> None:
    """cervspine from the kit's wheels, offline, unless this interpreter already has the kit's version."""
    wanted = json.loads((kit / "kit.json").read_text())["cervspine"]
    try:
        from importlib.metadata import version

        if version("cervspine") == wanted:
            return
    except Exception:  # noqa: BLE001  (not installed)
        pass
    cmd = [sys.executable, "-m", "pip", "install", "--no-index", "--find-links", str(kit / "wheels"), "-q"]
    hashed = kit / "wheels" / "requirements.txt"
    cmd += ["--require-hashes", "-r", str(hashed)] if hashed.is_file() else [f"cervspine=={wanted}"]
    print("installing:", " ".join(cmd), flush=True)
    subprocess.run(cmd, check=True)
    importlib.invalidate_caches()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--data", type=Path, default=COMPETITION, help="the competition folder (test.csv, test_images/)"
    )
    parser.add_argument("--out", type=Path, default=SUBMISSION, help="the submission file to write")
    parser.add_argument("--kit", type=Path, default=KIT, help="the kit folder (kit.json, models/, wheels/)")
    parser.add_argument("--device", default="auto", help="auto (a GPU when there is one) | cuda | cpu")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--workers", type=int, default=2, help="DICOM decoder processes")
    parser.add_argument("--limit", type=int, default=None, help="score only the first N studies (a dry run)")
    parser.add_argument("--strict", action="store_true", help="fail on a study that cannot be scored")
    parser.add_argument("--no-install", action="store_true", help="use the cervspine this Python has")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    if not args.no_install:
        install(args.kit)
    from cervspine.kaggle.predict import predict_test_folder

    result = predict_test_folder(args.data, args.out, kit=args.kit, device=args.device,
                                 batch_size=args.batch_size, workers=args.workers, strict=args.strict,
                                 limit=args.limit)  # fmt: skip
    n, per, failed = len(result.predictions), result.seconds_per_study, len(result.failed)
    print(f"submission: {result.submission} ({n} studies, {per:.1f} s/study, {failed} answered by the prior)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
