"""Training reads every CT once: the pass that checks each image before the run folder is written
also crops it into the cache, with ``lungcore preprocess``'s function and pool."""
from __future__ import annotations

import shutil
from collections import Counter
from pathlib import Path

import pytest
from conftest import tiny_config

import lungcore.data.io.read as read_module
import lungcore.data.preprocess as preprocess_module
from lungcore.data import ManifestError, read_manifest
from lungcore.train import fit


def test_fit_fills_the_cache_first_with_the_preprocess_pool(tmp_path, survival_cohort, monkeypatch):
    calls = []
    real = preprocess_module.preprocess_manifest

    def recording(manifest, preprocessor, **kw):
        report = real(manifest, preprocessor, **kw)
        calls.append((len(manifest), kw, report))
        return report

    monkeypatch.setattr(preprocess_module, "preprocess_manifest", recording)
    cache = tmp_path / "cache"
    cfg = tiny_config("toy_survival", survival_cohort, cache, epochs=1, data={"num_workers": 2})
    fit(cfg, out=tmp_path / "run")
    assert len(calls) == 1
    rows, kw, report = calls[0]
    assert kw["workers"] == 2 and kw["shard"] == (0, 1) and kw["keep_going"]
    # every CT of the cohort (all splits) went through the pool, before any loader read a crop
    assert report["workers"] == 2 and report["misses"] == report["boxes"] == report["images"] > 0
    assert report["images_read"] == report["images"]  # each CT read once, in the workers
    assert report["failed"] == [] and len(list(cache.glob("??/*.npz"))) == report["boxes"]


def _count_reads(monkeypatch) -> Counter:
    """Every image the native readers open during the test, by path."""
    reads: Counter = Counter()
    for name in ("read_nifti", "read_dicom"):
        real = getattr(read_module, name)

        def counting(path, *a, _real=real, **kw):
            reads[str(Path(path).resolve())] += 1
            return _real(path, *a, **kw)

        monkeypatch.setattr(read_module, name, counting)
    return reads


def test_a_cold_run_reads_every_ct_once_and_a_warm_run_none(tmp_path, survival_cohort, monkeypatch):
    reads = _count_reads(monkeypatch)
    cache = tmp_path / "cache"
    cfg = tiny_config("toy_survival", survival_cohort, cache, epochs=1, data={"num_workers": 0})
    fit(cfg, out=tmp_path / "cold")
    images = {str(Path(p).resolve()) for row in read_manifest(survival_cohort).images for p in row if p is not None}
    assert len(images) > 10 and set(reads) == images and set(reads.values()) == {1}, reads
    reads.clear()
    fit(cfg, out=tmp_path / "warm")  # same cache: checks and crops come from it
    assert not reads


def test_bad_images_are_all_named_and_a_created_cache_is_removed(tmp_path, survival_cohort):
    cohort = tmp_path / "cohort"
    shutil.copytree(survival_cohort.parent, cohort)
    m = read_manifest(cohort / "manifest.csv")
    bad = sorted({Path(row[0]) for row in m.images if row[0] is not None and Path(row[0]).is_file()}, key=str)[:4]
    assert len(bad) == 4
    for p in bad[:2]:  # truncated .nii.gz files: the header reads, the voxels do not
        p.write_bytes(p.read_bytes()[: p.stat().st_size // 2])
    bad[2].write_bytes(b"not an image at all" * 20)   # unreadable from the first byte
    bad[3].write_bytes(bad[3].read_bytes()[:60])     # a header cut short
    out = tmp_path / "run"  # the cache defaults to run/cache: neither may be left behind
    cfg = tiny_config("toy_survival", cohort / "manifest.csv", out / "cache", epochs=1)
    with pytest.raises(ManifestError) as err:
        fit(cfg, out=out)
    text = str(err.value)   # all four in one report, as `validate --images full` gives them
    for p in bad:
        row = m.rows[next(i for i, r in enumerate(m.images) if r[0] is not None and Path(r[0]) == p)]
        assert f"row {row}, column 'ct'" in text and "unreadable image" in text
    assert not out.exists()
    # an existing cache keeps the crops of the good images (valid entries), and a retry reuses them
    shared = tmp_path / "shared-cache"
    shared.mkdir()
    with pytest.raises(ManifestError):
        fit(tiny_config("toy_survival", cohort / "manifest.csv", shared, epochs=1), out=tmp_path / "run2")
    assert shared.is_dir() and len(list(shared.glob("??/*.npz"))) > 0


def test_predict_and_evaluate_read_every_ct_once(tmp_path, survival_cohort, monkeypatch):
    """evaluate / predict: one read per CT (check and crop in one pass, through the pool), into a
    temporary folder that is gone afterwards, or into ``cache_dir``, where a second call finds every crop."""
    import tempfile

    from lungcore.train import evaluate, predict

    cfg = tiny_config("toy_survival", survival_cohort, tmp_path / "train-cache", epochs=1)
    best = fit(cfg, out=tmp_path / "run").best_checkpoint
    images = {str(Path(p).resolve()) for row in read_manifest(survival_cohort).images for p in row if p is not None}
    temp = tmp_path / "tmp"
    temp.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(temp))
    reads = _count_reads(monkeypatch)
    first = predict(best, survival_cohort)
    assert set(reads) == images and set(reads.values()) == {1}, reads
    assert list(temp.iterdir()) == []  # the temporary crops are deleted
    reads.clear()
    cache = tmp_path / "cache"
    metrics = evaluate(best, survival_cohort, cache_dir=cache, workers=2)  # read in the pool's workers
    assert not reads and len(list(cache.glob("??/*.npz"))) == len(images) and metrics
    second = predict(best, survival_cohort, cache_dir=cache)
    assert not reads  # every crop found in the cache
    assert first.equals(second)
