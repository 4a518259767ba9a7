"""torch Datasets of a cohort, patient-level splits, and train-time augmentation.

A sample (and, after ``torch.utils.data.default_collate``, a batch) holds exactly the tensors of
DESIGN.md "Tensors between the data layer and the models":

- survival (CMML): ``ct`` (1, D, H, W), ``ct_mask`` () bool, ``clinical`` (V,), ``clinical_mask``
  (V,), ``pfs_time``/``pfs_event``/``os_time``/``os_event`` () float32, ``pfs_mask``/``os_mask`` bool;
- nodules (CSF-Net): ``ct`` (T, 1, D, H, W), ``ct_mask`` (T,) bool (a missing scan is zeros),
  ``clinical``, ``clinical_mask``, ``label`` () long (-1 where absent) and ``label_mask`` bool;

plus ``id`` (the manifest id, a string) so predictions can be written back per row.

Example:
    >>> import tempfile, torch
    >>> from lungcore.data import CohortDataset, PreprocessSettings, read_manifest, synth_cohort
    >>> d = tempfile.mkdtemp()
    >>> m = read_manifest(synth_cohort("survival", d, n=3, preset="tiny")["manifest"])
    >>> ds = CohortDataset(m, m.fit_schema(), PreprocessSettings(spacing=4.0, crop=(8, 16, 16)))
    >>> batch = next(iter(torch.utils.data.DataLoader(ds, batch_size=3)))
    >>> batch["ct"].shape, batch["clinical"].shape, batch["os_time"].dtype
    (torch.Size([3, 1, 8, 16, 16]), torch.Size([3, 6]), torch.float32)
"""
from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from lungcore.data.manifest import Manifest
from lungcore.data.preprocess import PreprocessSettings, Preprocessor
from lungcore.data.schema import CohortSchema


