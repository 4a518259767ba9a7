"""The native CT reader (nibabel / pydicom directly) gives what the MONAI reader gives.

Identical means: the same array values bit for bit, the same dtype, the affine within 1e-6 mm,
for ``dtype=float32`` (the default) and ``dtype=None`` (the preprocessing hot path). Files: every
image the synthetic generators write (NIfTI and DICOM series, some stored feet-first), pydicom's
real ``CT_small.dcm``, NIfTIs with oblique affines, scaling and odd headers, and DICOM series
stored in shuffled order, feet-first, tilted, rescaled. Then the native reader's own checks
(mixed series, uneven spacing, ...) and that preprocessing gives the crops the MONAI read gives.
"""
from __future__ import annotations

import shutil

import numpy as np
import pytest

from lungcore.data import read_ct, read_manifest, synth_cohort, write_dicom_series, write_nifti
from lungcore.data.io import NativeReaderUnsupported

nib = pytest.importorskip("nibabel")
pydicom = pytest.importorskip("pydicom")
try:
    import monai  # noqa: F401

    HAVE_MONAI = True
except ImportError:
    HAVE_MONAI = False
needs_monai = pytest.mark.skipif(not HAVE_MONAI, reason="MONAI (the reference reader) not installed")

READ_MODES = [dict(), dict(dtype=None, contiguous=False)]


def assert_same_as_monai(path, **kwargs) -> None:
    """native == MONAI for ``path``: values bit for bit, dtype, shape, affine to 1e-6 mm."""
    ref = read_ct(path, reader="monai", **kwargs)
    for reader in ("native", "auto"):
        got = read_ct(path, reader=reader, **kwargs)
        assert got.array.dtype == ref.array.dtype, (path, reader, kwargs)
        # numpy's own dtype object: lungcore._C (resample_crop) matches dtypes by identity
        assert got.array.dtype is np.dtype(got.array.dtype.type), (path, reader, got.array.dtype.str)
        assert got.array.shape == ref.array.shape, (path, reader, kwargs)
        np.testing.assert_array_equal(got.array, ref.array, err_msg=f"{path} {reader} {kwargs}")
        np.testing.assert_allclose(got.affine, ref.affine, rtol=0, atol=1e-6, err_msg=f"{path} {reader} {kwargs}")
        if kwargs.get("contiguous", True):
            assert got.array.flags.c_contiguous


def _affine(columns, origin) -> np.ndarray:
    """(z, y, x) -> LPS affine from its three index columns (depth, height, width) and origin."""
    a = np.eye(4)
    a[:3, 0], a[:3, 1], a[:3, 2] = (np.asarray(c, dtype=np.float64) for c in columns)
    a[:3, 3] = origin
    return a


def _rotation(axis, angle) -> np.ndarray:
    axis = np.asarray(axis, dtype=np.float64) / np.linalg.norm(axis)
    k = np.array([[0, -axis[2], axis[1]], [axis[2], 0, -axis[0]], [-axis[1], axis[0], 0]])
    return np.eye(3) + np.sin(angle) * k + (1 - np.cos(angle)) * k @ k


def _volume(rng, shape=(6, 9, 11)) -> np.ndarray:
    return rng.integers(-1024, 2000, size=shape).astype(np.float32)


# -- the synthetic cohorts: every image file they write ---------------------------------------------------------
@pytest.fixture(scope="module")
def cohort_images(tmp_path_factory):
    root = tmp_path_factory.mktemp("cohorts")
    paths = []
    for kind, n in (("survival", 6), ("nodules", 6)):
        for dicom_every in (1, 4):
            info = synth_cohort(kind, root / f"{kind}-{dicom_every}", n=n, preset="tiny", seed=3,
                                dicom_every=dicom_every)
            m = read_manifest(info["manifest"], images="exists")
            paths += sorted({str(p) for row in m.images for p in row if p is not None})
    return paths


@needs_monai
@pytest.mark.parametrize("kwargs", READ_MODES, ids=["float32", "stored-strided"])
def test_every_synthetic_image_reads_as_monai_reads_it(cohort_images, kwargs):
    assert any(p.endswith("_dicom") for p in cohort_images) and any(p.endswith(".nii.gz") for p in cohort_images)
    flipped = 0
    for path in cohort_images:
        assert_same_as_monai(path, **kwargs)
        flipped += read_ct(path).affine[2, 0] < 0
    assert flipped > 0, "the cohorts should hold scans stored feet-first (flipped z)"


