"""Smoke test of the cohort-scale benchmark: a cohort of two tiny CTs (one .nii.gz, one DICOM series),
every lungcore provider and the floors once (MONAI left out: importing it takes longer than the
rest); the real run is ``python -m benchmarks.run --only cohort_scale`` (minutes)."""
from __future__ import annotations

import json

from benchmarks import run as bench_run


def test_cohort_scale_runs_and_writes_its_report(tmp_path, monkeypatch):
    monkeypatch.setenv("LUNGCORE_BENCH_DATA", str(tmp_path / "data"))
    monkeypatch.setenv("LUNGCORE_COHORT_N", "2")
    monkeypatch.setenv("LUNGCORE_COHORT_MONAI", "0")  # importing MONAI alone takes seconds
    assert bench_run.main(["--only", "cohort_scale", "--quick", "--device", "cpu", "--out", str(tmp_path / "out")]) == 0
    report = json.loads((tmp_path / "out" / "cohort_scale.json").read_text())
    assert report["cohort"] == {**report["cohort"], "cts": 2, "nifti_gz": 1, "dicom": 1}
    rates = report["ct_per_s"]
    assert {"lungcore_1w", "lungcore_2w", "lungcore_cached"} <= set(rates) and all(v > 0 for v in rates.values())
    assert report["floors"]["inflate_s"]["zlib"] > 0 and report["floors"]["read_nifti_over_inflate"] > 0
    assert set(report["stages_1w_s"]) == {"read_s", "resample_s", "hash_s", "cache_io_s"}
    assert all(0 < c < 4 for ps in report["cores_obtained"].values() for c in ps)
    rows = json.loads((tmp_path / "out" / "results.json").read_text())["results"]
    assert {r["provider"] for r in rows} == set(rates) and all(r["op"] == "cohort_scale" for r in rows)
