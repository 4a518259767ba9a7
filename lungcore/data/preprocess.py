"""Preprocessing of cohort CTs (read, reorient, resample + HU window + crop) with an on-disk cache.

The hot step is one call of :func:`lungcore.ops.resample_crop` per image: resampling to the
target spacing, the HU window (clip to ``window`` and scale to [0, 1]: the normalisation) and
the crop of a fixed box around each lesion centre happen in one pass that writes only the
crops. All boxes of one image (several nodules of a scan) go in the same call, so an image is
read once. Before that the volume is reoriented to lungcore's canonical axial frame (depth
towards the head, height towards the back, width towards the patient's left) by axis flips and
permutations only, so crops of all patients share an orientation.

The cache stores one ``.npz`` per (image content, centre, settings): its name is a hash of the
source file's bytes (all files of a DICOM series), the centre and the settings, so a changed
scan or changed settings never hit a stale entry. Entries are written to a temporary name and
renamed (a crash never leaves half an entry); the zip CRC and the stored metadata are checked on
every read and a corrupted or mismatching entry is rebuilt. Content digests are memoised by
(size, mtime) of the source in ``CACHE/sources/`` so a cached epoch does not rehash every scan.

A cohort is filled by :func:`preprocess_manifest` (``lungcore preprocess``; ``lungcore train``
calls it before its first epoch): its shard of the images (``--shard i/n`` or torchrun's
RANK/WORLD_SIZE: the engine across machines sharing one cache folder) spread over a pool of
``workers`` processes on this machine (the engine across cores), one report per shard.

Example:
    >>> import tempfile
    >>> from lungcore.data import PreprocessSettings, Preprocessor, synth_cohort, read_manifest
    >>> d = tempfile.mkdtemp()
    >>> info = synth_cohort("nodules", d, n=2, preset="tiny", seed=0)
    >>> m = read_manifest(info["manifest"])
    >>> pre = Preprocessor(PreprocessSettings.csfnet(), cache_dir=d + "/cache")
    >>> pre.crop(m.images[0][0], m.centres[0, 0]).shape
    (16, 64, 64)
"""
from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import time
import uuid
import zipfile
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from lungcore.data.io import CTImage, read_ct

CACHE_VERSION = 1


@dataclass(frozen=True)
class PreprocessSettings:
    """Target grid and crop. ``spacing`` (sz, sy, sx) mm; ``crop`` (D, H, W) output voxels;
    ``window`` (low, high) HU mapped to [0, 1]; ``order`` 0 nearest / 1 trilinear / 3 cubic; ``fill`` HU
    outside the scan; ``canonical`` reorients to the canonical axial frame first."""

    spacing: tuple[float, float, float] = (1.0, 1.0, 1.0)
    crop: tuple[int, int, int] = (16, 64, 64)
    window: tuple[float, float] = (-1200.0, 600.0)
    order: int = 1
    fill: float = -1024.0
    canonical: bool = True

    def __post_init__(self) -> None:
        spacing = tuple(float(s) for s in (self.spacing if np.ndim(self.spacing) else (self.spacing,) * 3))
        crop = tuple(int(c) for c in (self.crop if np.ndim(self.crop) else (self.crop,) * 3))
        if len(spacing) != 3 or not all(np.isfinite(spacing)) or min(spacing) <= 0:
            raise ValueError(f"spacing must be 3 positive numbers (sz, sy, sx) in mm, got {self.spacing!r}")
        if len(crop) != 3 or min(crop) < 1:
            raise ValueError(f"crop must be 3 positive integers (D, H, W), got {self.crop!r}")
        window = tuple(float(w) for w in self.window)
        if len(window) != 2 or not window[0] < window[1]:
            raise ValueError(f"window must be (low, high) HU with low < high, got {self.window!r}")
        if self.order not in (0, 1, 3):
            raise ValueError(f"order must be 0 (nearest), 1 (trilinear) or 3 (cubic B-spline), got {self.order!r}")
        object.__setattr__(self, "spacing", spacing)
        object.__setattr__(self, "crop", crop)
        object.__setattr__(self, "window", window)
        object.__setattr__(self, "fill", float(self.fill))

    @classmethod
    def csfnet(cls) -> PreprocessSettings:
        """CSF-Net: 1 mm isotropic, lung window [-1200, 600] HU, 16 x 64 x 64 around the nodule."""
        return cls(spacing=(1.0, 1.0, 1.0), crop=(16, 64, 64), window=(-1200.0, 600.0))

    @classmethod
    def cmml(cls) -> PreprocessSettings:
        """CMML (our choice; the paper is silent): 2 x 1 x 1 mm, window [-1000, 400] HU,
        32 x 128 x 128 around the tumour."""
        return cls(spacing=(2.0, 1.0, 1.0), crop=(32, 128, 128), window=(-1000.0, 400.0))

    @classmethod
    def for_kind(cls, kind: str) -> PreprocessSettings:
        from lungcore.data.schema import canonical_kind

        return cls.csfnet() if canonical_kind(kind) == "nodules" else cls.cmml()

    def to_dict(self) -> dict[str, Any]:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> PreprocessSettings:
        return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in d.items()})


