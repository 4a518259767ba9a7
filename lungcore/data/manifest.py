"""Cohort manifests: a CSV (one row per patient or per nodule) + its schema, validated once at load.

Every cell is read as text. An empty cell means *absent* (a CT, a centre, a clinical value, an
endpoint) and becomes a mask; anything else that is not valid is a problem naming the row, the
column and the value. Rows are numbered as a spreadsheet shows them: the header is row 1, the
first patient row 2. :func:`check_manifest` collects *every* problem of a manifest at once
(``lungcore validate``); :func:`read_manifest` raises :class:`ManifestError` listing them all.
A numeric clinical value far outside the rest of its column is no problem but a warning
(:meth:`Manifest.far_out_values`, which ``lungcore validate`` prints).

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
from typing import Any

import numpy as np

from lungcore.data import image_checks
from lungcore.data.image_checks import IMAGE_CHECKS
from lungcore.data.outliers import FAR_OUT_SD, far_out, robust_centre_scale, sd_text
from lungcore.data.schema import CohortSchema, schema_beside
from lungcore.usage import is_integer


@dataclass(frozen=True)
class ManifestProblem:
    """One invalid cell (or header entry): ``row`` as a spreadsheet numbers it (header = 1). Also the
    form of a warning about a valid cell (:meth:`Manifest.far_out_values`).

    ``value`` is the cell's text, ``message`` what is wrong with it, ``detail`` (may be empty) the
    underlying error; ``str()`` gives the line ``lungcore validate`` prints.

    Example:
        >>> import tempfile, pathlib
        >>> d = pathlib.Path(tempfile.mkdtemp())
        >>> _ = (d / "scan.nii.gz").write_bytes(b"not a CT")
        >>> _ = (d / "manifest.csv").write_text("patient_id,ct\\nP1,scan.nii.gz\\nP2,missing.nii.gz\\n")
        >>> _, problems = check_manifest(d / "manifest.csv", CohortSchema(endpoints=[]))
        >>> problems[1]
        ManifestProblem(row=3, column='ct', value='missing.nii.gz', message='file not found', detail='')
        >>> print(problems[0])
        row 2, column 'ct', value 'scan.nii.gz': unreadable image (not a NIfTI file or DICOM series lungcore can
        read) (ImageFileError: File .../scan.nii.gz is not a gzip file)
    """

    row: int
    column: str
    value: str
    message: str
    detail: str = ""

    def __str__(self) -> str:
        text = f"row {self.row}, column {self.column!r}, value {self.value!r}: {self.message}"
        return f"{text} ({self.detail})" if self.detail else text


class ManifestError(ValueError):
    """A manifest has problems; ``.problems`` lists every one of them (:class:`ManifestProblem`),
    ``.path`` is the manifest. Raised by :func:`read_manifest`; its message lists them all.

    Example:
        >>> import tempfile, pathlib
        >>> path = pathlib.Path(tempfile.mkdtemp()) / "manifest.csv"
        >>> _ = path.write_text("patient_id,ct,os_time,os_event\\nP1,,12,1\\nP1,,-3,2\\n")
        >>> try:
        ...     read_manifest(path, CohortSchema())
        ... except ManifestError as error:
        ...     print(error)
        ...     print(len(error.problems), error.problems[1].column, error.path.name)
        /.../manifest.csv: 3 problems
          row 3, column 'patient_id', value 'P1': duplicate id (first seen in row 2)
          row 3, column 'os_time', value '-3': time must be >= 0
          row 3, column 'os_event', value '2': event must be 0 (censored) or 1 (event)
        3 os_time manifest.csv
    """

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

    Example:
        >>> import tempfile, pathlib
        >>> from lungcore.data import ClinicalVariable
        >>> path = pathlib.Path(tempfile.mkdtemp()) / "manifest.csv"
        >>> _ = path.write_text("patient_id,ct,age,os_time,os_event\\nP1,,60,10,1\\nP2,,70,5.5,0\\nP3,,,8,1\\n")
        >>> m = read_manifest(path, CohortSchema(clinical=[ClinicalVariable("age")]))
        >>> len(m), m.rows, m.ids, m.images[0], m.endpoints["os_time"].tolist(), m.clinical_raw
        (3, [2, 3, 4], ['P1', 'P2', 'P3'], [None], [10.0, 5.5, 8.0], {'age': ['60', '70', '']})
        >>> schema = m.subset([0, 1]).fit_schema()          # fitted on a training split: P1, P2
        >>> schema.endpoints, schema.variable("age").mean    # no PFS data in these rows: OS only
        (['os'], 65.0)
        >>> values, mask = m.encode_clinical(schema)        # standardised; P3's missing age is masked
        >>> values[:, 0].tolist(), mask[:, 0].tolist()
        ([-1.0, 1.0, 0.0], [True, True, False])
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
        """The rows ``indices`` (in that order; positions 0 .. len - 1, not spreadsheet rows) as a new manifest."""
        idx = [int(i) for i in indices]
        bad = [i for i in idx if not 0 <= i < len(self.ids)]
        if bad:
            raise IndexError(f"indices must be positions in 0..{len(self.ids) - 1} of this manifest's "
                             f"{len(self.ids)} rows, got {bad[:5]}")
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
        if not self.ids:
            raise ValueError(f"cannot fit a schema on no rows (an empty split of {self.path})")
        fitted = self.schema.fit(self.clinical_raw)
        fitted.endpoints = [e for e in fitted.endpoints if self.endpoints[f"{e}_mask"].any()]
        return fitted

    def encode_clinical(self, schema: CohortSchema) -> tuple[np.ndarray, np.ndarray]:
        """``(values (N, V) float32, mask (N, V) bool)`` coded with a fitted ``schema``."""
        return schema.encode(self.clinical_raw)

    def far_out_values(self, limit: float = FAR_OUT_SD) -> list[ManifestProblem]:
        """Numeric clinical values more than ``limit`` standard deviations from their column's median
        in these rows (robust SDs: :mod:`lungcore.data.outliers`), by row: warnings, not problems. Such
        a value (an age of 1e25 fits float32, so it is no problem) can make a network's output NaN,
        and training then stops at its first validation; ``lungcore validate`` warns of them.
        Cells that are a problem already (not a number, beyond float32) are left out.

        Example:
            >>> import tempfile, pathlib
            >>> from lungcore.data import ClinicalVariable
            >>> path = pathlib.Path(tempfile.mkdtemp()) / "manifest.csv"
            >>> _ = path.write_text("patient_id,ct,age,os_time,os_event\\n"
            ...                     "P1,,61,10,1\\nP2,,70,5,0\\nP3,,1e25,8,1\\nP4,,58,3,1\\n")
            >>> m = read_manifest(path, CohortSchema(clinical=[ClinicalVariable("age")]))
            >>> [str(w) for w in m.far_out_values()]
            ["row 4, column 'age', value '1e25': far outside the cohort (id P3): 1.12e+24 standard deviations
            from the column's median 65.5 (robust SD 8.9)"]
        """
        found: list[tuple[int, int, ManifestProblem]] = []
        for k, v in enumerate(self.schema.clinical):
            if v.kind != "numeric" or v.name not in self.clinical_raw:
                continue
            cells = self.clinical_raw[v.name]
            values = np.array([_clinical_number(text) for text in cells], dtype=np.float64)
            centre, scale = robust_centre_scale(values)
            for i, sd in far_out(values, limit, (centre, scale)):
                found.append((i, k, ManifestProblem(
                    self.rows[i], v.name, cells[i],
                    f"far outside the cohort (id {self.ids[i]}): {sd_text(sd)} standard deviations from the "
                    f"column's median {centre:.4g} (robust SD {scale:.3g})")))
        return [problem for _, _, problem in sorted(found, key=lambda item: item[:2])]


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


def _clinical_number(text: str) -> float:
    """A numeric clinical cell as a number: NaN when empty or a problem (not finite, beyond float32)."""
    x = _parse_float(text) if text != "" else None
    return x if x is not None and math.isfinite(x) and abs(x) <= FLOAT32_MAX else math.nan


def _time_problem(text: str) -> str | None:
    """Why ``text`` is not a valid event/censoring time, or None."""
    t = _parse_float(text)
    if t is None or math.isnan(t):
        return "time must be a number"
    if not math.isfinite(t):
        return "time must be finite"
    if t < 0:
        return "time must be >= 0"
    if t > FLOAT32_MAX:
        return f"time too large: times are trained in float32 (<= {FLOAT32_MAX:.3g})"
    return None


def _header_problems(header: list[str], columns: dict[str, int], schema: CohortSchema) -> list[ManifestProblem]:
    """Empty, undecodable or repeated column names, and the columns the schema requires that are missing."""
    problems: list[ManifestProblem] = []
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
    return problems


class _Rows:
    """The body of a manifest being parsed row by row: the arrays the rows fill, the problems they have."""

    def __init__(self, schema: CohortSchema, header: list[str], n: int, root: Path, images: str):
        self.schema, self.header, self.root, self.image_check = schema, header, root, images
        self.checked: dict[Path, Any] = {}  # image -> its check: one read each
        self.columns = {name: j for j, name in enumerate(header)}
        self.problems: list[ManifestProblem] = []
        self.rows: list[int] = []
        self.ids: list[str] = []
        self.patient_ids: list[str] = []
        self.images: list[list[Path | None]] = []
        self.centres = np.full((n, len(schema.image_columns), 3), np.nan)
        self.clinical_raw: dict[str, list[str]] = {v.name: [] for v in schema.clinical}
        self.endpoints = {f"{e}_{k}": np.full(n, np.nan) for e in schema.endpoints for k in ("time", "event")}
        self.endpoints.update({f"{e}_mask": np.zeros(n, dtype=bool) for e in schema.endpoints})
        nodules = schema.kind == "nodules"
        self.label = np.full(n, -1, dtype=np.int64) if nodules else None
        self.label_mask = np.zeros(n, dtype=bool) if nodules else None
        self.first_seen: dict[str, int] = {}

    def resolve(self, value: str) -> Path:
        """An image cell's path (relative paths are relative to the manifest's folder)."""
        path = Path(value)
        return path if path.is_absolute() else self.root / path

    def image_paths(self, body: list[list[str]]) -> list[Path]:
        """Every distinct image the rows name (cells that are not UTF-8 left out: they are a problem already)."""
        paths = {self.resolve(v) for record in body for col in self.schema.image_columns
                 if (v := self.cell(record, col)) != "" and not _not_utf8(v)}
        return sorted(paths, key=str)

    def cell(self, record: list[str], name: str) -> str:
        j = self.columns.get(name)
        return record[j].strip() if j is not None and j < len(record) else ""

    def problem(self, *args: Any) -> None:
        self.problems.append(ManifestProblem(*args))

    def add(self, i: int, record: list[str], r: int) -> None:
        """Row ``i`` of the body, spreadsheet row ``r`` (``i + 2`` unless blank lines were skipped)."""
        self.rows.append(r)
        self._cells(r, record)
        self._identifiers(r, record)
        self.images.append([self._image(i, r, t, col, record) for t, col in enumerate(self.schema.image_columns)])
        self._clinical(r, record)
        for e in self.schema.endpoints:
            self._endpoint(i, r, record, e)
        self._label(i, r, record)

    def _cells(self, r: int, record: list[str]) -> None:
        header = self.header
        if len(record) > len(header):
            self.problem(r, f"#{len(header) + 1}", record[len(header)],
                         f"row has {len(record)} cells, the header {len(header)}")
        elif len(record) < len(header):
            self.problem(r, header[len(record)], "", f"row has {len(record)} cells, the header {len(header)} "
                         "(is the file cut short?)")
        for j, text in enumerate(record[:len(header)]):
            if _not_utf8(text):
                self.problem(r, header[j], _shown(text), _not_utf8_message(text))
                record[j] = ""  # reported once here; no second problem for the same cell

    def _identifiers(self, r: int, record: list[str]) -> None:
        schema = self.schema
        ident = self.cell(record, schema.id_column)
        if ident == "" and schema.id_column in self.columns:
            self.problem(r, schema.id_column, "", "id must not be empty")
        elif ident == "":
            pass  # the id column is missing: reported once, in the header
        elif ident in self.first_seen:
            self.problem(r, schema.id_column, ident, f"duplicate id (first seen in row {self.first_seen[ident]})")
        else:
            self.first_seen[ident] = r
        self.ids.append(ident)
        own_patient = schema.patient_column in self.columns and schema.patient_column != schema.id_column
        patient = self.cell(record, schema.patient_column) if own_patient else ident
        if patient == "" and own_patient:
            self.problem(r, schema.patient_column, "", "patient id must not be empty")
        self.patient_ids.append(patient)

    def _image(self, i: int, r: int, t: int, col: str, record: list[str]) -> Path | None:
        """The resolved path of image column ``col`` (checked at ``image_check``), its centre parsed."""
        value = self.cell(record, col)
        geometry = path = None
        if value != "":
            path = self.resolve(value)
            if path not in self.checked:
                self.checked[path] = image_checks.check_image(path, self.image_check)
            bad, geometry = self.checked[path]
            if bad:
                self.problem(r, col, value, *bad)
        cols = self.schema.centre_columns.get(col)
        if not cols or not all(c in self.columns for c in cols):
            return path
        cells = [self.cell(record, c) for c in cols]
        if all(c == "" for c in cells):
            if self.schema.kind == "nodules" and value != "":
                self.problem(r, cols[0], "", f"a nodule centre is required for {col}")
            return path
        for k, (c, text) in enumerate(zip(cols, cells)):
            x = _parse_float(text) if text != "" else None
            if text == "":
                self.problem(r, c, "", f"centre needs all of {', '.join(cols)} or none")
            elif x is None or not math.isfinite(x):
                self.problem(r, c, text, "centre coordinate must be a finite number")
            else:
                self.centres[i, t, k] = x
        if value != "" and geometry is not None and np.all(np.isfinite(self.centres[i, t])):
            outside = image_checks.centre_outside(self.centres[i, t], self.schema.centre_frame, geometry)
            if outside:
                self.problem(r, cols[0], cells[0], outside)
        return path

    def _clinical(self, r: int, record: list[str]) -> None:
        for v in self.schema.clinical:
            text = self.cell(record, v.name)
            self.clinical_raw[v.name].append(text)
            if text == "":
                continue
            if v.kind == "numeric":
                x = _parse_float(text)
                if x is None or not math.isfinite(x):
                    self.problem(r, v.name, text, "not a finite number")
                elif abs(x) > FLOAT32_MAX:
                    self.problem(r, v.name, text, "too large: values are standardised and "
                                 f"trained in float32 (|value| <= {FLOAT32_MAX:.3g})")
            elif v.categories is not None and text not in v.categories:
                self.problem(r, v.name, text, "unknown category; expected one of " + ", ".join(map(repr, v.categories)))

    def _endpoint(self, i: int, r: int, record: list[str], e: str) -> None:
        tcol, ecol = f"{e}_time", f"{e}_event"
        if tcol not in self.columns or ecol not in self.columns:
            return
        ttext, etext = self.cell(record, tcol), self.cell(record, ecol)
        if ttext == "" and etext == "":
            return
        ok = True
        if ttext == "":
            self.problem(r, tcol, "", f"{ecol} is given but {tcol} is empty")
            ok = False
        elif (bad := _time_problem(ttext)) is not None:
            self.problem(r, tcol, ttext, bad)
            ok = False
        if etext == "":
            self.problem(r, ecol, "", f"{tcol} is given but {ecol} is empty")
            ok = False
        elif etext not in ("0", "1", "0.0", "1.0"):
            self.problem(r, ecol, etext, "event must be 0 (censored) or 1 (event)")
            ok = False
        if ok:
            self.endpoints[tcol][i] = float(ttext)
            self.endpoints[ecol][i] = float(etext)
            self.endpoints[f"{e}_mask"][i] = True

    def _label(self, i: int, r: int, record: list[str]) -> None:
        if self.label is None or self.schema.label_column not in self.columns:
            return
        text = self.cell(record, self.schema.label_column)
        if text == "":
            return
        if text in ("0", "1", "0.0", "1.0"):
            self.label[i] = int(float(text))
            self.label_mask[i] = True
        else:
            self.problem(r, self.schema.label_column, text, "label must be 0 (benign) or 1 (malignant)")


def _schema_for(path: Path, schema: CohortSchema | str | Path | None) -> CohortSchema:
    if schema is None:
        found = schema_beside(path)
        if found is None:
            raise FileNotFoundError(f"no schema for {path}: pass one, or put {path.stem}.schema.json beside it")
        return CohortSchema.load(found)
    return schema if isinstance(schema, CohortSchema) else CohortSchema.load(schema)


def manifest_file_problem(path: str | Path) -> str | None:
    """Why ``path`` cannot be read as a manifest file (it does not exist, or is a folder: then the
    ``manifest.csv`` inside is suggested when there is one), or None when it is a file.

    Example:
        >>> import tempfile, pathlib
        >>> folder = pathlib.Path(tempfile.mkdtemp())
        >>> _ = (folder / "manifest.csv").write_text("patient_id")
        >>> manifest_file_problem(folder)  # doctest: +ELLIPSIS
        'manifest ... is a folder, not a CSV file; did you mean .../manifest.csv?'
    """
    path = Path(path)
    if path.is_file():
        return None
    if path.is_dir():
        inside = path / "manifest.csv"
        hint = f"; did you mean {inside}?" if inside.is_file() else ""
        return f"manifest {path} is a folder, not a CSV file{hint}"
    return f"manifest {path} does not exist"


def check_manifest(path: str | Path, schema: CohortSchema | str | Path | None = None, *,
                   images: str = "header", progress: bool = False,
                   workers: int = 1) -> tuple[Manifest | None, list[ManifestProblem]]:
    """Parse and validate ``path``; returns ``(manifest or None, every problem found)``.

    ``schema``: a :class:`CohortSchema`, a path to one, or None for the schema beside the manifest.
    ``images``: how hard to check image cells: ``"none"``, ``"exists"``, ``"header"`` (default:
    the file opens and its header parses) or ``"full"`` (the whole image is read). Each distinct
    image is checked once, however many rows name it. ``workers`` > 1 reads the images of a
    ``"full"`` check in that many processes (``lungcore preprocess``'s pool); the problems are the
    same, in the same order. ``progress``: a progress bar (on stderr).

    The manifest is None when the header has a problem (a required column is missing, say); rows
    with problems are still in it (their bad cells read as absent). Its
    :meth:`~Manifest.far_out_values` are the warnings ``lungcore validate`` adds: numeric clinical
    values that are valid but far outside the rest of their column.

    Example:
        >>> import tempfile, pathlib
        >>> d = pathlib.Path(tempfile.mkdtemp())
        >>> _ = (d / "manifest.csv").write_text("patient_id,ct,os_time,os_event\\nP1,,12,1\\nP2,,-3,1\\n")
        >>> manifest, problems = check_manifest(d / "manifest.csv", CohortSchema())
        >>> manifest.ids, [str(p) for p in problems]
        (['P1', 'P2'], ["row 3, column 'os_time', value '-3': time must be >= 0"])
        >>> _ = (d / "no_ids.csv").write_text("id,ct\\nP1,\\n")
        >>> check_manifest(d / "no_ids.csv", CohortSchema())
        (None, [ManifestProblem(row=1, column='patient_id', value='', message='required column is missing', detail='')])
    """
    from tqdm import tqdm

    path = Path(path)
    if images not in IMAGE_CHECKS:
        raise ValueError(f"images must be one of {IMAGE_CHECKS}, got {images!r}")
    if not is_integer(workers, 1):
        raise ValueError(f"workers must be a positive integer, got {workers!r}")
    missing = manifest_file_problem(path)
    if missing:
        raise FileNotFoundError(missing)
    schema = _schema_for(path, schema)
    # bytes that are not UTF-8 survive as lone surrogates, so the cell holding them is named below
    with open(path, newline="", encoding="utf-8-sig", errors="surrogateescape") as f:
        reader = csv.reader(f)
        try:
            header = [h.strip() for h in next(reader)]
        except StopIteration:
            return None, [ManifestProblem(1, "", "", "the manifest is empty (no header row)")]
        # blank lines (a trailing newline too many, a gap) are skipped, as pandas and spreadsheets
        # do; the rows keep their numbers in the file
        numbered = [(r, record) for r, record in enumerate(reader, start=2) if any(c.strip() for c in record)]
    body = [record for _, record in numbered]
    parsed = _Rows(schema, header, len(body), path.parent, images)
    if images == "full" and workers > 1:
        parsed.checked.update(image_checks.check_all_full(parsed.image_paths(body), int(workers), progress))
    parsed.problems += _header_problems(header, parsed.columns, schema)
    header_ok = not parsed.problems  # a header problem does not hide the problems of the rows: go on
    for i, (r, record) in enumerate(tqdm(numbered, desc=f"check {path.name}", unit="row", disable=not progress,
                                         leave=False)):
        parsed.add(i, record, r)
    if not body:
        parsed.problem(2, schema.id_column, "", "the manifest has no rows")
    if not header_ok:
        return None, parsed.problems
    manifest = Manifest(path=path, schema=schema, rows=parsed.rows, ids=parsed.ids, patient_ids=parsed.patient_ids,
                        images=parsed.images, centres=parsed.centres, clinical_raw=parsed.clinical_raw,
                        endpoints=parsed.endpoints, label=parsed.label, label_mask=parsed.label_mask)
    return manifest, parsed.problems


def read_manifest(path: str | Path, schema: CohortSchema | str | Path | None = None, *,
                  images: str = "header", workers: int = 1) -> Manifest:
    """Parse and validate a manifest; :class:`ManifestError` lists every problem if there is any.

    ``images`` and ``workers`` as for :func:`check_manifest`.

    Example:
        >>> import tempfile, pathlib
        >>> from lungcore.data import ClinicalVariable
        >>> d = pathlib.Path(tempfile.mkdtemp())
        >>> _ = (d / "manifest.csv").write_text("patient_id,ct,smoking,os_time,os_event\\nP1,,never,12,1\\n")
        >>> read_manifest(d / "manifest.csv")
        Traceback (most recent call last):
        ...
        FileNotFoundError: no schema for .../manifest.csv: pass one, or put manifest.schema.json beside it
        >>> schema = CohortSchema(clinical=[ClinicalVariable("smoking", "categorical", ["never", "former"])])
        >>> _ = schema.save(d / "manifest.schema.json")
        >>> m = read_manifest(d / "manifest.csv")           # the schema beside the manifest
        >>> m.ids, m.clinical_raw, m.schema == schema
        (['P1'], {'smoking': ['never']}, True)
    """
    manifest, problems = check_manifest(path, schema, images=images, workers=workers)
    if problems:
        raise ManifestError(path, problems)
    assert manifest is not None
    return manifest
