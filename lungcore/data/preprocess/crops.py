"""Windowed crops of a CT around lesion centres, cached on disk: :class:`Preprocessor`.

The cache stores one ``.npz`` per (image content, centre, settings): its name is a hash of the
source file's bytes (all files of a DICOM series: :func:`~lungcore.data.io.digest.source_digest`,
sha256), the centre and the settings, so a changed scan or changed settings never hit a stale
entry. Entries are written to a temporary name and renamed (a crash never leaves half an entry);
the zip CRC and the stored metadata are checked on every read and a corrupted or mismatching entry
is rebuilt. Content digests are memoised by (size, mtime) of the source in ``CACHE/sources/`` so a
cached epoch does not rehash every scan; a source never seen before is hashed from the bytes the
reader reads (one pass over the source, not two). ``CACHE_VERSION`` 2: sha256 source digests (1
was blake2b; entries of version 1 are never hit, they are rebuilt).

Example: see :mod:`lungcore.data.preprocess`.
"""
from __future__ import annotations

import hashlib
import io
import json
import os
import time
import uuid
import zipfile
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from lungcore.data.io import CTImage, read_ct
from lungcore.data.io.digest import ALGORITHM, SourceHash, source_digest
from lungcore.data.preprocess.settings import PreprocessSettings, canonical_orientation

CACHE_VERSION = 2


@dataclass
class PreprocessStats:
    """What a :class:`Preprocessor` did: cache hits, misses, rebuilt entries and where time went
    (wall seconds per stage; ``cpu_s``: the CPU seconds :meth:`Preprocessor.crops` used, so that
    ``cpu_s`` over a pool's wall time is the cores the run actually got on a shared machine).
    ``problems``: what went wrong with the cache (a corrupt entry that was rebuilt, say).

    Example:
        >>> import tempfile
        >>> from lungcore.data.io import write_nifti
        >>> d = tempfile.mkdtemp()
        >>> path = write_nifti(f"{d}/ct.nii.gz", np.full((8, 16, 16), -1000.0), np.eye(4))
        >>> pre = Preprocessor(PreprocessSettings(spacing=2.0, crop=(4, 8, 8)), cache_dir=f"{d}/cache")
        >>> _ = pre.crop(path), pre.crop(path)        # read and cached, then taken from the cache
        >>> entry = next(Path(d, "cache").glob("*/*.npz"))
        >>> _ = entry.write_bytes(entry.read_bytes()[:100])
        >>> _ = pre.crop(path)                        # an entry cut short: rebuilt
        >>> {k: v for k, v in pre.stats.as_dict().items() if not k.endswith("_s")}   # the counts, not the timings
        {'hits': 1, 'misses': 2, 'rebuilt': 1, 'images_read': 2, 'resample_calls': 2, 'boxes_resampled': 2}
        >>> pre.stats.problems
        ['cache entry ....npz rebuilt: ValueError: not an .npz archive (a foreign or corrupt file)']
    """

    hits: int = 0
    misses: int = 0
    rebuilt: int = 0
    images_read: int = 0
    resample_calls: int = 0
    boxes_resampled: int = 0
    read_s: float = 0.0
    resample_s: float = 0.0
    hash_s: float = 0.0
    cache_io_s: float = 0.0
    cpu_s: float = 0.0
    problems: list[str] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        """The counts and times (rounded), without ``problems``: what the preprocess report holds."""
        return {k: (round(v, 4) if isinstance(v, float) else v) for k, v in asdict(self).items() if k != "problems"}


def _stat_signature(path: Path) -> str:
    files = sorted(p for p in path.iterdir() if p.is_file()) if path.is_dir() else [path]
    parts = []
    for p in files:
        st = p.stat()
        parts.append(f"{p.name}:{st.st_size}:{st.st_mtime_ns}")
    return "|".join(parts)


