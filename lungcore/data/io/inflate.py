"""gzip inflation of a ``.nii.gz`` straight into a numpy array: the file memory-mapped, inflated
by python-isal, else zlib-ng, else zlib (:func:`gunzip`).

Example:
    >>> import gzip, tempfile
    >>> from pathlib import Path
    >>> path = Path(tempfile.mkdtemp()) / "x.gz"
    >>> _ = path.write_bytes(gzip.compress(bytes(range(10))))
    >>> gunzip(path, 2, 5).tolist()
    [2, 3, 4, 5, 6]
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

# gzip inflaters, fastest first (measured on a 160 x 512 x 512 int16 .nii.gz, 2 cores: python-isal
# about 1.6-2x zlib, zlib-ng between; benchmarks/bench_cohort_scale.py measures them again on every
# run). LUNGCORE_INFLATER=isal|zlib-ng|zlib forces one (tests, benchmarks).
INFLATERS = ("isal", "zlib-ng", "zlib")


def inflater() -> tuple[str, Any]:
    """(name, module) of the inflater ``gunzip`` uses: the first of :data:`INFLATERS` installed,
    or the one ``LUNGCORE_INFLATER`` names (an error if that one is not installed)."""
    import os

    forced = os.environ.get("LUNGCORE_INFLATER", "")
    if forced and forced not in INFLATERS:
        raise ValueError(f"LUNGCORE_INFLATER must be one of {INFLATERS}, got {forced!r}")
    for name in ((forced,) if forced else INFLATERS):
        try:
            if name == "isal":
                from isal import isal_zlib as module
            elif name == "zlib-ng":
                from zlib_ng import zlib_ng as module
            else:
                import zlib as module
        except ImportError:
            if forced:
                raise ValueError(f"LUNGCORE_INFLATER={forced}: that package is not installed") from None
            continue
        return name, module
    raise AssertionError("zlib is always there")


def gunzip(path: Path, offset: int, nbytes: int, source_hash: Any = None) -> np.ndarray:
    """Bytes ``[offset, offset + nbytes)`` of the gzip file ``path`` decompressed into a fresh,
    writable uint8 array (multi-member files too). ``source_hash``
    (:class:`~lungcore.data.io.digest.SourceHash`): fed the file's compressed bytes from the mapping.

    Copies: the file is memory-mapped (its compressed bytes are never copied); python-isal and
    zlib-ng inflate straight into the returned array (their C gzip reader's ``readinto``): each
    byte of the volume is written once. The zlib fallback inflates 256 KiB of input at a time into
    a bytes object and copies that into place: one extra pass over the volume, no full-size
    temporary.
    """
    import mmap

    name, module = inflater()
    out = np.empty(nbytes, dtype=np.uint8)
    with open(path, "rb") as f:
        size = f.seek(0, 2)
        if size == 0:
            raise ValueError(f"CT image {path} is truncated: the file is empty")
        mapped = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
    data = memoryview(mapped)
    try:
        if source_hash is not None:
            source_hash.update(path, data)
        if hasattr(module, "_GzipReader"):
            filled = _inflate_reader(module, data, out, offset, path)
        else:
            filled = _inflate_chunks(module, data, out, offset, path)
    finally:
        data.release()
        try:
            mapped.close()
        except BufferError:  # a view still alive (an exception's frame): unmapped when it is collected
            pass
    if filled < nbytes:
        raise ValueError(f"CT image {path} is truncated: {offset + filled} bytes of data after decompression, "
                         f"the header needs {offset + nbytes}")
    return out


def _inflate_reader(module: Any, data: memoryview, out: np.ndarray, offset: int, path: Path) -> int:
    """python-isal / zlib-ng: their C gzip reader over the mapped file, ``readinto`` the array."""
    reader = module._GzipReader(data)
    target = memoryview(out)
    try:
        head = memoryview(bytearray(offset)) if offset else None
        skipped = 0
        while head is not None and skipped < offset:
            k = reader.readinto(head[skipped:])
            if not k:
                return 0
            skipped += k
        filled = 0
        while filled < len(out):
            k = reader.readinto(target[filled:])
            if not k:
                break
            filled += k
        tail = memoryview(bytearray(1 << 16))
        while reader.readinto(tail):  # to the end of the stream: its CRC checks (the trailer is 8 bytes)
            pass
        return filled
    except EOFError:  # the stream ends before its end-of-stream marker
        raise ValueError(f"CT image {path} is truncated: its gzip stream ends early") from None
    except (OSError, module.error) as exc:  # BadGzipFile (an OSError), a corrupt deflate stream
        raise ValueError(f"CT image {path}: corrupt gzip data: {exc}") from None
    finally:
        target.release()
        reader.close()
        del reader


def _inflate_chunks(module: Any, data: memoryview, out: np.ndarray, offset: int, path: Path) -> int:
    """zlib (no gzip reader in C): ``decompressobj`` fed 256 KiB at a time, each piece copied into place."""
    nbytes = len(out)
    skip, filled, pos, step = offset, 0, 0, 1 << 18
    d = module.decompressobj(31)
    while pos < len(data):  # to the end of the input: every member's CRC checks (after the volume: bytes)
        with data[pos:pos + step] as piece:  # released at once: the mapping closes only without views
            try:
                block = d.decompress(piece)
            except module.error as exc:
                raise ValueError(f"CT image {path}: corrupt gzip data: {exc}") from None
            pos += len(piece)
        if d.eof:  # end of a gzip member: the rest of the input starts the next one
            pos -= len(d.unused_data)
            d = module.decompressobj(31)
        if skip:
            cut = min(skip, len(block))
            block, skip = block[cut:], skip - cut
        take = min(len(block), nbytes - filled)
        if take:
            out[filled:filled + take] = np.frombuffer(block, dtype=np.uint8, count=take)
            filled += take
    return filled
