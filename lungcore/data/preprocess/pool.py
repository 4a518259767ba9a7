"""A cohort's crops into the cache: :func:`preprocess_manifest` deals the images of a manifest to
shards (machines sharing one cache folder) and, within a shard, to a pool of worker processes.

Example: see :func:`preprocess_manifest`.
"""
from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Iterator
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np

from lungcore.data.preprocess.crops import PreprocessStats, Preprocessor
from lungcore.data.preprocess.settings import PreprocessSettings

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
        _not_the_images_fault(exc)
        error = _message(exc)
    return asdict(_WORKER.stats), error


# What one bad image raises (a bad file, whatever type its reader raises; a bad centre; a full disk):
# named by its row, the rest go on.
IMAGE_ERRORS = (Exception,)


def _not_the_images_fault(exc: BaseException) -> None:
    """Re-raise what no image causes (a forced backend this machine cannot run): it is one error
    of the command, not one problem per manifest row."""
    from lungcore.backend import BackendUnavailable

    if isinstance(exc, BackendUnavailable):
        raise exc


def _message(exc: BaseException) -> str:
    return str(exc) if type(exc) is ValueError else f"{type(exc).__name__}: {exc}"


def _merge_stats(total: PreprocessStats, part: dict[str, Any]) -> None:
    for k, v in part.items():
        if k == "problems":
            total.problems.extend(v)
        else:
            setattr(total, k, getattr(total, k) + v)


# the readers (what a worker that only reads images needs)
READ_PRELOAD = ("lungcore.data.io", "nibabel", "nibabel.nifti1", "pydicom", "pydicom.filereader", "isal.isal_zlib",
                "zlib_ng.zlib_ng")
# the readers and the resampler (a worker that crops). torch._dynamo: torch imports it on the first call
# of a custom op (the resampler), about 1 s a worker otherwise (2w passes of cohort_scale: 2.4 s of
# resampling against 0.17 s in one worker)
CROP_PRELOAD = ("lungcore.data.preprocess.pool", "lungcore.ops", "torch._dynamo", *READ_PRELOAD)


def _pool_context(preload: tuple[str, ...] = CROP_PRELOAD):
    import multiprocessing as mp

    try:
        ctx = mp.get_context("forkserver")
    except ValueError:  # no forkserver (Windows, macOS without it)
        return mp.get_context("spawn")
    # the forkserver imports these once (a missing one is skipped); each worker forked from it starts
    # with them loaded instead of importing torch, nibabel and pydicom again (seconds per worker). The
    # forkserver is one per process, started by the first pool: a later pool's list has no effect.
    ctx.set_forkserver_preload(list(preload))
    return ctx


def _image_cells(manifest: Any) -> dict[Path, list[tuple[int, int]]]:
    """(row index, image column index) of every image cell, by image (one scan, several nodules: one image)."""
    jobs: dict[Path, list[tuple[int, int]]] = {}
    for r, paths in enumerate(manifest.images):
        for t, p in enumerate(paths):
            if p is not None:
                jobs.setdefault(Path(p), []).append((r, t))
    return jobs


