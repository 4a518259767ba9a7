"""Manifest validation: every error names row, column and value; all problems are reported at once."""
from __future__ import annotations

import numpy as np
import pytest

from lungcore.cli import main
from lungcore.data import image_checks
from lungcore.data import ClinicalVariable, CohortSchema, ManifestError, check_manifest, read_manifest, write_nifti

HEADER = "patient_id,ct,age,smoking,pfs_time,pfs_event,os_time,os_event"


def _schema() -> CohortSchema:
    return CohortSchema(kind="survival", clinical=[ClinicalVariable("age", "numeric"),
                                                   ClinicalVariable("smoking", "categorical",
                                                                    ["never", "former", "current"])])


@pytest.fixture
def cohort(tmp_path):
    """A folder with one good NIfTI and a writer of manifests beside it."""
    write_nifti(tmp_path / "good.nii.gz", np.zeros((4, 6, 6)), np.diag([2.0, 1.0, 1.0, 1.0]))

    def write(*rows: str, header: str = HEADER):
        (tmp_path / "manifest.csv").write_text("\n".join([header, *rows]) + "\n")
        _schema().save(tmp_path / "manifest.schema.json")
        return tmp_path / "manifest.csv"
    return write


def _only(path, images="header"):
    manifest, problems = check_manifest(path, images=images)
    assert len(problems) == 1, [str(p) for p in problems]
    return problems[0]


def test_valid_manifest_and_masks(cohort):
    path = cohort("P1,good.nii.gz,61,former,3.5,1,10,0", "P2,,,,,,7.25,1")
    m = read_manifest(path)
    assert m.ids == ["P1", "P2"] and m.rows == [2, 3]
    assert m.images[1] == [None]
    assert m.endpoints["pfs_mask"].tolist() == [True, False]
    assert m.endpoints["os_time"].tolist() == [10.0, 7.25]
    values, mask = m.encode_clinical(m.fit_schema())
    assert mask.tolist() == [[True, True], [False, False]]
    assert values.dtype == np.float32 and values[1].tolist() == [0.0, 0.0]


@pytest.mark.parametrize("row, column, value, message", [
    ("P1,missing.nii.gz,61,former,3,1,10,0", "ct", "missing.nii.gz", "file not found"),
    ("P1,good.nii.gz,61,former,-3,1,10,0", "pfs_time", "-3", "time must be >= 0"),
    ("P1,good.nii.gz,61,former,nan,1,10,0", "pfs_time", "nan", "time must be a number"),
    ("P1,good.nii.gz,61,former,soon,1,10,0", "pfs_time", "soon", "time must be a number"),
    ("P1,good.nii.gz,61,former,inf,1,10,0", "pfs_time", "inf", "time must be finite"),
    ("P1,good.nii.gz,61,former,3,2,10,0", "pfs_event", "2", "event must be 0 (censored) or 1 (event)"),
    ("P1,good.nii.gz,61,former,3,yes,10,0", "pfs_event", "yes", "event must be 0 (censored) or 1 (event)"),
    ("P1,good.nii.gz,61,former,3,,10,0", "pfs_event", "", "pfs_time is given but pfs_event is empty"),
    ("P1,good.nii.gz,61,sometimes,3,1,10,0", "smoking", "sometimes",
     "unknown category; expected one of 'never', 'former', 'current'"),
    ("P1,good.nii.gz,sixty,former,3,1,10,0", "age", "sixty", "not a finite number"),
    (",good.nii.gz,61,former,3,1,10,0", "patient_id", "", "id must not be empty"),
])
def test_each_error_names_row_column_value(cohort, row, column, value, message):
    p = _only(cohort(row))
    assert (p.row, p.column, p.value, p.message) == (2, column, value, message)
    assert str(p) == f"row 2, column {column!r}, value {value!r}: {message}"


def test_blank_lines_are_skipped_and_rows_keep_their_numbers(cohort):
    """A gap and a trailing newline too many (CRLF) are no rows; a problem after the gap is named
    by its row in the file."""
    path = cohort("P1,good.nii.gz,61,former,3.5,1,10,0", "", "  ,  ", "P2,,,,,,7.25,1")
    path.write_text(path.read_text() + "\r\n")
    m, problems = check_manifest(path)
    assert problems == [] and m.ids == ["P1", "P2"] and m.rows == [2, 5]
    p = _only(cohort("P1,good.nii.gz,61,former,3.5,1,10,0", "", "P2,,,,,,-1,1"))
    assert (p.row, p.column) == (4, "os_time")


