"""Cohort manifests: a CSV (one row per patient or per nodule) + its schema, validated once at load.

Every cell is read as text. An empty cell means *absent* (a CT, a centre, a clinical value, an
endpoint) and becomes a mask; anything else that is not valid is a problem naming the row, the
column and the value. Rows are numbered as a spreadsheet shows them: the header is row 1, the
first patient row 2. :func:`check_manifest` collects *every* problem of a manifest at once
(``lungcore validate``); :func:`read_manifest` raises :class:`ManifestError` listing them all.

Example:
    >>> import tempfile, pathlib
    >>> from lungcore.data import CohortSchema, ClinicalVariable, read_manifest
    >>> d = pathlib.Path(tempfile.mkdtemp())
    >>> _ = (d / "manifest.csv").write_text("patient_id,ct,age,os_time,os_event,pfs_time,pfs_event\\n"
    ...                                     "P1,,61,12.5,1,,\\n")
    >>> m = read_manifest(d / "manifest.csv", CohortSchema(clinical=[ClinicalVariable("age")]))
    >>> m.ids, m.images[0][0], bool(m.endpoints["os_mask"][0]), bool(m.endpoints["pfs_mask"][0])
    (['P1'], None, True, False)
"""
from __future__ import annotations

import csv
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from lungcore.data.schema import CohortSchema, schema_beside

IMAGE_CHECKS = ("none", "exists", "header", "full")


@dataclass(frozen=True)
class ManifestProblem:
    """One invalid cell (or header entry): ``row`` as a spreadsheet numbers it (header = 1)."""

    row: int
    column: str
    value: str
    message: str
    detail: str = ""

    def __str__(self) -> str:
        text = f"row {self.row}, column {self.column!r}, value {self.value!r}: {self.message}"
        return f"{text} ({self.detail})" if self.detail else text


class ManifestError(ValueError):
    """A manifest has problems; ``.problems`` lists every one of them."""

    def __init__(self, path: str | Path, problems: Sequence[ManifestProblem]):
        self.path = Path(path)
        self.problems = list(problems)
        lines = [f"{path}: {len(self.problems)} problem{'s' if len(self.problems) != 1 else ''}"]
        lines += [f"  {p}" for p in self.problems]
        super().__init__("\n".join(lines))


@dataclass
class Manifest:
    """A validated cohort. Arrays are indexed by manifest row order (``rows[i]`` = spreadsheet row).

    - ``images[i][t]``: resolved path of image column ``t`` (a NIfTI file or a DICOM folder), or None.
    - ``centres[i, t]``: (x, y, z) in the schema's frame (LPS mm or source voxel indices), NaN if absent.
    - ``clinical_raw[name][i]``: the cell text (``""`` = missing); code it with ``schema.encode``.
    - ``endpoints``: ``{pfs,os}_{time,event}`` float64 (NaN where absent) and ``{pfs,os}_mask`` bool.
    - ``label`` int64 (-1 where absent) and ``label_mask`` (nodule cohorts).
    """

    path: Path
    schema: CohortSchema
    rows: list[int]
    ids: list[str]
    patient_ids: list[str]
    images: list[list[Path | None]]
    centres: np.ndarray
    clinical_raw: dict[str, list[str]]
    endpoints: dict[str, np.ndarray] = field(default_factory=dict)
    label: np.ndarray | None = None
    label_mask: np.ndarray | None = None

    def __len__(self) -> int:
        return len(self.ids)

    def subset(self, indices: Sequence[int]) -> Manifest:
        """The rows ``indices`` (in that order) as a new manifest."""
        idx = [int(i) for i in indices]
        return Manifest(
            path=self.path, schema=self.schema, rows=[self.rows[i] for i in idx], ids=[self.ids[i] for i in idx],
            patient_ids=[self.patient_ids[i] for i in idx], images=[self.images[i] for i in idx],
            centres=self.centres[idx], clinical_raw={k: [v[i] for i in idx] for k, v in self.clinical_raw.items()},
            endpoints={k: v[idx] for k, v in self.endpoints.items()},
            label=None if self.label is None else self.label[idx],
            label_mask=None if self.label_mask is None else self.label_mask[idx],
        )

    def fit_schema(self) -> CohortSchema:
        """The schema fitted on all rows of this manifest (call it on the training split).

        Besides the clinical coding, the fitted schema keeps only the endpoints that have data in
        these rows (an OS-only cohort whose schema declares PFS too fits to ``["os"]``).
        """
        fitted = self.schema.fit(self.clinical_raw)
        fitted.endpoints = [e for e in fitted.endpoints if self.endpoints[f"{e}_mask"].any()]
        return fitted

    def encode_clinical(self, schema: CohortSchema) -> tuple[np.ndarray, np.ndarray]:
        """``(values (N, V) float32, mask (N, V) bool)`` coded with a fitted ``schema``."""
        return schema.encode(self.clinical_raw)


