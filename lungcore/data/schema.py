"""The cohort schema: what the columns of a manifest mean, and how clinical values are coded.

A schema is a small JSON (or YAML) file beside the manifest (``manifest.schema.json``). It says
which network shape the cohort has, which columns hold image paths and nodule/tumour centres,
whether centres are world LPS millimetres or voxel indices, and which clinical variables exist
(numeric or categorical). After :meth:`CohortSchema.fit` on the training split it also holds the
standardisation statistics and category codes: it is then saved inside every checkpoint
(:meth:`to_dict` is plain JSON) and re-applied to a new manifest, which is coded the same way.

Two shapes:

- ``survival`` (CMML): one row per patient, one CT column (``ct``), optional tumour centre
  (``centre_x``, ``centre_y``, ``centre_z``), endpoints ``pfs_time``, ``pfs_event``, ``os_time``,
  ``os_event``.
- ``nodules`` (CSF-Net): one row per nodule (``nodule_id``; ``patient_id`` may repeat), two CT
  columns (``ct_t0``, ``ct_t1``), a nodule centre per time point (``t0_centre_x`` ...), the
  malignancy ``label`` (0 benign, 1 malignant).

Centre columns are named after the LPS axes in both frames: in the ``world`` frame
(``x``, ``y``, ``z``) are LPS millimetres; in the ``voxel`` frame they are the indices of the
source image along its width, height and depth axes (array index ``(z, y, x)``).

Example:
    >>> from lungcore.data.schema import CohortSchema, ClinicalVariable
    >>> s = CohortSchema(kind="survival", clinical=[ClinicalVariable("age", "numeric"),
    ...                  ClinicalVariable("smoking", "categorical", ["never", "former", "current"])])
    >>> CohortSchema.from_dict(s.to_dict()) == s
    True
    >>> s.id_column, s.image_columns
    ('patient_id', ['ct'])
"""
from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from lungcore import usage

KINDS = ("survival", "nodules")
KIND_ALIASES = {"survival": "survival", "cmml": "survival", "nodules": "nodules", "csfnet": "nodules",
                "csf-net": "nodules"}
CENTRE_FRAMES = ("world", "voxel")
VARIABLE_KINDS = ("numeric", "categorical")
ENDPOINTS = ("pfs", "os")
SCHEMA_VERSION = 1


def canonical_kind(kind: str) -> str:
    """``survival``/``cmml`` -> ``survival``; ``nodules``/``csfnet`` -> ``nodules``."""
    key = str(kind).lower()
    if key not in KIND_ALIASES:
        raise ValueError(f"kind must be one of survival (cmml), nodules (csfnet); got {kind!r}")
    return KIND_ALIASES[key]


@dataclass
class ClinicalVariable:
    """One clinical column. ``categories`` lists the allowed values in code order (code = index).

    ``mean``/``std`` (numeric) are filled in by :meth:`CohortSchema.fit` from the training split.
    For a categorical variable declared without ``categories`` the fit collects them (sorted).

    Example:
        >>> smoking = ClinicalVariable("smoking", "categorical", ["never", "former", "current"])
        >>> smoking.categories.index("former"), smoking.to_dict()      # "former" is coded 1
        (1, {'name': 'smoking', 'kind': 'categorical', 'categories': ['never', 'former', 'current']})
        >>> CohortSchema(clinical=[ClinicalVariable("age")]).fit({"age": ["50", "70", ""]}).variable("age")
        ClinicalVariable(name='age', kind='numeric', categories=None, mean=60.0, std=10.0)
        >>> ClinicalVariable("age", categories=["young", "old"])
        Traceback (most recent call last):
        ...
        ValueError: clinical variable 'age': categories given for a numeric variable
    """

    name: str
    kind: str = "numeric"
    categories: list[str] | None = None
    mean: float | None = None
    std: float | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not self.name:
            raise ValueError(f"clinical variable name must be a non-empty string, got {self.name!r}")
        if self.kind not in VARIABLE_KINDS:
            raise ValueError(f"clinical variable {self.name!r}: kind must be 'numeric' or 'categorical', "
                             f"got {self.kind!r}")
        if self.categories is not None:
            if self.kind != "categorical":
                raise ValueError(f"clinical variable {self.name!r}: categories given for a numeric variable")
            self.categories = [str(c) for c in self.categories]
            if not self.categories:
                raise ValueError(f"clinical variable {self.name!r}: categories is empty (list the values, or "
                                 "leave categories out and the fit collects them)")
            if len(set(self.categories)) != len(self.categories):
                raise ValueError(f"clinical variable {self.name!r}: categories repeat: {self.categories}")
            if any(c == "" for c in self.categories):
                raise ValueError(f"clinical variable {self.name!r}: an empty cell means missing, "
                                 "it cannot be a category")

    def to_dict(self) -> dict[str, Any]:
        """Plain-JSON form (what a schema file holds for one variable)."""
        out: dict[str, Any] = {"name": self.name, "kind": self.kind}
        for key in ("categories", "mean", "std"):
            if getattr(self, key) is not None:
                out[key] = getattr(self, key)
        return out

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ClinicalVariable:
        """A variable from :meth:`to_dict`'s form; unknown keys are errors."""
        unknown = set(d) - {"name", "kind", "categories", "mean", "std"}
        if unknown:
            raise ValueError(f"clinical variable {d.get('name')!r}: unknown keys {sorted(unknown)}")
        return cls(**d)


