"""Per-slice compressed cache entries: lossless round trips on real CT, partial reads with numpy's
indexing, atomic writes, corruption named, the DataModules and the predictor reading either form, and
caches built before compression existed staying current."""

from __future__ import annotations

import json
import pickle
import warnings
from pathlib import Path

import numpy as np
import pytest

from cervspine.cache import CachedStudy, CacheParams, CompressedVolume, CorruptCacheError, preprocess
from cervspine.cache.compressed import CODECS, write_volume
from cervspine.cache.params import key_differences
from cervspine.io.rsna import RsnaIndex
from tests.helpers import writable_copy

COMPRESSED = [c for c in CODECS if c != "none"]


def _real_ct() -> np.ndarray:
    """The real 512² CT slices pydicom and pydicom-data ship (a neck, a head, an abdomen, …) as the
    cache stores them: int16 HU clipped to [-1024, 3071]."""
    import pydicom
    from pydicom.data import get_testdata_file

    names = ["bad_sequence.dcm", "693_UNCR.dcm", "explicit_VR-UN.dcm", "J2K_pixelrep_mismatch.dcm"]
    out = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for name in names:
            path = get_testdata_file(name)
            if path is None:
                continue
            ds = pydicom.dcmread(path)
            hu = ds.pixel_array * float(ds.get("RescaleSlope", 1) or 1) + float(
                ds.get("RescaleIntercept", 0) or 0
            )
            out.append(np.clip(np.rint(hu), -1024, 3071).astype(np.int16))
    if not out:
        pytest.skip("no real CT slices (pydicom-data) here")
    return np.stack(out)


@pytest.fixture(scope="module")
def real_ct() -> np.ndarray:
    return _real_ct()


@pytest.fixture(scope="module")
def small_volume() -> np.ndarray:
    """A (9, 24, 20) HU volume: smooth anatomy, noise, the clip limits."""
    rng = np.random.default_rng(0)
    z, y, x = np.mgrid[0:9, 0:24, 0:20]
    vol = 400 * np.sin(z / 3.0) + 30 * y - 10 * x + rng.normal(0, 40, z.shape)
    vol[:, :3] = -1024
    vol[4, 10, 10] = 3071
    return np.clip(np.rint(vol), -1024, 3071).astype(np.int16)


@pytest.mark.parametrize("codec", COMPRESSED)
def test_real_ct_round_trips_losslessly_and_smaller(codec, real_ct, tmp_path):
    head = write_volume(tmp_path / "v.cvol", real_ct, codec)
    vol = CompressedVolume(tmp_path / "v.cvol")
    assert vol.shape == real_ct.shape and vol.dtype == np.int16 and len(vol) == len(real_ct)
    np.testing.assert_array_equal(np.asarray(vol), real_ct)
    ratio = real_ct.nbytes / head["stored_bytes"]
    assert head["stored_bytes"] == (tmp_path / "v.cvol").stat().st_size
    assert ratio > {"zstd": 1.6, "htj2k": 3.0, "jpegls": 3.0}[codec], ratio


def test_near_lossless_jpegls_stays_within_the_error(real_ct, tmp_path):
    lossless = write_volume(tmp_path / "a.cvol", real_ct, "jpegls")["stored_bytes"]
    near = write_volume(tmp_path / "b.cvol", real_ct, "jpegls", max_error=2)["stored_bytes"]
    got = np.asarray(CompressedVolume(tmp_path / "b.cvol")).astype(np.int32)
    assert np.abs(got - real_ct).max() <= 2 and near < 0.8 * lossless


@pytest.mark.parametrize("codec", COMPRESSED)
def test_labels_and_small_volumes_round_trip(codec, small_volume, tmp_path):
    labels = (small_volume > 200).astype(np.uint8) * 3
    for name, arr in (("v", small_volume), ("s", labels)):
        write_volume(tmp_path / f"{name}.cvol", arr, codec)
        got = CompressedVolume(tmp_path / f"{name}.cvol")
        assert got.dtype == arr.dtype
        np.testing.assert_array_equal(np.asarray(got), arr)


