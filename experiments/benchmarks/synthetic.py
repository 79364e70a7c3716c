"""Synthetic data generator: phantom rendering and the lossless JPEG encoder, against same-run baselines.

Phantom: ``make_phantom`` on a 128×128×120 study (the tests' size) vs the same renderer evaluating every
shape on whole slices (its bounding-box crops switched off); identical output is asserted. Encoder:
``cervspine.synthetic.ljpeg.encode_frame`` (numpy, JPEG Lossless SV1) on one 512² 16-bit slice of a
phantom vs pylibjpeg-openjpeg's JPEG 2000 lossless encoder (compiled) on the same frame; an exact
libjpeg decode is asserted. Interleaved repeats, medians.

    python -m experiments.benchmarks.synthetic [--quick]
"""

from __future__ import annotations

from unittest import mock

import numpy as np

from experiments.benchmarks.common import Row, cli, command, finish, interleaved, median

PHANTOM_GOAL_S = 1.5  # per 128×128×120 study (was a wall-clock assertion in tests/test_synthetic.py)
ENCODE_GOAL_S = 0.1  # per 512² frame (was a wall-clock assertion in tests/test_ljpeg.py)


def phantom_row(repeats: int, quick: bool) -> Row:
    from cervspine.synthetic import PhantomParams, make_phantom, render

    params = PhantomParams(size=128, n_slices=120, slice_spacing=0.625, fractured=("C7",))
    crop = render._frame

    def whole_frame(box, centre, px, size):  # the crop of every shape widened to the whole slice
        return crop((-1e9, 1e9, -1e9, 1e9), centre, px, size)

    def whole_sub(frame, x, y, box, margin):
        h, w = frame.shape
        return slice(0, h), slice(0, w)

    def uncropped():
        with mock.patch.object(render, "_frame", whole_frame), mock.patch.object(render, "_sub", whole_sub):
            return make_phantom(9, params)

    ours, theirs = make_phantom(9, params), uncropped()
    assert np.array_equal(ours.volume, theirs.volume) and np.array_equal(ours.labels, theirs.labels)
    assert ours.boxes == theirs.boxes, "cropped and whole-slice rendering disagree"
    times = interleaved({"crops": lambda: make_phantom(9, params), "whole": uncropped}, repeats)
    fast, slow = median(times["crops"]), median(times["whole"])
    every = {k: [round(t, 3) for t in v] for k, v in times.items()}
    return Row(
        "synthetic",
        "make_phantom 128×128×120, one fractured vertebra (s/study)",
        fast,
        "s",
        "same renderer on whole slices (no bounding-box crops)",
        slow,
        goal=f"≤{PHANTOM_GOAL_S:g} s per study, identical output",
        met=fast <= PHANTOM_GOAL_S,
        command=command("synthetic", quick),
        lower_is_better=True,
        note=f"volume, labels and boxes asserted equal; {repeats} interleaved repeats after a warm-up, "
        f"medians; all {every['crops']}, whole slices {every['whole']}",
    )


def encoder_row(repeats: int, quick: bool) -> Row:
    import libjpeg
    from pydicom.pixels.encoders import JPEG2000LosslessEncoder, RLELosslessEncoder

    from cervspine.synthetic import PhantomParams, make_phantom
    from cervspine.synthetic.dicom_writer import stored_pixels
    from cervspine.synthetic.ljpeg import encode_frame

    study = make_phantom(2, PhantomParams(size=512, n_slices=3, fractured=("C2",)))
    frame = stored_pixels(study.volume[1:2], signed=False, intercept=-1024, bits_stored=16)[0]
    stream = encode_frame(frame, 16)
    np.testing.assert_array_equal(libjpeg.decode(stream).reshape(frame.shape), frame)
    kw = dict(
        rows=512,
        columns=512,
        samples_per_pixel=1,
        bits_allocated=16,
        bits_stored=16,
        pixel_representation=0,
        photometric_interpretation="MONOCHROME2",
        number_of_frames=1,
    )

    def encode_with(encoder):
        return lambda: encoder.encode(frame, encoding_plugin="pylibjpeg", **kw)

    j2k, rle = encode_with(JPEG2000LosslessEncoder), encode_with(RLELosslessEncoder)
    sizes = {"ljpeg": len(stream), "j2k": len(j2k()), "rle": len(rle())}
    times = interleaved({"ljpeg": lambda: encode_frame(frame, 16), "j2k": j2k, "rle": rle}, repeats)
    ours, base = median(times["ljpeg"]), median(times["j2k"])
    pct = {k: f"{100 * v / frame.nbytes:.0f} %" for k, v in sizes.items()}
    return Row(
        "synthetic",
        "encode_frame, JPEG Lossless SV1 (numpy), one 512² 16-bit phantom slice (s/frame)",
        ours,
        "s",
        "JPEG 2000 lossless (pylibjpeg-openjpeg)",
        base,
        goal=f"≤{ENCODE_GOAL_S:g} s per frame, exact decode",
        met=ours <= ENCODE_GOAL_S,
        command=command("synthetic", quick),
        lower_is_better=True,
        note=f"libjpeg decode asserted exact; compressed size (of {frame.nbytes // 1024} KiB): SV1 "
        f"{pct['ljpeg']}, JPEG 2000 {pct['j2k']}, RLE {pct['rle']} (RLE Lossless, pylibjpeg-rle: "
        f"{median(times['rle']) * 1e3:.1f} ms); {repeats} interleaved repeats after a warm-up, medians",
    )


def main() -> None:
    args = cli(__doc__.splitlines()[0])
    rows = [phantom_row(3 if args.quick else 7, args.quick), encoder_row(5 if args.quick else 21, args.quick)]
    finish(rows, args.json)


if __name__ == "__main__":
    main()
