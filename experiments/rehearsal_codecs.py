"""The cache's codecs measured on real CT: ``python -m experiments.rehearsal_codecs`` →
experiments/rehearsal_codecs.md + .json.

The synthetic phantom compresses unrealistically well (flat regions, little noise), so the sizes are
measured on the real 512² CT slices pydicom and pydicom-data ship: a neck (Siemens, B30s, 0.29 mm pixels,
1 mm slice), two heads and an abdomen (the enhanced-CT example is left out: its pixels are not HU). Per
codec: compression ratio per slice, bytes per 512² slice, the projection to the RSNA train set (~711k
slices), encode and decode time on one core, against reading the uncompressed memory-mapped ``.npy``
(page cache warm). Real RSNA studies are bone-kernel reconstructions, noisier than these soft kernels and
noise is what lossless coding cannot remove: the neck slice with added Gaussian noise brackets that.
"""

from __future__ import annotations

import json
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np

from cervspine.cache.compressed import CompressedVolume, write_volume

OUT = Path(__file__).resolve().parent
N_SLICES = 711_000  # RSNA 2022 train set (DESIGN.md §3)
GOAL_GB = 120.0
REAL = {
    "neck": "bad_sequence.dcm",  # NECK, Siemens B30s, 0.287 mm pixels, 1 mm, JPEG Lossless in the file
    "head_ge": "693_UNCR.dcm",  # GE STANDARD, 0.48 mm, 5 mm
    "abdomen": "explicit_VR-UN.dcm",  # PANCREAS, 0.86 mm
    "head": "J2K_pixelrep_mismatch.dcm",  # HEAD, 0.43 mm, 5 mm
}
# (codec, max error HU, HU floor): lossless, near-lossless, and with air/fat floored at -500 (the lowest
# window of experiment=rsna's stages starts there: the models see exactly the same inputs)
CODECS = [
    ("zstd", 0, -1024),
    ("htj2k", 0, -1024),
    ("jpegls", 0, -1024),
    ("jpegls", 2, -1024),
    ("htj2k", 0, -500),
    ("jpegls", 2, -500),
]
NOISE_SD = (20, 40, 80)


