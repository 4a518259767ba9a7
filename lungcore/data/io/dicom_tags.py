"""A DICOM tag walker for the uncompressed little-endian transfer syntaxes: the few tags the native
reader uses, read from the file's bytes without pydicom's per-element parse (:func:`read_tags`).

It reads files whose file meta group (explicit VR little endian, after the 128-byte preamble and
``DICM``) names Explicit VR Little Endian (1.2.840.10008.1.2.1) or Implicit VR Little Endian
(1.2.840.10008.1.2), walks the top-level elements (sequences skipped: defined length, or items and
delimiters of undefined length, in implicit VR too) and returns a :class:`DicomTags` whose values
are pydicom's (DS / IS strings parsed as pydicom parses them) and whose ``PixelData`` is a view of
the file's bytes. Anything else -- another transfer syntax, encapsulated or absent pixel data, a
value of an unexpected VR or multiplicity, an empty value, a truncated element, a VR that does not
match the transfer syntax -- raises :class:`WalkerRefused`, and the reader falls back to pydicom
for the series (pydicom stays the reference: tests/data/test_dicom_tags.py compares the two on
pydicom's own test files).

Example:
    >>> from pathlib import Path
    >>> from pydicom.data import get_testdata_file
    >>> data = Path(get_testdata_file("CT_small.dcm")).read_bytes()
    >>> tags = read_tags(data)
    >>> tags.Rows, tags.Columns, tags.RescaleIntercept, len(tags.PixelData)
    (128, 128, -1024.0, 32768)
"""
from __future__ import annotations

import struct
from types import SimpleNamespace
from typing import Any

EXPLICIT_LE = "1.2.840.10008.1.2.1"
IMPLICIT_LE = "1.2.840.10008.1.2"
DICOMDIR = "1.2.840.10008.1.3.10"

# VRs whose explicit-VR header is 12 bytes (2 reserved bytes, 4-byte length); the rest have 8
_LONG_VRS = frozenset({b"OB", b"OD", b"OF", b"OL", b"OV", b"OW", b"SQ", b"SV", b"UC", b"UN", b"UR", b"UT", b"UV"})
_SHORT_VRS = frozenset({b"AE", b"AS", b"AT", b"CS", b"DA", b"DS", b"DT", b"FL", b"FD", b"IS", b"LO", b"LT", b"PN",
                        b"SH", b"SL", b"SS", b"ST", b"TM", b"UI", b"UL", b"US"})
_UNDEFINED = 0xFFFFFFFF
_ITEM, _ITEM_END, _SEQUENCE_END = 0xFFFEE000, 0xFFFEE00D, 0xFFFEE0DD
_PIXEL_DATA = 0x7FE00010
_META_TS = 0x00020010

# tag -> (keyword, VR, values: 0 for "one value", n for exactly n values)
_WANTED: dict[int, tuple[str, bytes, int]] = {
    0x00080016: ("SOPClassUID", b"UI", 0),
    0x00180050: ("SliceThickness", b"DS", 0),
    0x00180088: ("SpacingBetweenSlices", b"DS", 0),
    0x0020000E: ("SeriesInstanceUID", b"UI", 0),
    0x00200013: ("InstanceNumber", b"IS", 0),
    0x00200032: ("ImagePositionPatient", b"DS", 3),
    0x00200037: ("ImageOrientationPatient", b"DS", 6),
    0x00280002: ("SamplesPerPixel", b"US", 0),
    0x00280008: ("NumberOfFrames", b"IS", 0),
    0x00280010: ("Rows", b"US", 0),
    0x00280011: ("Columns", b"US", 0),
    0x00280030: ("PixelSpacing", b"DS", 2),
    0x00280100: ("BitsAllocated", b"US", 0),
    0x00280101: ("BitsStored", b"US", 0),
    0x00280103: ("PixelRepresentation", b"US", 0),
    0x00281052: ("RescaleIntercept", b"DS", 0),
    0x00281053: ("RescaleSlope", b"DS", 0),
}
_U16 = struct.Struct("<H")
_U32 = struct.Struct("<I")
_TAG = struct.Struct("<HH")


class WalkerRefused(Exception):
    """The walker does not read this file (see the module docstring); pydicom reads it instead."""


