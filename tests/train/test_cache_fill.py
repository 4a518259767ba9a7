"""Training fills the crop cache before its first epoch with ``lungcore preprocess``'s function and pool."""
from __future__ import annotations

from conftest import tiny_config

import lungcore.data.preprocess as preprocess_module
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
    assert kw["workers"] == 2 and kw["shard"] == (0, 1)
    # every CT of the cohort (all splits) went through the pool, before any loader read a crop
    assert report["workers"] == 2 and report["misses"] == report["boxes"] == report["images"] > 0
    assert report["failed"] == [] and len(list(cache.glob("??/*.npz"))) == report["boxes"]