# -- pydicom's real CT slice ------------------------------------------------------------------------------------
@needs_monai
@pytest.mark.parametrize("kwargs", READ_MODES, ids=["float32", "stored-strided"])
def test_real_ct_small_file_and_folder(tmp_path, kwargs):
    from pydicom.data import get_testdata_file

    path = get_testdata_file("CT_small.dcm")
    assert_same_as_monai(path, **kwargs)
    (tmp_path / "one").mkdir()
    shutil.copy(path, tmp_path / "one" / "IM0001")  # a one-file series folder, no suffix
    assert_same_as_monai(tmp_path / "one", **kwargs)
    ct = read_ct(path, reader="native")
    assert ct.shape == (1, 128, 128) and float(ct.array.min()) == -896.0
    np.testing.assert_allclose(ct.spacing, (5.0, 0.661468, 0.661468), rtol=1e-5)


# -- NIfTI: oblique, scaled, odd headers ------------------------------------------------------------------------
def _nifti(path, data_xyz, affine_ras, *, slope=None, inter=None, qform=True, sform=True, zooms=None, dtype=None):
    img = nib.Nifti1Image(data_xyz if dtype is None else data_xyz.astype(dtype), affine_ras)
    if sform:
        img.set_sform(affine_ras, code=1)
    else:
        img.set_sform(None, code=0)
    if qform:
        img.set_qform(affine_ras, code=1)
    else:
        img.set_qform(None, code=0)
    if zooms is not None:
        img.header.set_zooms(zooms)
    if slope is not None:
        img.header.set_slope_inter(slope, inter)
    nib.save(img, str(path))
    return path


def _oblique_ras() -> np.ndarray:
    """Rotated about a tilted axis, anisotropic (0.7, 0.8, 2.5) mm, a flipped y axis."""
    a = np.eye(4)
    a[:3, :3] = _rotation([0.3, -0.2, 1.0], 0.4) @ np.diag([1.0, -1.0, 1.0]) * [0.7, 0.8, 2.5]
    a[:3, 3] = [-12.0, 30.0, -80.0]
    return a


@needs_monai
@pytest.mark.parametrize("suffix", [".nii.gz", ".nii"])
@pytest.mark.parametrize("case", ["plain-int16", "scaled-int16", "scaled-uint16-intercept", "uint8", "float64",
                                  "qform-only", "sform-only", "pixdim-mismatch", "4d-singleton", "2d"])
def test_nifti_variants_read_as_monai_reads_them(tmp_path, rng, suffix, case):
    data = rng.integers(-1024, 2000, size=(13, 11, 7)).astype(np.int16)  # (x, y, z) as stored
    ras = _oblique_ras()
    kw = {}
    if case == "scaled-int16":
        kw = dict(slope=0.37, inter=-11.25)
    elif case == "scaled-uint16-intercept":
        data, kw = (data + 1024).astype(np.uint16), dict(slope=1.0, inter=-1024.0)
    elif case == "uint8":
        data = (data % 256).astype(np.uint8)
    elif case == "float64":
        data = data * 0.25
    elif case == "qform-only":
        kw = dict(sform=False)
    elif case == "sform-only":
        kw = dict(qform=False)
    elif case == "pixdim-mismatch":  # MONAI's header correction: the qform (which agrees) replaces the sform
        img = nib.Nifti1Image(data, ras)
        img.set_qform(ras, code=1)
        sheared = ras.copy()
        sheared[:3, 0] *= 1.5
        img.set_sform(sheared, code=1)
        nib.save(img, str(tmp_path / f"ct{suffix}"))
    elif case == "4d-singleton":
        data = data[..., None]
    elif case == "2d":
        data = data[:, :, 0]
    path = tmp_path / f"ct{suffix}"
    if case != "pixdim-mismatch":
        _nifti(path, data, ras, **kw)
    for kwargs in READ_MODES:
        assert_same_as_monai(path, **kwargs)
    if case in ("scaled-int16", "scaled-uint16-intercept"):
        assert read_ct(path, dtype=None).array.dtype == np.float32  # scaled: float32 HU even with dtype=None
        raw = data.astype(np.float64) * kw["slope"] + kw["inter"]
        np.testing.assert_allclose(read_ct(path).array, raw.transpose(2, 1, 0), rtol=1e-6, atol=1e-3)
    if case == "plain-int16":
        assert read_ct(path, dtype=None).array.dtype == np.int16
    if case == "pixdim-mismatch":
        np.testing.assert_allclose(read_ct(path).spacing, (2.5, 0.8, 0.7), rtol=1e-6)


