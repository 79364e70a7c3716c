"""Scoring the competition's test folder in a Kaggle notebook: ``test.csv``'s studies read one at a time from
DICOM into memory (the next one read while the current one is scored), never into a cache — the hidden test
set (~1,500 studies, ~300 slices of 512² each) would take ~240 GB cached where Kaggle gives ~20 GB of disk.

The loop is the one every folder run uses (:func:`cervspine.jobs.folder.score_folder`): a study that cannot
be read or scored is answered with the ensemble's training prior (logged with its UID, listed in
failures.csv): a submission missing rows scores nothing, a prior row costs about what a guess does.
``strict=True`` fails instead, once the others are scored. The kit's ``kaggle_predict.py`` calls
:func:`predict_test_folder` with the kit's models.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

from cervspine.io.rsna import TEST_CSV, TEST_IMAGES, read_test
from cervspine.jobs.folder import FolderResult, score_folder

log = logging.getLogger(__name__)
KIT_MANIFEST = "kit.json"


def kit_models(kit: str | Path) -> tuple[Path, list[Path]]:
    """(stage 1, [stage 2 members]) of a kit folder, from its ``kit.json``: each a file inside the kit whose
    SHA-256 is the one kit.json records (checked before anything loads it; else a ``ValueError``)."""
    kit = Path(kit)
    manifest = kit / KIT_MANIFEST
    if not manifest.is_file():
        raise FileNotFoundError(f"{kit}: no {KIT_MANIFEST} (not a folder written by make kaggle-kit)")
    record = json.loads(manifest.read_text())
    models, hashes = record["models"], record.get("sha256") or {}
    paths = [_kit_file(kit, rel, hashes) for rel in [models["stage1"], *models["stage2"]]]
    return paths[0], paths[1:]


def _kit_file(kit: Path, rel: str, hashes: dict[str, str]) -> Path:
    import hashlib

    path = kit / rel
    if Path(rel).is_absolute() or ".." in Path(rel).parts or not path.resolve().is_relative_to(kit.resolve()):
        raise ValueError(f"{manifest_name(kit)}: model {rel!r} is outside the kit: refused")
    if rel not in hashes:
        raise ValueError(f"{manifest_name(kit)}: no SHA-256 for {rel}: refused (build the kit again)")
    got = hashlib.sha256(path.read_bytes()).hexdigest() if path.is_file() else "missing"
    if got != hashes[rel]:
        raise ValueError(
            f"{path}: SHA-256 {got[:16]}… is not kit.json's {hashes[rel][:16]}… (changed after the kit was "
            "built): refused before loading it"
        )
    return path


def manifest_name(kit: Path) -> Path:
    return kit / KIT_MANIFEST


def predict_test_folder(
    data: str | Path,
    out: str | Path,
    *,
    kit: str | Path | None = None,
    stage1: str | Path | None = None,
    stage2: list[str | Path] | None = None,
    device: str = "auto",
    batch_size: int = 32,
    workers: int = 2,
    num_threads: int | str | None = "auto",
    strict: bool = False,
    limit: int | None = None,
) -> FolderResult:
    """``data``'s test.csv → ``out`` (submission.csv: row_id, fractured in test.csv's order; failures.csv
    and studies/<uid>.json beside it), with the models of ``kit`` (its kit.json) or the checkpoints given.
    ``workers``: DICOM decoder processes; ``limit``: the first studies only (a dry run)."""
    from cervspine.cache import CacheParams, InMemoryStudy
    from cervspine.inference import load_predictor
    from cervspine.io import load_study

    data, out = Path(data), Path(out)
    if kit is not None:
        stage1, stage2 = kit_models(kit)
    if stage1 is None or not stage2:
        raise ValueError("give kit= (a folder of make kaggle-kit) or stage1= and stage2=")
    test = read_test(data / TEST_CSV)
    uids = list(dict.fromkeys(test["StudyInstanceUID"]))[:limit]
    predictor = load_predictor(stage1=stage1, stage2=list(stage2), device=device, batch_size=batch_size,
                               num_threads=num_threads)  # fmt: skip
    params = CacheParams(image_size=predictor.image_size)
    log.info("%d test studies, models: %s + %s", len(uids), Path(stage1).name, [Path(p).name for p in stage2])

    def read(uid: str) -> InMemoryStudy:
        return InMemoryStudy(load_study(data / TEST_IMAGES / uid, workers=workers, uid=uid), params)

    return score_folder(
        test[test["StudyInstanceUID"].isin(uids)],
        read,
        predictor.predict,
        predictor.prior,
        out.parent,
        strict=strict,
        submission=out,
    )