FLOAT32_MAX = float(np.finfo(np.float32).max)


def _not_utf8(text: str) -> bool:
    """True when ``text`` holds bytes that were not UTF-8 (decoded with ``surrogateescape``)."""
    return any("\udc80" <= ch <= "\udcff" for ch in text)


def _shown(text: str) -> str:
    """``text`` with each undecodable byte as U+FFFD (printable, and UTF-8 itself)."""
    return "".join("\ufffd" if "\udc80" <= ch <= "\udcff" else ch for ch in text)


def _not_utf8_message(text: str) -> str:
    bad = " ".join(f"0x{ord(ch) - 0xDC00:02x}" for ch in text if "\udc80" <= ch <= "\udcff")
    return f"not UTF-8 text (byte {bad}): save the manifest as UTF-8"


def _parse_float(cell: str) -> float | None:
    try:
        return float(cell)
    except ValueError:
        return None


def _check_image(path: Path, level: str) -> tuple[tuple[str, str] | None, tuple[tuple[int, ...], np.ndarray] | None]:
    """(None if fine else (message, detail), (shape, affine) when the check learnt them)."""
    if level == "none":
        return None, None
    if not path.exists():
        return ("file not found", ""), None
    if level == "exists":
        return None, None
    from lungcore.data.io import read_ct, read_ct_header

    try:
        if level == "full":
            ct = read_ct(path, dtype=None, contiguous=False)
            return None, (ct.shape, ct.affine)
        shape, affine = read_ct_header(path)
        return None, None if affine is None else (shape, affine)
    except Exception as exc:  # noqa: BLE001 - any reader failure is an unreadable image
        return ("unreadable image (not a NIfTI file or DICOM series lungcore can read)",
                f"{type(exc).__name__}: {exc}"), None


def _centre_outside(centre_xyz: np.ndarray, frame: str, geometry: tuple[tuple[int, ...], np.ndarray]) -> str | None:
    shape, affine = geometry
    if frame == "voxel":
        idx = centre_xyz[::-1]
    else:
        inv = np.linalg.inv(affine)
        idx = inv[:3, :3] @ centre_xyz + inv[:3, 3]
    n = np.asarray(shape, dtype=np.float64)
    if np.all(idx >= -0.5) and np.all(idx <= n - 0.5):
        return None
    hint = " (are the coordinates LPS millimetres? RAS flips the signs of x and y)" if frame == "world" else ""
    return (f"centre lies outside the image: voxel index (z, y, x) {np.round(idx, 1).tolist()}, "
            f"image shape {tuple(int(v) for v in shape)}{hint}")