def test_subset_and_fit_schema_refuse_what_has_no_rows(cohort):
    m = read_manifest(cohort("P1,good.nii.gz,61,former,3.5,1,10,0", "P2,,,,,,7.25,1"))
    with pytest.raises(IndexError, match=r"indices must be positions in 0..1 of this manifest's 2 rows, got \[2, -1\]"):
        m.subset([0, 2, -1])
    with pytest.raises(ValueError, match="cannot fit a schema on no rows"):
        m.subset([]).fit_schema()


def test_duplicate_id(cohort):
    p = _only(cohort("P1,good.nii.gz,61,former,3,1,10,0", "P2,good.nii.gz,61,former,3,1,10,0",
                     "P1,good.nii.gz,70,never,3,1,10,0"))
    assert str(p) == "row 4, column 'patient_id', value 'P1': duplicate id (first seen in row 2)"


def test_unreadable_image(cohort, tmp_path):
    (tmp_path / "bad.nii.gz").write_bytes(b"this is not an image")
    p = _only(cohort("P1,bad.nii.gz,61,former,3,1,10,0"))
    assert (p.row, p.column, p.value) == (2, "ct", "bad.nii.gz")
    assert p.message == "unreadable image (not a NIfTI file or DICOM series lungcore can read)"
    assert p.detail  # the reader's own reason is kept
    # a truncated uncompressed NIfTI passes nibabel's header parse but not lungcore's size check
    write_nifti(tmp_path / "cut.nii", np.zeros((4, 6, 6)), np.eye(4))
    data = (tmp_path / "cut.nii").read_bytes()
    (tmp_path / "cut.nii").write_bytes(data[:-40])
    p = _only(cohort("P1,cut.nii,61,former,3,1,10,0"))
    assert p.message.startswith("unreadable image") and "truncated" in p.detail


def test_missing_column(cohort):
    p = _only(cohort("P1,good.nii.gz,61,3,1,10,0", header="patient_id,ct,age,pfs_time,pfs_event,os_time,os_event"))
    assert str(p) == "row 1, column 'smoking', value '': required column is missing"


def test_every_problem_reported_at_once(cohort):
    path = cohort("P1,missing.nii.gz,61,former,-3,1,10,0", "P2,good.nii.gz,61,sometimes,3,2,10,0",
                  "P1,good.nii.gz,61,former,3,1,10,0")
    with pytest.raises(ManifestError) as info:
        read_manifest(path)
    cells = [(p.row, p.column) for p in info.value.problems]
    assert cells == [(2, "ct"), (2, "pfs_time"), (3, "smoking"), (3, "pfs_event"), (4, "patient_id")]
    assert "5 problems" in str(info.value)


def test_nodule_manifest(tmp_path):
    write_nifti(tmp_path / "a.nii.gz", np.zeros((4, 6, 6)), np.eye(4))
    schema = CohortSchema(kind="csfnet", clinical=[ClinicalVariable("gender", "categorical")])
    header = "nodule_id,patient_id,ct_t0,ct_t1,t0_centre_x,t0_centre_y,t0_centre_z," \
             "t1_centre_x,t1_centre_y,t1_centre_z,gender,label"
    (tmp_path / "m.csv").write_text(f"{header}\n"
                                    "N1,S1,a.nii.gz,a.nii.gz,1,2,3,1,2,3,F,1\n"
                                    "N2,S1,a.nii.gz,,1,2,3,,,,M,\n"
                                    "N3,S2,a.nii.gz,a.nii.gz,1,2,,1,2,3,X,3\n")
    manifest, problems = check_manifest(tmp_path / "m.csv", schema)
    assert [str(p) for p in problems] == [
        "row 4, column 't0_centre_z', value '': centre needs all of t0_centre_x, t0_centre_y, t0_centre_z or none",
        "row 4, column 'label', value '3': label must be 0 (benign) or 1 (malignant)",
    ]
    assert manifest.patient_ids == ["S1", "S1", "S2"]
    assert manifest.label_mask.tolist() == [True, False, False]
    assert manifest.images[1][1] is None and np.isnan(manifest.centres[1, 1]).all()
    # categories undeclared in the schema are learned at fit time; an unseen one is an error when coding
    fitted = manifest.subset([0, 1]).fit_schema()
    assert fitted.variable("gender").categories == ["F", "M"]
    with pytest.raises(ValueError, match="unknown category 'X'"):
        fitted.encode(manifest.clinical_raw)


