"""Readers: (z, y, x) arrays + LPS affine through MONAI, HU for DICOM, canonical orientation."""
from __future__ import annotations

import numpy as np
import pytest

from lungcore.data import CTImage, canonical_orientation, read_ct, read_ct_header, write_dicom_series, write_nifti


def _oblique_affine() -> np.ndarray:
    """(z, y, x) -> LPS: depth runs towards the feet, a small tilt, a table offset."""
    a = np.zeros((4, 4))
    a[3, 3] = 1
    a[:3, 0] = [0.0, 0.0, -2.5]
    a[:3, 1] = [0.0, 0.7, 0.0]
    a[:3, 2] = [0.8, 0.0, 0.0]
    a[:3, 3] = [-100.0, 50.0, -300.0]
    return a


def test_nifti_round_trip(tmp_path, rng):
    hu = rng.integers(-1024, 2000, size=(7, 9, 11)).astype(np.float32)
    affine = _oblique_affine()
    write_nifti(tmp_path / "ct.nii.gz", hu, affine)
    ct = read_ct(tmp_path / "ct.nii.gz")
    assert ct.array.shape == (7, 9, 11) and ct.array.dtype == np.float32
    np.testing.assert_array_equal(ct.array, hu)
    np.testing.assert_allclose(ct.affine, affine, atol=1e-5)
    np.testing.assert_allclose(ct.spacing, (2.5, 0.7, 0.8), rtol=1e-6)
    shape, header_affine = read_ct_header(tmp_path / "ct.nii.gz")
    assert shape == (7, 9, 11)
    np.testing.assert_allclose(header_affine, affine, atol=1e-5)
    # world <-> index, and the voxel the affine names is the voxel the array holds
    idx = np.array([3.0, 4.0, 5.0])
    np.testing.assert_allclose(ct.world_to_index(ct.index_to_world(idx)), idx, atol=1e-9)


def test_nibabel_agrees_on_world_position(tmp_path):
    """Independent check against nibabel's own (x, y, z)/RAS convention."""
    import nibabel as nib

    hu = np.zeros((5, 6, 7), dtype=np.float32)
    write_nifti(tmp_path / "ct.nii", hu, _oblique_affine())
    img = nib.load(tmp_path / "ct.nii")
    ras = img.affine @ np.array([6.0, 5.0, 4.0, 1.0])   # nibabel index (i, j, k) = (x, y, z)
    lps = ras[:3] * np.array([-1, -1, 1])
    np.testing.assert_allclose(read_ct(tmp_path / "ct.nii").index_to_world([4.0, 5.0, 6.0]), lps, atol=1e-5)


def test_dicom_series_round_trip_in_hu(tmp_path, rng):
    hu = rng.integers(-1024, 1500, size=(6, 8, 10)).astype(np.float32)
    affine = _oblique_affine()
    write_dicom_series(tmp_path / "series", hu, affine, patient_id="P1")
    ct = read_ct(tmp_path / "series")
    np.testing.assert_array_equal(ct.array, hu)  # stored uint16 + RescaleIntercept -1024 -> HU
    np.testing.assert_allclose(ct.affine, affine, atol=1e-5)
    assert read_ct_header(tmp_path / "series")[0] == (6, 8, 10)


def test_real_dicom_ct_small():
    """pydicom's real CT slice: rescale intercept -1024, 0.661 mm pixels, 5 mm slice."""
    pydicom = pytest.importorskip("pydicom")
    from pydicom.data import get_testdata_file

    path = get_testdata_file("CT_small.dcm")
    ds = pydicom.dcmread(path)
    ct = read_ct(path)
    assert ct.array.shape == (1, 128, 128)
    expected = ds.pixel_array.astype(np.float32) * float(ds.RescaleSlope) + float(ds.RescaleIntercept)
    np.testing.assert_array_equal(ct.array[0], expected)
    assert float(ct.array.min()) == -896.0 and float(ct.array.max()) == 1167.0
    np.testing.assert_allclose(ct.spacing, (5.0, 0.661468, 0.661468), rtol=1e-5)
    # the first voxel sits at ImagePositionPatient (LPS), rows run along +y, columns along +x
    np.testing.assert_allclose(ct.index_to_world([0, 0, 0]), [float(v) for v in ds.ImagePositionPatient], atol=1e-4)
    np.testing.assert_allclose(ct.index_to_world([0, 1, 0]) - ct.index_to_world([0, 0, 0]), [0, 0.661468, 0], atol=1e-5)


def test_canonical_orientation_is_a_view_with_matching_affine(rng):
    array = rng.normal(size=(5, 6, 7)).astype(np.float32)
    image = CTImage(array, _oblique_affine())
    canon = canonical_orientation(image)
    assert np.all(np.diag(canon.affine[:3, :3][:, ::-1]) > 0)  # depth -> +z, height -> +y, width -> +x
    assert np.shares_memory(canon.array, array)
    # every voxel keeps its world position
    for idx in ([0, 0, 0], [4, 2, 6], [1, 5, 3]):
        world = image.index_to_world(idx)
        j = np.rint(canon.world_to_index(world)).astype(int)
        assert canon.array[tuple(j)] == array[tuple(idx)]
    # a transposed (x, y, z)-ordered array is permuted back
    perm = CTImage(array.transpose(2, 1, 0), image.affine[:, [2, 1, 0, 3]])
    np.testing.assert_array_equal(canonical_orientation(perm).array, canon.array)


def test_header_errors_name_the_file(tmp_path):
    import nibabel as nib

    # the header and the full read agree on which shapes are volumes: one slice is a depth of one,
    # trailing axes of one are dropped, anything else is refused by both
    for name, xyz in (("flat.nii", (4, 5)), ("one.nii.gz", (4, 5, 3, 1)), ("rgb.nii", (4, 5, 3, 2))):
        path = tmp_path / name
        nib.save(nib.Nifti1Image(np.zeros(xyz, np.int16), np.eye(4)), str(path))
        if len(xyz) == 4 and xyz[-1] != 1:
            for read in (read_ct_header, read_ct):
                with pytest.raises(ValueError, match=rf"^CT image {path} must be a 3-D volume, got shape \(4, 5, 3, 2\)$"):
                    read(path)
            continue
        assert read_ct_header(path)[0] == read_ct(path).array.shape == (tuple(xyz[:3]) + (1,))[:3][::-1]
    cut = write_nifti(tmp_path / "cut.nii", np.zeros((3, 4, 5)), np.eye(4))
    cut.write_bytes(cut.read_bytes()[:-10])
    with pytest.raises(ValueError, match=rf"^CT image {cut} is truncated: \d+ bytes, the header needs \d+$"):
        read_ct_header(cut)
    series = write_dicom_series(tmp_path / "series", np.zeros((2, 4, 5)), np.eye(4))
    import pydicom

    first = sorted(series.glob("*.dcm"))[0]
    ds = pydicom.dcmread(first)
    del ds.PixelSpacing
    ds.save_as(first)
    with pytest.raises(ValueError, match=rf"^CT image {series}: DICOM file {first.name} lacks PixelSpacing$"):
        read_ct_header(series)
