"""Input building of the real-data recipes, before and after issue 32, on one production-size study.

Study: a synthetic DICOM series of 512×512×300 slices 1 mm apart (``bench_study``), loaded as the cache
holds it (int16 HU, 512²); for the training loaders also written as the rsna job's cache entry (HTJ2K per
slice, HU floor −500), read through :class:`~cervspine.cache.compressed.CompressedVolume` (every sample
decodes its slices, as a loader worker does). Inputs at each recipe's own settings (composed from
``conf/experiment/``):

* loader cost per **stage-1 column** (``vertebrae_column``: 2 windows × 3 slices at 192², 2 mm steps):
  the whole column (150 positions; training draws parts of ≥ half of it, so this is the worst case);
* loader cost per **fracture_seq sample** (one vertebra: 15 crops × 5 slices + box mask at 384²);
* the **crops phase of one study** at inference: ``study_sequences`` (7 vertebrae) and the slice
  classifier's crops (``slice_inputs`` + ``slice_batch`` of every scored slice), in memory, 1 thread and
  the usable cores.

Baseline: the builders as they were (``experiments/benchmarks/inputs_reference.py``: every voxel windowed
at 512² then resized channel by channel; each crop stack resized apiece; the slice classifier's whole
volume windowed first), interleaved with the new ones, medians. The outputs agree within 1e-5
(``tests/test_input_builders.py``; the max |Δ| of these very inputs is in each note). Loader cores for an
H100: the rehearsal's arithmetic (``experiments/rehearsal.py``: the samples one fold trains on in the
stage's share of the 6 h budget) × seconds a sample on one core.

    python -m experiments.benchmarks.inputs [--quick]
"""

from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Any

import numpy as np

from experiments.benchmarks.common import (
    BENCH_DATA,
    Row,
    bench_study,
    cli,
    command,
    finish,
    hydra_config,
    interleaved,
    median,
)

N_SLICES, SPACING_MM, HU_FLOOR = 300, 1.0, -500
CORES_GOAL, CROPS_GOAL_S = 4.0, 1.0
SEQ_RECIPES = ("fracture_seq", "fracture_seq_384")  # the 224² recipe and the 384² one it replaced


def recipe_data(experiment: str) -> dict[str, Any]:
    from omegaconf import OmegaConf

    with hydra_config("train", [f"experiment={experiment}", "print_config=false"], Path("/tmp")) as cfg:
        return OmegaConf.to_container(cfg.data, resolve=False)


def study() -> tuple[Any, Any]:
    """(the study in memory at 512², its HTJ2K cache volume): made once."""
    from cervspine.cache import CacheParams, InMemoryStudy
    from cervspine.cache.compressed import CompressedVolume, write_volume
    from cervspine.io import load_study

    folder = bench_study("explicit", n_slices=N_SLICES, slice_spacing=SPACING_MM)
    loaded = InMemoryStudy(load_study(folder), CacheParams(image_size=512))
    path = BENCH_DATA / f"inputs_{N_SLICES}x{SPACING_MM:g}mm_htj2k_floor{-HU_FLOOR}.cvol"
    if not path.is_file():
        write_volume(path, np.maximum(np.asarray(loaded.volume), HU_FLOOR).astype(np.int16), "htj2k")
    return loaded, CompressedVolume(path)


def required_rate(step: str) -> float:
    """Samples/s one fold's training needs in its share of the 6 h (experiments/rehearsal.py)."""
    from experiments.rehearsal import BUDGET_H, STAGES

    return STAGES[step][3] / (BUDGET_H[step] * 3600)


def cores_row(name: str, step: str, times: dict[str, list[float]], what: str, delta: float, cmd: str) -> Row:
    new, old = median(times["new"]), median(times["old"])
    rate = required_rate(step)
    cores_new, cores_old = rate * new, rate * old
    return Row(
        "inputs",
        f"{name}: loader seconds a sample on one core → {cores_new:.1f} cores to feed one H100 at the 6 h "
        "rate "
        f"({rate:.1f} samples/s; before: {cores_old:.1f} cores)",
        new,
        "s",
        "before (windowed at 512², resized channel by channel)",
        old,
        goal=f"≤{CORES_GOAL:g} cores for the required rate",
        met=cores_new <= CORES_GOAL,
        command=cmd,
        lower_is_better=True,
        note=f"{what}; max |new − before| = {delta:.1e}; the cores are {rate:.1f} samples/s × s/sample "
        f"(the rehearsal's arithmetic); {len(times['new'])} interleaved repeats, medians",
    )