def test_validate_command(cohort, capsys):
    bad = cohort("P1,missing.nii.gz,61,former,-3,1,10,0", "P1,good.nii.gz,61,former,3,1,10,0")
    assert main(["validate", "--manifest", str(bad)]) == 1
    out = capsys.readouterr().err  # problems go to stderr
    assert "3 problems" in out
    assert "row 2, column 'ct', value 'missing.nii.gz': file not found" in out
    assert "row 2, column 'pfs_time', value '-3': time must be >= 0" in out
    assert "row 3, column 'patient_id', value 'P1': duplicate id (first seen in row 2)" in out
    good = cohort("P1,good.nii.gz,61,former,3,1,10,0")
    assert main(["validate", "--manifest", str(good)]) == 0
    assert "OK, 1 rows" in capsys.readouterr().out


def test_centre_outside_the_image(cohort, tmp_path):
    header = HEADER + ",centre_x,centre_y,centre_z"
    # good.nii.gz: 4 x 6 x 6 voxels, affine diag(2, 1, 1): depth runs along world x (2 mm), height along y
    assert not check_manifest(cohort("P1,good.nii.gz,61,former,3,1,10,0,2,3,4", header=header))[1]
    p = _only(cohort("P1,good.nii.gz,61,former,3,1,10,0,-2,-3,4", header=header))
    assert (p.row, p.column, p.value) == (2, "centre_x", "-2")
    assert p.message == ("centre lies outside the image: voxel index (z, y, x) [-1.0, -3.0, 4.0], image shape "
                         "(4, 6, 6) (are the coordinates LPS millimetres? RAS flips the signs of x and y)")