def test_nifti_native_reader_needs_no_monai(tmp_path, rng, monkeypatch):
    """The native path imports nothing of MONAI (the GPU machine has none)."""
    import sys

    hu = _volume(rng)
    write_nifti(tmp_path / "ct.nii.gz", hu, _affine([[0, 0, -2.5], [0, 0.7, 0], [0.8, 0, 0]], [1, 2, 3]))
    write_dicom_series(tmp_path / "s", hu, _affine([[0, 0, 2.5], [0, 0.7, 0], [0.8, 0, 0]], [1, 2, 3]))
    monkeypatch.setitem(sys.modules, "monai", None)  # any import of monai now raises ImportError
    np.testing.assert_array_equal(read_ct(tmp_path / "ct.nii.gz", reader="native").array, hu)
    np.testing.assert_array_equal(read_ct(tmp_path / "s", reader="auto").array, hu)


def test_big_endian_and_multi_member_gzip(tmp_path, rng):
    """Files nibabel reads that MONAI's torch conversion may not: compared to nibabel itself."""
    import gzip

    data = rng.integers(-1024, 2000, size=(9, 8, 5)).astype(np.int16)
    img = nib.Nifti1Image(data, _oblique_ras(), header=nib.Nifti1Header(endianness=">"))
    img.set_data_dtype(np.int16)
    nib.save(img, str(tmp_path / "be.nii"))
    assert nib.load(tmp_path / "be.nii").header.endianness == ">"
    ct = read_ct(tmp_path / "be.nii", dtype=None, reader="native")
    assert ct.array.dtype == np.int16 and ct.array.dtype.isnative
    np.testing.assert_array_equal(ct.array, data.transpose(2, 1, 0))
    np.testing.assert_allclose(ct.affine, read_ct(tmp_path / "be.nii", reader="native").affine)
    # the same bytes as two gzip members
    raw = (tmp_path / "be.nii").read_bytes()
    (tmp_path / "two.nii.gz").write_bytes(gzip.compress(raw[:1000]) + gzip.compress(raw[1000:]))
    np.testing.assert_array_equal(read_ct(tmp_path / "two.nii.gz", dtype=None, reader="native").array, ct.array)


# -- DICOM series: shuffled, feet-first, tilted, rescaled -------------------------------------------------------
FEET_FIRST = _affine([[0, 0, -2.0], [0, 0.7, 0], [-0.75, 0, 0]], [120.0, -90.0, 40.0])  # IOP (-1, 0, 0, 0, 1, 0)


def _shuffle_files(folder, rng) -> None:
    """Rename the slice files so that sorting by name no longer gives the slice order."""
    files = sorted(folder.iterdir())
    names = [f"IM{v:05d}" for v in rng.permutation(10_000)[:len(files)]]
    for f, name in zip(files, names):
        f.rename(folder / f"tmp_{name}")
    for f in folder.iterdir():
        f.rename(folder / f.name[4:])


def _edit_slices(folder, edit) -> None:
    for f in sorted(folder.iterdir()):
        ds = pydicom.dcmread(f)
        edit(ds)
        ds.save_as(f, enforce_file_format=True)


@needs_monai
@pytest.mark.parametrize("geometry", ["head-first", "feet-first", "oblique-tilted"])
def test_dicom_series_shuffled_files_read_as_monai_reads_them(tmp_path, rng, geometry):
    hu = _volume(rng, (7, 10, 12))
    if geometry == "head-first":
        affine = _affine([[0, 0, 1.25], [0, 0.6, 0], [0.6, 0, 0]], [-100.0, -120.0, -300.0])
    elif geometry == "feet-first":
        affine = FEET_FIRST
    else:  # rotated in-plane axes and a depth step off the slice normal (gantry tilt)
        r = _rotation([0.2, 1.0, 0.1], 0.3)
        affine = _affine([r @ [0.3, 0, 2.0], r @ [0, 0.7, 0], r @ [0.8, 0, 0]], [10.0, 20.0, -30.0])
    write_dicom_series(tmp_path / "series", hu, affine)
    _shuffle_files(tmp_path / "series", rng)
    for kwargs in READ_MODES:
        assert_same_as_monai(tmp_path / "series", **kwargs)
    ct = read_ct(tmp_path / "series", reader="native")
    np.testing.assert_array_equal(ct.array, hu)
    np.testing.assert_allclose(ct.affine, affine, atol=1e-5)