def real_slices() -> dict[str, np.ndarray]:
    import pydicom
    from pydicom.data import get_testdata_file

    out = {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for name, file in REAL.items():
            path = get_testdata_file(file)
            if path is None:
                continue
            ds = pydicom.dcmread(path)
            hu = ds.pixel_array * float(ds.get("RescaleSlope", 1) or 1) + float(
                ds.get("RescaleIntercept", 0) or 0
            )
            out[name] = np.clip(np.rint(hu), -1024, 3071).astype(np.int16)
    return out


def _timed_reads(read, n: int, reps: int = 3) -> float:
    """Slices per second of ``read(z)`` over every slice, best of ``reps``."""
    best = float("inf")
    for _ in range(reps):
        t = time.perf_counter()
        for z in range(n):
            read(z)
        best = min(best, time.perf_counter() - t)
    return n / best


def measure(slices: dict[str, np.ndarray], work: Path, reps: int = 8) -> dict:
    """Each codec on each slice (the slice repeated ``reps`` times as one volume, so timings average)."""
    rows = []
    for name, sl in slices.items():
        vol = np.repeat(sl[None], reps, axis=0)
        npy = work / f"{name}.npy"
        np.save(npy, vol)
        mm = np.load(npy, mmap_mode="r")
        memmap_rate = _timed_reads(lambda z, mm=mm: np.array(mm[z]), reps)
        for codec, err, floor in CODECS:
            path = work / f"{name}-{codec}{err}.cvol"
            v = np.maximum(vol, np.int16(floor))
            t = time.perf_counter()
            head = write_volume(path, v, codec, max_error=err, verify=False)
            encode_ms = (time.perf_counter() - t) / reps * 1e3
            cv = CompressedVolume(path)
            got = np.asarray(cv)
            assert np.abs(got.astype(np.int32) - v).max() <= err
            per_slice = (head["stored_bytes"] - int(cv.offsets[0])) / reps
            rows.append(
                {
                    "slice": name,
                    "codec": codec,
                    "max_error_hu": err,
                    "hu_floor": floor,
                    "bytes_per_slice": per_slice,
                    "ratio": sl.nbytes / per_slice,
                    "encode_ms": encode_ms,
                    "decode_slices_per_s": _timed_reads(cv.slice, reps),
                    "memmap_slices_per_s": memmap_rate,
                }
            )
    return rows


def noise_rows(slices: dict[str, np.ndarray], work: Path) -> list[dict]:
    """Each slice with Gaussian noise added inside the scan's field of view (> -1024 HU)."""
    rng = np.random.default_rng(0)
    rows = []
    for name, sl in slices.items():
        for sd in NOISE_SD:
            noise = rng.normal(0, sd, sl.shape) * (sl > -1024)
            noisy = np.clip(np.rint(sl + noise), -1024, 3071).astype(np.int16)
            for codec, err, floor in CODECS:
                v = np.maximum(noisy, np.int16(floor))[None]
                head = write_volume(work / "n.cvol", v, codec, max_error=err, verify=True)
                per_slice = head["stored_bytes"] - int(CompressedVolume(work / "n.cvol").offsets[0])
                row = {
                    "slice": name,
                    "noise_sd_hu": sd,
                    "codec": codec,
                    "max_error_hu": err,
                    "hu_floor": floor,
                }
                rows.append({**row, "ratio": sl.nbytes / per_slice, "bytes_per_slice": per_slice})
    return rows


def summarise(rows: list[dict]) -> list[dict]:
    out = []
    for codec, err, floor in CODECS:
        rs = [r for r in rows if (r["codec"], r["max_error_hu"], r["hu_floor"]) == (codec, err, floor)]
        mean_bytes = float(np.mean([r["bytes_per_slice"] for r in rs]))
        neck = next((r for r in rs if r["slice"] == "neck"), rs[0])
        out.append(
            {
                "codec": codec,
                "max_error_hu": err,
                "hu_floor": floor,
                "ratio_neck": neck["ratio"],
                "ratio_mean": float(np.mean([r["ratio"] for r in rs])),
                "ratio_min": float(min(r["ratio"] for r in rs)),
                "bytes_per_slice_neck": neck["bytes_per_slice"],
                "bytes_per_slice_mean": mean_bytes,
                "full_set_gb_neck": neck["bytes_per_slice"] * N_SLICES / 1e9,
                "full_set_gb_mean": mean_bytes * N_SLICES / 1e9,
                "decode_slices_per_s": float(np.median([r["decode_slices_per_s"] for r in rs])),
                "encode_ms": float(np.median([r["encode_ms"] for r in rs])),
                "memmap_slices_per_s": float(np.median([r["memmap_slices_per_s"] for r in rs])),
            }
        )
    return out


def _label(codec: str, err: int, floor: int) -> str:
    return codec + (f" ±{err} HU" if err else "") + (f", floor {floor}" if floor > -1024 else "")


def markdown(summary: list[dict], noise: list[dict], rows: list[dict]) -> str:
    raw_gb = 512 * 512 * 2 * N_SLICES / 1e9
    names = sorted({r["slice"] for r in rows})
    lines = [
        "# The cache's codecs on real CT",
        "",
        "`python -m experiments.rehearsal_codecs` (one core of a 2-core machine shared with other jobs;",
        f"imagecodecs). Slices: the real 512² CT that pydicom/pydicom-data ship ({', '.join(names)}), int16",
        "HU clipped to [-1024, 3071] as the cache stores them. Uncompressed: 524,288 B a slice,",
        f"{raw_gb:.0f} GB for the RSNA train set ({N_SLICES:,} slices). Goal: ≤ {GOAL_GB:.0f} GB.",
        "Projections (bytes a slice × 711k), not measurements on RSNA.",
        "",
        "| storage | ratio neck | ratio mean (min) | B/slice neck | full set GB (neck / mean) "
        "| decode slices/s (1 core) | encode ms | memmap .npy slices/s |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for s in summary:
        lines.append(
            f"| {_label(s['codec'], s['max_error_hu'], s['hu_floor'])} | {s['ratio_neck']:.2f} | "
            f"{s['ratio_mean']:.2f} ({s['ratio_min']:.2f}) | {s['bytes_per_slice_neck']:,.0f} | "
            f"{s['full_set_gb_neck']:.0f} / {s['full_set_gb_mean']:.0f} | {s['decode_slices_per_s']:,.0f} | "
            f"{s['encode_ms']:.1f} | {s['memmap_slices_per_s']:,.0f} |"
        )
    lines += [
        "",
        "Noise is what lossless coding cannot remove, and RSNA's bone-kernel reconstructions are noisier",
        "than these soft-kernel slices. Each slice with Gaussian noise added inside its field of view",
        "(sd in HU; white noise, a pessimistic model of CT noise): projected full-set GB, mean over the",
        "slices (the neck, whose field of view is almost all body, in brackets):",
        "",
        "| noise sd | " + " | ".join(_label(*c) for c in CODECS) + " |",
        "|---|" + "---|" * len(CODECS),
    ]
    for sd in NOISE_SD:
        cells = []
        for c in CODECS:
            rs = [
                r
                for r in noise
                if r["noise_sd_hu"] == sd and (r["codec"], r["max_error_hu"], r["hu_floor"]) == c
            ]
            gb = np.mean([r["bytes_per_slice"] for r in rs]) * N_SLICES / 1e9
            neck = [r["bytes_per_slice"] * N_SLICES / 1e9 for r in rs if r["slice"] == "neck"]
            cells.append(f"{gb:.0f}" + (f" ({neck[0]:.0f})" if neck else ""))
        lines.append(f"| {sd} | " + " | ".join(cells) + " |")
    lines += [
        "",
        "Per slice:",
        "",
        "| slice | storage | ratio | decode slices/s |",
        "|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['slice']} | {_label(r['codec'], r['max_error_hu'], r['hu_floor'])} | {r['ratio']:.2f} | "
            f"{r['decode_slices_per_s']:,.0f} |"
        )
    lines += [
        "",
        "Reading: `experiment=rsna` stores htj2k with the floor at -500 HU",
        "(`data.cache_compression=htj2k data.cache_hu_floor=-500`): lossless for every voxel above -500 and",
        "exact for the models' inputs (the lowest window of its stages, bone, starts at -500; the",
        "DataModules refuse a window below the floor).",
        "htj2k codes about as small as JPEG-LS at about twice its decode speed. The full-set size is a",
        "projection: the first real preprocessing shows it (`du -sh` of the cache folder; `make rehearsal`",
        "prints bytes a study). Above ~170 kB a slice, add `data.cache_compression=jpegls",
        "data.cache_max_error_hu=2` (every voxel within 2 HU: below CT noise and below one grey level of the",
        "bone window, 7 HU), which changes the content and so is part of the cache key.",
        "",
    ]
    return "\n".join(lines)


def main() -> dict:
    slices = real_slices()
    with tempfile.TemporaryDirectory() as tmp:
        rows = measure(slices, Path(tmp))
        noise = noise_rows(slices, Path(tmp))
    summary = summarise(rows)
    result = {
        "n_slices_full_set": N_SLICES,
        "goal_gb": GOAL_GB,
        "summary": summary,
        "rows": rows,
        "noise": noise,
    }
    (OUT / "rehearsal_codecs.json").write_text(json.dumps(result, indent=1) + "\n")
    (OUT / "rehearsal_codecs.md").write_text(markdown(summary, noise, rows))
    print((OUT / "rehearsal_codecs.md").read_text())
    return result


if __name__ == "__main__":
    main()