def test_full_check_in_worker_processes_finds_what_one_process_finds(cohort, tmp_path, capsys, monkeypatch):
    """``workers`` > 1 reads the images in the preprocessing pool: the same problems, in the same order."""

    header = HEADER + ",centre_x,centre_y,centre_z"
    (tmp_path / "bad.nii.gz").write_bytes(b"this is not an image")
    write_nifti(tmp_path / "cut.nii.gz", np.random.default_rng(0).normal(size=(8, 16, 16)), np.eye(4))
    data = (tmp_path / "cut.nii.gz").read_bytes()
    (tmp_path / "cut.nii.gz").write_bytes(data[:len(data) // 2])  # the header parses, the data is cut
    rows = ["P1,good.nii.gz,61,former,3,1,10,0,2,3,4", "P2,missing.nii.gz,61,former,3,1,10,0,,,",
            "P3,cut.nii.gz,61,former,3,1,10,0,,,", "P4,good.nii.gz,61,former,3,1,10,0,-2,-3,4",
            "P5,bad.nii.gz,61,former,-3,1,10,0,,,", "P6,cut.nii.gz,61,former,3,1,10,0,1,1,1",
            "P7,good.nii.gz,61,former,3,1,10,0,,,"]
    path = cohort(*rows, header=header)
    header_only = [(p.row, p.column) for p in check_manifest(path, images="header")[1]]
    assert (4, "ct") not in header_only  # only a full read finds the cut file
    one, problems_one = check_manifest(path, images="full", workers=1)

    def not_here(path, level):  # workers > 1: no full read in this process (the workers import their own)
        assert level != "full", f"{path} read in the parent process"
        return check(path, level)

    check = image_checks.check_image
    monkeypatch.setattr(image_checks, "check_image", not_here)
    two, problems_two = check_manifest(path, images="full", workers=2)
    assert [(p.row, p.column) for p in problems_one] == [(3, "ct"), (4, "ct"), (5, "centre_x"), (6, "ct"),
                                                         (6, "pfs_time"), (7, "ct")]
    assert [str(p) for p in problems_two] == [str(p) for p in problems_one]
    assert [p.detail for p in problems_two] == [p.detail for p in problems_one]
    assert two.ids == one.ids and two.images == one.images
    np.testing.assert_array_equal(two.centres, one.centres)
    monkeypatch.undo()
    # the command: --workers reaches the check, and the same lines come out
    outputs = []
    for workers in ("1", "2"):
        assert main(["validate", "--manifest", str(path), "--quiet", "--workers", workers]) == 1
        outputs.append(capsys.readouterr().err)
    assert outputs[0] == outputs[1] and "6 problems" in outputs[0]
    assert main(["validate", "--manifest", str(path), "--workers", "0"]) == 2
    assert "--workers must be an integer >= 1, got 0" in capsys.readouterr().err
    with pytest.raises(ValueError, match="workers must be a positive integer"):
        check_manifest(path, images="full", workers=0)


def test_each_image_is_checked_once(cohort, monkeypatch):
    """Rows that share an image (a scan with several nodules, a repeated CT) read it once."""
    reads = []
    check = image_checks.check_image
    monkeypatch.setattr(image_checks, "check_image", lambda path, level: reads.append(path) or check(path, level))
    path = cohort(*[f"P{i},good.nii.gz,61,former,3,1,10,0" for i in range(5)], "P9,missing.nii.gz,61,former,3,1,10,0")
    manifest, problems = check_manifest(path, images="full")
    assert [p.name for p in reads] == ["good.nii.gz", "missing.nii.gz"]
    assert [str(p) for p in problems] == ["row 7, column 'ct', value 'missing.nii.gz': file not found"]


@pytest.mark.parametrize("command", ["validate", "preprocess"])
def test_invalid_schema_json_beside_the_manifest_names_the_file(cohort, tmp_path, capsys, command):
    manifest = cohort("P1,good.nii.gz,61,former,3,1,10,0")
    schema = tmp_path / "manifest.schema.json"
    schema.write_text('{"version": 1, "kind": "surv\x01ival"}')
    extra = ["--out", str(tmp_path / "cache")] if command == "preprocess" else []
    assert main([command, "--manifest", str(manifest), *extra]) == 2
    err = capsys.readouterr().err
    assert err == (f"lungcore {command}: schema file {schema} is not valid JSON: Invalid control character "
                   "(line 1 column 29)\n")
    assert not (tmp_path / "cache").exists()


@pytest.mark.parametrize("command", ["validate", "preprocess"])
def test_a_manifest_that_is_a_folder_is_named_as_one(cohort, tmp_path, capsys, command):
    cohort("P1,good.nii.gz,61,former,3,1,10,0")
    extra = ["--out", str(tmp_path / "cache")] if command == "preprocess" else []
    assert main([command, "--manifest", str(tmp_path), *extra]) == 2
    assert capsys.readouterr().err == (f"lungcore {command}: manifest {tmp_path} is a folder, not a CSV file; "
                                       f"did you mean {tmp_path / 'manifest.csv'}?\n")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match=r"empty is a folder, not a CSV file$"):
        read_manifest(tmp_path / "empty")
    with pytest.raises(FileNotFoundError, match="missing.csv does not exist"):
        read_manifest(tmp_path / "missing.csv")
    assert not (tmp_path / "cache").exists()


# --------------------------------------------------------------------------------------------------
# clinical values far outside the cohort: valid (they fit float32), so a warning, not a problem


def _synth(kind: str, folder, n: int = 12):
    from lungcore.data import synth_cohort

    return synth_cohort(kind, folder, n=n, preset="tiny", dicom_every=0)["manifest"]


def _edit(manifest, row: int, column: str, value: str) -> str:
    """Set the cell (spreadsheet ``row``) of ``manifest``; returns that row's id."""
    import pandas as pd

    frame = pd.read_csv(manifest, dtype=str, keep_default_na=False)
    frame.loc[row - 2, column] = value
    frame.to_csv(manifest, index=False)
    return frame.loc[row - 2, "patient_id"]


def _validate(capsys, manifest, *flags: str) -> tuple[int, str, str]:
    capsys.readouterr()
    rc = main(["validate", "--manifest", str(manifest), "--images", "header", "--quiet", *flags])
    captured = capsys.readouterr()
    return rc, captured.out, captured.err


def test_a_far_out_clinical_value_warns_naming_row_column_id_and_value(tmp_path, capsys):
    manifest = _synth("survival", tmp_path / "cohort")
    ident = _edit(manifest, 4, "age", "1e25")
    rc, out, err = _validate(capsys, manifest)
    assert rc == 0, err  # a warning: the exit status is that of a valid manifest
    assert "OK, 12 rows" in out and out.rstrip().endswith("; 1 warning (stderr)")
    lines = err.splitlines()
    assert lines[0].startswith(f"lungcore validate: WARNING: 1 clinical value of {manifest} lies more than 1000 "
                               "standard deviations"), err
    assert len(lines) == 2 and lines[1].startswith(f"  row 4, column 'age', value '1e25': far outside the cohort "
                                                   f"(id {ident}): "), err
    assert "e+23 standard deviations from the column's median" in lines[1] or \
        "e+24 standard deviations from the column's median" in lines[1], err
    # the Python API: the manifest is valid, its far_out_values name the same cell
    m, problems = check_manifest(manifest, images="header")
    assert problems == []
    (w,) = m.far_out_values()
    assert (w.row, w.column, w.value) == (4, "age", "1e25") and f"(id {ident})" in w.message
    assert str(w) == lines[1].strip()
    # the same rule train's message uses: an age 1e25 from a median of ~65 is sd = |1e25 - median| / scale
    from lungcore.data.outliers import robust_centre_scale, sd_text

    centre, scale = robust_centre_scale([float(a) for a in m.clinical_raw["age"] if a])
    assert f"{sd_text(abs(1e25 - centre) / scale)} standard deviations" in w.message
    # with a problem too: both are said, and the problem sets the exit status
    _edit(manifest, 6, "os_time", "-1")
    rc, out, err = _validate(capsys, manifest)
    assert rc == 1 and out == ""
    assert "1 problem\n  row 6, column 'os_time', value '-1': time must be >= 0" in err
    assert "WARNING: 1 clinical value" in err and "row 4, column 'age', value '1e25'" in err


def test_several_far_out_values_are_listed_by_row(tmp_path, capsys):
    manifest = _synth("survival", tmp_path / "cohort")
    _edit(manifest, 7, "pdl1_tps", "-3e30")
    _edit(manifest, 3, "age", "6.5e6")           # a typo-sized slip, not only an overflow
    _edit(manifest, 5, "age", "inf")            # not finite: a problem, never a warning too
    rc, _, err = _validate(capsys, manifest)
    assert rc == 1
    warned = [line.strip() for line in err.split("WARNING:", 1)[1].splitlines()[1:]]
    assert [w.split(":")[0] for w in warned] == ["row 3, column 'age', value '6.5e6'",
                                                 "row 7, column 'pdl1_tps', value '-3e30'"], err


@pytest.mark.parametrize("kind", ["survival", "nodules"])
def test_the_bundled_synthetic_cohorts_do_not_warn(tmp_path, capsys, kind):
    manifest = _synth(kind, tmp_path / kind, n=40)
    rc, out, err = _validate(capsys, manifest)
    assert rc == 0 and err == "" and "warning" not in out, (out, err)
    assert check_manifest(manifest, images="exists")[0].far_out_values() == []


def test_a_constant_column_or_a_rare_flag_does_not_warn_nor_divide_by_zero(tmp_path, capsys):
    import warnings

    manifest = _synth("survival", tmp_path / "cohort")
    for row in range(2, 14):
        _edit(manifest, row, "age", "60")        # constant: no scale, nothing is far from it
        _edit(manifest, row, "pdl1_tps", "0")    # a flag: zero but for one row
    _edit(manifest, 9, "pdl1_tps", "1")
    with warnings.catch_warnings():
        warnings.simplefilter("error")           # no numpy division warning either
        rc, out, err = _validate(capsys, manifest)
        assert rc == 0 and err == "", err
        assert check_manifest(manifest, images="header")[0].far_out_values() == []
    from lungcore.data.outliers import far_out

    assert far_out([0.0] * 4999 + [1.0]) == [] and far_out([]) == [] and far_out([float("nan")] * 3) == []
    # mostly zeros: the scale is the MAD of the other values (2, 3, 5, 1e9: median 4)
    assert far_out([0.0] * 50 + [2.0, 3.0, 5.0, 1e9]) == [(53, pytest.approx(1e9 / (1.4826 * 4.0)))]


def test_real_heavy_tailed_clinical_values_do_not_warn(tmp_path):
    """lifelines' GBSG2 (686 real breast-cancer patients): hormone receptor levels run to about 50
    robust SDs from their medians; the 1e3 rule leaves them alone, an age of 1e25 does not."""
    datasets = pytest.importorskip("lifelines.datasets")
    frame = datasets.load_gbsg2()
    columns = ["age", "tsize", "pnodes", "progrec", "estrec"]
    out = frame[columns].astype(str)
    out.insert(0, "patient_id", [f"G{i}" for i in range(len(frame))])
    out.insert(1, "ct", "")
    out["os_time"], out["os_event"] = frame["time"].astype(str), frame["cens"].astype(str)
    path = tmp_path / "gbsg2.csv"
    out.to_csv(path, index=False)
    schema = CohortSchema(kind="survival", endpoints=["os"], clinical=[ClinicalVariable(c) for c in columns])
    m = read_manifest(path, schema, images="none")
    assert m.far_out_values() == []
    assert len(m.far_out_values(limit=20)) > 0  # the tail is there: a tighter rule would warn on real data
    out.loc[10, "age"] = "1e25"
    out.to_csv(path, index=False)
    assert [(w.row, w.column) for w in read_manifest(path, schema, images="none").far_out_values()] == [(12, "age")]