def loader_rows(loaded: Any, cvol: Any, repeats: int, cmd: str) -> list[Row]:
    from cervspine.data.column_sampler import ColumnSampler
    from cervspine.data.vertebra_crops import VertebraCropper
    from experiments.benchmarks import inputs_reference as before

    rows = []
    sampler = ColumnSampler.from_hparams(recipe_data("vertebrae_column"))
    idx = sampler.positions(N_SLICES, SPACING_MM)
    new = sampler.inputs(cvol, idx, SPACING_MM)
    delta = float(np.abs(new - before.column_inputs(sampler, cvol, idx, SPACING_MM)).max())
    k = sampler.stride(SPACING_MM)
    need = np.unique(
        np.clip(idx[:, None] + np.arange(-sampler.context, sampler.context + 1) * k, 0, N_SLICES - 1)
    )
    times = interleaved(
        {
            "new": lambda: sampler.inputs(cvol, idx, SPACING_MM),
            "old": lambda: before.column_inputs(sampler, cvol, idx, SPACING_MM),
            "decode": lambda: np.asarray(cvol[need]),
        },
        repeats,
    )
    decode = median(times["decode"])
    what = (f"the whole column: {len(idx)} positions × {sampler.channels} ch at {sampler.input_size}² from "
            f"{len(need)} HTJ2K slices of 512² (decoding them alone: {decode:.2f} s)")  # fmt: skip
    rows.append(cores_row("stage-1 column (vertebrae_column)", "train_stage1", times, what, delta, cmd))

    for recipe in SEQ_RECIPES:
        cropper = VertebraCropper.from_hparams(recipe_data(recipe))
        rows.append(sequence_row(recipe, cropper, cvol, repeats, cmd))
    return rows


def sequence_row(recipe: str, cropper: Any, cvol: Any, repeats: int, cmd: str) -> Row:
    from experiments.benchmarks import inputs_reference as before
    from experiments.benchmarks.backends import stage1_answer

    answer = stage1_answer(N_SLICES, SPACING_MM)
    extent = cropper.extents_from_stage1(answer.visibility, answer.boxes)[3]  # C4
    vis, boxes = answer.visibility, answer.boxes

    def old_seq() -> np.ndarray:
        zs = extent.sample(cropper.n_slices)
        img = before.sequence_images(cropper, cvol, extent)
        mask = cropper._mask(extent, zs, _crop(extent, cvol.shape), cvol.shape[1:], vis, boxes, None)
        return np.concatenate([img, mask[:, None]], axis=1)

    got, _ = cropper.sequence(cvol, extent, vis, boxes)
    delta = float(np.abs(got - old_seq()).max())
    times = interleaved({"new": lambda: cropper.sequence(cvol, extent, vis, boxes), "old": old_seq}, repeats)
    what = (f"one vertebra (C4, slices {extent.z0}–{extent.z1}): {cropper.n_slices} crops × "
            f"{cropper.channels} ch at {cropper.input_size}² from HTJ2K slices of 512²")  # fmt: skip
    return cores_row(f"{recipe} sample", "train_stage2", times, what, delta, cmd)


def _crop(extent: Any, shape: tuple[int, ...]) -> tuple[int, int, int, int]:
    from cervspine.data.spine import crop_pixels

    return crop_pixels(np.asarray(extent.box), shape[1], shape[2])