def canonical_orientation(image: CTImage) -> CTImage:
    """``image`` with array axes permuted/flipped so that depth, height and width run along world
    +z (superior), +y (posterior) and +x (left) as closely as the scan allows. No resampling: the
    array is a strided view and the affine follows it. Obliquely tilted scans keep their tilt."""
    a = image.affine
    world_of_axis = np.argmax(np.abs(a[:3, :3]), axis=0)  # dominant world axis of each array axis
    if sorted(world_of_axis.tolist()) != [0, 1, 2]:
        return image
    perm = [int(np.flatnonzero(world_of_axis == w)[0]) for w in (2, 1, 0)]
    array = image.array.transpose(perm)
    affine = a.copy()
    affine[:, :3] = a[:, perm]
    flips = []
    for k in range(3):
        if affine[2 - k, k] < 0:
            flips.append(k)
            affine[:3, 3] += affine[:3, k] * (array.shape[k] - 1)
            affine[:3, k] *= -1
    if flips:
        array = np.flip(array, axis=flips)
    return CTImage(array=array, affine=affine)


@dataclass
class PreprocessStats:
    """What a :class:`Preprocessor` did: cache hits, misses, rebuilt entries and where time went."""

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
    problems: list[str] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        return {k: (round(v, 4) if isinstance(v, float) else v) for k, v in asdict(self).items() if k != "problems"}


def _stat_signature(path: Path) -> str:
    files = sorted(p for p in path.iterdir() if p.is_file()) if path.is_dir() else [path]
    parts = []
    for p in files:
        st = p.stat()
        parts.append(f"{p.name}:{st.st_size}:{st.st_mtime_ns}")
    return "|".join(parts)