KEYS = [
    3,
    -1,
    slice(None),
    slice(2, 7),
    slice(None, None, 3),
    slice(8, 1, -2),
    [4, 1, 1, 8],
    np.array([[0, 2], [2, 5]]),
    np.arange(9) % 2 == 0,
    (np.array([1, 3]), slice(2, 9), slice(None, 11)),
    (2, slice(None), [0, 3]),  # numpy moves the advanced axes here: the same result
    (slice(1, 4), 5),
    (np.array([0, 8]), np.array([1, 2]), np.array([3, 4])),
    (Ellipsis, 2),
    (),
]


@pytest.mark.parametrize("key", KEYS, ids=repr)
def test_indexing_gives_what_the_array_gives(key, small_volume, tmp_path):
    write_volume(tmp_path / "v.cvol", small_volume, "zstd")
    vol = CompressedVolume(tmp_path / "v.cvol")
    want = small_volume[key]
    got = vol[key]
    assert got.shape == want.shape and got.dtype == want.dtype
    np.testing.assert_array_equal(got, want)


def test_reads_decode_only_the_slices_asked_for_once(small_volume, tmp_path, monkeypatch):
    write_volume(tmp_path / "v.cvol", small_volume, "htj2k")
    vol = CompressedVolume(tmp_path / "v.cvol")
    decoded: list[int] = []
    real = CompressedVolume.slice
    monkeypatch.setattr(CompressedVolume, "slice", lambda self, z: decoded.append(z) or real(self, z))
    vol[[5, 2, 5, 5], 3:9, 2:8]
    assert sorted(decoded) == [2, 5]
    with pytest.raises(IndexError):
        vol[9]
    with pytest.raises(IndexError):
        vol[[0, 12]]


def test_pickled_volumes_reopen_in_the_worker(small_volume, tmp_path):
    write_volume(tmp_path / "v.cvol", small_volume, "htj2k")
    vol = CompressedVolume(tmp_path / "v.cvol")
    vol[0]  # opened here; a DataLoader worker gets a copy that opens its own map
    copy = pickle.loads(pickle.dumps(vol))
    assert copy._buf is None
    np.testing.assert_array_equal(copy[[1, 2]], small_volume[[1, 2]])


def test_a_failed_write_leaves_no_file(small_volume, tmp_path, monkeypatch):
    import cervspine.cache.compressed as compressed

    target = tmp_path / "v.cvol"
    write_volume(target, small_volume[:3], "zstd")  # an older complete file
    before = target.read_bytes()
    calls = {"n": 0}
    real = compressed._encoder

    def failing(*args):
        enc = real(*args)

        def encode(a):
            calls["n"] += 1
            if calls["n"] == 5:
                raise MemoryError("killed mid-volume")
            return enc(a)

        return encode

    monkeypatch.setattr(compressed, "_encoder", failing)
    with pytest.raises(MemoryError):
        write_volume(target, small_volume, "zstd")
    assert target.read_bytes() == before  # the old file stays whole, nothing half-written beside it
    assert [p.name for p in tmp_path.iterdir()] == ["v.cvol"]


def test_a_corrupt_slice_is_named_never_read(small_volume, tmp_path):
    path = tmp_path / "entry" / "volume.cvol"
    path.parent.mkdir()
    write_volume(path, small_volume, "htj2k")
    vol = CompressedVolume(path)
    data = bytearray(path.read_bytes())
    at = int(vol.offsets[4]) + 7
    data[at] ^= 0xFF
    path.write_bytes(bytes(data))
    bad = CompressedVolume(path)
    np.testing.assert_array_equal(bad[3], small_volume[3])  # the other slices still read
    with pytest.raises(CorruptCacheError, match=r"volume\.cvol: slice 4 fails its checksum"):
        bad[2:6]
    path.write_bytes(bytes(data[:-10]))  # truncated
    with pytest.raises(CorruptCacheError, match=r"volume\.cvol: .*truncated"):
        CompressedVolume(path)
    path.write_bytes(b"not a volume at all")
    with pytest.raises(CorruptCacheError, match=r"volume\.cvol: not a compressed cache volume"):
        CompressedVolume(path)


