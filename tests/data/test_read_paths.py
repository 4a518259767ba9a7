"""The fast read paths change speed, not values: crops bit-identical to the reference read's.

Reference: MONAI's reader (``read_ct(reader="monai")``, float32 HU for DICOM, the stored int16
for NIfTI), code this work did not touch and that the native reader was proved equal to, then
the same ``resample_crop``. Checked against it, bit for bit, for every read path of the hot
path: ``.nii.gz`` through each inflater that is installed (python-isal's and zlib-ng's gzip
readers inflating straight into the array, zlib's chunked fallback), ``.nii``, scaled NIfTI
(float32), DICOM series kept as int16 HU (uint16 pixels + intercept -1024: the per-slice range
check; 12-bit data: the bound from BitsStored; int16 pixels + intercept 0: from the pixel type), DICOM whose HU overflow int16
(the float32 fallback mid-series), DICOM with a non-unit slope (float32) and implicit VR DICOM;
linear and cubic. The DICOM tag walker against pydicom's parse on each series (bit-identical
volumes and affines). The source hash fed by the readers against ``source_digest`` and an
independent sha256 (one pass: no second read on a cold miss). Plus the inflaters against
``gzip.decompress`` on multi-member and corrupt files.
"""
from __future__ import annotations

import gzip

import numpy as np
import pytest

from lungcore.data import PreprocessSettings, Preprocessor, canonical_orientation, read_ct, write_dicom_series
from lungcore.data.io import INFLATERS, gunzip, inflater as active_inflater, write_nifti

pydicom = pytest.importorskip("pydicom")
nib = pytest.importorskip("nibabel")
pytest.importorskip("monai")


def _installed() -> list[str]:
    import importlib.util

    mods = {"isal": "isal", "zlib-ng": "zlib_ng", "zlib": "zlib"}
    return [n for n in INFLATERS if importlib.util.find_spec(mods[n]) is not None]


SHAPE = (23, 70, 61)
AFFINE = np.array([[0.0, 0.0, 0.74, -20.0], [0.0, 0.81, 0.0, -30.5], [-2.5, 0.0, 0.0, 40.0], [0, 0, 0, 1.0]])