def source_digest(path: str | Path) -> str:
    """blake2b of the image's bytes (a DICOM series: every file's name and bytes, sorted)."""
    path = Path(path)
    h = hashlib.blake2b(digest_size=20)
    files = sorted(p for p in path.iterdir() if p.is_file() and not p.name.startswith(".")) if path.is_dir() else [path]
    for p in files:
        if path.is_dir():
            h.update(p.name.encode() + b"\0")
        with open(p, "rb") as f:
            while chunk := f.read(1 << 22):
                h.update(chunk)
    return h.hexdigest()


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
            memo = self._digests.get(str(path.resolve()))
            if memo and memo[0] == sig:
                return memo[1]
            record = self._source_record(path)
            if record:
                digest = record["digest"]
            else:
                digest = source_digest(path)
                if self.cache_dir is not None and remember:
                    record = {"path": str(path.resolve()), "signature": sig, "digest": digest}
                    _atomic_write(self._source_record_path(path), json.dumps(record).encode())
            self._digests[str(path.resolve())] = (sig, digest)
            return digest
        finally:
            self.stats.hash_s += time.perf_counter() - t0

    def _source_record_path(self, path: Path) -> Path:
        assert self.cache_dir is not None
        return self.cache_dir / "sources" / (hashlib.blake2b(str(path.resolve()).encode(),
                                                             digest_size=16).hexdigest() + ".json")

    def _source_record(self, path: Path) -> dict[str, Any] | None:
        """The memo ``{path, signature, digest}`` of ``path`` if it matches the file's size and mtime."""
        if self.cache_dir is None:
            return None
        try:
            record = json.loads(self._source_record_path(path).read_text())
        except (OSError, ValueError):
            return None
        return record if isinstance(record, dict) and record.get("signature") == _stat_signature(path) else None

    def key(self, digest: str, centre: np.ndarray | None, frame: str) -> str:
        c = "none" if centre is None else ",".join(f"{v:.4f}" for v in np.asarray(centre, dtype=np.float64))
        text = f"v{CACHE_VERSION}|{digest}|{frame}:{c}|{self._settings_json}"
        return hashlib.blake2b(text.encode(), digest_size=20).hexdigest()

    def entry_path(self, key: str) -> Path:
        assert self.cache_dir is not None
        return self.cache_dir / key[:2] / f"{key}.npz"

    # -- cache entries --------------------------------------------------------------------------
    def _load_entry(self, key: str, meta_expected: dict[str, Any]) -> np.ndarray | None:
        path = self.entry_path(key)
        if not path.is_file():
            return None
        t0 = time.perf_counter()
        try:
            with np.load(path, allow_pickle=False) as z:
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
    def read(self, path: str | Path) -> tuple[CTImage, CTImage]:
        """(the image as stored, the image reoriented per the settings), timed in ``stats.read_s``."""
        t0 = time.perf_counter()
        # native (no MONAI, same values), as stored, no transpose copy; DICOM integer HU as int16
        source = read_ct(path, dtype=None, contiguous=False, reader="auto", int16=True)
        image = canonical_orientation(source) if self.settings.canonical else source
        self.stats.images_read += 1
        self.stats.read_s += time.perf_counter() - t0
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
        path = Path(path)
        if centres is None:
            centres = [None]
        centres = [None if c is None or not np.all(np.isfinite(np.asarray(c, dtype=np.float64))) else
                   np.asarray(c, dtype=np.float64) for c in centres]
        out = np.empty((len(centres), *self.settings.crop), dtype=np.float32)
        todo: list[int] = list(range(len(centres)))
        keys: list[str] = []
        metas: list[dict[str, Any]] = []
        if self.cache_dir is not None:
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
            source, image = self.read(path)
            idx = np.stack([self.centre_index(image, centres[b], frame, source) for b in todo])
            n = np.asarray(image.shape, dtype=np.float64)
            outside = ((idx < -0.5) | (idx > n - 0.5)).any(axis=1)
            if outside.any():
                b = todo[int(np.flatnonzero(outside)[0])]
                raise ValueError(f"centre {np.round(centres[b], 3).tolist()} ({frame}) lies outside the image {path} "
                                 f"(voxel index (z, y, x) {np.round(idx[int(np.flatnonzero(outside)[0])], 2).tolist()},"
                                 f" shape {image.shape})")
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


def shard_from_env(shard: str | None = None) -> tuple[int, int]:
    """``"i/n"`` -> (i, n); None -> torchrun's ``RANK``/``WORLD_SIZE`` (or (0, 1))."""
    if shard is None:
        return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    try:
        i, n = (int(v) for v in str(shard).split("/"))
    except ValueError:
        raise ValueError(f"shard must look like i/n (e.g. 0/4), got {shard!r}") from None
    if n < 1 or not 0 <= i < n:
        raise ValueError(f"shard {shard!r}: need 0 <= i < n")
    return i, n