@dataclass(frozen=True)
class Augmentation:
    """Train-time augmentation of the windowed crops, drawn from ``generator`` (torch's RNG if None).

    ``flip``: probability of mirroring each spatial axis; ``rotate_deg``: in-plane rotation drawn
    from [-rotate_deg, rotate_deg] (trilinear, border values extended); ``scale``/``shift``:
    intensity jitter ``x * U(1 - scale, 1 + scale) + U(-shift, shift)``; ``noise``: Gaussian std.
    The same geometric transform is applied to every time point of a nodule (T0 and T1 stay aligned).
    Calling it on ``ct`` (..., D, H, W) returns an augmented copy; a seeded ``generator`` repeats it.

    Example:
        >>> x = torch.arange(8.0).reshape(1, 2, 2, 2)
        >>> mirror = Augmentation(flip=1.0, rotate_deg=0, scale=0, shift=0, noise=0)   # mirror each axis, only
        >>> torch.equal(mirror(x), x.flip(-3, -2, -1))
        True
        >>> ct = torch.rand(2, 1, 4, 8, 8)                  # T0, T1 crops of a nodule
        >>> a, b = (Augmentation()(ct, torch.Generator().manual_seed(0)) for _ in range(2))
        >>> a.shape, torch.equal(a, b), torch.equal(a, ct)
        (torch.Size([2, 1, 4, 8, 8]), True, False)
    """

    flip: float = 0.5
    rotate_deg: float = 10.0
    scale: float = 0.1
    shift: float = 0.05
    noise: float = 0.01

    def __call__(self, ct: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """``ct`` (..., D, H, W) -> augmented copy of the same shape."""
        x = ct
        g = generator
        for axis in (-3, -2, -1):
            if self.flip > 0 and torch.rand((), generator=g).item() < self.flip:
                x = x.flip(axis)
        if self.rotate_deg > 0:
            angle = math.radians((torch.rand((), generator=g).item() * 2 - 1) * self.rotate_deg)
            x = _rotate_inplane(x, angle)
        if self.scale > 0 or self.shift > 0:
            a = 1 + (torch.rand((), generator=g).item() * 2 - 1) * self.scale
            b = (torch.rand((), generator=g).item() * 2 - 1) * self.shift
            x = x * a + b
        if self.noise > 0:
            x = x + self.noise * torch.randn(x.shape, generator=g, dtype=x.dtype)
        return x.contiguous()


def sample_generator(seed: int | None, index: int) -> torch.Generator | None:
    """A generator of its own for sample ``index`` under ``seed`` (None: None, torch's RNG).

    The pair is mixed by numpy's ``SeedSequence``, so nearby seeds and indices give unrelated streams.

    Example:
        >>> a, b = sample_generator(3, 10), sample_generator(3, 10)
        >>> torch.equal(torch.rand(4, generator=a), torch.rand(4, generator=b)), sample_generator(None, 10)
        (True, None)
    """
    if seed is None:
        return None
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise ValueError(f"augment_seed must be None or an integer >= 0, got {seed!r}")
    state = np.random.SeedSequence([int(seed), int(index)]).generate_state(1, np.uint64)[0]
    return torch.Generator().manual_seed(int(state))


def _rotate_inplane(x: torch.Tensor, angle: float) -> torch.Tensor:
    shape = x.shape
    d, h, w = shape[-3:]
    flat = x.reshape(-1, d, h, w).float()  # (N, D, H, W): rotate each depth slice in (H, W)
    c, s = math.cos(angle), math.sin(angle)
    theta = torch.tensor([[c, -s * h / w, 0.0], [s * w / h, c, 0.0]], dtype=torch.float32)
    theta = theta.unsqueeze(0).expand(flat.shape[0] * d, 2, 3)
    slices = flat.reshape(-1, 1, h, w)
    grid = F.affine_grid(theta, list(slices.shape), align_corners=False)
    out = F.grid_sample(slices, grid, mode="bilinear", padding_mode="border", align_corners=False)
    return out.reshape(shape).to(x.dtype)


class CohortDataset(torch.utils.data.Dataset):
    """Samples of a validated manifest, coded with a *fitted* schema (see module docstring).

    ``preprocessor``: a :class:`Preprocessor` (or ``settings`` + ``cache_dir`` to build one);
    ``augment``: an :class:`Augmentation` for training, None for evaluation.

    ``augment_seed``: None draws each sample's augmentation from torch's RNG (of the process that
    loads it: a DataLoader worker's differs from the main process's). An integer makes sample ``i``'s
    augmentation a function of ``(augment_seed, i)`` alone: the same whatever ``num_workers``, the
    worker that loads it or the order, and another one for another seed. Set it per epoch (the
    trainer sets it to the epoch's seed) so that epochs differ, like ``DistributedSampler.set_epoch``.
    It never touches torch's global RNG, so a model's dropout and masking draw the same numbers with
    any worker count.

    Example:
        >>> import tempfile
        >>> from lungcore.data import read_manifest, synth_cohort
        >>> m = read_manifest(synth_cohort("nodules", tempfile.mkdtemp(), n=2, preset="tiny")["manifest"])
        >>> ds = CohortDataset(m, m.fit_schema(), augment=Augmentation(), augment_seed=7)
        >>> torch.equal(ds[1]["ct"], ds[1]["ct"])           # seeded: sample 1 repeats
        True
        >>> first = ds[1]["ct"]; ds.augment_seed = 8        # next epoch: another transform
        >>> torch.equal(ds[1]["ct"], first)
        False
    """

    def __init__(self, manifest: Manifest, schema: CohortSchema, settings: PreprocessSettings | None = None, *,
                 cache_dir: str | Path | None = None, preprocessor: Preprocessor | None = None,
                 augment: Augmentation | None = None, augment_seed: int | None = None):
        if not schema.fitted:
            raise ValueError("schema must be fitted (schema.fit on the training split) before coding a dataset")
        if schema.kind != manifest.schema.kind:
            raise ValueError(f"schema is for {schema.kind!r} cohorts, the manifest is {manifest.schema.kind!r}")
        self.manifest = manifest
        self.schema = schema
        self.kind = schema.kind
        self.preprocessor = preprocessor or Preprocessor(settings or PreprocessSettings.for_kind(schema.kind),
                                                         cache_dir=cache_dir)
        self.settings = self.preprocessor.settings
        self.augment = augment
        sample_generator(augment_seed, 0)  # checks it
        self.augment_seed = augment_seed
        values, mask = schema.encode(manifest.clinical_raw)
        self.clinical = torch.from_numpy(values)
        self.clinical_mask = torch.from_numpy(mask)
        self.frame = manifest.schema.centre_frame

    def __len__(self) -> int:
        return len(self.manifest)

    def _ct(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        m = self.manifest
        ct = torch.zeros(len(m.images[i]), 1, *self.settings.crop)  # (T, 1, D, H, W); a missing scan stays zeros
        present = []
        for t, path in enumerate(m.images[i]):
            present.append(path is not None)
            if path is None:
                continue
            centre = m.centres[i, t]
            try:
                crop = self.preprocessor.crop(path, None if np.isnan(centre).any() else centre, self.frame)
            except ValueError as exc:
                col = m.schema.image_columns[t]
                raise ValueError(f"row {m.rows[i]}, column {col!r}, value {str(path)!r}: {exc}") from None
            ct[t, 0] = torch.from_numpy(crop)
        if self.augment is not None and any(present):
            # one transform for every time point (T0/T1 stay aligned); a missing scan stays zeros
            ct = self.augment(ct, sample_generator(self.augment_seed, i))
            if not all(present):
                ct[~torch.tensor(present)] = 0.0
        return ct, torch.tensor(present)

    def __getitem__(self, i: int) -> dict[str, Any]:
        m = self.manifest
        ct, present = self._ct(i)
        sample: dict[str, Any] = {"id": m.ids[i], "clinical": self.clinical[i], "clinical_mask": self.clinical_mask[i]}
        if self.kind == "survival":
            sample["ct"] = ct[0]
            sample["ct_mask"] = present[0]
            for e in ("pfs", "os"):
                if f"{e}_mask" in m.endpoints:
                    has = bool(m.endpoints[f"{e}_mask"][i])
                    sample[f"{e}_time"] = torch.tensor(m.endpoints[f"{e}_time"][i] if has else 0.0, dtype=torch.float32)
                    sample[f"{e}_event"] = torch.tensor(m.endpoints[f"{e}_event"][i] if has else 0.0,
                                                        dtype=torch.float32)
                    sample[f"{e}_mask"] = torch.tensor(has)
        else:
            sample["ct"] = ct
            sample["ct_mask"] = present
            sample["label"] = torch.tensor(int(m.label[i]), dtype=torch.long)
            sample["label_mask"] = torch.tensor(bool(m.label_mask[i]))
        return sample


def split_by_patient(manifest: Manifest, fractions: Sequence[float] = (0.7, 0.15, 0.15), *, seed: int = 0,
                     stratify: str | None = "auto", names: Sequence[str] = ("train", "val", "test")
                     ) -> dict[str, list[int]]:
    """Row indices per split; all rows of a patient land in the same split.

    ``stratify``: ``"auto"`` (``os_event`` for survival, ``pfs_event`` when the schema has PFS alone,
    ``label`` for nodules), a column name
    among the endpoints (``pfs_event``, ``os_event``, ``label``) or None. A patient's stratum is
    the maximum over its rows (any event / any malignant nodule); absent values form their own
    stratum. Within each stratum patients are shuffled (``seed``) and dealt by ``fractions``
    (largest remainders), so each split gets its share of events.

    Example:
        >>> import tempfile
        >>> from lungcore.data import read_manifest, synth_cohort
        >>> m = read_manifest(synth_cohort("nodules", tempfile.mkdtemp(), n=10, preset="tiny")["manifest"])
        >>> splits = split_by_patient(m, (0.8, 0.2), names=("train", "test"))
        >>> sorted(splits), sum(map(len, splits.values())) == len(m)
        (['test', 'train'], True)
    """
    fractions = [float(f) for f in fractions]
    if len(fractions) != len(names) or any(f < 0 for f in fractions) or not math.isclose(sum(fractions), 1.0,
                                                                                       abs_tol=1e-6):
        raise ValueError(f"fractions must be {len(names)} non-negative numbers summing to 1, got {fractions}")
    if stratify == "auto":  # OS events, else PFS events (a PFS-only cohort), else labels
        events = [f"{e}_event" for e in ("os", "pfs") if f"{e}_event" in manifest.endpoints]
        stratify = (events[0] if events else None) if manifest.schema.kind == "survival" else "label"
    values: np.ndarray
    if stratify is None:
        values = np.zeros(len(manifest))
    elif stratify == "label":
        if manifest.label is None:
            raise ValueError("stratify='label' needs a nodule manifest")
        values = np.where(manifest.label_mask, manifest.label, -1).astype(float)
    elif stratify in manifest.endpoints and stratify.endswith("_event"):
        values = np.nan_to_num(manifest.endpoints[stratify], nan=-1.0)
    else:
        raise ValueError(f"stratify must be 'auto', None, 'label' or one of "
                         f"{[k for k in manifest.endpoints if k.endswith('_event')]}, got {stratify!r}")
    rows_of: dict[str, list[int]] = {}
    for i, p in enumerate(manifest.patient_ids):
        rows_of.setdefault(p, []).append(i)
    stratum = {p: max(values[i] for i in rows) for p, rows in rows_of.items()}
    rng = np.random.default_rng(seed)
    out: dict[str, list[int]] = {name: [] for name in names}
    for s in sorted(set(stratum.values())):
        patients = sorted(p for p in rows_of if stratum[p] == s)
        patients = [patients[k] for k in rng.permutation(len(patients))]
        exact = np.asarray(fractions) * len(patients)
        counts = np.floor(exact).astype(int)
        for k in np.argsort(-(exact - counts), kind="stable")[: len(patients) - counts.sum()]:
            counts[k] += 1
        start = 0
        for name, c in zip(names, counts):
            for p in patients[start:start + c]:
                out[name].extend(rows_of[p])
            start += c
    return {name: sorted(rows) for name, rows in out.items()}
