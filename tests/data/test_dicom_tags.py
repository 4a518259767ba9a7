"""The DICOM tag walker reads what pydicom reads, or refuses (and pydicom reads the series).

Reference: pydicom's ``dcmread`` on every DICOM file pydicom ships with its tests (the bundled
``pydicom/data/test_files``: ``get_testdata_files()`` would also fetch the external pydicom-data
index over the network), files written here in implicit VR with sequences of defined and undefined
length, truncated and garbage files, and the series of tests/data/test_read_paths.py (there: both
paths bit-identical through ``read_ct``).
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from lungcore.data.io import dicom as dicom_reader
from lungcore.data.io.dicom_tags import _WANTED, WalkerRefused, read_tags

pydicom = pytest.importorskip("pydicom")

CORPUS = sorted(p for p in (Path(pydicom.data.__file__).parent / "test_files").rglob("*")
                if p.is_file() and p.suffix != ".py")


def _pydicom_value(value):
    if isinstance(value, (list, pydicom.multival.MultiValue)):
        return [float(v) for v in value]
    if isinstance(value, pydicom.valuerep.DSfloat):
        return float(value)
    if isinstance(value, int):
        return int(value)
    return str(value)


def _assert_equal_to_pydicom(path: Path, tags) -> None:
    ds = pydicom.dcmread(str(path))
    assert tags.file_meta.TransferSyntaxUID == str(ds.file_meta.TransferSyntaxUID)
    for keyword, _, _ in _WANTED.values():
        assert (keyword in tags) == (keyword in ds), (path.name, keyword)
        if keyword in ds:
            got, want = getattr(tags, keyword), _pydicom_value(ds[keyword].value)
            assert got == want and type(got) is type(want), (path.name, keyword, got, want)
    assert bytes(tags.PixelData) == ds.PixelData, path.name


def test_walker_equals_pydicom_on_its_test_files():
    accepted, refused = [], []
    for path in CORPUS:
        data = path.read_bytes()
        try:
            tags = read_tags(data)
        except WalkerRefused:
            refused.append(path.name)
            continue
        accepted.append(path.name)
        _assert_equal_to_pydicom(path, tags)
    assert len(CORPUS) > 60 and len(accepted) >= 15, (len(CORPUS), accepted)
    assert {"CT_small.dcm", "MR_small.dcm", "MR_small_implicit.dcm", "MR_small_padded.dcm", "nested_priv_SQ.dcm",
            "liver_1frame.dcm"} <= set(accepted)
    # big endian, deflate, compressed (encapsulated), no file meta, not DICOM at all: pydicom's
    assert {"MR_small_bigendian.dcm", "ExplVR_BigEnd.dcm", "image_dfl.dcm", "JPEG2000.dcm", "MR_small_RLE.dcm",
            "JPEG-lossy.dcm", "no_meta.dcm", "ExplVR_LitEndNoMeta.dcm", "MR_truncated.dcm", "rtplan_truncated.dcm",
            "README.txt", "meta_missing_tsyntax.dcm", "rtdose.dcm"} <= set(refused)


@pytest.mark.parametrize("path", CORPUS, ids=[p.name for p in CORPUS])
def test_read_dicom_of_a_corpus_file_is_pydicoms(path, monkeypatch):
    """Each test file through ``read_dicom``: with the walker the same array, dtype and affine (or
    the same error) as with pydicom alone."""
    def read(walker: bool):
        if not walker:
            monkeypatch.setattr(dicom_reader, "_walked", lambda files: None)
        try:
            array, affine = dicom_reader.read_dicom(path, None, True)
            return ("ok", array, array.dtype, affine)
        except Exception as exc:  # noqa: BLE001 - compared below, type and message
            return ("error", type(exc).__name__, str(exc))
        finally:
            monkeypatch.undo()

    walked, parsed = read(True), read(False)
    assert walked[0] == parsed[0], (walked, parsed)
    if walked[0] == "ok":
        np.testing.assert_array_equal(walked[1], parsed[1])
        assert walked[2] == parsed[2]
        np.testing.assert_array_equal(walked[3], parsed[3])
    else:
        assert walked[1:] == parsed[1:]


def _ct_small(tmp_path: Path, implicit: bool, undefined: bool) -> Path:
    """CT_small.dcm rewritten in implicit or explicit VR with a nested sequence of defined or
    undefined length (items likewise) before the tags the reader needs."""
    from pydicom.dataset import Dataset
    from pydicom.sequence import Sequence
    from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian

    ds = pydicom.dcmread(pydicom.data.get_testdata_file("CT_small.dcm"))
    inner = Dataset()
    inner.CodeValue, inner.CodeMeaning = "113691", "IHE Protocol"
    item = Dataset()
    item.CodeValue = "1"
    item.PurposeOfReferenceCodeSequence = Sequence([inner])
    ds.ReferencedImageSequence = Sequence([item, Dataset()])
    for element in (ds["ReferencedImageSequence"], item["PurposeOfReferenceCodeSequence"]):
        element.is_undefined_length = undefined
        for it in element.value:
            it.is_undefined_length_sequence_item = undefined
    ds.file_meta.TransferSyntaxUID = ImplicitVRLittleEndian if implicit else ExplicitVRLittleEndian
    out = tmp_path / f"ct_{implicit}_{undefined}.dcm"
    ds.save_as(str(out), implicit_vr=implicit, little_endian=True, enforce_file_format=True)
    return out


@pytest.mark.parametrize("implicit", [False, True], ids=["explicit", "implicit"])
@pytest.mark.parametrize("undefined", [False, True], ids=["defined", "undefined"])
def test_walker_skips_sequences_of_either_length(tmp_path, implicit, undefined):
    path = _ct_small(tmp_path, implicit, undefined)
    data = path.read_bytes()
    assert (b"\xfe\xff\xdd\xe0" in data) == undefined  # the sequence delimiter is really there (or not)
    _assert_equal_to_pydicom(path, read_tags(data))


def test_truncated_and_garbage_files_give_todays_error(tmp_path, monkeypatch):
    from lungcore.data.io import read_ct, write_dicom_series

    volume = np.arange(3 * 8 * 8, dtype=np.float32).reshape(3, 8, 8) - 1000
    cases = {}
    for name, damage in (("truncated", lambda d: d[:len(d) - 50]), ("header cut", lambda d: d[:140]),
                         ("garbage", lambda d: d[:132] + bytes(range(256)) * 4)):
        folder = write_dicom_series(tmp_path / name.replace(" ", "_"), volume, np.eye(4))
        victim = sorted(folder.iterdir())[1]
        victim.write_bytes(damage(victim.read_bytes()))
        with pytest.raises(WalkerRefused):
            read_tags(victim.read_bytes())
        cases[name] = folder
    for name, folder in cases.items():
        errors = []
        for walker in (True, False):
            if not walker:
                monkeypatch.setattr(dicom_reader, "_walked", lambda files: None)
            with pytest.raises(ValueError) as info:
                read_ct(folder, reader="native")
            errors.append((type(info.value), str(info.value)))
            monkeypatch.undo()
        assert errors[0] == errors[1], name
        assert str(sorted(folder.iterdir())[1].name) in errors[0][1], errors[0]
