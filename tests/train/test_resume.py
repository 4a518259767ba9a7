"""Kill a real training process (SIGKILL) during epoch 3, --resume, compare with an uninterrupted run.

The kill is deterministic: ``LUNGCORE_KILL_AT_STEP=N`` makes the trainer SIGKILL itself right
after its N-th optimiser step (no sleeps, no timing)."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import torch

from conftest import tiny_config
from lungcore.models import read_checkpoint
from lungcore.train import fit

HERE = Path(__file__).parent


def test_sigkill_in_epoch_3_then_resume_matches_uninterrupted(tmp_path, nodule_cohort, cache_dir):
    cfg = tiny_config("toy_classifier", nodule_cohort, cache_dir, epochs=5, data={"batch_size": 4})
    reference = fit(cfg, out=tmp_path / "reference")
    n_train = len(json.loads((tmp_path / "reference" / "splits.json").read_text())["train"])
    steps_per_epoch = n_train // 4 if n_train > 4 else 1  # drop_last when the split exceeds a batch

    cfg_file = tmp_path / "cfg.json"
    cfg_file.write_text(json.dumps(cfg))
    out = tmp_path / "killed"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(HERE.parents[1]), os.environ.get("PYTHONPATH", "")]),
           "LUNGCORE_KILL_AT_STEP": str(2 * steps_per_epoch + 1)}  # the first step of epoch 3
    proc = subprocess.run([sys.executable, str(HERE / "_run_fit.py"), str(cfg_file), str(out)], env=env,
                          stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, timeout=300)
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    state = read_checkpoint(out / "last.pt")["extra"]["trainer"]
    assert state["epoch"] == 2  # epochs 1 and 2 finished; the kill lost only (part of) epoch 3
    assert "epoch 3/5 end" not in (out / "train.log").read_text()

    resumed = fit(cfg, out=out, resume=True)
    log = (out / "train.log").read_text()
    assert "resuming" in log and "at stage train epoch 3/5" in log
    assert log.count("stage train epoch 1/5 start") == 1  # not restarted from scratch
    assert [h["epoch"] for h in resumed.history] == [1, 2, 3, 4, 5]
    keys = ["train_loss", "val_loss", "val_roc_auc", "val_accuracy", "lr"]
    for a, b in zip(reference.history, resumed.history):
        assert {k: a[k] for k in keys} == {k: b[k] for k in keys}
    assert reference.test_metrics == resumed.test_metrics or all(
        (a != a and b != b) or a == b for a, b in zip(reference.test_metrics.values(), resumed.test_metrics.values()))
    w_ref = read_checkpoint(reference.best_checkpoint)["state_dict"]
    w_res = read_checkpoint(resumed.best_checkpoint)["state_dict"]
    assert all(torch.equal(w_ref[k], w_res[k]) for k in w_ref)


def test_resume_without_checkpoint_and_rerun_into_used_folder(tmp_path, nodule_cohort, cache_dir):
    import pytest

    cfg = tiny_config("toy_classifier", nodule_cohort, cache_dir, epochs=1)
    from lungcore.usage import UsageError

    with pytest.raises(UsageError, match="nothing to resume"):
        fit(cfg, out=tmp_path / "fresh", resume=True)
    fit(cfg, out=tmp_path / "run")
    with pytest.raises(UsageError, match="pass resume=True to continue it, overwrite=True to replace it"):
        fit(cfg, out=tmp_path / "run")


def test_resume_from_another_directory(tmp_path, nodule_cohort, cache_dir, monkeypatch):
    """A run started with relative paths saves them absolute, so ``--resume`` works from anywhere; a
    run saved before that (relative paths) is resumed by naming the file again, and without it the
    error says where the path was relative to."""
    import pytest
    import yaml

    from lungcore.models.registry import write_checkpoint
    from lungcore.usage import UsageError

    monkeypatch.chdir(nodule_cohort.parent.parent)
    rel = os.path.relpath(nodule_cohort)
    cfg = tiny_config("toy_classifier", rel, cache_dir, epochs=1)
    out = tmp_path / "run"
    fit(cfg, out=out)
    saved = yaml.safe_load((out / "config.yaml").read_text())
    assert saved["data"]["manifest"] == str(nodule_cohort.resolve())
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    fit(None, out=out, resume=True, epochs=2)                                  # no flag needed
    assert "epoch 2/2 end" in (out / "train.log").read_text()

    # a run saved by an older lungcore: its manifest relative to where it was started
    payload = read_checkpoint(out / "last.pt")
    payload["extra"]["train_config"]["data"]["manifest"] = rel
    write_checkpoint(payload, out / "last.pt")
    with pytest.raises(UsageError, match=r"^resume=True, out=\S+run: the run saved its manifest as \S+, relative to the "
                       r"directory it was started in.*pass manifest= with its path"):
        fit(None, out=out, resume=True, epochs=3)
    with pytest.raises(UsageError, match=r"manifest \S+other.csv \(the run was started with data.manifest"):
        fit(None, out=out, resume=True, epochs=3, manifest=str(tmp_path / "other.csv"))
    fit(None, out=out, resume=True, epochs=3, manifest=str(nodule_cohort))    # the same file, named in full
    assert yaml.safe_load((out / "config.yaml").read_text())["data"]["manifest"] == str(nodule_cohort)


def test_augmented_run_is_the_same_with_any_num_workers_and_across_a_kill(tmp_path, nodule_cohort, cache_dir):
    """Augmentation (on by default) is keyed by (epoch seed, sample), not by the process that loads
    the sample: a seeded run with 2 DataLoader workers, SIGKILLed in epoch 3 and resumed with none,
    ends bit for bit as an uninterrupted run with none."""
    cfg = tiny_config("toy_classifier", nodule_cohort, cache_dir, epochs=4, data={"batch_size": 4, "augment": True})
    reference = fit(cfg, out=tmp_path / "reference")
    n_train = len(json.loads((tmp_path / "reference" / "splits.json").read_text())["train"])
    steps_per_epoch = n_train // 4 if n_train > 4 else 1

    workers = {**cfg, "data": {**cfg["data"], "num_workers": 2}}
    cfg_file = tmp_path / "cfg.json"
    cfg_file.write_text(json.dumps(workers))
    out = tmp_path / "killed"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(HERE.parents[1]), os.environ.get("PYTHONPATH", "")]),
           "LUNGCORE_KILL_AT_STEP": str(2 * steps_per_epoch + 2)}  # mid epoch 3
    proc = subprocess.run([sys.executable, str(HERE / "_run_fit.py"), str(cfg_file), str(out)], env=env,
                          stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, timeout=300)
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    resumed = fit(cfg, out=out, resume=True)  # num_workers 0 now
    keys = ["train_loss", "val_loss", "val_roc_auc", "lr"]
    assert [{k: h[k] for k in keys} for h in reference.history] == [{k: h[k] for k in keys} for h in resumed.history]
    w_ref = read_checkpoint(reference.best_checkpoint)["state_dict"]
    w_res = read_checkpoint(resumed.best_checkpoint)["state_dict"]
    assert all(torch.equal(w_ref[k], w_res[k]) for k in w_ref)
    # and augmentation is on: without it the run differs
    plain = fit({**cfg, "data": {**cfg["data"], "augment": False}}, out=tmp_path / "plain")
    assert [h["train_loss"] for h in plain.history] != [h["train_loss"] for h in reference.history]