def crops_rows(loaded: Any, repeats: int, cmd: str) -> list[Row]:
    from cervspine.data.slice_crops import SliceCropSpec
    from cervspine.data.slice_inputs import slice_batch, slice_inputs
    from cervspine.data.vertebra_crops import VertebraCropper, study_sequences
    from cervspine.data.windows import StackSpec, input_threads
    from experiments.benchmarks import inputs_reference as before
    from experiments.benchmarks.backends import stage1_answer

    answer = stage1_answer(N_SLICES, SPACING_MM)
    vis, boxes = answer.visibility, answer.boxes
    volume = np.asarray(loaded.volume)
    b5 = recipe_data("fracture_b5")
    stack, spec = StackSpec.from_hparams(b5), SliceCropSpec.from_hparams(b5)
    cores = input_threads()

    def seq_old(cropper: Any, extents: list) -> np.ndarray:
        out = []
        for e in extents:
            img = before.sequence_images(cropper, volume, e)
            if e.present:
                zs = e.sample(cropper.n_slices)
                mask = cropper._mask(e, zs, _crop(e, volume.shape), volume.shape[1:], vis, boxes, None)
                img = np.concatenate([img, mask[:, None]], axis=1)
            else:
                img = np.zeros((cropper.n_slices, cropper.channels, *img.shape[2:]), np.float32)
            out.append(img)
        return np.stack(out)

    def slices_old() -> np.ndarray:
        inputs = slice_inputs(loaded, answer, spec, stack)
        return before.slice_images(volume, inputs.crops, inputs.slices, stack)

    def slices_new(threads: int) -> np.ndarray:
        inputs = slice_inputs(loaded, answer, spec, stack)
        return slice_batch(inputs, inputs.slices, stack, threads=threads)[0]

    members: dict[str, tuple[Any, Any, str]] = {}  # name → (old, new(threads), what)
    for recipe in SEQ_RECIPES:
        c = VertebraCropper.from_hparams(recipe_data(recipe))
        ext = c.extents_from_stage1(vis, boxes)
        members[recipe] = (
            lambda c=c, ext=ext: seq_old(c, ext),
            lambda t, c=c, ext=ext: study_sequences(c, volume, ext, vis, boxes, threads=t)[0],
            f"{recipe}: {sum(e.present for e in ext)} vertebrae × {c.n_slices} crops × {c.channels} ch at "
            f"{c.input_size}²",
        )
    n_scored = len(slice_inputs(loaded, answer, spec, stack).slices)
    b5_what = f"fracture_b5: {n_scored} scored slices × {stack.channels} ch at {stack.input_size}²"
    members["fracture_b5"] = (slices_old, slices_new, b5_what)
    rows, med = [], {}
    for name, (old, new, what) in members.items():
        delta = float(np.abs(new(1) - old()).max())
        calls = {"old": old, "1": lambda n=new: n(1), str(cores): lambda n=new: n(cores)}
        times = {k: median(v) for k, v in interleaved(calls, repeats).items()}
        med[name] = times
        for t in sorted({1, cores}):
            rows.append(
                Row(
                    "inputs",
                    f"crops phase of one study, {what}, {t} thread{'s' if t > 1 else ''} (s)",
                    times[str(t)],
                    "s",
                    "before, 1 thread",
                    times["old"],
                    command=cmd,
                    lower_is_better=True,
                    note=f"in memory (a predictor's loaded study); max |new − before| = {delta:.1e}; "
                    f"{repeats} interleaved repeats, medians",
                )
            )
    for seq in SEQ_RECIPES:
        total = med[seq][str(cores)] + med["fracture_b5"][str(cores)]
        rows.append(
            Row(
                "inputs",
                f"crops phase of one study, the rsna ensemble with {seq} (+ fracture_b5), {cores} "
                f"thread{'s' if cores > 1 else ''} (s)",
                total,
                "s",
                "before, 1 thread",
                med[seq]["old"] + med["fracture_b5"]["old"],
                goal=f"≤{CROPS_GOAL_S:g} s",
                met=total <= CROPS_GOAL_S,
                command=cmd,
                lower_is_better=True,
                note="the sum of its members' rows above (the issue's 6.7 s was this phase in the backends "
                "bench with the 384² member, the same inputs)",
            )  # fmt: skip
        )
    return rows


def main() -> None:
    args = cli(__doc__.splitlines()[0])
    repeats = 2 if args.quick else 5
    cmd = command("inputs", args.quick)
    t0 = time.perf_counter()
    loaded, cvol = study()
    print(f"    study ready in {time.perf_counter() - t0:.0f} s", flush=True)
    rows = loader_rows(loaded, cvol, repeats, cmd)
    rows += crops_rows(loaded, max(2, math.ceil(repeats / 2)), cmd)
    finish(rows, args.json)


if __name__ == "__main__":
    main()