@needs_monai
def test_dicom_rescale_slope_and_unused_high_bits_as_monai(tmp_path, rng):
    """A slope other than 1 (MONAI computes in float64, then float32) and 12 stored bits with
    garbage in the 4 unused ones (pydicom masks / sign-extends them)."""
    hu = _volume(rng)
    write_dicom_series(tmp_path / "slope", hu, FEET_FIRST)

    def slope(ds):
        ds.RescaleSlope, ds.RescaleIntercept = "0.7", "-1000.3"

    _edit_slices(tmp_path / "slope", slope)
    write_dicom_series(tmp_path / "bits", np.clip(hu, -1024, 3071), FEET_FIRST)

    def bits(ds):
        raw = np.frombuffer(ds.PixelData, np.uint16).copy()
        raw[::3] |= np.uint16(0xB000)
        ds.PixelData, ds.BitsStored, ds.HighBit = raw.tobytes(), 12, 11

    _edit_slices(tmp_path / "bits", bits)
    for kwargs in READ_MODES:
        assert_same_as_monai(tmp_path / "slope", **kwargs)
        assert_same_as_monai(tmp_path / "bits", **kwargs)
    np.testing.assert_array_equal(read_ct(tmp_path / "bits").array, np.clip(hu, -1024, 3071))


def test_dicom_order_comes_from_positions_not_instance_numbers(tmp_path, rng):
    """Instance numbers reversed or shuffled: the native reader still stacks by position (MONAI
    would stack by InstanceNumber and put slices in the wrong place)."""
    from lungcore.data import canonical_orientation

    hu = _volume(rng, (8, 6, 7))
    affine = _affine([[0, 0, 1.5], [0, 0.7, 0], [0.8, 0, 0]], [0.0, 0.0, 0.0])
    truth = canonical_orientation(read_ct(write_dicom_series(tmp_path / "ok", hu, affine), reader="native"))
    for mode in ("reversed", "shuffled", "missing"):
        folder = tmp_path / mode
        write_dicom_series(folder, hu, affine)
        numbers = iter(rng.permutation(8) + 1)

        def renumber(ds):
            if mode == "reversed":
                ds.InstanceNumber = 9 - int(ds.InstanceNumber)
            elif mode == "shuffled":
                ds.InstanceNumber = int(next(numbers))
            else:
                del ds.InstanceNumber

        _edit_slices(folder, renumber)
        ct = canonical_orientation(read_ct(folder, reader="native"))
        np.testing.assert_array_equal(ct.array, truth.array)
        np.testing.assert_allclose(ct.affine, truth.affine, atol=1e-5)
    reversed_ = read_ct(tmp_path / "reversed", reader="native")  # scanner order kept: now top-down
    np.testing.assert_array_equal(reversed_.array, hu[::-1])


def test_non_dicom_files_in_a_series_folder_are_skipped(tmp_path, rng):
    hu = _volume(rng)
    write_dicom_series(tmp_path / "s", hu, FEET_FIRST)
    (tmp_path / "s" / "notes.txt").write_text("not a DICOM file\n")
    (tmp_path / "s" / ".DS_Store").write_bytes(b"\0" * 10)
    np.testing.assert_array_equal(read_ct(tmp_path / "s", reader="native").array, hu)
    if HAVE_MONAI:
        assert_same_as_monai(tmp_path / "s")