def _atomic_write(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp")
    with open(tmp, "wb") as f:
        f.write(data)
    os.replace(tmp, path)


class Preprocessor:
    """Turns (image, centres) into cached, windowed crops. Picklable (DataLoader workers).

    ``cache_dir`` None disables the cache. ``device``: ``"cpu"``, ``"cuda"`` or ``"auto"`` (CUDA
    when available): where :func:`lungcore.ops.resample_crop` runs. ``verify``: ``"stat"``
    (default) memoises content digests by file size and mtime; ``"content"`` rehashes every time.
    What it did (cache hits and misses, time per stage) accumulates in ``stats``
    (:class:`PreprocessStats`).

    Example:
        >>> import tempfile
        >>> from lungcore.data.io import write_nifti
        >>> from lungcore.data.io.image import XYZ_TO_ZYX
        >>> d = tempfile.mkdtemp()
        >>> volume = np.full((8, 16, 16), -1000.0)   # air around ...
        >>> volume[3:5, 6:10, 6:10] = 0.0            # ... a 2 x 4 x 4 mm block of soft tissue
        >>> path = write_nifti(f"{d}/ct.nii.gz", volume, XYZ_TO_ZYX)   # 1 mm voxels at LPS (x, y, z) = (x, y, z) mm
        >>> settings = PreprocessSettings(spacing=1.0, crop=(4, 8, 8), window=(-1000, 0))
        >>> pre = Preprocessor(settings, cache_dir=f"{d}/cache")
        >>> centre = np.array([7.5, 7.5, 3.5])       # the block's middle, (x, y, z) LPS mm
        >>> crop = pre.crop(path, centre)            # the window [-1000, 0] HU scaled to [0, 1]
        >>> crop.shape, crop.dtype, crop[:, 4, 4].tolist(), crop[2, 4].tolist()
        ((4, 8, 8), dtype('float32'), [0.0, 1.0, 1.0, 0.0], [0.0, 0.0, 1.0, 1.0, 1.0, 1.0, 0.0, 0.0])
        >>> pre.cached(path, [centre]), pre.crops(path, [centre, None]).shape   # None: the volume's middle
        (True, (2, 4, 8, 8))
        >>> pre.crop(path, np.array([100.0, 0.0, 0.0]))
        Traceback (most recent call last):
        ...
        ValueError: centre [100.0, 0.0, 0.0] (world) lies outside the image .../ct.nii.gz
        (voxel index (z, y, x) [0.0, 0.0, 100.0], shape (8, 16, 16))
    """

    def __init__(self, settings: PreprocessSettings | None = None, cache_dir: str | Path | None = None, *,
                 device: str = "cpu", verify: str = "stat"):
        self.settings = settings or PreprocessSettings()
        self.cache_dir = None if cache_dir is None else Path(cache_dir)
        if device not in ("cpu", "cuda", "auto"):
            raise ValueError(f"device must be 'cpu', 'cuda' or 'auto', got {device!r}")
        if verify not in ("stat", "content"):
            raise ValueError(f"verify must be 'stat' or 'content', got {verify!r}")
        self.device = device
        self.verify = verify
        self.stats = PreprocessStats()
        self._digests: dict[str, tuple[str, str]] = {}
        self._settings_json = json.dumps(self.settings.to_dict(), sort_keys=True)

    # -- keys -----------------------------------------------------------------------------------
    def digest(self, path: Path, remember: bool = True) -> str:
        """The content digest of the image at ``path`` (``verify="stat"``: memoised by size and
        mtime in ``<cache>/sources``; ``remember=False`` reads that memo but never writes it)."""
        t0 = time.perf_counter()
        path = Path(path)
        try:
            if self.verify == "content":
                return source_digest(path)
            sig = _stat_signature(path)
            digest = self._memo(path, sig)
            if digest is None:
                digest = source_digest(path)
                self._remember(path, sig, digest, remember)
            return digest
        finally:
            self.stats.hash_s += time.perf_counter() - t0

    def _memo(self, path: Path, sig: str) -> str | None:
        """The memoised digest of ``path`` if its stat signature is still ``sig`` (in this process or
        in ``<cache>/sources``), else None."""
        memo = self._digests.get(str(path.resolve()))
        if memo and memo[0] == sig:
            return memo[1]
        record = self._source_record(path, sig)
        if record:
            self._digests[str(path.resolve())] = (sig, record["digest"])
            return record["digest"]
        return None

    def _remember(self, path: Path, sig: str, digest: str, write: bool = True) -> None:
        if self.cache_dir is not None and write:
            record = {"path": str(path.resolve()), "signature": sig, "hash": ALGORITHM, "digest": digest}
            _atomic_write(self._source_record_path(path), json.dumps(record).encode())
        self._digests[str(path.resolve())] = (sig, digest)

    def _source_record_path(self, path: Path) -> Path:
        assert self.cache_dir is not None
        return self.cache_dir / "sources" / (hashlib.blake2b(str(path.resolve()).encode(),
                                                             digest_size=16).hexdigest() + ".json")

    def _source_record(self, path: Path, sig: str | None = None) -> dict[str, Any] | None:
        """The memo ``{path, signature, hash, digest}`` of ``path`` if it matches the file's size and
        mtime (``sig``, else stat now) and today's hash algorithm."""
        if self.cache_dir is None:
            return None
        try:
            record = json.loads(self._source_record_path(path).read_text())
        except (OSError, ValueError):
            return None
        if not isinstance(record, dict) or record.get("hash") != ALGORITHM:
            return None
        return record if record.get("signature") == (sig if sig is not None else _stat_signature(path)) else None

    def key(self, digest: str, centre: np.ndarray | None, frame: str) -> str:
        """The cache key of one crop: the source's digest, the centre and its frame, the settings."""
        c = "none" if centre is None else ",".join(f"{v:.4f}" for v in np.asarray(centre, dtype=np.float64))
        text = f"v{CACHE_VERSION}|{digest}|{frame}:{c}|{self._settings_json}"
        return hashlib.blake2b(text.encode(), digest_size=20).hexdigest()

    def entry_path(self, key: str) -> Path:
        """Where the cache entry of ``key`` lives (``CACHE/<2 hex>/<key>.npz``)."""
        assert self.cache_dir is not None
        return self.cache_dir / key[:2] / f"{key}.npz"

    # -- cache entries --------------------------------------------------------------------------
    def _load_entry(self, key: str, meta_expected: dict[str, Any]) -> np.ndarray | None:
        path = self.entry_path(key)
        if not path.is_file():
            return None
        t0 = time.perf_counter()
        try:
            with open(path, "rb") as f:  # one open for the check and the read
                if not zipfile.is_zipfile(f):  # np.load would read other bytes as a pickle and say so
                    raise ValueError("not an .npz archive (a foreign or corrupt file)")
                f.seek(0)
                with np.load(f, allow_pickle=False) as z:
                    meta = json.loads(bytes(z["meta"]).decode())
                    crop = z["crop"]
            if meta != meta_expected or crop.shape != tuple(self.settings.crop) or crop.dtype != np.float32:
                raise ValueError("stale entry: metadata does not match")
            return crop
        except (OSError, ValueError, KeyError, zipfile.BadZipFile, EOFError) as exc:
            self.stats.rebuilt += 1
            self.stats.problems.append(f"cache entry {path.name} rebuilt: {type(exc).__name__}: {exc}")
            try:
                path.unlink()
            except OSError:
                pass
            return None
        finally:
            self.stats.cache_io_s += time.perf_counter() - t0

    def _store_entry(self, key: str, meta: dict[str, Any], crop: np.ndarray) -> None:
        t0 = time.perf_counter()
        buf = io.BytesIO()
        np.savez(buf, crop=np.ascontiguousarray(crop, dtype=np.float32),
                 meta=np.frombuffer(json.dumps(meta, sort_keys=True).encode(), dtype=np.uint8))
        _atomic_write(self.entry_path(key), buf.getvalue())
        self.stats.cache_io_s += time.perf_counter() - t0

    # -- work -----------------------------------------------------------------------------------
    def read(self, path: str | Path, source_hash: SourceHash | None = None) -> tuple[CTImage, CTImage]:
        """(the image as stored, the image reoriented per the settings), timed in ``stats.read_s``;
        ``source_hash`` is fed the source's bytes as they are read (its time goes to ``hash_s``)."""
        t0 = time.perf_counter()
        hashed = source_hash.seconds if source_hash is not None else 0.0
        # native (no MONAI, same values), as stored, no transpose copy; DICOM integer HU as int16
        source = read_ct(path, dtype=None, contiguous=False, reader="auto", int16=True, source_hash=source_hash)
        image = canonical_orientation(source) if self.settings.canonical else source
        self.stats.images_read += 1
        hashed = source_hash.seconds - hashed if source_hash is not None else 0.0
        self.stats.read_s += time.perf_counter() - t0 - hashed
        self.stats.hash_s += hashed
        return source, image

    def centre_index(self, image: CTImage, centre: np.ndarray | None, frame: str,
                     source: CTImage | None = None) -> np.ndarray:
        """A manifest centre (x, y, z) -> (z, y, x) index of ``image`` (reoriented); None -> middle.

        ``frame="voxel"``: indices of the *source* image (before reorientation), given as (x, y, z).
        """
        if centre is None or not np.all(np.isfinite(centre)):
            return (np.asarray(image.shape, dtype=np.float64) - 1) / 2
        centre = np.asarray(centre, dtype=np.float64)
        if frame == "voxel":
            src = source if source is not None else image
            centre = src.index_to_world(centre[::-1])
        return image.world_to_index(centre)

    def _resample(self, image: CTImage, centres_zyx: np.ndarray) -> np.ndarray:
        from lungcore.ops import resample_crop

        s = self.settings
        t0 = time.perf_counter()
        volume: Any = image.array
        use_cuda = self.device == "cuda" or (self.device == "auto" and _cuda_available())
        if use_cuda:
            import torch

            volume = torch.from_numpy(np.ascontiguousarray(volume)).to("cuda", non_blocking=True)
        out = resample_crop(volume, image.spacing, s.spacing, centres_zyx, s.crop, order=s.order, fill=s.fill,
                            window=s.window, out_dtype=np.float32 if not use_cuda else None)
        if use_cuda:
            out = out.float().cpu().numpy()
        self.stats.resample_calls += 1
        self.stats.boxes_resampled += len(centres_zyx)
        self.stats.resample_s += time.perf_counter() - t0
        return np.asarray(out, dtype=np.float32)

    def crops(self, path: str | Path, centres: Sequence[np.ndarray | None] | np.ndarray | None = None,
              frame: str = "world") -> np.ndarray:
        """``(N, D, H, W)`` float32 crops of the image at ``path`` around each centre.

        ``centres``: (x, y, z) per box in ``frame`` (``"world"`` LPS mm or ``"voxel"`` source
        indices); None (or a NaN centre) crops around the middle of the volume. Cached entries are
        used where valid; the image is read (once) only if some box is missing.
        """
        cpu0 = time.process_time()
        try:
            return self._crops(Path(path), centres, frame)
        finally:
            self.stats.cpu_s += time.process_time() - cpu0

    def _crops(self, path: Path, centres: Sequence[np.ndarray | None] | np.ndarray | None, frame: str) -> np.ndarray:
        if centres is None:
            centres = [None]
        centres = [None if c is None or not np.all(np.isfinite(np.asarray(c, dtype=np.float64))) else
                   np.asarray(c, dtype=np.float64) for c in centres]
        out = np.empty((len(centres), *self.settings.crop), dtype=np.float32)
        todo: list[int] = list(range(len(centres)))
        keys: list[str] = []
        metas: list[dict[str, Any]] = []
        done: tuple[CTImage, CTImage] | None = None  # the image, when the fused hash read it
        if self.cache_dir is not None:
            sig = _stat_signature(path) if self.verify == "stat" else ""
            if self.verify == "stat" and self._memo(path, sig) is None:
                # never seen (or rewritten since): read it, hashing the bytes the reader reads
                source_hash = SourceHash(path)
                try:
                    done = self.read(path, source_hash)
                except Exception:
                    self.stats.misses += len(centres)  # no entry could be looked up: every box missed
                    raise
                t0 = time.perf_counter()
                digest = source_hash.hexdigest()
                self._remember(path, sig, digest)
                self.stats.hash_s += time.perf_counter() - t0
            else:
                digest = self.digest(path)
            todo = []
            for b, c in enumerate(centres):
                key = self.key(digest, c, frame)
                meta = {"version": CACHE_VERSION, "source_digest": digest, "frame": frame,
                        "centre": None if c is None else [round(float(v), 4) for v in c],
                        "settings": json.loads(self._settings_json)}
                keys.append(key)
                metas.append(meta)
                hit = self._load_entry(key, meta)
                if hit is None:
                    todo.append(b)
                    self.stats.misses += 1
                else:
                    out[b] = hit
                    self.stats.hits += 1
        if todo:
            source, image = done if done is not None else self.read(path)
            idx = np.stack([self.centre_index(image, centres[b], frame, source) for b in todo])
            n = np.asarray(image.shape, dtype=np.float64)
            outside = ((idx < -0.5) | (idx > n - 0.5)).any(axis=1)
            if outside.any():
                from lungcore.data.image_checks import source_index

                b = todo[int(np.flatnonzero(outside)[0])]
                stored = source_index(centres[b], frame, source.affine)  # validate's index: the file's own axes
                raise ValueError(f"centre {np.round(centres[b], 3).tolist()} ({frame}) lies outside the image {path} "
                                 f"(voxel index (z, y, x) {np.round(stored, 1).tolist()}, shape {source.shape})")
            crops = self._resample(image, idx)
            for k, b in enumerate(todo):
                out[b] = crops[k]
                if self.cache_dir is not None:
                    self._store_entry(keys[b], metas[b], crops[k])
        return out

    def cached(self, path: str | Path, centres: Sequence[np.ndarray | None], frame: str = "world") -> bool:
        """True when every crop of ``path`` around ``centres`` has a cache entry (writes nothing;
        an entry that turns out corrupt is rebuilt when it is read)."""
        if self.cache_dir is None:
            return False
        path = Path(path)
        if self.verify == "stat" and str(path.resolve()) not in self._digests and not self._source_record(path):
            return False  # never preprocessed (or rewritten since): reading beats hashing then reading
        digest = self.digest(path, remember=False)
        for c in centres:
            c = None if c is None or not np.all(np.isfinite(np.asarray(c, dtype=np.float64))) else \
                np.asarray(c, dtype=np.float64)
            if not self.entry_path(self.key(digest, c, frame)).is_file():
                return False
        return True

    def crop(self, path: str | Path, centre: np.ndarray | None = None, frame: str = "world") -> np.ndarray:
        """One ``(D, H, W)`` crop; see :meth:`crops`."""
        return self.crops(path, [centre], frame)[0]


def _cuda_available() -> bool:
    try:
        import torch

        return torch.cuda.is_available()
    except Exception:  # noqa: BLE001
        return False