def _default_images(kind: str) -> list[str]:
    return ["ct"] if kind == "survival" else ["ct_t0", "ct_t1"]


def _default_centres(kind: str) -> dict[str, list[str]]:
    if kind == "survival":
        return {"ct": ["centre_x", "centre_y", "centre_z"]}
    return {"ct_t0": ["t0_centre_x", "t0_centre_y", "t0_centre_z"],
            "ct_t1": ["t1_centre_x", "t1_centre_y", "t1_centre_z"]}


@dataclass
class CohortSchema:
    """Column roles of a manifest plus the clinical coding (see the module docstring).

    Example:
        >>> s = CohortSchema(kind="csfnet", clinical=[ClinicalVariable("age"), ClinicalVariable("sex", "categorical")])
        >>> s.kind, s.id_column, s.image_columns, s.endpoints
        ('nodules', 'nodule_id', ['ct_t0', 'ct_t1'], [])
        >>> fitted = s.fit({"age": ["50", "70"], "sex": ["M", "F"]})     # on the training split
        >>> fitted.variable("sex").categories, fitted.cardinalities()
        (['F', 'M'], [0, 2])
        >>> values, mask = fitted.encode({"age": ["60", ""], "sex": ["M", "F"]})
        >>> values.tolist(), mask.tolist()
        ([[0.0, 1.0], [0.0, 0.0]], [[True, True], [False, True]])
    """

    kind: str = "survival"
    clinical: list[ClinicalVariable] = field(default_factory=list)
    centre_frame: str = "world"
    id_column: str | None = None
    patient_column: str = "patient_id"
    image_columns: list[str] | None = None
    centre_columns: dict[str, list[str]] | None = None
    endpoints: list[str] | None = None
    label_column: str = "label"
    fitted: bool = False

    def __post_init__(self) -> None:
        self.kind = canonical_kind(self.kind)
        if self.centre_frame not in CENTRE_FRAMES:
            raise ValueError(f"centre_frame must be 'world' (LPS mm) or 'voxel' (source voxel indices), "
                             f"got {self.centre_frame!r}")
        self.clinical = [v if isinstance(v, ClinicalVariable) else ClinicalVariable.from_dict(v)
                         for v in self.clinical]
        names = [v.name for v in self.clinical]
        if len(set(names)) != len(names):
            raise ValueError(f"clinical variables repeat: {names}")
        if self.id_column is None:
            self.id_column = "patient_id" if self.kind == "survival" else "nodule_id"
        if self.image_columns is None:
            self.image_columns = _default_images(self.kind)
        if self.centre_columns is None:
            self.centre_columns = {c: cols for c, cols in _default_centres(self.kind).items()
                                   if c in self.image_columns}
        for image, cols in self.centre_columns.items():
            if image not in self.image_columns:
                raise ValueError(f"centre_columns names {image!r}, which is not an image column "
                                 f"({self.image_columns})")
            if len(cols) != 3:
                raise ValueError(f"centre_columns[{image!r}] must name 3 columns (x, y, z), got {cols}")
        if self.endpoints is None:
            self.endpoints = list(ENDPOINTS) if self.kind == "survival" else []
        for e in self.endpoints:
            if e not in ENDPOINTS:
                raise ValueError(f"endpoints must be among {ENDPOINTS}, got {e!r}")
        reserved = self.reserved_columns()
        for v in self.clinical:
            if v.name in reserved:
                raise ValueError(f"clinical variable {v.name!r} clashes with a reserved column")

    # -- columns ---------------------------------------------------------------------------------
    def reserved_columns(self) -> set[str]:
        """Columns that are not clinical variables: ids, images, centres, endpoints, label."""
        cols = {self.id_column, self.patient_column, *self.image_columns}
        for c in self.centre_columns.values():
            cols.update(c)
        for e in self.endpoints:
            cols.update((f"{e}_time", f"{e}_event"))
        if self.kind == "nodules":
            cols.add(self.label_column)
        return cols

    @property
    def clinical_names(self) -> list[str]:
        """The clinical variables' names, in coding order."""
        return [v.name for v in self.clinical]

    def variable(self, name: str) -> ClinicalVariable:
        """The clinical variable ``name``; ``KeyError(name)`` when there is none."""
        for v in self.clinical:
            if v.name == name:
                return v
        raise KeyError(name)

    # -- (de)serialisation -----------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        """Plain-JSON form (what a checkpoint stores)."""
        return {
            "version": SCHEMA_VERSION,
            "kind": self.kind,
            "centre_frame": self.centre_frame,
            "id_column": self.id_column,
            "patient_column": self.patient_column,
            "image_columns": list(self.image_columns),
            "centre_columns": {k: list(v) for k, v in self.centre_columns.items()},
            "endpoints": list(self.endpoints),
            "label_column": self.label_column,
            "clinical": [v.to_dict() for v in self.clinical],
            "fitted": self.fitted,
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> CohortSchema:
        """A schema from :meth:`to_dict`'s form (a schema file, a checkpoint); unknown keys are errors."""
        d = dict(d)
        version = d.pop("version", SCHEMA_VERSION)
        if version != SCHEMA_VERSION:
            raise ValueError(f"schema version {version} is not supported (this lungcore reads {SCHEMA_VERSION})")
        allowed = {"kind", "centre_frame", "id_column", "patient_column", "image_columns", "centre_columns",
                   "endpoints", "label_column", "clinical", "fitted"}
        unknown = set(d) - allowed
        if unknown:
            raise ValueError(f"schema: unknown keys {sorted(unknown)} (allowed: {sorted(allowed)})")
        d["clinical"] = [ClinicalVariable.from_dict(v) for v in d.get("clinical", [])]
        return cls(**d)

    def save(self, path: str | Path) -> Path:
        """Write the schema as JSON (atomically)."""
        path = Path(path)
        tmp = path.with_name(f".{path.name}.tmp")
        tmp.write_text(json.dumps(self.to_dict(), indent=1) + "\n")
        tmp.replace(path)
        return path

    @classmethod
    def load(cls, path: str | Path) -> CohortSchema:
        """Read a schema from JSON or YAML (``.yaml``/``.yml``).

        A file that does not parse, or whose content is not a valid schema, raises ``ValueError``
        naming the file (and the line and column of a syntax error).
        """
        data = usage.read_mapping(path, "schema file")
        try:
            return cls.from_dict(data)
        except (TypeError, ValueError) as exc:
            raise ValueError(f"schema file {path}: {str(exc).removeprefix('schema: ')}") from None

    # -- fitting and coding ----------------------------------------------------------------------
    def fit(self, raw: dict[str, Sequence[str]]) -> CohortSchema:
        """A copy with standardisation statistics (and undeclared categories) from ``raw``.

        ``raw`` maps each clinical variable to its cells (strings, ``""`` = missing) of the
        training split: ``Manifest.clinical_raw`` restricted to the training rows.
        """
        fitted = CohortSchema.from_dict(self.to_dict())
        for v in fitted.clinical:
            cells = [c for c in raw[v.name] if c != ""]
            if v.kind == "numeric":
                x = np.asarray([float(c) for c in cells], dtype=np.float64)
                v.mean = float(x.mean()) if x.size else 0.0
                std = float(x.std()) if x.size > 1 else 1.0
                v.std = std if std > 0 and math.isfinite(std) else 1.0
            elif v.categories is None:
                v.categories = sorted(set(cells))
        fitted.fitted = True
        return fitted

    def encode(self, raw: dict[str, Sequence[str]]) -> tuple[np.ndarray, np.ndarray]:
        """Clinical cells -> ``(values (N, V) float32, mask (N, V) bool)``.

        Numeric: standardised ``(x - mean) / std``; categorical: the integer code stored exactly in
        float32; missing: 0 with mask False. Needs a fitted schema. Cells must already be valid
        (the manifest validated them); an unknown category raises ``ValueError``.
        """
        if not self.fitted:
            raise ValueError("schema is not fitted: call schema.fit(...) on the training split first")
        n = len(next(iter(raw.values()))) if raw else 0
        values = np.zeros((n, len(self.clinical)), dtype=np.float32)
        mask = np.zeros((n, len(self.clinical)), dtype=bool)
        for j, v in enumerate(self.clinical):
            cells = raw[v.name]
            codes = {c: i for i, c in enumerate(v.categories or [])}
            for i, c in enumerate(cells):
                if c == "":
                    continue
                if v.kind == "numeric":
                    values[i, j] = (float(c) - v.mean) / v.std
                else:
                    if c not in codes:
                        raise ValueError(f"clinical variable {v.name!r}: unknown category {c!r}; "
                                         f"expected one of {', '.join(map(repr, v.categories))}")
                    values[i, j] = codes[c]
                mask[i, j] = True
        return values, mask

    def cardinalities(self) -> list[int]:
        """Number of categories per variable (0 for numeric): what an embedding table needs."""
        return [len(v.categories or []) if v.kind == "categorical" else 0 for v in self.clinical]


def schema_beside(manifest: str | Path) -> Path | None:
    """The schema file that goes with ``manifest``: ``<stem>.schema.json``/``.yaml`` or ``schema.json``."""
    manifest = Path(manifest)
    for name in (f"{manifest.stem}.schema.json", f"{manifest.stem}.schema.yaml", f"{manifest.stem}.schema.yml",
                 "schema.json", "schema.yaml", "schema.yml"):
        p = manifest.with_name(name)
        if p.is_file():
            return p
    return None