def preprocess_manifest(manifest: Any, preprocessor: Preprocessor, *, shard: tuple[int, int] = (0, 1),
                        progress: bool = False, workers: int = 1, keep_going: bool = False,
                        threads: int | None = None) -> dict[str, Any]:
    """Fill the cache for every (image, centre) of ``manifest`` that falls in ``shard``.

    Images are dealt to shards by their sorted path (``k % n == i``), so ``n`` processes on any
    number of machines sharing the cache folder cover the cohort exactly once. All boxes of an
    image are cropped in one call. ``workers`` > 1 spreads this shard's images over that many
    processes on this machine (each with ``threads`` threads for the resampler; default: the cores
    available divided among the workers); the report is still one: counts, wall seconds, CTs/s,
    and the time split (summed over the workers: worker-seconds). When every crop is already in the
    cache (checked by size and modification time, ``verify="stat"``), no pool is started: the
    entries are loaded in this process (``workers`` 1 and ``all_cached`` True in the report). A bad
    image raises a ``ValueError`` naming its manifest row, column and path; with ``keep_going`` it is listed under ``failed``
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

    from lungcore.usage import is_integer

    if not is_integer(workers, 1):
        raise ValueError(f"workers must be a positive integer, got {workers!r}")
    workers = int(workers)
    if workers > 1 and preprocessor.cache_dir is None:
        raise ValueError("workers > 1 needs a cache folder: the workers hand their crops over through it")
    if threads is not None and not is_integer(threads, 1):
        raise ValueError(f"threads must be a positive integer, got {threads!r}")
    i, n = shard
    jobs = _image_cells(manifest)
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
    # every crop already cached: loading them here beats starting worker processes (seconds each)
    all_cached = workers > 1 and _all_cached(preprocessor, images, centres_of, frame)
    if all_cached:
        workers = 1
    bar = tqdm(total=len(images), desc=f"preprocess {i}/{n}", unit="CT", disable=not progress)
    try:
        if workers == 1:
            with _torch_threads(threads):
                for path in images:
                    try:
                        preprocessor.crops(path, centres_of(path), frame)
                    except IMAGE_ERRORS as exc:
                        _not_the_images_fault(exc)
                        fail(path, _message(exc))
                    bar.update()
        else:
            _run_pool(preprocessor, images, centres_of, frame, workers,
                      threads or max(1, available_cores() // workers), fail, bar)
    finally:
        bar.close()
    wall = time.perf_counter() - t0
    s = preprocessor.stats
    failed_paths = {f["path"] for f in failed}
    return {"shard": f"{i}/{n}", "workers": workers, "images": len(images),
            # crops of the images that did not fail (--keep-going lists those in "failed")
            "boxes": sum(len(jobs[p]) for p in images if str(p) not in failed_paths),
            "seconds": round(wall, 3),
            "volumes_per_s": round(len(images) / wall, 2) if wall > 0 else None,
            "all_cached": all_cached, **s.as_dict(), "failed": failed}


def _all_cached(preprocessor: Preprocessor, images: list[Path], centres_of: Any, frame: str) -> bool:
    """True when every box of every image has a cache entry, by a cheap check (``verify="stat"``: the
    sources' size and modification time against their memo, then the entries' names; stops at the
    first miss). ``verify="content"`` would hash every source here, what the pool is for: False."""
    if preprocessor.verify != "stat" or preprocessor.cache_dir is None:
        return False
    try:
        return all(preprocessor.cached(path, centres_of(path), frame) for path in images)
    except OSError:  # a source gone or unreadable: the pool names it by its row
        return False


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
    p = preprocessor

    def done(path: Path, result: tuple[dict[str, Any], str | None]) -> None:
        part, error = result
        _merge_stats(p.stats, part)
        if error is not None:
            fail(path, error)
        bar.update()

    cache = None if p.cache_dir is None else str(p.cache_dir)
    map_images(_worker_crops, images, lambda path: (centres_of(path), frame), workers, done,
               initializer=_worker_init, initargs=(p.settings, cache, p.device, p.verify, threads))


def map_images(task: Any, images: list[Path], args_of: Any, workers: int, done: Any, *,
               initializer: Any = None, initargs: tuple[Any, ...] = (),
               preload: tuple[str, ...] = CROP_PRELOAD) -> None:
    """``done(path, task(str(path), *args_of(path)))`` for every image, the tasks run by a pool of
    ``workers`` processes (forkserver preloading the modules ``preload``) and ``done`` called in this process
    as each finishes (in completion order). ``task`` must be a module-level function (workers import it).
    At most two tasks per worker are in flight: an exception from ``done`` stops the rest quickly and
    memory stays bounded. A worker that dies (out of memory) is a ``RuntimeError`` naming the images
    in progress.
    """
    from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
    from concurrent.futures.process import BrokenProcessPool

    with ProcessPoolExecutor(max_workers=workers, mp_context=_pool_context(preload), initializer=initializer,
                             initargs=initargs) as pool:
        todo = iter(images)
        running: dict[Any, Path] = {}
        try:
            while True:
                while len(running) < 2 * workers:
                    path = next(todo, None)
                    if path is None:
                        break
                    running[pool.submit(task, str(path), *args_of(path))] = path
                if not running:
                    break
                finished, _ = wait(running, return_when=FIRST_COMPLETED)
                for future in finished:
                    path = running.pop(future)
                    try:
                        result = future.result()
                    except BrokenProcessPool:
                        busy = ", ".join(str(q) for q in [path, *running.values()])
                        raise RuntimeError(
                            f"a worker process died while these images were in progress: {busy}. Out of "
                            "memory? Rerun with fewer workers. From a script: workers start by forkserver, which "
                            "imports the script again, so its top-level code must sit under "
                            "`if __name__ == '__main__':`") from None
                    done(path, result)
        except BaseException:
            for future in running:
                future.cancel()
            raise
