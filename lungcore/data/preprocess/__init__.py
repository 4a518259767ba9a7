"""Preprocessing of cohort CTs (read, reorient, resample + HU window + crop) with an on-disk cache.

The hot step is one call of :func:`lungcore.ops.resample_crop` per image: resampling to the
target spacing, the HU window (clip to ``window`` and scale to [0, 1]: the normalisation) and
the crop of a fixed box around each lesion centre happen in one pass that writes only the
crops. All boxes of one image (several nodules of a scan) go in the same call, so an image is
read once. Before that the volume is reoriented to lungcore's canonical axial frame (depth
towards the head, height towards the back, width towards the patient's left) by axis flips and
permutations only, so crops of all patients share an orientation.

The cache (one ``.npz`` per image content, centre and settings; atomic; checked on every read) is
described in :mod:`lungcore.data.preprocess.crops`.

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

Modules: :mod:`~lungcore.data.preprocess.settings` (settings, reorientation),
:mod:`~lungcore.data.preprocess.crops` (:class:`Preprocessor`: crops and their cache),
:mod:`~lungcore.data.preprocess.pool` (:func:`preprocess_manifest`: shards and worker processes).
"""
from lungcore.data.preprocess.crops import CACHE_VERSION, PreprocessStats, Preprocessor, source_digest
from lungcore.data.preprocess.pool import (IMAGE_ERRORS, available_cores, default_workers, preprocess_manifest,
                                           shard_from_env)
from lungcore.data.preprocess.settings import PreprocessSettings, canonical_orientation

__all__ = ["CACHE_VERSION", "IMAGE_ERRORS", "PreprocessSettings", "PreprocessStats", "Preprocessor", "available_cores",
           "canonical_orientation", "default_workers", "preprocess_manifest", "shard_from_env", "source_digest"]
