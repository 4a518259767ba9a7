"""The cohort schema: JSON/YAML files, defaults per network shape, clear errors."""
from __future__ import annotations

import pytest

from lungcore.data import ClinicalVariable, CohortSchema


def test_defaults_per_kind():
    s = CohortSchema(kind="cmml")
    assert (s.kind, s.id_column, s.image_columns, s.endpoints) == ("survival", "patient_id", ["ct"], ["pfs", "os"])
    n = CohortSchema(kind="csfnet")
    assert (n.kind, n.id_column, n.image_columns, n.endpoints) == ("nodules", "nodule_id", ["ct_t0", "ct_t1"], [])
    assert n.centre_columns["ct_t1"] == ["t1_centre_x", "t1_centre_y", "t1_centre_z"]


def test_yaml_and_json_files(tmp_path):
    (tmp_path / "s.yaml").write_text(
        "kind: nodules\ncentre_frame: voxel\nclinical:\n"
        "  - {name: age, kind: numeric}\n  - {name: smoking, kind: categorical, categories: [former, current]}\n")
    s = CohortSchema.load(tmp_path / "s.yaml")
    assert s.centre_frame == "voxel" and s.cardinalities() == [0, 2]
    s.save(tmp_path / "s.json")
    assert CohortSchema.load(tmp_path / "s.json") == s


@pytest.mark.parametrize("kwargs, message", [
    (dict(kind="mri"), "kind must be one of survival"),
    (dict(centre_frame="ras"), "centre_frame must be 'world'"),
    (dict(clinical=[ClinicalVariable("age"), ClinicalVariable("age")]), "clinical variables repeat"),
    (dict(clinical=[ClinicalVariable("os_time")]), "clashes with a reserved column"),
    (dict(endpoints=["dfs"]), "endpoints must be among"),
])
def test_bad_schema(kwargs, message):
    with pytest.raises(ValueError, match=message):
        CohortSchema(**kwargs)


def test_bad_variables():
    with pytest.raises(ValueError, match="kind must be 'numeric' or 'categorical'"):
        ClinicalVariable("x", "ordinal")
    with pytest.raises(ValueError, match="an empty cell means missing"):
        ClinicalVariable("x", "categorical", ["a", ""])
    with pytest.raises(ValueError, match="clinical variable 'x': categories is empty"):
        ClinicalVariable("x", "categorical", [])
    with pytest.raises(ValueError, match="unknown keys"):
        CohortSchema.from_dict({"kind": "survival", "colour": "red"})


@pytest.mark.parametrize("name, text, message", [
    ("s.json", '{"version": 1, "kind": "surv\x01ival"}',
     "is not valid JSON: Invalid control character (line 1 column 29)"),
    ("s.json", '{"kind": "survival",\n}',
     "is not valid JSON: Expecting property name enclosed in double quotes (line 2 column 1)"),
    ("s.yaml", "kind: [survival\n", "is not valid YAML: expected ',' or ']'"),
    ("s.json", '{"kind": "survival", "colour": "red"}', ": unknown keys ['colour']"),
])
def test_a_schema_file_that_does_not_parse_names_the_file(tmp_path, name, text, message):
    path = tmp_path / name
    path.write_text(text)
    with pytest.raises(ValueError) as info:
        CohortSchema.load(path)
    assert str(info.value).startswith(f"schema file {path}")
    assert message in str(info.value)
    path.write_bytes(b'{"kind": "surv\xffival"}')
    with pytest.raises(ValueError, match=f"schema file .*{name} is not UTF-8 text: byte 14"):
        CohortSchema.load(path)