class DicomTags(SimpleNamespace):
    """The tags of one DICOM file the native reader uses, as attributes named like pydicom's
    (``getattr(tags, "RescaleSlope", 1.0)``, ``"PixelData" in tags`` work as on a pydicom dataset);
    ``file_meta.TransferSyntaxUID``; ``PixelData`` a memoryview of the file's bytes (or, read from
    the file's head, ``pixel_span`` and ``head``: see :func:`read_tags`)."""

    def __contains__(self, keyword: str) -> bool:
        return keyword in self.__dict__


def _string(value: Any) -> str:
    return bytes(value).decode("iso8859")  # pydicom's default_encoding for these VRs


def _decode(keyword: str, vr: bytes, count: int, value: memoryview) -> Any:
    """``value``'s bytes -> what pydicom's element value converts to (float for DS, int for IS/US,
    str for UI; a list of floats for ``count`` values), else :class:`WalkerRefused`."""
    if not len(value):
        raise WalkerRefused(f"{keyword} is empty")
    if vr == b"US":
        if len(value) != 2:
            raise WalkerRefused(f"{keyword} holds {len(value) // 2} values")
        return _U16.unpack(value)[0]
    if vr == b"UI":
        items = _string(value).rstrip("\0 ").rstrip(" \x00").split("\\")  # convert_UI, then multi_string
        if len(items) != 1:
            raise WalkerRefused(f"{keyword} holds {len(items)} values")
        return items[0]
    # DS (convert_DS_string: strip, then multi_string) and IS (multi_string), each item through
    # DSfloat / IS, which return '' for a blank item (refused here)
    text = _string(value)
    items = (text.strip() if vr == b"DS" else text).rstrip(" \x00").split("\\")
    if len(items) != max(count, 1):
        raise WalkerRefused(f"{keyword} holds {len(items)} values, the reader needs {max(count, 1)}")
    numbers = []
    for item in items:
        if not item.strip():
            raise WalkerRefused(f"{keyword} has an empty value")
        try:
            numbers.append(float(item) if vr == b"DS" else int(item))
        except ValueError:
            raise WalkerRefused(f"{keyword} value {item!r} is not what pydicom reads as a plain number") from None
    return numbers if count else numbers[0]


def _element(data: memoryview, pos: int, explicit: bool) -> tuple[int, bytes | None, int, int]:
    """(tag, VR or None, value length, value offset) of the element at ``pos``."""
    if pos + 8 > len(data):
        raise WalkerRefused(f"an element header runs past the end of the file at byte {pos}")
    group, elem = _TAG.unpack_from(data, pos)
    tag = group << 16 | elem
    if group == 0xFFFE or not explicit:  # item / delimiter tags have no VR, even in explicit VR
        return tag, None, _U32.unpack_from(data, pos + 4)[0], pos + 8
    vr = bytes(data[pos + 4:pos + 6])
    if vr in _SHORT_VRS:
        return tag, vr, _U16.unpack_from(data, pos + 6)[0], pos + 8
    if vr in _LONG_VRS:
        if pos + 12 > len(data):
            raise WalkerRefused(f"an element header runs past the end of the file at byte {pos}")
        return tag, vr, _U32.unpack_from(data, pos + 8)[0], pos + 12
    raise WalkerRefused(f"element ({group:04X},{elem:04X}) at byte {pos} has no valid explicit VR ({vr!r})")


def _skip_sequence(data: memoryview, pos: int, explicit: bool, depth: int) -> int:
    """The offset after an undefined-length sequence whose first item starts at ``pos``."""
    if depth > 32:
        raise WalkerRefused("sequences nested more than 32 deep")
    while True:
        tag, _, length, pos = _element(data, pos, False)
        if tag == _SEQUENCE_END:
            return pos
        if tag != _ITEM:
            raise WalkerRefused(f"a sequence holds tag {tag:08X} where an item should start")
        if length != _UNDEFINED:
            pos += length
            continue
        pos = _walk(data, pos, explicit, None, depth + 1)  # an undefined-length item: to its delimiter