def check_manifest(path: str | Path, schema: CohortSchema | str | Path | None = None, *,
                   images: str = "header", progress: bool = False) -> tuple[Manifest | None, list[ManifestProblem]]:
    """Parse and validate ``path``; returns ``(manifest or None, every problem found)``.

    ``schema``: a :class:`CohortSchema`, a path to one, or None for the schema beside the manifest.
    ``images``: how hard to check image cells: ``"none"``, ``"exists"``, ``"header"`` (default:
    the file opens and its header parses) or ``"full"`` (the whole image is read).
    ``progress``: a progress bar over the rows (on stderr).
    """
    path = Path(path)
    if images not in IMAGE_CHECKS:
        raise ValueError(f"images must be one of {IMAGE_CHECKS}, got {images!r}")
    if not path.is_file():
        raise FileNotFoundError(f"manifest {path} does not exist")
    if schema is None:
        found = schema_beside(path)
        if found is None:
            raise FileNotFoundError(f"no schema for {path}: pass one, or put {path.stem}.schema.json beside it")
        schema = CohortSchema.load(found)
    elif not isinstance(schema, CohortSchema):
        schema = CohortSchema.load(schema)

    # bytes that are not UTF-8 survive as lone surrogates, so the cell holding them is named below
    with open(path, newline="", encoding="utf-8-sig", errors="surrogateescape") as f:
        reader = csv.reader(f)
        try:
            header = [h.strip() for h in next(reader)]
        except StopIteration:
            return None, [ManifestProblem(1, "", "", "the manifest is empty (no header row)")]
        body = list(reader)

    problems: list[ManifestProblem] = []
    columns = {name: j for j, name in enumerate(header)}
    for j, name in enumerate(header):
        if name == "":
            problems.append(ManifestProblem(1, f"#{j + 1}", "", "empty column name"))
        elif _not_utf8(name):
            problems.append(ManifestProblem(1, f"#{j + 1}", _shown(name), _not_utf8_message(name)))
        elif header.index(name) != j:
            problems.append(ManifestProblem(1, name, name, "column appears twice"))

    required = [schema.id_column, *schema.image_columns, *schema.clinical_names]
    if schema.kind == "nodules":
        required.append(schema.patient_column)
    for e in schema.endpoints:
        if (f"{e}_time" in columns) != (f"{e}_event" in columns):
            required += [f"{e}_time", f"{e}_event"]
    for image, cols in schema.centre_columns.items():
        present = [c in columns for c in cols]
        if any(present) and not all(present) or (schema.kind == "nodules" and not any(present)):
            required += cols
    for name in dict.fromkeys(required):
        if name not in columns:
            problems.append(ManifestProblem(1, name, "", "required column is missing"))
    header_ok = not problems  # a header problem does not hide the problems of the rows: go on

    root = path.parent
    n = len(body)
    T = len(schema.image_columns)
    ids: list[str] = []
    patient_ids: list[str] = []
    rows: list[int] = []
    image_paths: list[list[Path | None]] = []
    centres = np.full((n, T, 3), np.nan)
    clinical_raw: dict[str, list[str]] = {v.name: [] for v in schema.clinical}
    endpoints = {f"{e}_{k}": np.full(n, np.nan) for e in schema.endpoints for k in ("time", "event")}
    endpoints.update({f"{e}_mask": np.zeros(n, dtype=bool) for e in schema.endpoints})
    label = np.full(n, -1, dtype=np.int64) if schema.kind == "nodules" else None
    label_mask = np.zeros(n, dtype=bool) if schema.kind == "nodules" else None
    first_seen: dict[str, int] = {}

    def cell(record: list[str], name: str) -> str:
        j = columns.get(name)
        return record[j].strip() if j is not None and j < len(record) else ""

    from tqdm import tqdm

    for i, record in enumerate(tqdm(body, desc=f"check {path.name}", unit="row", disable=not progress,
                                    leave=False)):
        r = i + 2
        rows.append(r)
        if len(record) > len(header):
            problems.append(ManifestProblem(r, f"#{len(header) + 1}", record[len(header)],
                                            f"row has {len(record)} cells, the header {len(header)}"))
        elif len(record) < len(header):
            problems.append(ManifestProblem(r, header[len(record)], "",
                                            f"row has {len(record)} cells, the header {len(header)} "
                                            "(is the file cut short?)"))
        for j, text in enumerate(record[:len(header)]):
            if _not_utf8(text):
                problems.append(ManifestProblem(r, header[j], _shown(text), _not_utf8_message(text)))
                record[j] = ""  # reported once here; no second problem for the same cell
        # identifiers
        ident = cell(record, schema.id_column)
        if ident == "" and schema.id_column in columns:
            problems.append(ManifestProblem(r, schema.id_column, "", "id must not be empty"))
        elif ident == "":
            pass  # the id column is missing: reported once, in the header
        elif ident in first_seen:
            problems.append(ManifestProblem(r, schema.id_column, ident,
                                            f"duplicate id (first seen in row {first_seen[ident]})"))
        else:
            first_seen[ident] = r
        ids.append(ident)
        own_patient = schema.patient_column in columns and schema.patient_column != schema.id_column
        patient = cell(record, schema.patient_column) if own_patient else ident
        if patient == "" and own_patient:
            problems.append(ManifestProblem(r, schema.patient_column, "", "patient id must not be empty"))
        patient_ids.append(patient)

        # images and centres
        row_images: list[Path | None] = []
        for t, col in enumerate(schema.image_columns):
            value = cell(record, col)
            geometry = None
            if value == "":
                row_images.append(None)
            else:
                p = Path(value)
                p = p if p.is_absolute() else root / p
                bad, geometry = _check_image(p, images)
                if bad:
                    problems.append(ManifestProblem(r, col, value, *bad))
                row_images.append(p)
            cols = schema.centre_columns.get(col)
            if cols and all(c in columns for c in cols):
                cells = [cell(record, c) for c in cols]
                if all(c == "" for c in cells):
                    if schema.kind == "nodules" and value != "":
                        problems.append(ManifestProblem(r, cols[0], "", f"a nodule centre is required for {col}"))
                    continue
                for k, (c, text) in enumerate(zip(cols, cells)):
                    x = _parse_float(text) if text != "" else None
                    if text == "":
                        problems.append(ManifestProblem(r, c, "", f"centre needs all of {', '.join(cols)} or none"))
                    elif x is None or not math.isfinite(x):
                        problems.append(ManifestProblem(r, c, text, "centre coordinate must be a finite number"))
                    else:
                        centres[i, t, k] = x
                if value != "" and geometry is not None and np.all(np.isfinite(centres[i, t])):
                    outside = _centre_outside(centres[i, t], schema.centre_frame, geometry)
                    if outside:
                        problems.append(ManifestProblem(r, cols[0], cells[0], outside))
        image_paths.append(row_images)

        # clinical
        for v in schema.clinical:
            text = cell(record, v.name)
            clinical_raw[v.name].append(text)
            if text == "":
                continue
            if v.kind == "numeric":
                x = _parse_float(text)
                if x is None or not math.isfinite(x):
                    problems.append(ManifestProblem(r, v.name, text, "not a finite number"))
                elif abs(x) > FLOAT32_MAX:
                    problems.append(ManifestProblem(r, v.name, text, "too large: values are standardised and "
                                                    f"trained in float32 (|value| <= {FLOAT32_MAX:.3g})"))
            elif v.categories is not None and text not in v.categories:
                problems.append(ManifestProblem(r, v.name, text, "unknown category; expected one of "
                                                + ", ".join(map(repr, v.categories))))

        # endpoints
        for e in schema.endpoints:
            tcol, ecol = f"{e}_time", f"{e}_event"
            if tcol not in columns or ecol not in columns:
                continue
            ttext, etext = cell(record, tcol), cell(record, ecol)
            if ttext == "" and etext == "":
                continue
            ok = True
            if ttext == "":
                problems.append(ManifestProblem(r, tcol, "", f"{ecol} is given but {tcol} is empty"))
                ok = False
            else:
                t_val = _parse_float(ttext)
                if t_val is None or math.isnan(t_val):
                    problems.append(ManifestProblem(r, tcol, ttext, "time must be a number"))
                    ok = False
                elif not math.isfinite(t_val):
                    problems.append(ManifestProblem(r, tcol, ttext, "time must be finite"))
                    ok = False
                elif t_val < 0:
                    problems.append(ManifestProblem(r, tcol, ttext, "time must be >= 0"))
                    ok = False
                elif t_val > FLOAT32_MAX:
                    problems.append(ManifestProblem(r, tcol, ttext, "time too large: times are trained in float32 "
                                                    f"(<= {FLOAT32_MAX:.3g})"))
                    ok = False
            if etext == "":
                problems.append(ManifestProblem(r, ecol, "", f"{tcol} is given but {ecol} is empty"))
                ok = False
            elif etext not in ("0", "1", "0.0", "1.0"):
                problems.append(ManifestProblem(r, ecol, etext, "event must be 0 (censored) or 1 (event)"))
                ok = False
            if ok:
                endpoints[tcol][i] = float(ttext)
                endpoints[ecol][i] = float(etext)
                endpoints[f"{e}_mask"][i] = True

        # label
        if label is not None and schema.label_column in columns:
            text = cell(record, schema.label_column)
            if text == "":
                continue
            if text in ("0", "1", "0.0", "1.0"):
                label[i] = int(float(text))
                label_mask[i] = True
            else:
                problems.append(ManifestProblem(r, schema.label_column, text,
                                                "label must be 0 (benign) or 1 (malignant)"))

    if n == 0:
        problems.append(ManifestProblem(2, schema.id_column, "", "the manifest has no rows"))
    if not header_ok:
        return None, problems
    manifest = Manifest(path=path, schema=schema, rows=rows, ids=ids, patient_ids=patient_ids, images=image_paths,
                        centres=centres, clinical_raw=clinical_raw, endpoints=endpoints, label=label,
                        label_mask=label_mask)
    return manifest, problems


def read_manifest(path: str | Path, schema: CohortSchema | str | Path | None = None, *,
                  images: str = "header") -> Manifest:
    """Parse and validate a manifest; :class:`ManifestError` lists every problem if there is any."""
    manifest, problems = check_manifest(path, schema, images=images)
    if problems:
        raise ManifestError(path, problems)
    assert manifest is not None
    return manifest