def test_bad_parameters_are_refused():
    with pytest.raises(ValueError, match="one of none, zstd, htj2k, jpegls"):
        CacheParams(compression="gzip")
    with pytest.raises(ValueError, match="JPEG-LS only"):
        CacheParams(compression="htj2k", max_error_hu=2)
    params = CacheParams.from_config(
        {"image_size": 512, "cache_compression": "jpegls", "cache_max_error_hu": 1}
    )
    assert (params.image_size, params.compression, params.max_error_hu) == (512, "jpegls", 1)


def test_keys_of_caches_built_before_compression_stay_the_same():
    old = {"image_size": 64, "segmentation_method": "auto", "version": 1}  # what entries recorded before
    for compression in CODECS:
        assert CacheParams(image_size=64, compression=compression).key() == old  # storage, not content
    assert not key_differences(old, CacheParams(image_size=64, compression="htj2k"))
    near = CacheParams(image_size=64, compression="jpegls", max_error_hu=2)
    assert key_differences(old, near) == {"max_error_hu": (0, 2)}
    assert key_differences(near.key(), CacheParams(image_size=64)) == {"max_error_hu": (2, 0)}


@pytest.fixture(scope="module")
def compressed_root(tiny_root, tmp_path_factory) -> Path:
    """A copy of the tiny folder whose cache (the same path and size as the uncompressed one) holds htj2k
    entries."""
    root = writable_copy(tiny_root, tmp_path_factory.mktemp("cz") / "rsna", ".cervspine_cache")
    index = RsnaIndex.from_root(root)
    params = CacheParams(image_size=64, compression="htj2k")
    report = preprocess(index, root / ".cervspine_cache" / "s64", params, workers=2, progress=False)
    assert report.ok, report.failed
    return root


def test_compressed_entries_hold_the_same_voxels(compressed_root, tiny_cache):
    for entry in sorted((compressed_root / ".cervspine_cache" / "s64").iterdir()):
        plain, packed = CachedStudy(tiny_cache / entry.name), CachedStudy(entry)
        assert packed.compressed and not plain.compressed
        assert not (entry / "volume.npy").exists() and (entry / "volume.cvol").is_file()
        np.testing.assert_array_equal(np.asarray(packed.volume), plain.volume)
        np.testing.assert_array_equal(packed.slices([-2, 0, 99]), plain.slices([-2, 0, 99]))
        if plain.seg is not None:
            np.testing.assert_array_equal(np.asarray(packed.seg), plain.seg)
        meta = json.loads((entry / "meta.json").read_text())
        assert meta["storage"]["volume"]["codec"] == "htj2k"
        assert meta["params"] == plain.meta["params"]  # the content key: unchanged by storage
        loaded = packed.loaded()
        assert isinstance(loaded.volume, np.ndarray) and loaded.uid == packed.uid
        assert plain.loaded() is plain


def test_old_uncompressed_caches_stay_current_and_read(tiny_root, tmp_path, caplog):
    root = writable_copy(tiny_root, tmp_path / "rsna")  # with its uncompressed cache
    cache = root / ".cervspine_cache" / "s64"
    index = RsnaIndex.from_root(root)
    with caplog.at_level("WARNING"):
        report = preprocess(
            index, cache, CacheParams(image_size=64, compression="htj2k"), workers=1, progress=False
        )
    assert not report.built and len(report.skipped) == len(index.train_uids) + len(index.test_uids)
    assert "stored as none, this run asks htj2k: kept" in caplog.text
    study = CachedStudy(cache / index.train_uids[0])
    assert not study.compressed and isinstance(study.volume, np.memmap)