def _hu(seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    z, y, x = np.ogrid[:SHAPE[0], :SHAPE[1], :SHAPE[2]]
    body = ((y - 35) / 30.0) ** 2 + ((x - 30) / 27.0) ** 2 < 1
    hu = np.where(body, 40, -1000) + 3 * z + rng.normal(scale=60, size=SHAPE)
    return np.rint(hu).astype(np.int16)


def _rewrite_series(folder, fn) -> None:
    """Apply ``fn(ds, k)`` to every slice file of a series and save it again."""
    for k, f in enumerate(sorted(folder.iterdir())):
        ds = pydicom.dcmread(str(f))
        fn(ds, k)
        ds.save_as(str(f), enforce_file_format=True)


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("paths")
    hu = _hu()
    out = {}
    out["nii.gz"] = write_nifti(d / "ct.nii.gz", hu, AFFINE)
    out["nii"] = write_nifti(d / "ct.nii", hu, AFFINE)
    img = nib.load(str(out["nii"]))
    scaled = nib.Nifti1Image(np.asarray(img.dataobj).astype(np.int16), img.affine, img.header)
    scaled.header.set_slope_inter(0.5, -3.0)
    nib.save(scaled, str(d / "scaled.nii.gz"))
    out["scaled.nii.gz"] = d / "scaled.nii.gz"
    # uint16 pixels + intercept -1024, slope 1 (what scanners write): int16 HU, per-slice range check
    out["dicom uint16"] = write_dicom_series(d / "uint16", hu, AFFINE)
    # int16 pixels holding HU, intercept 0: int16 HU, the bound from the pixel type
    out["dicom int16"] = write_dicom_series(d / "int16", hu, AFFINE)

    def signed(ds, k):
        ds.PixelRepresentation = 1
        ds.RescaleIntercept = "0"
        ds.PixelData = hu[k].astype("<i2").tobytes()
    _rewrite_series(out["dicom int16"], signed)
    # 12-bit data (what most scanners store): int16 HU, the bound from BitsStored
    out["dicom 12-bit"] = write_dicom_series(d / "bits12", hu, AFFINE)

    def twelve(ds, k):
        ds.BitsStored, ds.HighBit = 12, 11
        assert np.frombuffer(ds.PixelData, dtype="<u2").max() < 4096
    _rewrite_series(out["dicom 12-bit"], twelve)
    # HU above 32767 in the later slices (uint16 near 40000 - 1024): int16 until then, float32 after
    out["dicom overflow"] = write_dicom_series(d / "overflow", hu, AFFINE)

    def bright(ds, k):
        if k >= 15:
            pixels = np.frombuffer(ds.PixelData, dtype="<u2").copy()
            pixels[::97] = 40000
            ds.PixelData = pixels.tobytes()
    _rewrite_series(out["dicom overflow"], bright)
    # a non-unit slope: float32 HU as before
    out["dicom slope"] = write_dicom_series(d / "slope", hu, AFFINE)

    def slope(ds, k):
        ds.RescaleSlope = "0.5"
    _rewrite_series(out["dicom slope"], slope)
    # implicit VR little endian (the tag walker's other transfer syntax)
    out["dicom implicit"] = write_dicom_series(d / "implicit", hu, AFFINE)
    for f in sorted(out["dicom implicit"].iterdir()):
        ds = pydicom.dcmread(str(f))
        ds.file_meta.TransferSyntaxUID = pydicom.uid.ImplicitVRLittleEndian
        ds.save_as(str(f), implicit_vr=True, little_endian=True, enforce_file_format=True)
    # data after the pixels (trailing padding): the walker reads such a file whole
    out["dicom trailing"] = write_dicom_series(d / "trailing", hu, AFFINE)

    def trailing(ds, k):
        ds.DataSetTrailingPadding = b"\0" * 16
    _rewrite_series(out["dicom trailing"], trailing)
    return out


HOT_DTYPE = {"nii.gz": np.int16, "nii": np.int16, "scaled.nii.gz": np.float32, "dicom uint16": np.int16,
             "dicom 12-bit": np.int16, "dicom int16": np.int16, "dicom overflow": np.float32, "dicom slope": np.float32,
             "dicom implicit": np.int16, "dicom trailing": np.int16}
DICOM_KINDS = [k for k in HOT_DTYPE if k.startswith("dicom")]


def _reference_crops(path, settings, centres):
    from lungcore.ops import resample_crop

    image = canonical_orientation(read_ct(path, dtype=None, contiguous=False, reader="monai"))
    idx = np.stack([image.world_to_index(c) for c in centres])
    return resample_crop(image.array, image.spacing, settings.spacing, idx, settings.crop, order=settings.order,
                         fill=settings.fill, window=settings.window, out_dtype=np.float32)


@pytest.mark.parametrize("order", [1, 3])
@pytest.mark.parametrize("kind", list(HOT_DTYPE))
def test_crops_are_bit_identical_to_the_reference_read(files, kind, order, monkeypatch):
    path = files[kind]
    settings = PreprocessSettings(spacing=(2.0, 1.0, 1.0), crop=(8, 24, 24), window=(-1000.0, 400.0), order=order)
    ref_image = canonical_orientation(read_ct(path, reader="monai"))
    centres = [ref_image.index_to_world(np.array([11.2, 30.7, 25.1])),
               ref_image.index_to_world(np.array([2.0, 5.5, 58.0]))]  # near a corner: fill voxels too
    expected = _reference_crops(path, settings, centres)
    for inflater in (_installed() if kind.endswith(".gz") else ["default"]):
        if inflater != "default":
            monkeypatch.setenv("LUNGCORE_INFLATER", inflater)
        pre = Preprocessor(settings)
        source, _ = pre.read(path)
        assert source.array.dtype == HOT_DTYPE[kind], (kind, inflater)  # the path this case is about ran
        np.testing.assert_array_equal(pre.crops(path, centres), expected, err_msg=f"{kind} {inflater}")


def test_int16_dicom_holds_the_float32_values(files):
    """``int16=True`` is today's float32 read, narrowed: the same numbers (and the old path stays callable)."""
    for kind in DICOM_KINDS:
        narrow = read_ct(files[kind], dtype=None, int16=True)
        today = read_ct(files[kind], dtype=None)
        assert today.array.dtype == np.float32
        assert narrow.array.dtype == HOT_DTYPE[kind]
        np.testing.assert_array_equal(narrow.array.astype(np.float32), today.array, err_msg=kind)
        np.testing.assert_array_equal(narrow.affine, today.affine)
    assert read_ct(files["dicom overflow"], dtype=None).array.max() > 32767


# bytes of each file the walker reads first: the default (these small files fit whole), the header
# and part of the pixels (the pixels are read into place later), part of the header (the walker
# then reads the file whole)
HEADS = {"whole file": None, "header + some pixels": 2048, "part of the header": 300}


def _walk_head(monkeypatch, files, kind, head):
    """Set the walker's head size; check which of its paths the series takes."""
    from lungcore.data.io import dicom

    if HEADS[head] is not None:
        monkeypatch.setattr(dicom, "_HEAD", HEADS[head])
    walked = dicom._walked(sorted(files[kind].iterdir()))
    assert walked is not None, kind
    lazy = HEADS[head] == 2048 and kind != "dicom trailing"
    assert all(("pixel_span" in t) == lazy and ("PixelData" in t) != lazy for t, _ in walked), (kind, head)


@pytest.mark.parametrize("head", list(HEADS))
@pytest.mark.parametrize("kind", DICOM_KINDS)
def test_tag_walker_and_pydicom_give_the_same_volume(files, kind, head, monkeypatch):
    """The walker's read (forced: pydicom's parse made to fail) and pydicom's (the walker turned off)
    are bit-identical: array, dtype and affine, int16 and float32, whichever way the walker reads."""
    from lungcore.data.io import dicom

    def no_pydicom(files_):
        raise AssertionError("the tag walker refused this series")

    for int16 in (True, False):
        _walk_head(monkeypatch, files, kind, head)
        monkeypatch.setattr(dicom, "_parsed", no_pydicom)
        walked = read_ct(files[kind], dtype=None, int16=int16, reader="native")
        monkeypatch.undo()
        monkeypatch.setattr(dicom, "_walked", lambda files_: None)
        parsed = read_ct(files[kind], dtype=None, int16=int16, reader="native")
        monkeypatch.undo()
        assert walked.array.dtype == parsed.array.dtype
        np.testing.assert_array_equal(walked.array, parsed.array, err_msg=kind)
        np.testing.assert_array_equal(walked.affine, parsed.affine, err_msg=kind)


def _sha256_of(path) -> str:
    """The source digest's definition, computed here independently."""
    import hashlib

    h = hashlib.sha256()
    if path.is_dir():
        for f in sorted(path.iterdir()):
            h.update(f.name.encode() + b"\0" + f.read_bytes())
    else:
        h.update(path.read_bytes())
    return h.hexdigest()


@pytest.mark.parametrize("head", list(HEADS))
@pytest.mark.parametrize("kind", list(HOT_DTYPE))
def test_the_hash_fed_by_the_reader_is_the_source_digest(files, kind, head, tmp_path, monkeypatch):
    """One pass: the reader feeds the source's bytes to the hash (every file of a .nii.gz or a
    walked DICOM series; a .nii is hashed after, by SourceHash itself); the digest is
    ``source_digest``'s, verify="content"'s and the stat memo's, and a cold Preprocessor never
    calls ``source_digest`` (no second read) yet leaves a cache that the other modes hit."""
    from lungcore.data.io import SourceHash, source_digest
    from lungcore.data.preprocess import crops as crops_module

    if kind.startswith("dicom"):
        _walk_head(monkeypatch, files, kind, head)
    elif HEADS[head] is not None:
        pytest.skip("the head size is the DICOM walker's")
    path = files[kind]
    h = SourceHash(path)
    read_ct(path, dtype=None, contiguous=False, int16=True, source_hash=h)
    assert h.fed == (0 if kind == "nii" else len(h.files))
    assert h.hexdigest() == source_digest(path) == _sha256_of(path)

    settings = PreprocessSettings(spacing=(2.0, 1.0, 1.0), crop=(8, 24, 24), window=(-1000.0, 400.0))
    centres = [canonical_orientation(read_ct(path)).index_to_world(np.array([11.2, 30.7, 25.1]))]
    with monkeypatch.context() as m:
        m.setattr(crops_module, "source_digest", lambda p: pytest.fail("hashed by a second read"))
        cold = Preprocessor(settings, cache_dir=tmp_path)
        first = cold.crops(path, centres)
    assert cold.stats.misses == 1 and cold.stats.images_read == 1
    content = Preprocessor(settings, cache_dir=tmp_path, verify="content")
    memo = Preprocessor(settings, cache_dir=tmp_path)
    assert content.digest(path) == memo.digest(path) == _sha256_of(path)
    for pre in (content, memo):
        np.testing.assert_array_equal(pre.crops(path, centres), first)
        assert pre.stats.hits == 1 and pre.stats.misses == 0 and pre.stats.images_read == 0


@pytest.mark.parametrize("inflater", _installed())
def test_inflaters_give_gzip_bytes(tmp_path, inflater, monkeypatch):
    monkeypatch.setenv("LUNGCORE_INFLATER", inflater)
    assert active_inflater()[0] == inflater
    rng = np.random.default_rng(1)
    raw = rng.integers(0, 50, size=300_000, dtype=np.uint8).tobytes()
    p = tmp_path / "two.gz"
    p.write_bytes(gzip.compress(raw[:100_001]) + gzip.compress(raw[100_001:]))  # two members
    got = gunzip(p, 777, 250_000)
    assert got.flags.writeable and got.dtype == np.uint8
    np.testing.assert_array_equal(got, np.frombuffer(raw[777:250_777], dtype=np.uint8))
    with pytest.raises(ValueError, match="truncated"):
        gunzip(p, 0, 400_000)  # the header asks for more than the file holds
    whole = gzip.compress(raw)
    p.write_bytes(whole[:len(whole) // 2])
    with pytest.raises(ValueError, match="truncated"):
        gunzip(p, 0, 300_000)
    broken = bytearray(whole)
    broken[len(broken) // 3: len(broken) // 3 + 64] = b"\xff" * 64
    p.write_bytes(bytes(broken))
    with pytest.raises(ValueError, match="corrupt gzip data|truncated"):
        gunzip(p, 0, 300_000)
    p.write_bytes(b"")
    with pytest.raises(ValueError, match="empty"):
        gunzip(p, 0, 10)


def test_unknown_inflater_is_an_error(monkeypatch):
    monkeypatch.setenv("LUNGCORE_INFLATER", "brotli")
    with pytest.raises(ValueError, match="LUNGCORE_INFLATER must be one of"):
        active_inflater()


def test_a_stray_file_in_a_series_is_skipped_and_hashed(files, tmp_path, monkeypatch):
    """A non-DICOM file in a series folder: skipped by the walker as by pydicom, and still part of
    the source digest (in its name order)."""
    import shutil

    from lungcore.data.io import SourceHash, dicom, source_digest

    folder = tmp_path / "series"
    shutil.copytree(files["dicom uint16"], folder)
    (folder / "notes.txt").write_text("scanned on a Tuesday\n")
    monkeypatch.setattr(dicom, "_parsed", lambda files_: pytest.fail("the tag walker refused this series"))
    h = SourceHash(folder)
    got = read_ct(folder, dtype=None, int16=True, source_hash=h)
    assert h.fed == len(h.files) and h.hexdigest() == source_digest(folder) == _sha256_of(folder)
    want = read_ct(files["dicom uint16"], dtype=None, int16=True)
    np.testing.assert_array_equal(got.array, want.array)
    np.testing.assert_array_equal(got.affine, want.affine)