# -- errors that name the path ----------------------------------------------------------------------------------
@pytest.mark.parametrize("reader", ["native", "auto"])
def test_errors_name_the_path(tmp_path, rng, reader):
    hu = _volume(rng)
    with pytest.raises(FileNotFoundError, match="nothere.nii.gz"):
        read_ct(tmp_path / "nothere.nii.gz", reader=reader)
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="empty.*holds no files"):
        read_ct(tmp_path / "empty", reader=reader)
    (tmp_path / "junk").mkdir()
    (tmp_path / "junk" / "a.txt").write_text("hello")
    with pytest.raises(ValueError, match="junk.*holds no DICOM image"):
        read_ct(tmp_path / "junk", reader=reader)
    # two series in one folder
    a = write_dicom_series(tmp_path / "a", hu, FEET_FIRST)
    write_dicom_series(tmp_path / "b", hu, FEET_FIRST)
    shutil.copy(tmp_path / "b" / "slice_0000.dcm", a / "other_0000.dcm")
    with pytest.raises(ValueError, match=r"a mixes 2 series"):
        read_ct(a, reader=reader)
    # one series, two orientations
    c = write_dicom_series(tmp_path / "c", hu, FEET_FIRST)

    def tilt(ds):
        if ds.InstanceNumber == 3:
            ds.ImageOrientationPatient = [0.0, 1.0, 0.0, 1.0, 0.0, 0.0]

    _edit_slices(c, tilt)
    with pytest.raises(ValueError, match="c mixes orientations"):
        read_ct(c, reader=reader)
    c2 = write_dicom_series(tmp_path / "c2", hu, FEET_FIRST)

    def pixel_spacing(ds):
        if ds.InstanceNumber == 2:
            ds.PixelSpacing = ["0.9", "0.9"]

    _edit_slices(c2, pixel_spacing)
    with pytest.raises(ValueError, match="c2 mixes pixel spacings"):
        read_ct(c2, reader=reader)
    # a missing slice: uneven spacing is an error (the affine would misplace the slices after it)
    d = write_dicom_series(tmp_path / "d", hu, FEET_FIRST)
    (d / "slice_0003.dcm").unlink()
    with pytest.raises(ValueError, match=r"d has uneven slice spacing: slice_0002.dcm -> slice_0004.dcm"):
        read_ct(d, reader=reader)
    # duplicated slices
    e = write_dicom_series(tmp_path / "e", hu[:1].repeat(2, axis=0), _affine([[0, 0, 0], [0, 0.7, 0], [0.8, 0, 0]],
                                                                              [0, 0, 0]))
    with pytest.raises(ValueError, match="e: its 2 slices share one position"):
        read_ct(e, reader=reader)
    # not a 3-D volume
    nib.save(nib.Nifti1Image(np.zeros((4, 5, 6, 2), np.int16), np.eye(4)), str(tmp_path / "4d.nii.gz"))
    with pytest.raises(ValueError, match="4d.nii.gz must be a 3-D volume"):
        read_ct(tmp_path / "4d.nii.gz", reader=reader)
    (tmp_path / "bad.nii.gz").write_bytes(b"not an image")
    with pytest.raises(ValueError, match="bad.nii.gz"):
        read_ct(tmp_path / "bad.nii.gz", reader=reader)
    # a truncated file
    write_nifti(tmp_path / "t.nii", hu, FEET_FIRST)
    (tmp_path / "t.nii").write_bytes((tmp_path / "t.nii").read_bytes()[:-100])
    with pytest.raises(ValueError, match="t.nii is truncated"):
        read_ct(tmp_path / "t.nii", reader=reader)


def test_unknown_reader_is_refused(tmp_path):
    with pytest.raises(ValueError, match="reader must be one of"):
        read_ct(tmp_path, reader="itk")


def test_multi_frame_dicom_is_left_to_monai(tmp_path, rng):
    """What the native reader does not read: ``native`` says so; ``auto`` hands it to MONAI."""
    hu = _volume(rng, (2, 6, 7))
    folder = write_dicom_series(tmp_path / "s", hu, FEET_FIRST)
    ds = pydicom.dcmread(folder / "slice_0000.dcm")
    ds.NumberOfFrames = 2
    ds.PixelData = b"".join(pydicom.dcmread(f).PixelData for f in sorted(folder.iterdir()))
    ds.save_as(tmp_path / "multi.dcm", enforce_file_format=True)
    with pytest.raises(NativeReaderUnsupported, match="multi.dcm is multi-frame"):
        read_ct(tmp_path / "multi.dcm", reader="native")
    if HAVE_MONAI:
        auto, ref = read_ct(tmp_path / "multi.dcm", reader="auto"), read_ct(tmp_path / "multi.dcm", reader="monai")
        np.testing.assert_array_equal(auto.array, ref.array)
        np.testing.assert_array_equal(auto.affine, ref.affine)


# -- preprocessing: the native read gives the crops (and so the cache entries) the MONAI read gives -------------
@needs_monai
def test_preprocessor_crops_equal_those_from_a_monai_read(cohort_images, tmp_path):
    from lungcore.data import PreprocessSettings, Preprocessor, canonical_orientation
    from lungcore.ops import resample_crop

    s = PreprocessSettings(spacing=(2.0, 1.5, 1.5), crop=(6, 12, 12))
    pre = Preprocessor(s, cache_dir=tmp_path / "cache")
    for path in cohort_images[:2] + [p for p in cohort_images if p.endswith("_dicom")][:2]:
        image = canonical_orientation(read_ct(path, dtype=None, contiguous=False, reader="monai"))
        centre = image.index_to_world((np.asarray(image.shape) - 1) / 2 + 0.3)
        expected = resample_crop(image.array, image.spacing, s.spacing, image.world_to_index(centre)[None], s.crop,
                                 window=s.window, out_dtype=np.float32)[0]
        np.testing.assert_array_equal(pre.crop(path, centre), expected)