@pytest.mark.parametrize("kind", ["vertebrae", "fracture", "column", "sequence"])
def test_datamodules_give_the_same_samples_from_either_form(kind, tiny_root, compressed_root, tmp_path):
    from cervspine.data.column import VertebraeColumnDataModule
    from cervspine.data.datamodules import FractureDataModule, VertebraeDataModule
    from cervspine.data.sequence import VertebraSequenceDataModule

    cls = {
        "vertebrae": VertebraeDataModule,
        "fracture": FractureDataModule,
        "column": VertebraeColumnDataModule,
        "sequence": VertebraSequenceDataModule,
    }[kind]
    kw = {"n_slices": 4} if kind == "sequence" else {}
    samples = []
    for root, compression in ((tiny_root, "none"), (compressed_root, "htj2k")):
        dm = cls(root=str(root), cache_dir=str(root / ".cervspine_cache" / "s64"), image_size=64,
                 cache_compression=compression, n_folds=3, input_size=32, num_workers=0,
                 preprocess_workers=1, batch_size=2, **kw)  # fmt: skip
        dm.setup()
        ds = dm.dataset(dm.val_uids)
        samples.append([ds[i] for i in range(min(len(ds), 3))])
    assert len(samples[0]) == len(samples[1]) > 0
    for a, b in zip(*samples):
        assert a.keys() == b.keys()
        for k in a:
            np.testing.assert_array_equal(np.asarray(a[k]), np.asarray(b[k]), err_msg=k)


def test_the_predictor_answers_the_same_from_either_form(shared_run, tiny_cache, compressed_root):
    from cervspine.inference import load_predictor

    predictor = load_predictor(shared_run.dir, device="cpu")
    uid = sorted(p.name for p in tiny_cache.iterdir() if p.is_dir())[0]
    packed = CachedStudy(compressed_root / ".cervspine_cache" / "s64" / uid)
    assert packed.compressed
    a = predictor.predict(CachedStudy(tiny_cache / uid)).probabilities
    b = predictor.predict(packed).probabilities
    np.testing.assert_array_equal(a, b)


def test_the_hu_floor_is_content_and_exact_for_windows_above_it(tiny_root, tmp_path):
    from cervspine.cache import InMemoryStudy
    from cervspine.data.windows import WINDOWS, apply_windows
    from cervspine.io import load_study

    floored = CacheParams(image_size=48, hu_floor=-500)
    assert floored.key()["hu_floor"] == -500 and "hu_floor" not in CacheParams(image_size=48).key()
    assert key_differences(CacheParams(image_size=48).key(), floored) == {"hu_floor": (-1024, -500)}
    assert CacheParams.from_config({"image_size": 48, "cache_hu_floor": -500}) == floored
    with pytest.raises(ValueError, match="hu_floor"):
        CacheParams(hu_floor=-2000)
    index = RsnaIndex.from_root(tiny_root)
    study = load_study(index.study_dir(index.train_uids[0]))
    plain, low = InMemoryStudy(study, CacheParams(image_size=48)).volume, InMemoryStudy(study, floored).volume
    assert (
        low.min() >= -500
        and (plain < -500).any()
        and np.array_equal(low[plain >= -500], plain[plain >= -500])
    )
    for name in ("bone", "soft"):  # the windows experiment=rsna's stages use
        np.testing.assert_array_equal(
            apply_windows(low, [WINDOWS[name]]), apply_windows(plain, [WINDOWS[name]])
        )


def test_datamodules_refuse_windows_below_the_cache_floor(tiny_root):
    from cervspine.data.datamodules import VertebraeDataModule

    kw = dict(root=str(tiny_root), cache_dir=str(tiny_root / "unused"), image_size=64, cache_hu_floor=-500)
    VertebraeDataModule(**kw, windows=["bone", "soft"])
    with pytest.raises(ValueError, match=r"\(-1200, 1800\) start below the cache's data.cache_hu_floor=-500"):
        VertebraeDataModule(**kw, windows=["bone", "wide"])
