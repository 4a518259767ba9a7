"""Shared fixtures of the training tests: tiny cohorts on disk (module-scoped) and toy networks."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
import toy  # noqa: E402,F401  (registers toy_survival / toy_classifier)

TINY = {"spacing": [8.0, 6.0, 6.0], "crop": [4, 8, 8]}


@pytest.fixture(scope="session")
def survival_cohort(tmp_path_factory):
    from lungcore.data import synth_cohort

    d = tmp_path_factory.mktemp("survival")
    synth_cohort("survival", d, n=24, preset="tiny", seed=1)
    return d / "manifest.csv"


@pytest.fixture(scope="session")
def nodule_cohort(tmp_path_factory):
    from lungcore.data import synth_cohort

    d = tmp_path_factory.mktemp("nodules")
    synth_cohort("nodules", d, n=24, preset="tiny", seed=1)
    return d / "manifest.csv"


@pytest.fixture(scope="session")
def cache_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("cache")


def tiny_config(model: str, manifest, cache, **kw):
    cfg = {"model": model, "epochs": 2, "progress": False, "seed": 0,
           "data": {"manifest": str(manifest), "batch_size": 6, "preprocess": dict(TINY), "cache_dir": str(cache),
                    "augment": False},
           "optim": {"lr": 1e-2, "warmup_epochs": 0.5}}
    for k, v in kw.items():
        if k in ("data", "optim"):
            cfg[k].update(v)
        else:
            cfg[k] = v
    return cfg