def available_cores() -> int:
    """CPU cores this process may run on (its affinity mask; ``os.cpu_count()`` where that is unknown)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):
        return max(1, os.cpu_count() or 1)


def default_workers() -> int:
    """``--workers`` default: the cores available, shared among torchrun's processes on this machine
    (``LOCAL_WORLD_SIZE``), at least 1."""
    return max(1, available_cores() // max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1") or 1)))


# -- the worker pool ---------------------------------------------------------------------------------
# One Preprocessor per worker process, built once by the pool's initializer; each task is one image
# (all its boxes) and returns what that image cost (a PreprocessStats delta), never the crops: the
# worker writes them to the cache (atomically) and the parent only counts. Workers start through
# forkserver (spawn where there is none): a fork of a parent that has run OpenMP (the C++ core, torch)
# can hang in the child, and CUDA cannot be forked.
_WORKER: Preprocessor | None = None


def _worker_init(settings: PreprocessSettings, cache_dir: str | None, device: str, verify: str,
                 threads: int) -> None:
    global _WORKER
    import torch

    torch.set_num_threads(threads)  # the C++ resampler's OpenMP team follows torch's thread count
    _WORKER = Preprocessor(settings, cache_dir=cache_dir, device=device, verify=verify)


def _worker_crops(path: str, centres: list[np.ndarray | None], frame: str) -> tuple[dict[str, Any], str | None]:
    """(stats of this image, None) or (stats, the error message) for one image in a pool worker."""
    assert _WORKER is not None
    _WORKER.stats = PreprocessStats()
    try:
        _WORKER.crops(path, centres, frame)
        error = None
    except IMAGE_ERRORS as exc:
        error = _message(exc)
    return asdict(_WORKER.stats), error


# What one bad image raises (a bad file, a bad centre, a full disk): named by its row, the rest go on.
IMAGE_ERRORS = (ValueError, OSError, RuntimeError)


def _message(exc: BaseException) -> str:
    return str(exc) if type(exc) is ValueError else f"{type(exc).__name__}: {exc}"


def _merge_stats(total: PreprocessStats, part: dict[str, Any]) -> None:
    for k, v in part.items():
        if k == "problems":
            total.problems.extend(v)
        else:
            setattr(total, k, getattr(total, k) + v)


def _pool_context():
    import multiprocessing as mp

    try:
        ctx = mp.get_context("forkserver")
    except ValueError:  # no forkserver (Windows, macOS without it)
        return mp.get_context("spawn")
    # the forkserver imports these once (a missing one is skipped); each worker forked from it starts
    # with them loaded instead of importing torch, nibabel and pydicom again (seconds per worker)
    ctx.set_forkserver_preload(["lungcore.data.preprocess", "lungcore.ops", "nibabel", "nibabel.nifti1", "pydicom",
                                "pydicom.filereader", "isal.isal_zlib", "zlib_ng.zlib_ng"])
    return ctx


def preprocess_manifest(manifest: Any, preprocessor: Preprocessor, *, shard: tuple[int, int] = (0, 1),
                        progress: bool = False, workers: int = 1, keep_going: bool = False,
                        threads: int | None = None) -> dict[str, Any]:
    """Fill the cache for every (image, centre) of ``manifest`` that falls in ``shard``.

    Images are dealt to shards by their sorted path (``k % n == i``), so ``n`` processes on any
    number of machines sharing the cache folder cover the cohort exactly once. All boxes of an
    image are cropped in one call. ``workers`` > 1 spreads this shard's images over that many
    processes on this machine (each with ``threads`` threads for the resampler; default: the cores
    available divided among the workers); the report is still one: counts, wall seconds, CTs/s,
    and the time split (summed over the workers: worker-seconds). A bad image raises a ``ValueError``
    naming its manifest row, column and path; with ``keep_going`` it is listed under ``failed``
    instead and every other image is still done. The cache stays atomic (each entry is written
    under a temporary name and renamed, so concurrent workers and machines never see half of one).

    Example:
        >>> import tempfile
        >>> from lungcore.data import PreprocessSettings, Preprocessor, synth_cohort, read_manifest
        >>> d = tempfile.mkdtemp()
        >>> m = read_manifest(synth_cohort("nodules", d, n=2, preset="tiny", seed=0)["manifest"])
        >>> pre = Preprocessor(PreprocessSettings.csfnet(), cache_dir=d + "/cache")
        >>> report = preprocess_manifest(m, pre, workers=1)
        >>> report["images"], report["boxes"], report["failed"]
        (4, 4, [])
    """
    from tqdm import tqdm

    if int(workers) != workers or workers < 1:
        raise ValueError(f"workers must be a positive integer, got {workers!r}")
    workers = int(workers)
    if workers > 1 and preprocessor.cache_dir is None:
        raise ValueError("workers > 1 needs a cache folder: the workers hand their crops over through it")
    if threads is not None and (int(threads) != threads or threads < 1):
        raise ValueError(f"threads must be a positive integer, got {threads!r}")
    i, n = shard
    jobs: dict[Path, list[tuple[int, int]]] = {}
    for r, paths in enumerate(manifest.images):
        for t, p in enumerate(paths):
            if p is not None:
                jobs.setdefault(Path(p), []).append((r, t))
    images = sorted(jobs, key=str)[i::n]
    frame = manifest.schema.centre_frame
    failed: list[dict[str, Any]] = []

    def where(path: Path) -> str:
        r, t = jobs[path][0]
        return f"row {manifest.rows[r]}, column {manifest.schema.image_columns[t]!r}, value {str(path)!r}"

    def fail(path: Path, message: str) -> None:
        if not keep_going:
            raise ValueError(f"{where(path)}: {message}")
        r, t = jobs[path][0]
        failed.append({"row": manifest.rows[r], "column": manifest.schema.image_columns[t], "path": str(path),
                       "error": message})

    def centres_of(path: Path) -> list[np.ndarray | None]:
        return [manifest.centres[r, t] for r, t in jobs[path]]

    workers = min(workers, max(1, len(images)))
    t0 = time.perf_counter()
    bar = tqdm(total=len(images), desc=f"preprocess {i}/{n}", unit="CT", disable=not progress)
    try:
        if workers == 1:
            with _torch_threads(threads):
                for path in images:
                    try:
                        preprocessor.crops(path, centres_of(path), frame)
                    except IMAGE_ERRORS as exc:
                        fail(path, _message(exc))
                    bar.update()
        else:
            _run_pool(preprocessor, images, centres_of, frame, workers,
                      threads or max(1, available_cores() // workers), fail, bar)
    finally:
        bar.close()
    wall = time.perf_counter() - t0
    s = preprocessor.stats
    return {"shard": f"{i}/{n}", "workers": workers, "images": len(images),
            "boxes": sum(len(jobs[p]) for p in images), "seconds": round(wall, 3),
            "volumes_per_s": round(len(images) / wall, 2) if wall > 0 else None,
            **s.as_dict(), "failed": failed}


@contextlib.contextmanager
def _torch_threads(threads: int | None) -> Iterator[None]:
    """torch's (and so the C++ resampler's) thread count set to ``threads`` inside the block; None: unchanged."""
    if threads is None:
        yield
        return
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(int(threads))
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _run_pool(preprocessor: Preprocessor, images: list[Path], centres_of: Any, frame: str, workers: int,
              threads: int, fail: Any, bar: Any) -> None:
    """The images over a pool of ``workers`` processes; stats merged into ``preprocessor.stats``."""
    from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
    from concurrent.futures.process import BrokenProcessPool

    p = preprocessor
    cache = None if p.cache_dir is None else str(p.cache_dir)
    with ProcessPoolExecutor(max_workers=workers, mp_context=_pool_context(), initializer=_worker_init,
                             initargs=(p.settings, cache, p.device, p.verify, threads)) as pool:
        # at most 2 tasks per worker in flight: a failure stops the rest quickly, memory stays bounded
        todo = iter(images)
        running: dict[Any, Path] = {}
        try:
            while True:
                while len(running) < 2 * workers:
                    path = next(todo, None)
                    if path is None:
                        break
                    running[pool.submit(_worker_crops, str(path), centres_of(path), frame)] = path
                if not running:
                    break
                done, _ = wait(running, return_when=FIRST_COMPLETED)
                for future in done:
                    path = running.pop(future)
                    try:
                        part, error = future.result()
                    except BrokenProcessPool:
                        busy = ", ".join(str(q) for q in [path, *running.values()])
                        raise RuntimeError(
                            f"a preprocessing worker died while these images were in progress: {busy}. Out of "
                            "memory? Rerun with fewer workers. From a script: workers start by forkserver, which "
                            "imports the script again, so its top-level code must sit under "
                            "`if __name__ == '__main__':`") from None
                    _merge_stats(p.stats, part)
                    if error is not None:
                        fail(path, error)
                    bar.update()
        except BaseException:
            for future in running:
                future.cancel()
            raise