def _walk(data: memoryview, pos: int, explicit: bool, found: dict[int, tuple[bytes | None, Any]] | None,
          depth: int = 0, size: int | None = None) -> int:
    """Walk elements from ``pos``: to the end of the file (the top level, values of the wanted tags
    put into ``found``) or, inside an undefined-length item (``found`` None), past its delimiter.
    ``data`` may be the file's head only (``size``: the whole file's): then the pixel data must
    run to the end of the file, and its value is recorded as ``(offset, length)``."""
    end = len(data)
    while pos < end:
        tag, vr, length, start = _element(data, pos, explicit)
        if tag == _ITEM_END and found is None:
            return start
        if tag >> 16 == 0xFFFE:
            raise WalkerRefused(f"item tag {tag:08X} outside a sequence at byte {pos}")
        if length == _UNDEFINED:
            if tag == _PIXEL_DATA:
                raise WalkerRefused("encapsulated (compressed) pixel data")
            if vr not in (None, b"SQ"):
                raise WalkerRefused(f"element {tag:08X} of VR {vr!r} has an undefined length")
            pos = _skip_sequence(data, start, explicit, depth)
            continue
        pos = start + length
        if pos > end:
            if found is not None and tag == _PIXEL_DATA and size is not None and pos == size:
                found[tag] = (vr, (start, length))  # the rest of the file: read by the caller
                return pos
            raise WalkerRefused(f"element {tag:08X} runs past the end of the {'file' if size is None else 'data'}")
        if found is not None and (tag in _WANTED or tag == _PIXEL_DATA):
            if tag in found:
                raise WalkerRefused(f"element {tag:08X} appears twice")
            found[tag] = (vr, data[start:pos])
    if found is None:
        raise WalkerRefused("an undefined-length item runs past the end of the file")
    return pos


def read_tags(data: Any, size: int | None = None) -> DicomTags:
    """The native reader's tags of one DICOM file given as bytes (or any buffer);
    :class:`WalkerRefused` for anything the walker leaves to pydicom (the file is no DICOM file
    -- no ``DICM`` at byte 128 -- included: pydicom decides what that is).

    ``size``: ``data`` is the head of a file of ``size`` bytes. When the pixel data starts in the
    head and ends the file, ``tags.pixel_span`` is its ``(offset, length)`` in the file, ``tags.head``
    the bytes before it, and there is no ``PixelData`` (the reader reads it into place); whatever
    else does not fit in the head is refused (read the whole file then)."""
    data = memoryview(data).cast("B")
    if len(data) < 132 or bytes(data[128:132]) != b"DICM":
        raise WalkerRefused("no DICM prefix at byte 128")
    pos, syntax, media_class = 132, None, None
    while pos + 8 <= len(data) and _U16.unpack_from(data, pos)[0] == 0x0002:  # the file meta group
        tag, vr, length, start = _element(data, pos, True)
        if length == _UNDEFINED or start + length > len(data):
            raise WalkerRefused("a malformed file meta element")
        if tag == _META_TS:
            syntax = _decode("TransferSyntaxUID", b"UI", 0, data[start:start + length])
        elif tag == 0x00020002 and length:
            media_class = _string(data[start:start + length]).rstrip("\0 ")
        pos = start + length
    if syntax not in (EXPLICIT_LE, IMPLICIT_LE):
        raise WalkerRefused(f"transfer syntax {syntax!r}")
    if media_class == DICOMDIR:
        raise WalkerRefused("a DICOMDIR")
    explicit = syntax == EXPLICIT_LE
    if pos + 6 <= len(data) and not explicit and all(0x40 < b < 0x5B for b in data[pos + 4:pos + 6]):
        # pydicom's test (_is_implicit_vr): two capital letters where a length would be: explicit VR
        raise WalkerRefused("implicit VR declared, explicit VR found (pydicom switches; the walker does not)")
    found: dict[int, tuple[bytes | None, Any]] = {}
    _walk(data, pos, explicit, found, size=None if size is None or size == len(data) else size)
    if _PIXEL_DATA not in found:
        raise WalkerRefused("no PixelData")
    tags = DicomTags(file_meta=SimpleNamespace(TransferSyntaxUID=syntax))
    for tag, (vr, value) in found.items():
        if tag == _PIXEL_DATA:
            if vr not in (None, b"OB", b"OW"):
                raise WalkerRefused(f"PixelData of VR {vr!r}")
            if isinstance(value, tuple):
                tags.pixel_span, tags.head = value, bytes(data[:value[0]])
            else:
                tags.PixelData = value
            continue
        keyword, want_vr, count = _WANTED[tag]
        if vr is not None and vr != want_vr:
            raise WalkerRefused(f"{keyword} has VR {vr!r}, not {want_vr!r}")
        setattr(tags, keyword, _decode(keyword, want_vr, count, value))
    return tags
